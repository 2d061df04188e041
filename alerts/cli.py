"""Subcommands owned by ``alerts``: ``finpulse receiver`` (the demo/test webhook receiver), ``finpulse dispatch``
(the alert dispatcher on its own, outside the Faust worker) and ``finpulse silence`` (withhold notifications for a
while)."""
from __future__ import annotations

import argparse
import getpass

from stream.config import tcp_port

SILENCE_EXAMPLES = """examples:
  finpulse silence add --match "about=Energy | Oil" --for 4h --comment "OPEC meeting: the topic and its tickers"
  finpulse silence add --match ticker=TSLA --match severity!=critical --starts 2026-12-03T21:00Z --for 2h \\
      --comment "earnings call: only critical pages"
  finpulse silence add --match endpoint=risk-slack --for 30m --comment "channel migration"
  finpulse silence list
  finpulse silence expire sil_4f2a9c1be3d0
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("receiver", help="a webhook receiver that verifies Standard Webhooks signatures and stores what it gets")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1; GET /received is unauthenticated)")
    p.add_argument("--port", type=tcp_port, default=8787, help="listen port (default 8787)")
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
    p.add_argument("--metrics-port", type=tcp_port, metavar="PORT",
                   help="serve /metrics, /healthz and /readyz on this port (default [alerts] metrics_port, 6068; 0: none)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="check each endpoint (config, secrets, address guard; the TLS handshake of https ones, through their proxy) and exit")
    mode.add_argument("--preview", metavar="NAME", help="print what endpoint NAME would be sent for an example episode "
                                                        "(firing, escalation, resolve; a group too when it groups), in "
                                                        "its format, template included, and exit; sends nothing")
    mode.add_argument("--test", metavar="NAME", help="send endpoint NAME a test alert for real (its firing, an "
                                                     "escalation where the endpoint updates the incident it opened, "
                                                     "then its resolve), as a delivery would send it, and print what "
                                                     "it answered; exit 1 unless it took each. Kafka is not needed "
                                                     "and nothing is recorded")
    p.add_argument("--resolve-after", type=float, default=5.0, metavar="SECONDS",
                   help="with --test: wait this long before each request after the firing (default 5)")
    mode.add_argument("--fields", action="store_true", help="list the {fields} a template endpoint's template and "
                                                            "group_template may name, and exit")
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

    p = sub.add_parser("silence", help="withhold alert notifications matching some fields for a while (add, list, expire)",
                       description="Silences, as in Alertmanager: alerts still fire, are stored and shown; their "
                                   "notifications are withheld while a silence matching them is in force. An episode "
                                   "still firing when its silence ends is sent then.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=SILENCE_EXAMPLES)
    actions = p.add_subparsers(dest="silence_action", metavar="ACTION", required=True)
    add = actions.add_parser("add", help="add a silence; prints its id")
    add.add_argument("--match", action="append", default=[], metavar="NAME=VALUE", required=True,
                     help="key, key_type, severity, about (the topic a topic or ticker alert is about) or endpoint, "
                          "with = != =~ (whole-value regex) or !~; topic=LABEL and ticker=SYMBOL are shorthands for a "
                          "key of that type. Repeat: every matcher must match")
    until = add.add_mutually_exclusive_group(required=True)
    until.add_argument("--for", dest="duration", metavar="DURATION", help="how long from its start: 90m, 4h, 2d")
    until.add_argument("--until", metavar="TIME", help="when it ends: ISO-8601 (naive means UTC)")
    add.add_argument("--starts", metavar="TIME", help="when it starts (default now): ISO-8601")
    add.add_argument("--comment", required=True, help="why: the earnings call, the vendor outage, a ticket")
    add.add_argument("--author", default=_login_name(), help="who (default: your login name)")
    listing = actions.add_parser("list", help="the silences in force and those to come (--all: the ended ones too)")
    listing.add_argument("--all", action="store_true", help="include silences that have ended")
    expire = actions.add_parser("expire", help="end a silence now")
    expire.add_argument("silence_id", metavar="ID", help="the silence's id (`finpulse silence list`)")
    p.set_defaults(func=_silence)


def _receiver(args, settings) -> int:
    from .receiver import run_receiver
    return run_receiver(args)


def _dispatch(args, settings) -> int:
    from stream.config import ConfigError
    from .dispatch import run_dispatch
    if not args.redeliver and (args.endpoint or args.alert or args.dry_run):
        raise ConfigError("--endpoint, --alert and --dry-run go with --redeliver")
    settings = settings.with_overrides({"alerts": {"group_id": args.group_id, "metrics_port": args.metrics_port}})
    if args.resolve_after != 5.0 and not args.test:
        raise ConfigError("--resolve-after goes with --test")
    if args.resolve_after < 0:
        raise ConfigError("--resolve-after must be 0 or more seconds")
    if args.fields:
        from .preview import fields_help
        print(fields_help())
        return 0
    if args.test:
        import asyncio
        from .endpoints import load_delivery_config
        from .trial import send_trial
        return asyncio.run(send_trial(load_delivery_config(settings), args.test, args.resolve_after))
    return run_dispatch(settings, check=args.check, status=args.status, redeliver=args.redeliver, preview=args.preview,
                        endpoint=args.endpoint, alert_id=args.alert, dry_run=args.dry_run)


def _silence(args, settings) -> int:
    from .silences import run_silence
    return run_silence(args, settings)


def _login_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name in the environment nor in the password database
        return ""
