"""One attempt at a delivery: the signed request (a POST; a template endpoint's resolve may be a PUT or PATCH) of a
rendered body to an endpoint, and what its answer means.

The dispatcher decides when to attempt, how often, and what to record; this module only sends one request and
turns whatever comes back (an answer, a timeout, a refused certificate, a blocked address) into an ``Outcome``:
delivered, worth retrying (and after how long the endpoint asked for), or failed for good.

- Signing: Standard Webhooks headers (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``) over the exact
  body, one signature per configured secret so that a receiver mid-rotation accepts either.
- The address guard: an endpoint that may not reach private networks is sent through a session whose resolver
  refuses private addresses; a literal IP, and the target of a proxied request (the proxy resolves it), are checked
  here before anything is sent.
- What is retried: timeouts, connection errors, 408, 425, 429 and 5xx; a ``Retry-After`` on them is read (seconds
  or an HTTP date). Everything else fails at once: other 4xx, redirects (never followed), a blocked address, a
  certificate that fails verification, a proxy refusing our credentials.
- Error texts keep the first 300 characters and never carry the endpoint's secrets (``Endpoint.scrub``).
- A taken firing's answer is read whole (up to ``ANSWER_MAX``) where the endpoint names the incident it opened
  there (``incident_id_from``): its resolve closes that one.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace
from email.utils import parsedate_to_datetime

import aiohttp
import yarl

from .endpoints import BlockedAddressError, Endpoint, GuardedResolver, checked_address, literal_ip
from .signing import signature_headers
from .transport import certificate_failure, host_and_port

USER_AGENT = "FinPulse-Dispatcher/1"
RETRYABLE_STATUS = frozenset({408, 425, 429})
PAUSING_STATUS = frozenset({429, 503})   # a Retry-After on these pauses the whole endpoint, not one delivery
ERROR_TEXT_MAX = 300
ANSWER_MAX = 1 << 20      # a ServiceNow answer carries the whole record it created: some kilobytes


@dataclass(frozen=True)
class Outcome:
    """What one attempt came to."""
    ok: bool
    error: str = ""
    status: int | None = None
    retryable: bool = True
    retry_after: float | None = None
    incident_id: str = ""       # a taken firing: the id its answer gave at the endpoint's incident_id_from


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date; None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def classify(status: int, retry_after: str | None, body: bytes) -> Outcome:
    if 200 <= status < 300:
        return Outcome(ok=True, status=status)
    text = body.decode("utf-8", "replace").strip()
    error = f"HTTP {status}" + (f": {text}" if text else "")
    if 300 <= status < 400:
        return Outcome(ok=False, status=status, retryable=False, error=f"{error} (redirects are not followed)")
    retryable = status in RETRYABLE_STATUS or status >= 500
    return Outcome(ok=False, status=status, retryable=retryable, error=error,
                   retry_after=parse_retry_after(retry_after) if retryable else None)


async def _read_up_to(content: aiohttp.StreamReader, limit: int) -> bytes:
    """The answer's first ``limit`` bytes (all of it when shorter): one ``read`` may return less than is coming."""
    chunks, size = [], 0
    while size < limit:
        chunk = await content.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


