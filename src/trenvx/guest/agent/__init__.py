"""trenvx guest agent: the program that runs inside every sandbox VM.

It speaks the protocol of E2B's envd (Connect RPC with the JSON codec over HTTP/1.1,
port 49983, plus the plain HTTP endpoints ``/health``, ``/init``, ``/files``, ``/envs``),
so that E2B's SDKs and trenvx's own host-side client can drive it.

Standard library only. Inside the guest it is installed as the package ``trenvx_agent``
and started with ``python3 -m trenvx_agent --port 49983``; on the host the same code is
``trenvx.guest.agent``. Modules import each other relatively and nothing else of trenvx.
"""

__version__ = "0.1.0"

#: The envd version this agent claims to be compatible with (``X-Envd-Version`` of
#: ``/health``, and ``envdVersion`` in the server's sandbox answers). E2B's SDKs gate
#: features on it; this is the newest version whose gated features the agent serves. In
#: e2b 2.63 the gates are: recursive watch 0.1.4, stdin choice 0.3.0, default user 0.4.0,
#: CloseStdin 0.5.2, octet-stream upload 0.5.7, file metadata (``user.e2b.*`` xattrs) 0.6.2,
#: entry info on watch events 0.6.3, watching network mounts on request 0.6.4, and none newer.
ENVD_COMPAT_VERSION = "0.6.4"

DEFAULT_PORT = 49983
