"""``finpulse receiver``: a webhook receiver for the demo and the tests that trusts only what is signed.

Every POST, PUT or PATCH (any path) must carry valid Standard Webhooks headers signed with one of the secrets in
the environment variable ``--secret-env`` (several, space-separated, during a key rotation). Answers:

- 200 ``{"ok": true, "id": "3"}``: verified and stored (one JSON line in ``--store``) and printed; ``id`` numbers
  what was stored, as a ticketing tool names the ticket it opened (an endpoint's ``incident_id_from = "/id"``);
- 200 ``{"ok": true, "duplicate": true, "id": ...}``: a ``webhook-id`` already stored (its first ``id``). Replays are
  acknowledged without being stored again (idempotent), so a sender that resends after a lost acknowledgement stops
  retrying; the count is kept per id under ``duplicates``. A captured request replayed later is refused anyway: its
  timestamp goes stale.
- 400: the webhook headers are missing or the timestamp is not a number;
- 401: the signature matches no secret (tampered body, wrong key) or the timestamp is outside ``--tolerance``
  (stale or in the future).

Failure injection for demos and tests: ``--fail-first N`` answers the first N requests with 500, then
``--throttle N`` answers the next N with 429 and ``Retry-After`` (``--retry-after`` seconds, or an HTTP date with
``--retry-after-date``); ``--delay S`` answers every request S seconds late (a slow endpoint). Ids seen in an existing ``--store`` file count as seen after a restart.

TLS for trying an endpoint's transport settings (``ca_file``, mTLS) end to end: ``--tls-cert`` (and ``--tls-key``)
serves https; ``--client-ca`` also requires a client certificate signed by those CAs.

``GET /received`` returns what was stored plus counters and a log of every request (time, path, status, id).
It is unauthenticated: keep the receiver on 127.0.0.1 (the default) unless the network is yours.
"""
from __future__ import annotations

import asyncio
import json
import os
import ssl
import time
from collections import Counter
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path

from aiohttp import web

from stream.config import ConfigError
from stream.records import format_time, utcnow

from .signing import DEFAULT_TOLERANCE_S, HEADER_ID, BadTimestamp, MissingHeaders, WebhookVerificationError, decode_secret, split_secrets, verify


@dataclass
class ReceiverOptions:
    secrets: list[str]
    tolerance_s: float = DEFAULT_TOLERANCE_S
    store: Path | None = None
    fail_first: int = 0
    throttle: int = 0
    retry_after_s: int = 1
    retry_after_date: bool = False
    delay_s: float = 0.0
    quiet: bool = False


class Receiver:
    def __init__(self, options: ReceiverOptions):
        if not options.secrets:
            raise ConfigError("the receiver needs at least one whsec_ secret")
        self.options = options
        self.items: list[dict] = []
        self.seen: dict[str, str] = {}          # webhook-id -> the id its item was stored under
        self.duplicates: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.injected: Counter[str] = Counter()
        self.requests: list[dict] = []
        self._fail_left = options.fail_first
        self._throttle_left = options.throttle
        if options.store and options.store.exists():
            for line in options.store.read_text().splitlines():
                if line.strip():
                    item = json.loads(line)
                    self.items.append(item)
                    self.seen.setdefault(item["webhook_id"], item.get("id", str(len(self.items))))

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 20)
        app.router.add_get("/received", self._received)
        app.router.add_get("/healthz", self._healthz)
        for method in ("POST", "PUT", "PATCH"):
            app.router.add_route(method, "/{path:.*}", self._webhook)
        return app

    async def _webhook(self, request: web.Request) -> web.Response:
        arrived = time.time()
        body = await request.read()
        if self.options.delay_s:
            await asyncio.sleep(self.options.delay_s)
        response = self._answer(request, body)
        self.requests.append({"at": arrived, "method": request.method, "path": request.path,
                              "target": request.raw_path, "status": response.status,
                              "webhook_id": request.headers.get(HEADER_ID)})
        return response

    def _answer(self, request: web.Request, body: bytes) -> web.Response:
        if self._fail_left > 0:
            self._fail_left -= 1
            self.injected["500"] += 1
            return web.json_response({"error": "injected failure (--fail-first)"}, status=500)
        if self._throttle_left > 0:
            self._throttle_left -= 1
            self.injected["429"] += 1
            wait = self.options.retry_after_s
            retry_after = formatdate(time.time() + wait, usegmt=True) if self.options.retry_after_date else str(wait)
            return web.json_response({"error": "injected throttling (--throttle)"}, status=429,
                                     headers={"Retry-After": retry_after})
        try:
            msg_id = verify(request.headers, body, self.options.secrets, self.options.tolerance_s)
        except WebhookVerificationError as exc:
            self.rejected[exc.reason] += 1
            self._say(f"REJECTED {request.path}: {exc.reason}: {exc.detail}")
            status = 400 if isinstance(exc, (MissingHeaders, BadTimestamp)) else 401
            return web.json_response({"error": exc.reason, "detail": exc.detail}, status=status)
        if msg_id in self.seen:
            self.duplicates[msg_id] += 1
            return web.json_response({"ok": True, "duplicate": True, "id": self.seen[msg_id]})
        return web.json_response({"ok": True, "id": self._store(request, msg_id, body)})

    def _store(self, request: web.Request, msg_id: str, body: bytes) -> str:
        try:
            payload = json.loads(body)
        except ValueError:
            payload = body.decode("utf-8", "replace")
        item_id = str(len(self.items) + 1)
        item = {"received_at": format_time(utcnow()), "path": request.path, "method": request.method, "id": item_id,
                "webhook_id": msg_id, "payload": payload}
        self.seen[msg_id] = item_id
        self.items.append(item)
        if self.options.store:
            with self.options.store.open("a", encoding="utf-8") as out:
                out.write(json.dumps(item, ensure_ascii=False) + "\n")
        self._say(f"RECEIVED {'' if request.method == 'POST' else request.method + ' '}{request.path} {msg_id}: "
                  f"{describe_payload(payload)}")
        return item_id

    def _say(self, line: str) -> None:
        if not self.options.quiet:
            print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)

    async def _received(self, request: web.Request) -> web.Response:
        return web.json_response({
            "count": len(self.items), "items": self.items, "duplicates": dict(self.duplicates),
            "rejected": dict(self.rejected), "injected": dict(self.injected), "requests": self.requests,
        })

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "count": len(self.items)})


