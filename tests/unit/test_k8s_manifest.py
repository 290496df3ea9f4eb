"""deploy/kubernetes: the node DaemonSet and its image, checked offline (no Kubernetes here).

The manifest's container args are parsed by ``trenvx serve``'s own command line, after the
``$(VAR)`` expansion Kubernetes does, so an option renamed in the CLI or a variable the pod does
not define fails here; the image's packages are checked against scripts/start.sh's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import typer

yaml = pytest.importorskip("yaml")

from trenvx.cli.admin import app as admin_app  # noqa: E402
from trenvx.cluster.etcd import parse_etcd_url  # noqa: E402
from trenvx.config import ClusterConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "deploy" / "kubernetes" / "trenvx-node.yaml"
DOCKERFILE = REPO / "deploy" / "kubernetes" / "Dockerfile"
START_SH = REPO / "scripts" / "start.sh"
NOT_IN_IMAGE = {"chromium", "fonts-liberation", "openssh-client", "etcd-server"}
"""APT_PACKAGES of scripts/start.sh a node's image does without: the tests' (a browser, ssh, a local etcd)."""
VAR_RE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


@pytest.fixture(scope="module")
def docs() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for doc in yaml.safe_load_all(MANIFEST.read_text()):
        if doc is None:
            continue
        assert doc["kind"] not in out, f"two {doc['kind']} objects in {MANIFEST}"
        out[doc["kind"]] = doc
    assert set(out) == {"Namespace", "Service", "DaemonSet"}, set(out)
    return out


@pytest.fixture(scope="module")
def container(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (c,) = docs["DaemonSet"]["spec"]["template"]["spec"]["containers"]
    return c


def expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion of a container arg (a variable it does not define stays as written)."""
    return VAR_RE.sub(lambda m: env.get(m.group(1), m.group(0)), arg)


def serve_params(args: list[str]) -> dict[str, Any]:
    """The arguments as ``trenvx serve`` parses them (its real command line, not a copy of it)."""
    group = typer.main.get_command(admin_app)
    assert args[0] == "serve", f"the image runs trenvx; the args must start with its subcommand serve: {args}"
    cmd = group.commands["serve"]  # type: ignore[attr-defined]
    with cmd.make_context("serve", list(args[1:])) as ctx:
        return dict(ctx.params)


def volume_of(docs: dict[str, dict[str, Any]], container: dict[str, Any], mount_path: str) -> dict[str, Any]:
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
    assert mount_path in mounts, f"nothing is mounted at {mount_path}: {sorted(mounts)}"
    volumes = {v["name"]: v for v in docs["DaemonSet"]["spec"]["template"]["spec"]["volumes"]}
    return volumes[mounts[mount_path]["name"]]


def test_the_daemonset_runs_privileged_with_kvm_and_tun(docs, container) -> None:
    assert container["securityContext"]["privileged"] is True
    for dev, kind in (("/dev/kvm", "CharDevice"), ("/dev/net/tun", "CharDevice")):
        vol = volume_of(docs, container, dev)
        assert vol["hostPath"]["path"] == dev and vol["hostPath"]["type"] == kind, vol


def test_the_data_root_is_on_the_host_where_the_server_looks(docs, container) -> None:
    env = {e["name"]: e.get("value") for e in container["env"]}
    data = volume_of(docs, container, env["TRENVX_DATA_ROOT"])
    assert data["hostPath"]["path"] and data["hostPath"]["type"] == "DirectoryOrCreate"


def test_the_args_join_the_cluster_and_advertise_the_pod(docs, container) -> None:
    env_names = {e["name"] for e in container["env"]}
    for arg in container["args"]:
        for var in VAR_RE.findall(arg):
            assert var in env_names, f"arg {arg!r} refers to $({var}), which the container does not define"
    env = {"POD_IP": "10.244.1.7", "NODE_NAME": "worker-3.example"}
    params = serve_params([expand(a, env) for a in container["args"]])
    assert params["cluster"] and parse_etcd_url(params["cluster"])
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == "api")
    assert params["advertise_url"] == f"http://10.244.1.7:{port}"
    assert params["node_name"] == "worker-3.example"
    assert params["host"] == "0.0.0.0"
    ClusterConfig.model_validate({"etcd": params["cluster"], "name": params["node_name"],
                                  "advertise_url": params["advertise_url"]})  # what serve merges into [cluster]
    config = Path(params["config"])
    assert config.is_relative_to("/opt/trenvx"), config
    assert (REPO / config.relative_to("/opt/trenvx")).is_file(), f"the image has no {config}"
    assert params["port"] in (None, port)


def test_a_non_loopback_host_has_its_api_key_from_a_secret(container) -> None:
    refs = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef") for e in container["env"]}
    ref = refs.get("TRENVX_API_KEY")
    assert ref and ref["name"] and ref["key"] and not ref.get("optional", False), ref


def test_probes_ask_health_on_the_api_port(container) -> None:
    names = {p["name"] for p in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health", (probe, get)
        assert get["port"] in names or get["port"] in {p["containerPort"] for p in container["ports"]}, (probe, get)


def test_resources_and_a_grace_period_for_sandboxes_to_end(docs, container) -> None:
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    assert "memory" not in container["resources"].get("limits", {}), "a memory limit OOM-kills the guests' VMMs"
    assert docs["DaemonSet"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 30


def test_the_headless_service_selects_the_daemonsets_pods(docs, container) -> None:
    svc, ds = docs["Service"], docs["DaemonSet"]
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert ds["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert {svc["metadata"]["namespace"], ds["metadata"]["namespace"]} == {docs["Namespace"]["metadata"]["name"]}
    names = {p["name"] for p in container["ports"]}
    assert all(p["targetPort"] in names for p in svc["spec"]["ports"])


def apt_packages_of_start_sh() -> set[str]:
    m = re.search(r"^APT_PACKAGES=\((.*?)^\)", START_SH.read_text(), re.S | re.M)
    assert m, "APT_PACKAGES=( ... ) not found in scripts/start.sh"
    return {w for line in m.group(1).splitlines() for w in line.split("#", 1)[0].split()}


def test_the_image_has_the_runtime_packages_and_runs_trenvx() -> None:
    text = DOCKERFILE.read_text()
    installs = " ".join(re.findall(r"apt-get install[^&]*", text.replace("\\\n", " ")))
    have = set(installs.split())
    missing = apt_packages_of_start_sh() - NOT_IN_IMAGE - have
    assert not missing, f"scripts/start.sh installs {sorted(missing)}; the image does not"
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))
    assert Path(entry[-1]).name == "trenvx", entry  # the manifest's args start with the subcommand
    for src in ("src", "configs", "pyproject.toml"):
        assert re.search(rf"^COPY {re.escape(src)}\b", text, re.M), f"the image lacks {src}"


def test_serve_params_rejects_an_unknown_option() -> None:
    """The check above would catch an option the CLI no longer has."""
    with pytest.raises(Exception, match="No such option: --advertise-adress"):
        serve_params(["serve", "--advertise-adress", "http://10.0.0.1:5000"])
