"""trenvx: sandboxes for AI agents, as VMs restored from shared snapshots in milliseconds."""

__version__ = "0.1.0"
