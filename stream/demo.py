"""``finpulse demo`` (``make demo``): the whole product on one machine, started and stopped together.

Order: a quick model is trained if none exists yet, then the embedded broker, the webhook receiver, the worker
(scoring, tables, detection, delivery), a SIMULATED backlog of recent history (so baselines exist), the live
SIMULATED stream with a scripted negative shock, and the dashboard. Ctrl-C (or any process dying) stops every
process the demo started. Logs go to var/demo/*.log; a status line shows progress every few seconds.
"""
from __future__ import annotations

import asyncio
import math
import os
import secrets
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

from models.interface import SCORERS_WITHOUT_A_MODEL

from .broker import EmbeddedBroker, free_port
from .kafka_io import topic_sizes
from .kafka_security import embedded_broker_connection, without_connection_settings
from .records import format_time, utcnow
from .topics import TopicNames, ensure_topics

DEMO_DIR = Path("var/demo")


class ProcessGroup:
    """Children started in order and stopped in reverse, each in its own session so Ctrl-C reaches us first."""

    def __init__(self, log_dir: Path, env: dict[str, str]):
        self.log_dir = log_dir
        self.env = env
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, *finpulse_args: str) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")
        cmd = [sys.executable, "-m", "stream.cli", *finpulse_args]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def run(self, name: str, *finpulse_args: str) -> int:
        """Run to completion in the foreground, output shown (used for training, which prints progress)."""
        return subprocess.call([sys.executable, "-m", "stream.cli", *finpulse_args], env=self.env)

    def dead(self) -> list[tuple[str, int]]:
        return [(name, p.returncode) for name, p in self.procs if p.poll() is not None and p.returncode != 0]

    def stop_all(self, timeout_s: float = 10.0) -> None:
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for name, proc in reversed(self.procs):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _time_left(first: tuple[float, int] | None, now: float, done: int, total: int) -> str:
    """The status line's "~N min left", at the rate scored since ``first`` (time, count): a slow CPU scores the
    history for minutes, and a count alone does not say how many."""
    if first is None or done <= first[1] or done >= total:
        return ""
    per_second = (done - first[1]) / max(1e-9, now - first[0])
    return f" ~{math.ceil((total - done) / per_second / 60)} min left"


def _demo_config(path: Path, bootstrap: str, receiver_port: int, prefix: str) -> None:
    path.write_text(f"""# Written by `finpulse demo`; every value here is a local demo default.
[kafka]
bootstrap_servers = "{bootstrap}"
topic_prefix = "{prefix}"

[worker]
data_dir = "{DEMO_DIR / 'worker'}"

[alerts]
# The demo's own receiver runs on loopback, so this endpoint opts in to private addresses.
[[alerts.endpoints]]
name = "demo-receiver"
url = "http://127.0.0.1:{receiver_port}/webhook"
format = "native"
secret_env = "FINPULSE_WEBHOOK_SECRET"
allow_private = true
""")


def fresh_store(path: Path) -> Path:
    """``path``, emptied for this run: a previous demo's webhooks came from another broker's alerts (tansu keeps
    nothing), and a receiver that read them would show them as this run's. They are kept as
    ``<name>.previous.jsonl`` (the run before only)."""
    if path.exists():
        path.replace(path.with_name(f"{path.stem}.previous{path.suffix}"))
    return path


def _worker_model(settings) -> Path | None | bool:
    """The model directory the demo's worker loads; None when there is none yet, False when the classifier's code
    is not installed."""
    try:
        from models.registry import find_model_dir
        from models.settings import models_root
    except ImportError:
        return False
    return find_model_dir(settings.worker.model_dir or None, models_root(settings))


def _describe_worker_model(settings) -> str:
    if settings.worker.scorer in SCORERS_WITHOUT_A_MODEL:
        return f"none: [worker] scorer is {settings.worker.scorer}"
    found = _worker_model(settings)
    if found is False:
        return "the keyword baseline (the classifier's code is not installed)"
    if found is None:
        return "the keyword baseline (no trained model)"
    return (f'{found.name}\n             ask it: the dashboard\'s Ask view, or finpulse score "a headline"; '
            'every model: finpulse models')


