#!/usr/bin/env bash
# trenvx: set up this machine, or run the backend.
#
#   scripts/start.sh setup   system packages (apt), the Python package (pip -e), the guest kernel
#   scripts/start.sh run     start the backend (builds the default template first if missing)
#   scripts/start.sh demo    build the default template, start the backend, create a sandbox,
#                            run python -c "print('Hello World')" in it, print the timings
#   scripts/start.sh test    setup, then the whole test suite (what .ci/run runs)
#   scripts/start.sh cluster [--detach] [-- serve options]
#                            a 3-node cluster on this machine: a 3-member etcd, 3 trenvx nodes
#                            (docs/cluster.md); in the foreground Ctrl-C stops it all, --detach
#                            returns once it is up
#   scripts/start.sh cluster-stop   stop a cluster started with --detach (or left behind)
#
# Environment:
#   TRENVX_DATA_ROOT   data root (default: data_root of configs/example_config.toml, else /var/lib/trenvx)
#   TRENVX_CONFIG      config file (default: configs/example_config.toml)
#   PYTHON             the Python to install into (default: python3)
#   TRENVX_CLUSTER_PORTS      cluster: the nodes' API ports, one per node (default "5001 5002 5003")
#   TRENVX_CLUSTER_ETCD_PORT  cluster: client port of etcd's first member (default: free ports)
#   TRENVX_CLUSTER_WAIT_S     cluster: how long to wait for every node to register (default 180)
#
# setup is idempotent: a second run only checks, and takes seconds.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SELF="$(basename "$0")"  # how this script's processes are recognised (cluster-stop)
PYTHON="${PYTHON:-python3}"
CONFIG="${TRENVX_CONFIG:-$REPO/configs/example_config.toml}"

APT_PACKAGES=(
    qemu-system-x86 qemu-utils buildah debootstrap debian-archive-keyring e2fsprogs
    busybox-static cpio tini xz-utils zstd sqlite3 iproute2 python3-venv
    nftables util-linux  # network slots: libnftables for sandbox rules, nsenter to start a VMM in its namespace
    gcc libc6-dev  # builds src/trenvx/vmm/preload (QEMU 7.2 must not punch holes in templates)
    openssh-client  # ssh root@<sandbox-id> (sandbox-cli ssh-config) and its end-to-end test
    chromium fonts-liberation  # the web IDE's end-to-end test drives Debian's browser headless (Playwright)
    etcd-server etcd-client  # the cluster's store (issue 17): its tests start a 3-member etcd on loopback
)

