"""Subcommands owned by ``stream``: the embedded broker, ingest, the simulator, the worker and the demo."""
from __future__ import annotations

import argparse

from models.interface import CPU_PRECISIONS

from .config import tcp_port


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("broker", help="run the embedded Kafka-compatible broker (tansu) and create FinPulse's topics")
    p.add_argument("--port", type=tcp_port, help="listen on 127.0.0.1:PORT (default [kafka] embedded_port, 9092)")
    p.set_defaults(func=_broker)

    p = sub.add_parser("topics", help="create every FinPulse topic that does not exist yet (any Kafka)")
    p.add_argument("--check", action="store_true",
                   help="create nothing: connect as every command does, and say which topics are missing or have "
                        "another partition count (exit 1 if any)")
    p.set_defaults(func=_topics)

    p = sub.add_parser("worker", help="run the Faust worker: score, aggregate, detect, deliver")
    p.add_argument("--scorer", choices=["auto", "model", "baseline", "noop"], help="which scorer (default [worker] scorer)")
    p.add_argument("--model", dest="model_dir", metavar="DIR", help="a trained model directory (default: newest found)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--cpu-precision", choices=CPU_PRECISIONS,
                   help="how the model computes on a CPU: auto (bf16 where the CPU has bfloat16 instructions, about 3x "
                   "float32 with AMX; else float32), float32, bf16, or int8 (about 1.2x, float32's labels for 96-97%% "
                   "of texts) (default [worker] cpu_precision: auto)")
    p.add_argument("--max-batch", type=int, metavar="N",
                   help="score at most this many messages at once (default [worker] max_batch, 256)")
    p.add_argument("--max-wait", type=float, dest="max_wait_s", metavar="SECONDS",
                   help="score what has arrived after waiting at most this long for a full batch "
                   "(default [worker] max_wait_s, 0.5)")
    p.add_argument("--data-dir", help="where the worker keeps local state (default [worker] data_dir, var/worker)")
    p.add_argument("--web-port", type=tcp_port, metavar="PORT",
                   help="serve /metrics, /healthz and /readyz on this port (default [worker] web_port, 6066; 0: none)")
    p.add_argument("--app-id", help="Kafka consumer group / Faust app id (default [worker] app_id, finpulse-worker)")
    p.set_defaults(func=_worker)

    ingest = sub.add_parser("ingest", help="put news and comments into Kafka").add_subparsers(dest="source", metavar="SOURCE", required=True)
    p = ingest.add_parser("file", help="ingest a JSONL or CSV file")
    p.add_argument("path", help="a JSONL or CSV file (comma, semicolon, tab or bar delimited)")
    p.add_argument("--kind", choices=["news", "comments"], required=True, help="which input topic its lines go to")
    p.add_argument("--format", choices=["auto", "jsonl", "csv"], default="auto",
                   help="the file's format (default auto: from its extension, .jsonl/.ndjson/.json or .csv/.tsv)")
    p.set_defaults(func=_ingest_file)
    p = ingest.add_parser("rss", help="poll RSS/Atom feeds into the news topic")
    p.add_argument("urls", nargs="+", metavar="URL", help="RSS or Atom feed addresses")
    p.add_argument("--every", default="60s", help="poll interval, e.g. 30s, 5m (default 60s)")
    p.add_argument("--once", action="store_true", help="poll each feed once and exit")
    p.add_argument("--state", default="var/rss-state.json", help="where seen ids and ETag/Last-Modified are kept")
    p.add_argument("--metrics-port", type=tcp_port, default=None,
                   help="serve /metrics, /healthz and /readyz on this port while polling (default [ingest] "
                        "metrics_port, 6067; 0: none; never with --once)")
    p.set_defaults(func=_ingest_rss)

    p = sub.add_parser("simulate", help="produce a SIMULATED mixed stream of news and comments (with an optional negative shock)")
    p.add_argument("--rate", type=float, default=20.0, help="messages per second of event time (default 20)")
    p.add_argument("--count", type=int, default=0, help="stop after this many messages (default: run until stopped)")
    p.add_argument("--max-speed", action="store_true", help="produce as fast as possible; event times still advance at --rate")
    p.add_argument("--start", help="event time of the first message, ISO-8601 (default: now)")
    p.add_argument("--seed", type=int, default=7, help="random seed: the same seed, --start and other flags "
                   "give the same messages (default 7)")
    p.add_argument("--comment-share", type=float, default=0.6, help="fraction of messages that are comments")
    p.add_argument("--shock-topic", default="Energy | Oil", help="topic that receives the scripted negative shock")
    p.add_argument("--shock-at", type=float, default=300.0, help="seconds of event time after the start when the shock begins")
    p.add_argument("--shock-duration", type=float, default=240.0, help="seconds of event time the shock lasts")
    p.add_argument("--shock-strength", type=float, default=0.85, help="share of the shocked topic's messages that turn bearish")
    p.add_argument("--no-shock", action="store_true", help="no scripted shock: the topics' usual mix only")
    p.add_argument("--malformed-share", type=float, default=0.0, help="fraction of deliberately malformed messages")
    p.set_defaults(func=_simulate)

    p = sub.add_parser("demo", help="broker, worker, simulator, dashboard and webhook receiver, started and stopped together")
    p.add_argument("--port", type=tcp_port, help="embedded broker port (default 9092)")
    p.add_argument("--dashboard-port", type=tcp_port, default=8501, help="the dashboard's port (default 8501)")
    p.add_argument("--receiver-port", type=tcp_port, default=8787, help="the webhook receiver's port (default 8787)")
    p.add_argument("--rate", type=float, default=20.0, help="live messages per second (default 20)")
    p.add_argument("--no-dashboard", action="store_true", help="start everything but the dashboard")
    p.add_argument("--no-train", action="store_true", help="do not train the quick model when none exists")
    p.set_defaults(func=_demo)


