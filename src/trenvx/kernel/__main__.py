"""``python -m trenvx.kernel --data-root DIR [--version auto] [--initramfs]``: fetch the guest
kernel (cached) and print the path of its bzImage (and of the initramfs with --initramfs)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from trenvx.config import DEFAULT_DATA_ROOT
from trenvx.layout import DataRoot
from trenvx.build_errors import BuildError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trenvx.kernel", description=__doc__)
    ap.add_argument(
        "--data-root",
        default=os.environ.get("TRENVX_DATA_ROOT") or str(DEFAULT_DATA_ROOT),
        help="trenvx data root (default: $TRENVX_DATA_ROOT or %(default)s)",
    )
    ap.add_argument("--version", default="auto", help="kernel ABI such as 6.1.0-28, or 'auto' (default)")
    ap.add_argument("--initramfs", action="store_true", help="also build the initramfs and print its path")
    args = ap.parse_args(argv)

    from trenvx.kernel.debian import ensure_kernel
    from trenvx.kernel.initramfs import ensure_initramfs

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    async def go() -> None:
        dr = DataRoot(Path(args.data_root).resolve())
        k = await ensure_kernel(dr, args.version, log=log)
        print(k.bzimage)
        if args.initramfs:
            print(await ensure_initramfs(k))

    try:
        asyncio.run(go())
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
