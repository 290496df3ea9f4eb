"""In-process stand-ins for the APIs of VMMs that are not installed here (Firecracker, Cloud
Hypervisor) and for their hybrid vsock socket. Each checks every request against the VMM's
documented API and answers as the documentation says, errors included."""