def _broker(args, settings) -> int:
    from .broker import run_broker
    return run_broker(settings, port=args.port)


def _topics(args, settings) -> int:
    from .kafka_security import describe
    from .topics import TopicNames, check_topics, ensure_topics
    names = TopicNames(settings.kafka.topic_prefix)
    if args.check:
        problems = check_topics(settings.kafka, names.all())
        print(f"connected to Kafka at {settings.kafka.bootstrap_servers} ({describe(settings.kafka)}): "
              f"{len(names.all()) - sum(p.endswith(': missing') for p in problems)} of {len(names.all())} FinPulse "
              f"topics present")
        for problem in problems:
            print(f"  {problem}")
        if problems:
            print("`finpulse topics` creates the missing ones where its user may create topics; else ask the "
                  "cluster's owner for them ([kafka] partitions and replication_factor; compacted: "
                  f"{', '.join(names.compacted())})")
        return 1 if problems else 0
    created = ensure_topics(settings.kafka, names.all(), names.compacted())
    print(f"created {len(created)} topic(s): {', '.join(created) or 'none (all existed)'}")
    return 0


def _worker(args, settings) -> int:
    from .worker import run_worker
    overrides = {k: getattr(args, k) for k in ("scorer", "model_dir", "device", "cpu_precision", "max_batch",
                                               "max_wait_s", "data_dir", "web_port", "app_id")}
    return run_worker(settings.with_overrides({"worker": overrides}))


def _ingest_file(args, settings) -> int:
    from .ingest import ingest_file
    return ingest_file(settings, args.path, kind=args.kind, fmt=args.format)


def _ingest_rss(args, settings) -> int:
    from .ingest import ingest_rss
    return ingest_rss(settings, args.urls, every=args.every, once=args.once, state_path=args.state,
                      metrics_port=args.metrics_port)


def _simulate(args, settings) -> int:
    from .simulate import run_simulate
    return run_simulate(settings, args)


def _demo(args, settings) -> int:
    from .demo import run_demo
    return run_demo(settings, args)
