"""Sandbox networking: a network namespace per sandbox (a *slot*), egress rules, DNS and the
egress proxy that enforces domain rules. Below :mod:`trenvx.sandbox`, above nothing but the OS."""
