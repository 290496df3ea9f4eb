"""Many nodes, one API: membership and state in etcd, placement of creates, routing of a
sandbox's requests to the node that owns it. Single-machine mode uses none of this."""
