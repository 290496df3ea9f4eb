"""TrEnv-X's hello world: start a sandbox, run a command in it, print its output.

    SANDBOX_BACKEND_ADDR=127.0.0.1 python examples/hello.py

The backend address comes from SANDBOX_BACKEND_ADDR (default 127.0.0.1, port 5000 or
SANDBOX_BACKEND_PORT); the template from TRENVX_TEMPLATE (default "default-sandbox").
"""

import asyncio
import os

from sandbox_sdk.sandbox import Sandbox


async def main():
    ci = await Sandbox.create(
        template=os.environ.get("TRENVX_TEMPLATE", "default-sandbox"),
        target_addr=os.environ.get("SANDBOX_BACKEND_ADDR", "127.0.0.1"),
    )
    try:
        p = await ci.process.start("python -c \"print('Hello World')\"")
        await p.wait()
        print(p.stdout)
    finally:
        await ci.close()


asyncio.run(main())
