"""trenvx guest agent: the program that runs inside every sandbox VM.

It speaks the protocol of E2B's envd (Connect RPC with the JSON codec over HTTP/1.1,
port 49983, plus the plain HTTP endpoints ``/health``, ``/init``, ``/files``, ``/envs``),
so that E2B's SDKs and trenvx's own host-side client can drive it.

Standard library only. Inside the guest it is installed as the package ``trenvx_agent``
and started with ``python3 -m trenvx_agent --port 49983``; on the host the same code is
``trenvx.guest.agent``. Modules import each other relatively and nothing else of trenvx.
"""

__version__ = "0.1.0"

#: The envd version this agent claims to be compatible with (reported by ``/health``
#: headers and ``/metrics``); E2B's SDKs gate features on the sandbox's envd version.
ENVD_COMPAT_VERSION = "0.5.7"

DEFAULT_PORT = 49983
