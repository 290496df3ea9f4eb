"""schemathesis against the real server with real VMs: no 5xx for any generated request.

The unit suite fuzzes the API thoroughly with fake sandboxes (tests/unit/test_server_fuzz.py);
this run checks that requests which really start VMs (generated metadata, env vars, timeouts)
cannot make the VM layer fail either. Sandboxes are capped and short-lived; the snapshots it
takes are deleted after it.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from .server_helpers import running_server

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("schemathesis") is None, reason="schemathesis is not installed"),
]


def test_schemathesis_against_the_real_server(tmp_path, e2e_config, test_template) -> None:
    with running_server(tmp_path, e2e_config, template=test_template, max_sandboxes=3, default_timeout_s=8,
                        max_timeout_s=30, reaper_interval_s=0.5) as srv:
        r = subprocess.run(
            ["schemathesis", "run", f"{srv.url}/openapi.json", "--no-color", "--checks", "not_a_server_error",
             "-n", os.environ.get("TRENVX_FUZZ_EXAMPLES", "8"), "--max-time",
             os.environ.get("TRENVX_FUZZ_SECONDS", "30"), "--seed", os.environ.get("TRENVX_FUZZ_SEED", "3"),
             "--request-timeout", "60"],
            capture_output=True, text=True, timeout=600,
        )
        with srv.client() as c:
            for s in c.get("/sandboxes").json():
                c.delete(f"/sandboxes/{s['sandboxID']}")
            # the snapshots it took are builds in the shared template store: a later run would
            # start sandboxes from them under the names it generates again
            for _ in range(100):
                snapshots = c.get("/snapshots", params={"limit": 100}).json()
                if not snapshots:
                    break
                for snap in snapshots:
                    assert c.delete(f"/templates/{snap['snapshotID'].split(':')[0]}").status_code == 204
            assert c.get("/snapshots").json() == []
        server_errors = [line for line in srv.log(2000).splitlines() if " ERROR " in line]
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert not server_errors, "\n".join(server_errors[:20])
