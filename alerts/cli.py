"""Subcommands owned by ``alerts``: ``finpulse receiver`` (the demo/test webhook receiver) and ``finpulse dispatch``
(the alert dispatcher on its own, outside the Faust worker)."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("receiver", help="a webhook receiver that verifies Standard Webhooks signatures and stores what it gets")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1; GET /received is unauthenticated)")
    p.add_argument("--port", type=int, default=8787)
    p.add_argument("--store", metavar="FILE", default="var/received.jsonl", help="JSON lines of verified webhooks (default var/received.jsonl; '' keeps them in memory)")
    p.add_argument("--secret-env", default="FINPULSE_WEBHOOK_SECRET", metavar="VAR", help="env var holding the whsec_ secret(s) (default FINPULSE_WEBHOOK_SECRET)")
    p.add_argument("--tolerance", type=float, default=300.0, metavar="SECONDS", help="accepted clock skew of webhook-timestamp, either way (default 300)")
    p.add_argument("--fail-first", type=int, default=0, metavar="N", help="answer the first N requests with HTTP 500 (failure injection)")
    p.add_argument("--throttle", type=int, default=0, metavar="N", help="then answer N requests with HTTP 429 and Retry-After")
    p.add_argument("--retry-after", type=int, default=1, metavar="SECONDS", help="the Retry-After of --throttle (default 1)")
    p.add_argument("--retry-after-date", action="store_true", help="send Retry-After as an HTTP date instead of seconds")
    p.add_argument("--delay", type=float, default=0.0, metavar="SECONDS", help="answer every request this late (a slow endpoint)")
    p.add_argument("--quiet", action="store_true", help="do not print each request")
    p.add_argument("--tls-cert", metavar="PEM", help="serve https with this certificate (chain) file, e.g. one an internal CA signed")
    p.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert (default: in the certificate file)")
    p.add_argument("--client-ca", metavar="PEM", help="require a client certificate signed by these CAs (mTLS; needs --tls-cert)")
    p.set_defaults(func=_receiver)

    p = sub.add_parser("dispatch", help="deliver alerts to the [alerts] endpoints (the worker does this too when endpoints are configured)")
    p.add_argument("--group-id", help="consumer group (default [alerts] group_id, else <worker.app_id>-dispatcher)")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve /metrics, /healthz and /readyz on this port (default [alerts] metrics_port, 6068; 0: none)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="check each endpoint (config, secrets, address guard; the TLS handshake of https ones, through their proxy) and exit")
    mode.add_argument("--status", action="store_true", help="print the delivery states on the deliveries topic and exit")
    mode.add_argument("--redeliver", action="store_true",
                      help="re-queue failed deliveries (failed -> pending on the deliveries topic, fresh retry horizon, "
                           "same webhook-id) and exit; this command sends nothing itself: the running dispatcher "
                           "(worker or `finpulse dispatch`) sends them within seconds, or the next one to start. "
                           "Delivered ones are never re-queued")
    p.add_argument("--endpoint", metavar="NAME", help="with --redeliver: only deliveries to this endpoint")
    p.add_argument("--alert", metavar="ID", help="with --redeliver: only deliveries of this alert id (its firing and resolve)")
    p.add_argument("--dry-run", action="store_true", help="with --redeliver: print what would be re-queued, change nothing")
    p.set_defaults(func=_dispatch)


def _receiver(args, settings) -> int:
    from .receiver import run_receiver
    return run_receiver(args)


def _dispatch(args, settings) -> int:
    from stream.config import ConfigError
    from .dispatch import run_dispatch
    if not args.redeliver and (args.endpoint or args.alert or args.dry_run):
        raise ConfigError("--endpoint, --alert and --dry-run go with --redeliver")
    settings = settings.with_overrides({"alerts": {"group_id": args.group_id, "metrics_port": args.metrics_port}})
    return run_dispatch(settings, check=args.check, status=args.status, redeliver=args.redeliver,
                        endpoint=args.endpoint, alert_id=args.alert, dry_run=args.dry_run)
