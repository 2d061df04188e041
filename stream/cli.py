"""``finpulse``: one command line for every part of FinPulse.

Each package owns its subcommands in its own ``cli.py`` with a ``register(subparsers)`` function; this module only
parses the global flags, loads settings (defaults < config file < environment < flags) and dispatches. Commands
import their heavy dependencies (torch, faust, streamlit) only when they run, so ``finpulse --help`` is instant.

A command is a function ``(args, settings) -> exit code``, set with ``parser.set_defaults(func=...)``.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .client_logs import tame_kafka_client_logs
from .config import ConfigError, Settings, load_settings
from .kafka_security import describe, why_unreachable

# Packages whose cli.py adds subcommands, in the order data flows through FinPulse.
COMMAND_MODULES = ("stream.commands", "models.cli", "alerts.cli", "dashboard.cli", "stream.replay.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finpulse",
        description="FinPulse: streaming financial-sentiment monitor (Kafka + Faust + a fine-tuned classifier).",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML config file (default: $FINPULSE_CONFIG or ./finpulse.toml)")
    parser.add_argument("--bootstrap-servers", metavar="HOST:PORT", help="Kafka bootstrap servers (overrides [kafka] bootstrap_servers)")
    parser.add_argument("--partitions", type=int, help="partitions for every FinPulse topic (overrides [kafka] partitions)")
    parser.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"],
                        help="how much the command logs (default [worker] log_level, info)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue  # that package's commands are not part of this build
            raise
        module.register(sub)
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config)
    return settings.with_overrides({
        "kafka": {"bootstrap_servers": args.bootstrap_servers, "partitions": args.partitions},
        "worker": {"log_level": args.log_level},
    })


def kafka_errors() -> tuple[tuple[type[BaseException], ...], ...]:
    """(every Kafka error, those that mean "no connection was made", those that mean "the credentials were
    refused"), of both Kafka clients FinPulse uses (aiokafka for streams, kafka-python for admin) and of our own
    admin connection's timeout. A client that fails TLS or SASL says only that it could not bootstrap:
    ``why_unreachable`` finds out why."""
    import aiokafka.errors as aio
    import kafka.errors as sync
    from .topics import BrokerUnreachable
    unreachable = (aio.KafkaConnectionError, aio.KafkaTimeoutError, sync.KafkaConnectionError,
                   sync.KafkaTimeoutError, BrokerUnreachable)
    refused = (aio.SaslAuthenticationFailed, aio.AuthenticationFailedError, aio.UnsupportedSaslMechanismError,
               sync.SaslAuthenticationFailedError, sync.UnsupportedSaslMechanismError)
    return (aio.KafkaError, sync.KafkaError, BrokerUnreachable), unreachable, refused


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        settings = settings_from_args(args)
        level = (args.log_level or settings.worker.log_level).upper()
    except ConfigError as exc:
        print(f"finpulse: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    tame_kafka_client_logs()
    try:
        return int(args.func(args, settings) or 0)
    except ConfigError as exc:
        print(f"finpulse: configuration error: {exc}", file=sys.stderr)
        return 2
    except kafka_errors()[0] as exc:
        # A Kafka failure is one line; the traceback is for --log-level debug.
        logging.getLogger(__name__).debug("Kafka error", exc_info=True)
        detail = str(exc) if str(exc).startswith((type(exc).__name__, "Kafka at")) else f"{type(exc).__name__}: {exc}"
        servers = settings.kafka.bootstrap_servers
        if isinstance(exc, kafka_errors()[1]):
            try:
                reason = getattr(exc, "reason", None) or why_unreachable(settings.kafka)
            except Exception:   # the look for a reason must not hide the error it explains
                logging.getLogger(__name__).debug("no reason found", exc_info=True)
                reason = None
            if reason:
                print(f"finpulse: cannot connect to Kafka at {servers}: {reason}", file=sys.stderr)
            else:
                print(f"finpulse: cannot reach Kafka at {servers} ({detail}); is the broker running? "
                      "(`--bootstrap-servers`, [kafka] bootstrap_servers)", file=sys.stderr)
        elif isinstance(exc, kafka_errors()[2]):
            print(f"finpulse: Kafka at {servers} did not accept FinPulse's credentials ({describe(settings.kafka)}): "
                  f"{detail}", file=sys.stderr)
        else:
            print(f"finpulse: Kafka at {servers} refused the request: {detail}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