def describe_payload(payload) -> str:
    """One readable line for a native FinPulse payload; a size for anything else."""
    if isinstance(payload, dict) and payload.get("type") == "finpulse.alert.group":
        group = payload.get("group") or {}
        counts = ", ".join(f"{n} {kind}" for kind, n in (group.get("counts") or {}).items())
        return f"GROUP {group.get('label', '?')} of {group.get('count', '?')}: {counts}"
    if isinstance(payload, dict) and isinstance(payload.get("data"), dict):
        data = payload["data"]
        observed = data.get("observed") or {}
        share = observed.get("bearish_share")
        share_text = f" bearish {share:.0%}" if isinstance(share, (int, float)) else ""
        escalated_from = data.get("escalated_from")
        state = "ESCALATED" if escalated_from else str(data.get("status", "?")).upper()
        severity = f"{escalated_from} → {data.get('severity', '?')}" if escalated_from else data.get("severity", "?")
        return (f"{state} [{severity}] {data.get('key_type', '?')} "
                f"{data.get('key', '?')!r}{share_text} (alert {data.get('id', '?')})")
    return f"{type(payload).__name__} payload, {len(json.dumps(payload))} bytes"


def load_secrets(env_var: str) -> list[str]:
    secrets = split_secrets(os.environ.get(env_var, ""))
    if not secrets:
        raise ConfigError(f"set {env_var} to the webhook secret (whsec_...; several, space-separated, during a rotation)")
    for secret in secrets:
        try:
            decode_secret(secret)
        except ValueError as exc:
            raise ConfigError(f"${env_var}: {exc}") from None
    return secrets


def run_receiver(args) -> int:
    options = ReceiverOptions(
        secrets=load_secrets(args.secret_env), tolerance_s=args.tolerance, store=Path(args.store) if args.store else None,
        fail_first=args.fail_first, throttle=args.throttle, retry_after_s=args.retry_after,
        retry_after_date=args.retry_after_date, delay_s=args.delay, quiet=args.quiet)
    if options.store:
        options.store.parent.mkdir(parents=True, exist_ok=True)
    receiver = Receiver(options)
    tls = server_tls(args.tls_cert, args.tls_key, args.client_ca)
    where = f"{'https' if tls else 'http'}://{args.host}:{args.port}"
    mtls = " (client certificates required)" if args.client_ca else ""
    web.run_app(receiver.app(), host=args.host, port=args.port, access_log=None, ssl_context=tls,
                print=lambda *_: print(f"receiver listening on {where}{mtls} (POST any path; GET {where}/received); "
                                       f"storing to {options.store or 'memory only'}", flush=True))
    return 0


def server_tls(cert_file: str | None, key_file: str | None, client_ca: str | None) -> ssl.SSLContext | None:
    """The receiver's TLS: None (plain http) without a certificate; with ``client_ca``, client certificates signed by
    those CAs are required."""
    if not cert_file:
        if key_file or client_ca:
            raise ConfigError("--tls-key and --client-ca need --tls-cert")
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert_file, key_file or None)
        if client_ca:
            context.load_verify_locations(cafile=client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the receiver's TLS files ({exc})") from None
    return context