say() { printf '\033[1m==>\033[0m %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

data_root() {
    if [ -n "${TRENVX_DATA_ROOT:-}" ]; then
        printf '%s\n' "$TRENVX_DATA_ROOT"
        return
    fi
    "$PYTHON" - "$CONFIG" <<'EOF'
import sys, tomllib, pathlib
p = pathlib.Path(sys.argv[1])
root = "/var/lib/trenvx"
if p.is_file():
    try:
        root = tomllib.loads(p.read_text()).get("data_root") or root
    except Exception as e:  # an invalid config is reported by trenvx itself later
        print(f"warning: cannot read data_root from {p}: {e}", file=sys.stderr)
r = pathlib.Path(root)
print(r if r.is_absolute() else (p.parent / r).resolve())
EOF
}

setup_apt() {
    local missing=() pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        if [ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)" != "install ok installed" ]; then
            missing+=("$pkg")
        fi
    done
    if [ ${#missing[@]} -eq 0 ]; then
        say "system packages: all ${#APT_PACKAGES[@]} present"
        return
    fi
    [ "$(id -u)" -eq 0 ] || die "missing packages (${missing[*]}); run setup as root (apt-get install needs it)"
    local need_update=0
    for pkg in "${missing[@]}"; do
        if ! apt-cache policy "$pkg" 2>/dev/null | grep -q 'Candidate: [^(]'; then
            need_update=1
        fi
    done
    if [ $need_update -eq 1 ]; then
        say "apt-get update (apt does not know: ${missing[*]})"
        # A third-party repository that cannot be reached makes this exit non-zero while
        # Debian's own indexes were refreshed: the install below is the real check.
        apt-get update || say "apt-get update reported errors; trying the install anyway"
    fi
    say "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
}

setup_pip() {
    local stamp_dir stamp want
    stamp_dir="$("$PYTHON" -c 'import sys; print(sys.prefix)')"
    [ -w "$stamp_dir" ] || stamp_dir="${XDG_CACHE_HOME:-$HOME/.cache}/trenvx"
    stamp="$stamp_dir/.trenvx-setup.stamp"
    want="$( { sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1; echo "$REPO"; "$PYTHON" -c 'import sys; print(sys.executable)'; } | sha256sum | cut -d' ' -f1)"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] &&
        "$PYTHON" -c 'import trenvx, sys; sys.exit(0 if trenvx.__file__ and trenvx.__file__.startswith(sys.argv[1]) else 1)' "$REPO/src" 2>/dev/null; then
        say "python package: trenvx installed (pyproject.toml unchanged)"
        return
    fi
    say "pip install -e \"$REPO[test]\" into $("$PYTHON" -c 'import sys; print(sys.executable)')"
    "$PYTHON" -m pip install --disable-pip-version-check -q -e "$REPO[test]"
    mkdir -p "$(dirname "$stamp")"
    printf '%s\n' "$want" >"$stamp"
}

setup_kernel() {
    local root
    root="$(data_root)"
    mkdir -p "$root"
    say "guest kernel (data root $root)"
    "$PYTHON" -m trenvx.kernel --data-root "$root" --initramfs
}

cmd_setup() {
    setup_apt
    setup_pip
    setup_kernel
    say "setup done"
}

# The console script if it is on PATH, else the module through $PYTHON (same program).
tool() {
    local name="$1" module="$2"
    shift 2
    if command -v "$name" >/dev/null 2>&1; then
        "$name" "$@"
    else
        "$PYTHON" -m "$module" "$@"
    fi
}

default_template() {
    "$PYTHON" - "$CONFIG" <<'EOF'
import sys
from trenvx.config import ConfigError, load_config
try:
    print(load_config(sys.argv[1]).default_template)
except ConfigError as e:
    sys.exit(f"error: {e}")
EOF
}

# The default template of $CONFIG, built into the data root unless it is there already.
ensure_default_template() {
    local root template
    root="$(data_root)"
    template="$(default_template)" || exit 2
    if [ -e "$root/templates/$template/current/manifest.json" ]; then
        say "template $template: built ($(basename "$(readlink "$root/templates/$template/current")"))"
    else
        say "template $template: not built yet; building it (a few minutes the first time)"
        tool template-manager trenvx.cli.template_manager --config "$CONFIG" --quiet
    fi
}

# run [trenvx serve options, e.g. --keep]: build the default template if it is missing, then
# start the backend in the foreground (Ctrl-C stops it and kills its sandboxes).
cmd_run() {
    [ -f "$CONFIG" ] || die "config file $CONFIG not found (set TRENVX_CONFIG)"
    "$PYTHON" -c 'import trenvx' 2>/dev/null || die "trenvx is not installed; run: scripts/start.sh setup"
    ensure_default_template
    say "starting the backend (trenvx serve --config $CONFIG $*)"
    if command -v trenvx >/dev/null 2>&1; then
        exec trenvx serve --config "$CONFIG" "$@"
    fi
    exec "$PYTHON" -m trenvx.cli.admin serve --config "$CONFIG" "$@"
}

config_port() {
    "$PYTHON" -c 'import sys; from trenvx.config import load_config; print(load_config(sys.argv[1]).orchestrator.port)' "$CONFIG"
}

cmd_demo() {
    cd "$REPO"
    say "template default (template-manager --config $CONFIG)"
    tool template-manager trenvx.cli.template_manager --config "$CONFIG"
    local port log pid
    port="$(config_port)"
    log="$(data_root)/run/demo-server.log"
    mkdir -p "$(dirname "$log")"
    say "backend on 127.0.0.1:$port (log: $log)"
    "$PYTHON" -m trenvx.cli.admin serve --config "$CONFIG" >"$log" 2>&1 &
    pid=$!
    trap 'kill -TERM '"$pid"' 2>/dev/null; wait '"$pid"' 2>/dev/null || true' EXIT
    "$PYTHON" - "$port" "$pid" "$log" <<'EOF2'
import sys, time, os, httpx
port, pid, log = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code < 500:
            sys.exit(0)
    except httpx.HTTPError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit(f"the backend exited; its log:\n{open(log).read()[-2000:]}")
    time.sleep(0.1)
sys.exit(f"the backend did not answer on port {port} within 60 s; see {log}")
EOF2
    say "sandbox: python -c \"print('Hello World')\""
    "$PYTHON" examples/demo.py --port "$port"
}

cmd_test() {
    cmd_setup
    cd "$REPO"
    # A pyenv rehash that was killed leaves its lock; every login shell's rehash then waits ~60 s
    # on it (the agent tests' commands run `bash -l`). One older than a minute is stale.
    if [ -n "${PYENV_ROOT:-}${HOME:-}" ]; then
        find "${PYENV_ROOT:-$HOME/.pyenv}/shims" -maxdepth 1 -name .pyenv-shim -mmin +1 -delete 2>/dev/null || true
    fi
    say "tests: $PYTHON -m pytest $*"
    "$PYTHON" -m pytest -p no:cacheprovider "$@"
}

# --- cluster: N nodes and a 3-member etcd on this machine (docs/cluster.md) ----------------------

cluster_dir() { printf '%s/cluster\n' "$(data_root)"; }

# Whether `setup` has to run before a cluster starts: the package, QEMU, etcd, a guest kernel.
need_setup() {
    "$PYTHON" -c 'import trenvx' 2>/dev/null || return 0
    command -v qemu-system-x86_64 >/dev/null 2>&1 || return 0
    command -v etcd >/dev/null 2>&1 || return 0
    command -v setsid >/dev/null 2>&1 || return 0
    local k
    k="$(data_root)/kernels"
    [ -d "$k" ] && [ -n "$(find "$k" -mindepth 1 -maxdepth 1 ! -name '.*' -print -quit)" ] || return 0
    return 1
}

# pid's process is alive and its command line contains WORD (a recycled pid is not ours).
pid_is() {
    local pid="$1" word="$2"
    [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
    [ "$(ps -o stat= -p "$pid" 2>/dev/null | cut -c1)" != "Z" ] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$word"
}

# stop_pid PID NAME SECONDS: SIGTERM, then await_pid.
stop_pid() {
    [ -n "$1" ] || return 0
    kill -TERM "$1" 2>/dev/null || true
    await_pid "$@"
}

# await_pid PID NAME SECONDS: wait for PID to exit (one SIGTERM is enough: a second one makes the
# server skip its graceful stop), SIGKILL it after SECONDS; reaps it when it is our child.
await_pid() {
    local pid="$1" name="$2" grace="$3" waited=0
    [ -n "$pid" ] || return 0
    while [ -d "/proc/$pid" ] && [ "$(ps -o stat= -p "$pid" 2>/dev/null | cut -c1)" != "Z" ]; do
        if [ "$waited" -ge $((grace * 10)) ]; then
            say "$name (pid $pid) did not stop within ${grace} s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    wait "$pid" 2>/dev/null || true
}

# The per-node config files: the base config with the node's data_root and [network] slot_cidr.
# Written from the parsed config (relative paths made absolute), then read back to check.
write_node_configs() {
    local cl="$1" root="$2"
    shift 2
    "$PYTHON" - "$CONFIG" "$cl" "$root" "$@" <<'EOF'
import json, re, socket, sys
from pathlib import Path

from trenvx.config import ConfigError, load_config


def toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k, ensure_ascii=False)


def toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):  # JSON's string escapes are TOML's; the read-back below checks the rest
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML form for {v!r}")


def toml_dumps(d: dict, path: tuple[str, ...] = ()) -> str:
    lines = [f"[{'.'.join(toml_key(p) for p in path)}]"] if path else []
    lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in d.items() if not isinstance(v, dict)]
    out = "\n".join(lines) + "\n"
    for k, v in d.items():
        if isinstance(v, dict):
            out += "\n" + toml_dumps(v, path + (k,))
    return out


config, cl, root, ports = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), [int(p) for p in sys.argv[4:]]
try:
    base = load_config(config)
