"""A TCP link a test can cut: clients reach the broker through it, and ``cut()`` makes the broker unreachable as a
broker restart or a network outage would, until ``restore()``.

    with broker_behind_link(tmp_path / "tansu.log") as (link, broker):   # clients are told to come through the link
        ...
        link.cut("refuse")      # open connections reset, new ones refused: the broker restarting
        link.cut("blackhole")   # open connections go silent, new ones hang: a network partition
        link.restore()

Threads and blocking sockets, so it runs beside the test's own code and processes whatever they do.
"""
from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from stream.broker import EmbeddedBroker, free_port


class BrokerLink:
    def __init__(self, listen_port: int, target_port: int, host: str = "127.0.0.1"):
        self.listen_port, self.target_port, self.host = listen_port, target_port, host
        self.mode = "open"                     # open | refuse | blackhole
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None

    def start(self) -> "BrokerLink":
        self._listen()
        return self

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.listen_port))
        listener.listen(128)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True, name="link-accept").start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return                          # the listener was closed: refused or stopped
            if self.mode == "blackhole":
                self._track(client)             # accepted, never answered
                continue
            if listener is not self._listener:
                client.close()                  # came in as the listener closed (a "refuse" cut)
                continue
            try:
                upstream = socket.create_connection((self.host, self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            self._track(client, upstream)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True, name="link-pump").start()

    def _track(self, *sockets: socket.socket) -> None:
        with self._lock:
            self._sockets.update(sockets)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                while self.mode == "blackhole":
                    time.sleep(0.05)                 # hold the bytes; a partition delivers nothing
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                self._close(sock)

    def _close(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def _close_all(self) -> None:
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
            except OSError:
                pass
            self._close(sock)

    def cut(self, mode: str = "refuse") -> None:
        """``refuse``: every open connection reset and no new one accepted (a broker going down). ``blackhole``:
        connections stay open but nothing passes either way, and new ones are accepted and never answered."""
        if mode not in ("refuse", "blackhole"):
            raise ValueError(f"cut mode {mode!r}: refuse or blackhole")
        self.mode = mode
        if mode == "refuse":
            self._close_listener()
            self._close_all()

    def restore(self) -> None:
        """Let traffic through again. After a blackhole, the held connections are reset: a client that kept waiting
        on one reconnects, as it would once a real partition healed after its timeouts."""
        previous, self.mode = self.mode, "open"
        if previous == "blackhole":
            self._close_all()
        if self._listener is None:
            self._listen()

    def stop(self) -> None:
        self.mode = "open"
        self._close_listener()
        self._close_all()

    def _close_listener(self) -> None:
        """Stop listening. ``close()`` alone does not: the accepting thread's blocked ``accept()`` keeps the socket
        listening and let the next connection through (a client reconnecting at once got past a "refuse" cut, and
        an ingest the test had cut off took its whole file); ``shutdown`` wakes it with an error."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        try:
            listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        listener.close()

    def __enter__(self) -> "BrokerLink":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextmanager
def broker_behind_link(log_file: Path) -> Iterator[tuple[BrokerLink, EmbeddedBroker]]:
    """A broker of the test's own whose clients all reach it through a ``BrokerLink``: its
    ``bootstrap_servers`` is the link's address, and so is the address it advertises."""
    link_port, broker_port = free_port(), free_port()
    with BrokerLink(link_port, broker_port) as link, \
            EmbeddedBroker(broker_port, log_file=log_file, advertised_port=link_port) as broker:
        yield link, broker
