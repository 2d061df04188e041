"""Test helpers: run real ``finpulse`` processes against the test broker, and read topics to their true end.

``FinpulseProcess`` gets the test's ``Settings`` through a TOML config file (``write_config``); inherited
``FINPULSE_*`` overrides are dropped so a test sees exactly its settings. ``ManagedProcess`` runs any command the
same way. Output goes to ``<log_dir>/<name>.log`` (kept for failed tests). Every process runs in its own session:
``kill()`` is a real ``kill -9`` of it and its children, ``stop()`` a SIGTERM (then SIGKILL after a timeout).

    def test_something(fp_settings, tmp_path):
        with start_worker(fp_settings, tmp_path) as worker:                       # waits for "Worker ready"
            rc, out = run_finpulse(fp_settings, "simulate", "--count", "100", "--max-speed", log_dir=tmp_path)
            records = wait_for_records(fp_settings, topics.scored, until_ids(expected_ids))
            worker.kill()                                                          # kill -9

``read_all(settings, topic)`` reads every record now in a topic; ``wait_for_records`` keeps reading until a
condition holds. Both read to the fetch high watermark, never ``end_offsets()`` (too low on tansu).
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

from stream.broker import free_port
from stream.config import Settings
from stream.kafka_io import ConsumedRecord, read_topic, tail_topic_async
from stream.topics import TopicNames, ensure_topics

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER_READY = "Worker ready"     # Faust logs it (at info) once partitions are assigned and tables recovered


# ---------------------------------------------------------------- settings -> config file

def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)      # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def write_config(settings: Settings, path: str | os.PathLike) -> Path:
    """Write ``settings.raw`` as a TOML file that ``load_settings`` reads back to the same values."""
    lines = [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in settings.raw.items() if not isinstance(v, dict)]
    for section, values in settings.raw.items():
        if isinstance(values, dict):
            lines.append(f"\n[{json.dumps(section)}]")
            lines += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in values.items()]
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


def isolated_settings(bootstrap_servers: str, tmp_path: str | os.PathLike, **sections: dict[str, Any]) -> Settings:
    """Settings for one test on the broker at ``bootstrap_servers``: a topic prefix and app id of its own, the
    keyword scorer, every FinPulse topic created up front (4 partitions), and ``sections`` on top
    (``worker={"stop_timeout_s": 4}``). The ``fp_settings`` fixture is this on the session's broker."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    settings = Settings(raw={
        "kafka": {"bootstrap_servers": bootstrap_servers, "partitions": 4, "topic_prefix": prefix},
        "worker": {"app_id": f"{prefix}-worker", "data_dir": str(Path(tmp_path) / "worker"), "scorer": "baseline",
                   "max_wait_s": 0.2},
    }).with_overrides(sections)
    names = TopicNames(prefix)
    ensure_topics(settings.kafka, names.all(), names.compacted())
    return settings


def with_section(settings: Settings, section: str, **values: Any) -> Settings:
    """A copy of ``settings`` with ``[section]`` keys set (e.g. a second worker's web port)."""
    return settings.with_overrides({section: values})


# ---------------------------------------------------------------- processes