except ConfigError as e:
    sys.exit(f"error: {e}")
(cl / "conf").mkdir(parents=True, exist_ok=True)
for k, port in enumerate(ports, start=1):
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
    except OSError as e:
        sys.exit(f"error: port {port} (node n{k}) is not free ({e.strerror}); choose others with "
                 f"TRENVX_CLUSTER_PORTS=\"{' '.join(str(6000 + i) for i in range(1, len(ports) + 1))}\"")
    data_root = root if k == 1 else cl / f"n{k}"
    want = base.model_copy(update={
        "data_root": data_root,
        "network": base.network.model_copy(update={"slot_cidr": f"10.{200 + k}.0.0/16"}),
    })
    data = want.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
    data["data_root"] = str(data_root)
    data.setdefault("network", {})["slot_cidr"] = want.network.slot_cidr
    path = cl / "conf" / f"n{k}.toml"
    path.write_text(f"# node n{k} of scripts/start.sh cluster: written from {config} on each start\n"
                    + toml_dumps(data))
    back = load_config(path)
    if back.model_dump(exclude={"source_path"}) != want.model_dump(exclude={"source_path"}):
        sys.exit(f"error: {path} does not read back as the config it was written from (a bug: report it)")
EOF
}

# Wait until node 1 lists every node, or a process exits (its log is shown), or the time is up.
wait_cluster() {
    local port="$1" n="$2" wait_s="$3" cl="$4"
    shift 4
    "$PYTHON" - "$port" "$n" "$wait_s" "$cl" "$@" <<'EOF'
import os, sys, time
import httpx

port, n, wait_s, cl = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
procs = [a.split("=", 1) for a in sys.argv[5:]]  # name=pid
key = os.environ["TRENVX_API_KEY"]

def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

deadline = time.monotonic() + wait_s
seen: list[str] = []
last = ""
while time.monotonic() < deadline:
    for name, pid in procs:
        if not alive(int(pid)):
            log = f"{cl}/logs/{name}.log"
            try:
                tail = "\n".join(open(log, errors="replace").read().splitlines()[-25:])
            except OSError:
                tail = "(no log)"
            sys.exit(f"error: {name} exited while the cluster was starting; {log} ends:\n{tail}")
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/cluster/nodes", headers={"X-API-Key": key}, timeout=5)
        if r.status_code == 200:
            names = sorted(x["name"] for x in r.json())
            if names != seen:
                seen = names
                print(f"  registered: {', '.join(names) or '(none yet)'}", flush=True)
            if len(names) >= n:
                sys.exit(0)
        else:
            last = f"{r.status_code} {r.text[:200]}"
    except httpx.HTTPError as e:
        last = repr(e)
    time.sleep(0.5)
sys.exit(f"error: node n1 did not list {n} nodes within {wait_s:.0f} s (registered: {seen or 'none'}; "
         f"last answer: {last or 'ok'}); logs in {cl}/logs/")
EOF
}

