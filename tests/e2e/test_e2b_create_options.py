"""E2B create options trenvx does not implement yet are refused, through the unmodified ``e2b``
package against the session backend (issue 13 item 13): the SDK's error carries the server's
message naming the option; the SDK's defaults and the options' harmless values still create a
sandbox that runs commands. tests/unit/test_server_unimplemented.py covers every listed option."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e

e2b = pytest.importorskip("e2b")


def _running_ids() -> set[str]:
    return {s.sandbox_id for s in e2b.Sandbox.list().next_items()}


def test_an_unimplemented_option_is_refused_with_a_message_naming_it(e2b_env: str, test_template: str) -> None:
    before = _running_ids()
    with pytest.raises(e2b.exceptions.SandboxException) as ei:
        e2b.Sandbox.create(test_template, timeout=60, volume_mounts={"/mnt/data": "data"})
    message = str(ei.value)
    assert "body field volumeMounts" in message and "not implemented in trenvx yet" in message, message
    with pytest.raises(e2b.exceptions.SandboxException, match="body field mcp: .*not implemented in trenvx yet"):
        e2b.Sandbox.create(test_template, timeout=60, mcp={"exa": {"apiKey": "k"}})
    assert _running_ids() <= before  # nothing was started


def test_defaults_and_harmless_values_still_create(e2b_env: str, test_template: str) -> None:
    sbx = e2b.Sandbox.create(test_template, timeout=120, secure=True, lifecycle={"on_timeout": "kill"})
    try:
        assert sbx.commands.run("echo ok").stdout == "ok\n"
    finally:
        sbx.kill()