class ManagedProcess:
    """A background process in its own session with its output in ``<log_dir>/<name>.log``."""

    def __init__(self, cmd: Iterable[str], log_dir: str | os.PathLike, name: str, env: dict[str, str] | None = None):
        self.name = name
        self.cmd = [str(a) for a in cmd]
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_dir / f"{name}.log"
        base = {k: v for k, v in os.environ.items() if not (k.startswith("FINPULSE_") and "__" in k)}
        self.env = {**base, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ManagedProcess":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, chars: int = 4000) -> str:
        return self.output()[-chars:]

    def wait_for(self, text: str, timeout: float = 90.0, count: int = 1) -> None:
        """Wait until ``text`` has appeared ``count`` times in the output; fail with the output's tail if the
        process exits or the timeout passes first."""
        deadline = time.monotonic() + timeout
        while self.output().count(text) < count:
            if not self.running():
                raise AssertionError(f"{self.name} exited with {self.proc.returncode if self.proc else None} before "
                                     f"printing {text!r}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not print {text!r} (x{count}) within {timeout:.0f}s:\n{self.tail()}")
            time.sleep(0.2)

    def wait(self, timeout: float = 120.0) -> int:
        """Wait for the process to exit by itself; kill it and fail on timeout."""
        assert self.proc is not None, "not started"
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} still running after {timeout:.0f}s:\n{self.tail()}") from None

    def kill(self) -> None:
        """``kill -9`` the process and its children, now: no shutdown code runs."""
        if self.running():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait for a clean exit; SIGKILL after ``timeout``. Returns the exit code."""
        if self.proc is None:
            return None
        if self.running():
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def __enter__(self) -> "ManagedProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def orphans_left(pids: Iterable[int], timeout: float) -> list[int]:
    """Of ``pids`` (children of a killed parent), those still running after ``timeout`` s; they are killed then."""
    pids = list(pids)

    def running(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return False
        return state != "Z"  # an orphan that exited is a zombie until init reaps it

    deadline = time.monotonic() + timeout
    while any(running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    leftover = [pid for pid in pids if running(pid)]
    for pid in leftover:
        os.kill(pid, signal.SIGKILL)
    return leftover


class FinpulseProcess(ManagedProcess):
    """``python -m stream.cli --log-level L ARGS...`` with ``settings`` in its own TOML config file."""

    def __init__(self, settings: Settings, args: Iterable[str], log_dir: str | os.PathLike, name: str,
                 log_level: str = "info", env: dict[str, str] | None = None):
        args = [str(a) for a in args]
        super().__init__([sys.executable, "-m", "stream.cli", "--log-level", log_level, *args], log_dir, name, env)
        self.config_path = write_config(settings, self.log_dir / f"{name}.toml")
        self.env["FINPULSE_CONFIG"] = str(self.config_path)


def start_finpulse(settings: Settings, *args: str, log_dir: str | os.PathLike, name: str | None = None,
                   env: dict[str, str] | None = None) -> FinpulseProcess:
    """Start ``finpulse ARGS...`` in the background."""
    return FinpulseProcess(settings, args, log_dir, name or args[0], env=env).start()


def run_finpulse(settings: Settings, *args: str, log_dir: str | os.PathLike, name: str | None = None,
                 timeout: float = 180.0, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run ``finpulse ARGS...`` to completion; returns (exit code, output)."""
    proc = start_finpulse(settings, *args, log_dir=log_dir, name=name, env=env)
    code = proc.wait(timeout)
    return code, proc.output()


def start_worker(settings: Settings, log_dir: str | os.PathLike, name: str = "worker", *args: str,
                 ready_timeout: float = 90.0, env: dict[str, str] | None = None) -> FinpulseProcess:
    """Start ``finpulse worker ARGS...`` and wait until Faust reports it ready. Unless the settings give a
    ``[worker] web_port``, the worker's web server gets a free port (several workers can run side by side)."""
    if "web_port" not in settings.raw.get("worker", {}):
        settings = with_section(settings, "worker", web_port=free_port())
    proc = start_finpulse(settings, "worker", *args, log_dir=log_dir, name=name, env=env)
    try:
        proc.wait_for(WORKER_READY, ready_timeout)
    except BaseException:
        proc.stop()
        raise
    return proc


# ---------------------------------------------------------------- reading topics