# The cluster's API key: saved once (0600) under the cluster's directory, the same for every node.
cluster_api_key() {
    local file="$1/api_key"
    if [ ! -s "$file" ]; then
        (umask 077 && "$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(32))' >"$file.tmp" && mv "$file.tmp" "$file")
    fi
    chmod 600 "$file"
    cat "$file"
}

cluster_info() {
    local cl="$1" etcd_url="$2" key="$3"
    shift 3
    local ports=("$@") k first="${ports[0]}"
    echo
    say "cluster up: ${#ports[@]} nodes, etcd $etcd_url"
    for k in "${!ports[@]}"; do
        local n=$((k + 1)) root
        if [ "$n" -eq 1 ]; then root="$(data_root)"; else root="$cl/n$n"; fi
        printf '    n%d  http://127.0.0.1:%s  data_root %s  log %s\n' "$n" "${ports[$k]}" "$root" "$cl/logs/n$n.log"
    done
    cat <<EOF
    etcd: data and logs in $cl/etcd (log $cl/logs/etcd.log)
    API key (every node; saved in $cl/api_key): $key

Any node answers for every sandbox of the cluster. Try:
    export TRENVX_API_KEY="\$(cat $cl/api_key)"
    curl -s -H "X-API-Key: \$TRENVX_API_KEY" http://127.0.0.1:$first/cluster/nodes
    E2B_API_URL=http://127.0.0.1:$first E2B_SANDBOX_URL=http://127.0.0.1:$first E2B_API_KEY="\$TRENVX_API_KEY" \\
        $PYTHON -c 'from e2b import Sandbox; s = Sandbox.create("$(default_template)"); print(s.sandbox_id, s.commands.run("echo hi").stdout.strip()); s.kill()'
    sandbox-cli --port $first sandbox create -t $(default_template)
    sandbox-cli --port ${ports[${#ports[@]}-1]} sandbox ls          # the list of the whole cluster, through another node
    sandbox-cli --port ${ports[${#ports[@]}-1]} sandbox exec <id> -- echo hi
Nodes 2 and up copy node 1's templates by themselves, one at a time in the background (minutes for
large ones; GET /cluster/nodes shows what each holds); a create placed on a node that lacks its
template copies it first.
EOF
}

cmd_cluster() {
    local detach=0
    while [ $# -gt 0 ]; do
        case "$1" in
        --detach | -d) detach=1; shift ;;
        --) shift; break ;;
        -h | --help) usage; return ;;
        *) die "cluster: unknown option $1 (scripts/start.sh cluster [--detach] [-- trenvx serve options])" ;;
        esac
    done
    [ -f "$CONFIG" ] || die "config file $CONFIG not found (set TRENVX_CONFIG)"
    local ports=() p
    read -r -a ports <<<"$(printf '%s' "${TRENVX_CLUSTER_PORTS:-5001 5002 5003}" | tr ',' ' ')"
    [ ${#ports[@]} -ge 1 ] && [ ${#ports[@]} -le 9 ] ||
        die "TRENVX_CLUSTER_PORTS names ${#ports[@]} ports; give 1 to 9, one per node (e.g. \"5001 5002 5003\")"
    for p in "${ports[@]}"; do
        [[ "$p" =~ ^[0-9]+$ ]] && [ "$p" -ge 1 ] && [ "$p" -le 65535 ] ||
            die "TRENVX_CLUSTER_PORTS: $p is not a TCP port (1-65535)"
    done
    [ "$(printf '%s\n' "${ports[@]}" | sort -u | wc -l)" -eq ${#ports[@]} ] ||
        die "TRENVX_CLUSTER_PORTS names a port twice: ${ports[*]}"
    local wait_s="${TRENVX_CLUSTER_WAIT_S:-180}"
    [[ "$wait_s" =~ ^[0-9]+$ ]] || die "TRENVX_CLUSTER_WAIT_S must be whole seconds, got $wait_s"
    local etcd_port=()
    if [ -n "${TRENVX_CLUSTER_ETCD_PORT:-}" ]; then
        [[ "$TRENVX_CLUSTER_ETCD_PORT" =~ ^[0-9]+$ ]] ||
            die "TRENVX_CLUSTER_ETCD_PORT must be a port number, got $TRENVX_CLUSTER_ETCD_PORT"
        etcd_port=(--first-port "$TRENVX_CLUSTER_ETCD_PORT")
    fi

    local cl
    cl="$(cluster_dir)"
    mkdir -p "$cl/run" "$cl/logs"
    local sup
    sup="$(cat "$cl/run/supervisor.pid" 2>/dev/null || true)"
    if pid_is "$sup" "$SELF"; then
        die "a cluster is already running (pid $sup, data in $cl); stop it with: scripts/start.sh cluster-stop"
    fi
    if cluster_leftovers "$cl"; then
        die "processes of an earlier cluster still run (see $cl/run/pids); stop them with: scripts/start.sh cluster-stop"
    fi

    if [ $detach -eq 1 ]; then
        rm -f "$cl/run/ready"
        say "starting the cluster in the background (log: $cl/logs/cluster.log)"
        setsid "$BASH" "$0" cluster -- "$@" >"$cl/logs/cluster.log" 2>&1 </dev/null &
        local bg=$!
        while [ ! -s "$cl/run/ready" ]; do
            if ! pid_is "$bg" "$SELF"; then
                wait "$bg" 2>/dev/null || true
                tail -n 30 "$cl/logs/cluster.log" >&2
                die "the cluster did not start (log above: $cl/logs/cluster.log)"
            fi
            sleep 0.5
        done
        cat "$cl/run/ready"
        say "running in the background (pid $bg); stop it with: scripts/start.sh cluster-stop"
        return
    fi

    if need_setup; then
        say "this machine is not set up yet (or a part is missing): running setup first"
        cmd_setup
    fi
    command -v etcd >/dev/null 2>&1 || die "etcd is not on PATH after setup (Debian's etcd-server provides it)"
    ensure_default_template

    local root key
    root="$(data_root)"
    key="$(cluster_api_key "$cl")"
    if [ -n "${TRENVX_API_KEY:-}" ] && [ "$TRENVX_API_KEY" != "$key" ]; then
        say "note: TRENVX_API_KEY in your environment is not the cluster's key; the cluster uses $cl/api_key"
    fi
    export TRENVX_API_KEY="$key"
    write_node_configs "$cl" "$root" "${ports[@]}"

    # Children run in sessions of their own: a Ctrl-C reaches this script only, which stops the
    # nodes first (they leave the cluster and kill their sandboxes while etcd still answers), then etcd.
    echo "$$" >"$cl/run/supervisor.pid"
    : >"$cl/run/pids"
    rm -f "$cl/run/ready" "$cl/run/etcd.url"
    CLUSTER_NODE_PIDS=()
    CLUSTER_ETCD_PID=""
    CLUSTER_DIR="$cl"
    trap 'cluster_down; exit 130' INT
    trap 'cluster_down; exit 143' TERM
    trap 'cluster_down' EXIT

    rm -rf "$cl/etcd"/m*.etcd  # data of a cluster that was not stopped cleanly: a new one starts
    say "etcd: 3 members on 127.0.0.1 (data $cl/etcd)"
    setsid "$PYTHON" -m trenvx.cluster.etcd_local --dir "$cl/etcd" --members 3 "${etcd_port[@]}" \
        >"$cl/run/etcd.url" 2>"$cl/logs/etcd.log" </dev/null &
    CLUSTER_ETCD_PID=$!
    echo "etcd $CLUSTER_ETCD_PID" >>"$cl/run/pids"
    local waited=0
    while [ ! -s "$cl/run/etcd.url" ]; do
        if ! pid_is "$CLUSTER_ETCD_PID" "etcd_local"; then
            tail -n 30 "$cl/logs/etcd.log" >&2
            die "etcd did not start (log above: $cl/logs/etcd.log)"
        fi
        [ $waited -lt 600 ] || die "etcd did not start within 60 s; see $cl/logs/etcd.log"
        sleep 0.1
        waited=$((waited + 1))
    done
    local etcd_url
    etcd_url="$(head -n 1 "$cl/run/etcd.url")"
    say "etcd: $etcd_url"

    local k n node_root args=()
    for k in "${!ports[@]}"; do
        n=$((k + 1))
        if [ "$n" -eq 1 ]; then node_root="$root"; else node_root="$cl/n$n"; fi
        mkdir -p "$node_root"
        say "node n$n: http://127.0.0.1:${ports[$k]} (data_root $node_root, network slots 10.$((200 + n)).0.0/16)"
        TRENVX_DATA_ROOT="$node_root" setsid "$PYTHON" -m trenvx.cli.admin serve --config "$cl/conf/n$n.toml" \
            --cluster "$etcd_url" --node-name "n$n" --port "${ports[$k]}" \
            --advertise-url "http://127.0.0.1:${ports[$k]}" "$@" >"$cl/logs/n$n.log" 2>&1 </dev/null &
        CLUSTER_NODE_PIDS+=($!)
        echo "n$n $!" >>"$cl/run/pids"
        args+=("n$n=$!")
    done
    args+=("etcd=$CLUSTER_ETCD_PID")
    say "waiting until node n1 lists ${#ports[@]} nodes"
    wait_cluster "${ports[0]}" "${#ports[@]}" "$wait_s" "$cl" "${args[@]}"
    cluster_info "$cl" "$etcd_url" "$key" "${ports[@]}" >"$cl/run/ready.tmp"
    mv "$cl/run/ready.tmp" "$cl/run/ready"
    cat "$cl/run/ready"
    say "Ctrl-C stops the nodes (their sandboxes are killed), then etcd"

    # Until a signal: report any process that exits (a node killed to try failures is not the end).
    local pid code name
    while true; do
        local running=0
        for pid in "${CLUSTER_NODE_PIDS[@]}" "$CLUSTER_ETCD_PID"; do
            [ -n "$pid" ] && [ -d "/proc/$pid" ] && running=1
        done
        [ $running -eq 1 ] || break
        code=0
        wait -n -p pid || code=$?
        [ -n "${pid:-}" ] || continue
        name="$(awk -v p="$pid" '$2 == p {print $1}' "$cl/run/pids")"
        say "${name:-pid $pid} exited (code $code); see $cl/logs/${name:-cluster}.log"
        if [ "$pid" = "$CLUSTER_ETCD_PID" ]; then CLUSTER_ETCD_PID=""; fi
        local rest=()
        for p in "${CLUSTER_NODE_PIDS[@]}"; do [ "$p" = "$pid" ] || rest+=("$p"); done
        CLUSTER_NODE_PIDS=("${rest[@]}")
        pid=""
    done
    say "every process of the cluster has exited"
}

# Stop what this script started: the nodes (in parallel), then etcd. Runs once.
cluster_down() {
    trap - INT TERM EXIT
    local pid
    if [ ${#CLUSTER_NODE_PIDS[@]} -gt 0 ]; then
        say "stopping the nodes"
        for pid in "${CLUSTER_NODE_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
        for pid in "${CLUSTER_NODE_PIDS[@]}"; do await_pid "$pid" "node" 90; done
    fi
    if [ -n "${CLUSTER_ETCD_PID:-}" ]; then
        say "stopping etcd"
        stop_pid "$CLUSTER_ETCD_PID" "etcd" 30
    fi
    rm -f "$CLUSTER_DIR/run/pids" "$CLUSTER_DIR/run/supervisor.pid" "$CLUSTER_DIR/run/ready" "$CLUSTER_DIR/run/etcd.url"
    say "cluster stopped"
}

# Whether processes listed in the cluster's pid file (of a run that did not clean up) still run.
cluster_leftovers() {
    local cl="$1" name pid
    [ -f "$cl/run/pids" ] || return 1
    while read -r name pid; do
        if pid_is "$pid" "trenvx"; then return 0; fi
    done <"$cl/run/pids"
    return 1
}

cmd_cluster_stop() {
    local cl sup name pid
    cl="$(cluster_dir)"
    sup="$(cat "$cl/run/supervisor.pid" 2>/dev/null || true)"
    if pid_is "$sup" "$SELF"; then
        say "stopping the cluster (pid $sup)"
        kill -TERM "$sup"
        local waited=0
        while pid_is "$sup" "$SELF"; do
            [ $waited -lt 1500 ] || die "the cluster (pid $sup) did not stop within 150 s; see $cl/logs/cluster.log"
            sleep 0.1
            waited=$((waited + 1))
        done
        say "cluster stopped"
        return
    fi
    if ! cluster_leftovers "$cl"; then
        rm -f "$cl/run/pids" "$cl/run/supervisor.pid" "$cl/run/ready"
        say "no cluster runs (nothing in $cl/run)"
        return
    fi
    # The script that started them is gone (killed outright): stop what it left, nodes first.
    while read -r name pid; do
        [ "$name" = "etcd" ] || ! pid_is "$pid" "trenvx" || { say "stopping $name (pid $pid)"; stop_pid "$pid" "$name" 90; }
    done <"$cl/run/pids"
    while read -r name pid; do
        [ "$name" != "etcd" ] || ! pid_is "$pid" "trenvx" || { say "stopping etcd (pid $pid)"; stop_pid "$pid" "etcd" 30; }
    done <"$cl/run/pids"
    rm -f "$cl/run/pids" "$cl/run/supervisor.pid" "$cl/run/ready"
    say "cluster stopped"
}

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

case "${1:-}" in
setup) shift; cmd_setup "$@" ;;
run) shift; cmd_run "$@" ;;
demo) shift; cmd_demo "$@" ;;
test) shift; cmd_test "$@" ;;
cluster) shift; cmd_cluster "$@" ;;
cluster-stop) shift; cmd_cluster_stop "$@" ;;
-h | --help | help) usage ;;
*) usage >&2; exit 2 ;;
esac