class WebhookSender:
    """Sends one delivery's body to its endpoint: ``open()``, then ``send(...)`` as often as needed, then ``close()``."""

    def __init__(self):
        self._sessions: dict[bool, aiohttp.ClientSession] = {}

    def open(self) -> None:
        # Keyed by "may reach private networks": endpoints that may not get a connector whose resolver refuses them.
        self._sessions = {
            False: aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=GuardedResolver()), trust_env=False),
            True: aiohttp.ClientSession(trust_env=False),
        }

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()
        self._sessions = {}

    async def send(self, endpoint: Endpoint, webhook_id: str, body: bytes, url: str | None = None,
                   method: str = "POST", opens_incident: bool = False) -> Outcome:
        """Send ``body`` to ``endpoint`` (at ``url``, a template endpoint's resolve or update, else at its url; with
        ``method``, their ``resolve_method`` or ``update_method``), signed under ``webhook_id``; never raises for what
        the network does. A taken request that ``opens_incident`` gives ``incident_id``: what its answer names at the
        endpoint's ``incident_id_from`` (an update's or a resolve's answer may name other things)."""
        # A filled resolve_url is sent as it is (encoded): a client would resolve a "%2E%2E" a value made.
        target = yarl.URL(url, encoded=True) if url else endpoint.url.reveal()
        url = url or endpoint.url.reveal()
        host, port = host_and_port(url)
        guarded = not endpoint.settings.allow_private
        try:
            # The endpoint's headers first: ours (framing, signature) always win; config checks refuse clashes anyway.
            headers = {**endpoint.request_headers(), "Content-Type": "application/json", "User-Agent": USER_AGENT}
            if endpoint.signing_secrets:
                headers.update(signature_headers(webhook_id, body, [s.reveal() for s in endpoint.signing_secrets]))
            if guarded and (endpoint.proxy is not None or literal_ip(host)):
                # The guarded session's resolver checks the hosts it resolves; a literal IP is never resolved, and
                # through a proxy the proxy resolves the target: check it here, before anything is sent.
                await checked_address(host, port)
            # A proxy may be on a private network (the operator configured it): the guarded resolver would refuse it.
            session = self._sessions[not guarded or endpoint.proxy is not None]
            proxy = endpoint.proxy
            if proxy is not None and not url.startswith("https:"):
                # An http request goes to the proxy as it is, so the proxy's credentials travel in it; aiohttp sends
                # proxy_headers with a CONNECT (https targets) only, and there they stay between us and the proxy.
                headers.update(proxy.headers())
            async with session.request(method, target, data=body, headers=headers, allow_redirects=False,
                                       ssl=endpoint.tls, proxy=proxy.url if proxy else None,
                                       proxy_headers=proxy.headers() if proxy else None,
                                       timeout=aiohttp.ClientTimeout(total=endpoint.settings.timeout_s)) as response:
                # An error's first words are enough for the record; an answer that names an incident is read whole.
                reads_id = opens_incident and 200 <= response.status < 300
                answer = await _read_up_to(response.content, ANSWER_MAX if reads_id else 200)
                outcome = classify(response.status, response.headers.get("Retry-After"), answer)
                if reads_id:
                    outcome = replace(outcome, incident_id=endpoint.incident_id_in(answer))
        except BlockedAddressError as exc:
            outcome = Outcome(ok=False, retryable=False, error=str(exc))
        except aiohttp.ClientConnectorCertificateError as exc:
            # A configuration error: retrying cannot help.
            outcome = Outcome(ok=False, retryable=False, error=f"{certificate_failure(exc, host)}; not retried: fix "
                                                               f"the config, then `finpulse dispatch --redeliver`")
        except aiohttp.ClientHttpProxyError as exc:
            # The proxy refused the tunnel: wrong credentials (407) will not get better by retrying.
            wrong_credentials = exc.status == 407
            outcome = Outcome(ok=False, retryable=not wrong_credentials,
                              error=f"the proxy answered the CONNECT with {exc.status} {exc.message}"
                                    + ("; not retried: check the credentials in proxy_env" if wrong_credentials else ""))
        except aiohttp.ClientConnectorError as exc:
            blocked = isinstance(exc.os_error, BlockedAddressError)
            outcome = Outcome(ok=False, retryable=not blocked, error=str(exc.os_error) if blocked else f"{type(exc).__name__}: {exc}")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            outcome = Outcome(ok=False, error=f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        # A resolve's URL was filled from its template, so the scrub's own copy of it matches no text: name it.
        return replace(outcome, error=endpoint.scrub(outcome.error, sent_to=url)[:ERROR_TEXT_MAX])
