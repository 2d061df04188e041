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

import asyncio
import socket
import ssl
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


class TlsFront:
    """A TLS listener in front of the broker, as a secured cluster's is: clients speak TLS to it (and must present a
    certificate its ``client_ca`` signed, where one is given: mTLS), and it passes the bytes on to the broker in
    plain text. An asyncio server on a thread of its own (one SSL object is never read and written from two threads).
    ``connections`` counts the clients whose handshake succeeded."""

    def __init__(self, listen_port: int, target_port: int, cert_file: Path, key_file: Path,
                 client_ca: Path | None = None, host: str = "127.0.0.1"):
        self.listen_port, self.target_port, self.host = listen_port, target_port, host
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert_file, key_file)
        if client_ca is not None:
            self.context.load_verify_locations(cafile=client_ca)
            self.context.verify_mode = ssl.CERT_REQUIRED
        self.connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="tls-front")

    def start(self) -> "TlsFront":
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the TLS front did not start")
        return self

    def _serve(self) -> None:
        self._loop = asyncio.new_event_loop()
        server = self._loop.run_until_complete(
            asyncio.start_server(self._relay, self.host, self.listen_port, ssl=self.context))
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            self._loop.run_until_complete(server.wait_closed())
            self._loop.close()

    async def _relay(self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            broker_in, broker_out = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            client_out.close()
            return

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (OSError, ssl.SSLError):
                pass
            finally:
                sink.close()

        await asyncio.gather(pump(client_in, broker_out), pump(broker_in, client_out))

    def stop(self) -> None:
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> "TlsFront":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextmanager
def broker_behind_tls(log_file: Path, pki: dict[str, Path], mutual: bool = False
                      ) -> Iterator[tuple[TlsFront, EmbeddedBroker]]:
    """A broker of the test's own that clients reach only by TLS (``pki``'s server certificate, for 127.0.0.1):
    its ``bootstrap_servers`` and the address it advertises are the TLS front's. ``mutual``: clients must also
    present a certificate the test CA signed."""
    front_port, broker_port = free_port(), free_port()
    with TlsFront(front_port, broker_port, pki["server.pem"], pki["server.key"],
                  pki["ca.pem"] if mutual else None) as front, \
            EmbeddedBroker(broker_port, log_file=log_file, advertised_port=front_port) as broker:
        yield front, broker
