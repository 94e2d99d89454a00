"""A network path that a test can cut: an HTTP CONNECT proxy on loopback that kafka-python
clients go through (`proxy_url=proxy.url`), so that one client loses every broker while the
others, connected directly, keep them.

    proxy = ConnectProxy()
    consumer = KafkaConsumer(..., proxy_url=proxy.url)
    proxy.cut()     # from now on nothing passes, either way; nothing is refused either
    proxy.heal()    # traffic passes again
    proxy.close()

A cut is a black hole, like a dropped route or a firewall that drops packets: open tunnels
stay open and what is sent into them is read and thrown away, new connections are accepted and
never answered. The client sees no error, only silence until its own timeouts.
"""

from __future__ import annotations

import contextlib
import socket
import threading

from ledger.stack import procs


class ConnectProxy:
    def __init__(self) -> None:
        self._server = socket.create_server((procs.HOST, 0))
        self.url = f"http://{procs.HOST}:{self._server.getsockname()[1]}"
        self._cut = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self.tunnels = 0  # tunnels opened so far
        threading.Thread(target=self._accept, name="netcut-accept", daemon=True).start()

    def cut(self) -> None:
        self._cut.set()

    def heal(self) -> None:
        """Let traffic through again, on the tunnels still open and on new ones. What was
        sent during the cut stays lost, as on a network that dropped it."""
        self._cut.clear()

    def close(self) -> None:
        self._cut.set()
        self._server.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()

    def _keep(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return  # closed
            self._keep(client)
            threading.Thread(target=self._tunnel, args=(client,), daemon=True).start()

    def _tunnel(self, client: socket.socket) -> None:
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(4096)
                if not chunk:
                    return
                head += chunk
            if self._cut.is_set():
                self._drain(client)  # never answered
                return
            request, rest = head.split(b"\r\n\r\n", 1)
            method, target = request.split()[:2]
            if method != b"CONNECT":
                client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
                return
            host, port = target.decode().rsplit(":", 1)
            upstream = socket.create_connection((host, int(port)), timeout=10)
            upstream.settimeout(None)
            self._keep(upstream)
            self.tunnels += 1
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            if rest:
                upstream.sendall(rest)
            threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()
            self._pipe(client, upstream)
        except OSError:
            return

    def _pipe(self, source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if not self._cut.is_set():
                    target.sendall(data)

    def _drain(self, sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while sock.recv(65536):
                pass
