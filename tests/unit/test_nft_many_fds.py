"""libnftables waits on its netlink socket with select(): a socket numbered 1024 or more aborts
the process. With the process's descriptors near that (a server with ~200 sandboxes), trenvx.network.nft
runs a script through the ``nft`` command instead, in the same network namespace. Checked in a
namespace of the test's own, with more than 1024 descriptors open."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from trenvx.network import netns, nft

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


@pytest.fixture
def namespace() -> Iterator[str]:
    name = f"nfttest-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_a_script_runs_with_more_than_fd_setsize_descriptors_open(namespace: str) -> None:
    held = [os.open("/dev/null", os.O_RDONLY) for _ in range(nft.FD_SETSIZE + 16)]
    try:
        assert max(held) >= nft.FD_SETSIZE
        netns.run_in(namespace, nft.run, "add table inet trenvx_fdtest\nadd chain inet trenvx_fdtest c\n")
        listed = netns.run_in(namespace, nft.run, "list table inet trenvx_fdtest")
        assert "chain c" in listed
        with pytest.raises(nft.NftError, match="refused"):
            netns.run_in(namespace, nft.run, "add chain inet no_such_table c\n")
    finally:
        for fd in held:
            os.close(fd)
    # The host's namespace has no such table: it went to the test's namespace only.
    assert "trenvx_fdtest" not in nft.run("list tables")
    # And with few descriptors, the library path sees the same namespace's table.
    assert "chain c" in netns.run_in(namespace, nft.run, "list table inet trenvx_fdtest")