def run_demo(settings, args) -> int:
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    env = {**without_connection_settings(os.environ), "PYTHONUNBUFFERED": "1",
           "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    # A fresh signing secret per demo run: shared by the worker and the receiver through the environment only.
    env.setdefault("FINPULSE_WEBHOOK_SECRET", "whsec_" + secrets.token_urlsafe(24))
    group = ProcessGroup(DEMO_DIR, env)

    if not args.no_train and settings.worker.scorer in ("auto", "model"):
        if _worker_model(settings) is None:
            print("==> no trained model yet: training the quick recipe first (about 6 minutes on 2 CPU cores, at "
                  "most 10; progress below; `finpulse train --recipe full` on a GPU trains the real one)", flush=True)
            # --resume: a demo stopped during its training goes on from its last epoch the next time.
            if group.run("train", "train", "--recipe", "quick", "--resume") != 0:
                print("quick training failed: the demo continues with the keyword baseline scorer", flush=True)

    port = args.port or settings.kafka.embedded_port
    try:
        broker = EmbeddedBroker(port, log_file=DEMO_DIR / "broker.log").start()
    except Exception:
        port = free_port()
        print(f"port {args.port or settings.kafka.embedded_port} is busy: using {port} for the broker", flush=True)
        broker = EmbeddedBroker(port, log_file=DEMO_DIR / "broker.log").start()
    stop = {"now": False}
    signal.signal(signal.SIGINT, lambda *_: stop.update(now=True))
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    try:
        kafka = embedded_broker_connection(settings.kafka, broker.bootstrap_servers)
        names = TopicNames(kafka.topic_prefix)
        ensure_topics(kafka, names.all(), names.compacted())
        config = DEMO_DIR / "finpulse.toml"
        _demo_config(config, broker.bootstrap_servers, args.receiver_port, kafka.topic_prefix)
        env["FINPULSE_CONFIG"] = str(config)

        group.start("receiver", "receiver", "--port", str(args.receiver_port), "--store",
                    str(fresh_store(DEMO_DIR / "received.jsonl")))
        group.start("worker", "worker")
        # The detector judges 1-minute windows with at least 15 messages per topic and learns 10 of them before it
        # may fire: history at the live rate (about 60 messages per topic-minute) gives every topic a baseline.
        history_minutes = 20
        history_start = utcnow() - timedelta(minutes=history_minutes)
        history_count = int(history_minutes * 60 * args.rate)
        group.start("history", "simulate", "--start", format_time(history_start), "--rate", str(args.rate),
                    "--count", str(history_count), "--max-speed", "--no-shock", "--seed", "11")
        # The live stream starts once the history is scored, so live windows never race the backlog.
        live_started = False
        warmup_deadline = time.monotonic() + 15 * 60
        if not args.no_dashboard:
            group.start("dashboard", "dashboard", "--port", str(args.dashboard_port))

        print(f"""
FinPulse demo is running (all data is SIMULATED):
  broker     tansu on {broker.bootstrap_servers} (in memory)
  dashboard  {'http://127.0.0.1:%d' % args.dashboard_port if not args.no_dashboard else '(disabled)'}
  receiver   http://127.0.0.1:{args.receiver_port}/webhook  (signed alerts land in {DEMO_DIR / 'received.jsonl'})
  model      {_describe_worker_model(settings)}
  history    {history_count} messages of the last {history_minutes} minutes are scored first (baselines), then
  live       {args.rate:g} messages/s; a negative shock on 'Energy | Oil' starts 150 s in and lasts 180 s
  logs       {DEMO_DIR}/*.log
Ctrl-C stops everything.
""", flush=True)
        last_status = 0.0
        first_scored: tuple[float, int] | None = None  # (time, count) when the worker's first scores showed
        while not stop["now"]:
            dead = [(n, rc) for n, rc in group.dead() if n != "history"]
            if dead:
                print(f"process {dead[0][0]} exited with code {dead[0][1]}: see {DEMO_DIR / dead[0][0]}.log; stopping the demo", flush=True)
                return 1
            if time.monotonic() - last_status > 10:
                last_status = time.monotonic()
                try:
                    c = asyncio.run(topic_sizes(kafka, [names.news, names.comments, names.scored, names.deadletter,
                                                        names.alerts]))
                except Exception as exc:  # the status line is best effort; the processes are what matter
                    print(f"status unavailable: {exc}", flush=True)
                    continue
                scored = min(c[names.scored], history_count)
                if first_scored is None and scored:
                    first_scored = (time.monotonic(), scored)
                phase = "live" if live_started else (f"history {scored}/{history_count}"
                                                     + _time_left(first_scored, time.monotonic(), scored, history_count))
                print(f"[{time.strftime('%H:%M:%S')}] {phase:<32} in {c[names.news] + c[names.comments]:>7}  "
                      f"scored {c[names.scored]:>7}  dead-letter {c[names.deadletter]:>4}  alerts {c[names.alerts]:>3}",
                      flush=True)
                if not live_started and (c[names.scored] >= history_count or time.monotonic() > warmup_deadline):
                    live_started = True
                    print("==> history scored: starting the live SIMULATED stream (shock in 150 s)", flush=True)
                    group.start("simulator", "simulate", "--rate", str(args.rate), "--shock-at", "150",
                                "--shock-duration", "180")
            time.sleep(0.5)
        return 0
    finally:
        print("stopping the demo…", flush=True)
        group.stop_all()
        broker.stop()
        print("stopped every process the demo started.", flush=True)
