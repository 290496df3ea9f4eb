"""The guest kernel (Debian's cloud kernel package) and the initramfs that boots it."""

from trenvx.kernel.debian import GuestKernel, ensure_kernel
from trenvx.kernel.initramfs import ensure_initramfs

__all__ = ["GuestKernel", "ensure_kernel", "ensure_initramfs"]