def run_without_broker(*args: str, timeout: float = 120.0, **settings: str) -> subprocess.CompletedProcess:
    """``finpulse ARGS...`` with no broker anywhere (Kafka at 127.0.0.1:9) and no ``FINPULSE_*`` settings but
    ``settings`` (``FINPULSE_WORKER__DEVICE="cuda"``, say): for what must be refused before anything connects."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINPULSE_")}
    env.update(FINPULSE_KAFKA__BOOTSTRAP_SERVERS="127.0.0.1:9", **settings)
    return subprocess.run([sys.executable, "-m", "stream.cli", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def read_all(settings: Settings, topic: str, timeout: float = 60.0) -> list[ConsumedRecord]:
    """Every record now in ``topic`` (to the fetch high watermark), in partition/offset order."""
    return read_topic(settings.kafka, topic, timeout)


def wait_for_records(settings: Settings, topic: str, until: Callable[[list[ConsumedRecord]], bool],
                     timeout: float = 120.0, what: str = "") -> list[ConsumedRecord]:
    """Read ``topic`` from the beginning as records arrive until ``until(all records read)`` holds; fail with a
    clear message (``what`` describes the condition) on timeout."""
    records, met = asyncio.run(tail_topic_async(settings.kafka, topic, until, timeout))
    if not met:
        raise AssertionError(f"{topic}: {what or 'condition'} not met within {timeout:.0f}s ({len(records)} records read)")
    return records


def wait_until_consumed(settings: Settings, topic: str, timeout: float = 120.0) -> None:
    """Wait until the worker's consumer group has committed every record now in ``topic``: what a downstream agent
    makes of them (alerts of trends, say) has been produced. Without this, reading its output right after its input
    is a race the worker loses when the machine is busy."""
    from kafka import KafkaAdminClient
    ends: dict[int, int] = {}
    for record in read_all(settings, topic):
        ends[record.partition] = max(ends.get(record.partition, 0), record.offset + 1)
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap_servers, client_id="test-lag")
    try:
        deadline = time.monotonic() + timeout
        while True:
            offsets = admin.list_group_offsets(settings.worker.app_id).get(settings.worker.app_id, {})
            committed = {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic}
            behind = {p: end for p, end in ends.items() if committed.get(p, -1) < end}
            if not behind:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{topic}: the worker has not consumed up to {behind} within {timeout:.0f}s "
                                     f"(committed {committed})")
            time.sleep(0.5)
    finally:
        admin.close()


def consumer_lag(settings: Settings, topics: Iterable[str]) -> str:
    """Where the worker's consumer group stands on ``topics``: per partition, committed offset / true end, and for a
    partition behind its end, what a fresh fetch from the committed offset returns. For failure messages: it tells a
    stream that stalled inside the worker from records the broker will not serve."""
    from kafka import KafkaAdminClient
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap_servers, client_id="test-lag")
    try:
        offsets = admin.list_group_offsets(settings.worker.app_id).get(settings.worker.app_id, {})
    finally:
        admin.close()
    lines = []
    for topic in topics:
        ends: dict[int, int] = {}
        for record in read_all(settings, topic):
            ends[record.partition] = max(ends.get(record.partition, 0), record.offset + 1)
        committed = {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic}
        parts = []
        for p in sorted(set(ends) | set(committed)):
            at, end = committed.get(p, -1), ends.get(p, 0)
            probe = f" (a fetch from {at} gives {_fetch_from(settings, topic, p, at)})" if 0 <= at < end else ""
            parts.append(f"[{p}] {at}/{end}{probe}")
        lines.append(f"{topic}: " + ", ".join(parts))
    return "\n".join(lines)


def _fetch_from(settings: Settings, topic: str, partition: int, offset: int) -> str:
    from aiokafka import TopicPartition
    from stream.kafka_io import _consumer

    async def fetch() -> str:
        consumer = _consumer(settings.kafka.bootstrap_servers)
        await consumer.start()
        try:
            tp = TopicPartition(topic, partition)
            consumer.assign([tp])
            consumer.seek(tp, offset)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                records = (await consumer.getmany(tp, timeout_ms=500)).get(tp, [])
                if records:
                    return f"{len(records)} records from offset {records[0].offset}"
            return f"nothing in 5s (high watermark {consumer.highwater(tp)})"
        finally:
            await consumer.stop()

    try:
        return asyncio.run(fetch())
    except Exception as exc:  # noqa: BLE001 - a diagnostic must not hide the failure it explains
        return f"an error: {exc!r}"


def until_ids(expected: Iterable[str]) -> Callable[[list[ConsumedRecord]], bool]:
    """A ``wait_for_records`` condition: every expected id has been read. Parses each record once."""
    missing = set(expected)
    parsed = [0]

    def check(records: list[ConsumedRecord]) -> bool:
        for record in records[parsed[0]:]:
            missing.discard(json.loads(record.value)["id"])
        parsed[0] = len(records)
        return not missing

    return check


def json_values(records: Iterable[ConsumedRecord]) -> list[dict]:
    return [json.loads(r.value) for r in records]
