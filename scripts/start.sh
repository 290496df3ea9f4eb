#!/usr/bin/env bash
# trenvx: set up this machine, or run the backend.
#
#   scripts/start.sh setup   system packages (apt), the Python package (pip -e), the guest kernel
#   scripts/start.sh run     start the backend (builds the default template first if missing)
#   scripts/start.sh demo    build the default template, start the backend, create a sandbox,
#                            run python -c "print('Hello World')" in it, print the timings
#   scripts/start.sh test    setup, then the whole test suite (what .ci/run runs)
#
# Environment:
#   TRENVX_DATA_ROOT   data root (default: data_root of configs/example_config.toml, else /var/lib/trenvx)
#   TRENVX_CONFIG      config file (default: configs/example_config.toml)
#   PYTHON             the Python to install into (default: python3)
#
# setup is idempotent: a second run only checks, and takes seconds.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
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

# run [trenvx serve options, e.g. --keep]: build the default template if it is missing, then
# start the backend in the foreground (Ctrl-C stops it and kills its sandboxes).
cmd_run() {
    local root template
    [ -f "$CONFIG" ] || die "config file $CONFIG not found (set TRENVX_CONFIG)"
    "$PYTHON" -c 'import trenvx' 2>/dev/null || die "trenvx is not installed; run: scripts/start.sh setup"
    root="$(data_root)"
    template="$(default_template)" || exit 2
    if [ -e "$root/templates/$template/current/manifest.json" ]; then
        say "template $template: built ($(basename "$(readlink "$root/templates/$template/current")"))"
    else
        say "template $template: not built yet; building it (a few minutes the first time)"
        tool template-manager trenvx.cli.template_manager --config "$CONFIG" --quiet
    fi
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
    say "tests: $PYTHON -m pytest $*"
    "$PYTHON" -m pytest -p no:cacheprovider "$@"
}

usage() {
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
}

case "${1:-}" in
setup) shift; cmd_setup "$@" ;;
run) shift; cmd_run "$@" ;;
demo) shift; cmd_demo "$@" ;;
test) shift; cmd_test "$@" ;;
-h | --help | help) usage ;;
*) usage >&2; exit 2 ;;
esac
