"""A raw TCP server for tests that need to see or break traffic below any library: it accepts on
127.0.0.1 (an ephemeral port, or the one given) and serves each connection in a thread of its own,
with the subclass's ``serve(conn)``."""

from __future__ import annotations

import contextlib
import socket
import threading


class RawUpstream:
    def __init__(self, port: int | None = None) -> None:
        self.sock = socket.create_server(("127.0.0.1", port or 0), backlog=64)  # SO_REUSEADDR on
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self.connections = 0
        """Connections accepted so far."""
        threading.Thread(target=self._accept, daemon=True).start()

    def serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes accept(): a bare close() would leave it listening
        self.sock.close()
