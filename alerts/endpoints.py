"""Where alerts are delivered: the ``[alerts]`` settings, secrets from the environment, the guard that keeps
webhooks off private networks (SSRF), and ``--check``'s look at each endpoint (``preflight``).

``[alerts]`` (``AlertsSettings``) holds the dispatcher's options and the list of endpoints::

    [alerts]
    backoff_initial_s = 1.0          # first retry after up to this long (full jitter), doubling each attempt
    backoff_max_s = 300.0            # the doubling stops here
    max_concurrency = 16             # requests in flight at once, all endpoints together
    max_alert_age_s = 21600.0        # older alerts are recorded "expired", not sent (a new dispatcher, a long outage)
    group_id = ""                    # consumer group; default "<worker.app_id>-dispatcher"
    replay_endpoint = ""             # the one endpoint that receives alerts of replays (run_id set), and no live ones
    dashboard_url = ""               # links back to the dashboard in Slack/PagerDuty/Alertmanager messages
    metrics_port = 6068              # `finpulse dispatch` alone: /metrics, /healthz, /readyz here (0 = none)
    metrics_host = "0.0.0.0"         # the interface they listen on

    [[alerts.inhibit]]               # while a topic alert fires, its tickers' alerts about it are not notified
    source = ["key_type=topic"]
    target = ["key_type=ticker"]
    equal = ["about"]

    [[alerts.endpoints]]
    name = "risk-desk"                          # unique; part of the delivery key
    url = "https://hooks.example.com/finpulse"  # or url_env = "VAR" when the URL is a secret (Slack, Teams: required)
    format = "native"                           # native | slack | teams | pagerduty | alertmanager | template
    template = {}                               # format = "template": the body, with {field} placeholders
    group_template = {}                         # format = "template" with group_by: a group notification's body
    resolve_url = ""                            # format = "template": where a resolve goes instead of url, e.g.
                                                # ".../v2/alerts/{alert_id}/close" (or resolve_url_env = "VAR")
    resolve_template = {}                       # format = "template": a resolve's body there (default: template)
    incident_id_from = ""                       # format = "template": JSON pointer into the answer to the firing,
                                                # e.g. "/result/sys_id": its value is {incident_id} for the resolve
    resolve_method = "POST"                     # format = "template": POST | PUT | PATCH for a resolve
    update_template = {}                        # with incident_id_from: an escalation of an open incident is sent
                                                # as an update with this body, e.g. { urgency = "1" }
    update_url = ""                             # where the update goes (default: resolve_url), e.g.
                                                # ".../issue/{incident_id}/comment"
    update_method = ""                          # POST | PUT | PATCH for an update (default: resolve_method when
                                                # it goes to resolve_url, else POST)
    secret_env = "FINPULSE_WEBHOOK_SECRET"      # env var(s) holding whsec_ secrets; several keys = rotation
    routing_key_env = ""                        # PagerDuty: env var holding the integration's routing key
    allow_private = false                       # true: may target private/loopback/link-local addresses
    min_severity = "info"                       # info | warning | critical
    key_types = []                              # e.g. ["topic"]; empty = all
    keys = []                                   # glob patterns on the alert key, e.g. ["Energy*", "AAPL"]; empty = all
    events = []                                 # e.g. ["firing"] for a tool that opens a ticket per request; empty = all
    timeout_s = 10.0                            # per request
    retry_horizon_s = 21600.0                   # give up (state "failed") this long after the alert was emitted
    max_concurrency = 4                         # this endpoint's requests in flight at once (within [alerts]'s)
    breaker_failures = 5                        # consecutive failed attempts that pause the endpoint; 0 = never
    ca_file = ""                                # PEM bundle of CA certificates trusted for this endpoint too
    client_cert_file = ""                       # mTLS: PEM client certificate (its key in it, or in:)
    client_key_file = ""                        # PEM private key of the client certificate
    client_key_password_env = ""                # env var holding the key's passphrase when it is encrypted
    headers = {}                                # static, non-secret headers, e.g. { "X-Team" = "risk" }
    headers_env = {}                            # header -> env var holding its value, e.g. { "Authorization" = "VAR" }
    proxy = ""                                  # http(s)://host:port of an HTTP proxy; "" = direct
    proxy_env = ""                              # or: env var holding the proxy URL (when it carries credentials)
    group_by = []                               # e.g. ["key_type"]: one notification per group (alerts.grouping)
    group_wait_s = 30.0                         # with group_by: a new group's first event waits this long for others
    group_interval_s = 300.0                    # with group_by: a group notifies again at most this often

Isolation: a request first takes one of its endpoint's ``max_concurrency`` slots, then one of the shared
``[alerts] max_concurrency`` ones, so an endpoint whose requests hang holds at most its own number of shared slots
and the others keep theirs. After ``breaker_failures`` consecutive failed attempts (timeouts, connection errors,
408/425/429/5xx) the endpoint is paused like a Retry-After pauses it: its deliveries wait, and take turns to probe
it one at a time, with the pause doubling from ``backoff_initial_s`` up to ``backoff_max_s``, until it answers
(``alerts.breaker``). Each delivery keeps its own retry window: one whose window ends while the endpoint is paused
is recorded ``failed``.

Grouping (``alerts.grouping``): with ``group_by`` the endpoint gets one notification per group of alert events
instead of one per event; not for pagerduty.

Transport (``alerts.transport``): ``ca_file``, the client certificate, ``headers``/``headers_env`` and
``proxy``/``proxy_env``. Headers that frame or sign the request (Content-Type, Host, User-Agent, webhook-*...) are
refused; static headers that look like secrets (Authorization, *-Key, *-Token...) too: they go in ``headers_env``.
With a proxy the address guard still holds: the target's host is resolved and checked before the request is handed
to the proxy (the proxy itself may be on a private network: the operator configured it).

From the environment: ``FINPULSE_ALERTS__BACKOFF_MAX_S=60`` and so on, and ``FINPULSE_ALERTS__ENDPOINTS`` takes a
JSON list of endpoint tables (replacing the file's list).

Secrets (signing keys, routing keys, secret URLs, secret headers, proxy URLs with credentials, key passphrases)
are only ever read from the environment variables named here (``*_env`` settings must look like variable names, see
``stream.config.ENV_NAME``), held in ``Secret`` objects whose repr is ``***``, and scrubbed from any error text
before it is logged or stored.
"""
from __future__ import annotations

import fnmatch
import ipaddress
import json
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import parse_qsl, urlsplit

from aiohttp.resolver import ThreadedResolver

from stream.aggregate import KEY_TYPES
from stream.config import ConfigError, Settings, build_dataclass
from stream.records import SEVERITIES, severity_rank

from .formats import EVENT_KINDS, GROUP_TEMPLATE_FIELDS, TEMPLATE_FIELD_VALUES, TEMPLATE_FIELDS, template_fields
from .grouping import GroupPolicy, check_grouping
from .signing import decode_secret, split_secrets
from .templates import (SECRET_NAME, at_json_pointer, check_json_pointer, check_template, check_url_template,
                        fields_used, fill_url)
from .transport import Proxy, check_connection, check_headers, check_proxy_url, host_and_port, tls_context

FORMATS = ("native", "slack", "teams", "pagerduty", "alertmanager", "template")
PAGERDUTY_EVENTS_URL = "https://events.pagerduty.com/v2/enqueue"


@dataclass
class EndpointSettings:
    name: str
    url: str = ""
    url_env: str = ""
    format: str = "native"
    secret_env: list[str] = field(default_factory=list)
    routing_key_env: str = ""
    allow_private: bool = False
    min_severity: str = "info"
    key_types: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    timeout_s: float = 10.0
    retry_horizon_s: float = 6 * 3600.0
    max_concurrency: int = 4
    breaker_failures: int = 5
    ca_file: str = ""
    client_cert_file: str = ""
    client_key_file: str = ""
    client_key_password_env: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    headers_env: dict[str, str] = field(default_factory=dict)
    proxy: str = ""
    proxy_env: str = ""
    group_by: list[str] = field(default_factory=list)
    group_wait_s: float | None = None
    group_interval_s: float | None = None
    template: Any = None           # JSON value or JSON text; parsed and checked by _validate
    group_template: Any = None
    resolve_url: str = ""          # a URL template: fields fill its path and query (alerts.templates.fill_url)
    resolve_url_env: str = ""
    resolve_template: Any = None
    incident_id_from: str = ""     # a JSON pointer into the answer to the firing: {incident_id} (templates)
    resolve_method: str = "POST"
    update_template: Any = None    # with incident_id_from: the body of an escalation sent to the open incident
    update_url: str = ""           # a URL template, where that update goes (default: resolve_url)
    update_method: str = ""        # POST, PUT or PATCH; default: resolve_method to resolve_url, else POST


@dataclass
class AlertsSettings:
    """``[alerts]``: the dispatcher's options; ``endpoints`` is validated into ``EndpointSettings``."""
    endpoints: list[dict] = field(default_factory=list)
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 300.0
    max_concurrency: int = 16
    max_alert_age_s: float = 6 * 3600.0
    group_id: str = ""
    replay_endpoint: str = ""
    dashboard_url: str = ""
    # `finpulse dispatch` alone serves /metrics, /healthz and /readyz here (0: not at all); inside the worker they
    # are on the worker's web server ([worker] web_port) instead.
    metrics_port: int = 6068
    metrics_host: str = "0.0.0.0"
    # Inhibition rules (alerts.inhibition): [[alerts.inhibit]] source / target / equal.
    inhibit: list[dict] = field(default_factory=list)


@dataclass
class AlertDeliveryConfig:
    """The validated ``[alerts]`` section."""
    endpoints: list[EndpointSettings]
    options: AlertsSettings
    inhibit_rules: list = field(default_factory=list)     # alerts.inhibition.InhibitRule, parsed from options


# ---------------------------------------------------------------- secrets

class Secret:
    """A value that must never be printed: repr/str show ``***``; ``reveal()`` is the only way in."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


# ---------------------------------------------------------------- the SSRF guard

class BlockedAddressError(OSError):
    """A webhook target resolves to an address FinPulse refuses to send to (private, loopback, link-local...)."""


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def blocked_reason(address: str) -> str | None:
    """Why an IP address is not a public webhook target, or None when it is one.

    IPv6 addresses that embed an IPv4 one (IPv4-mapped ``::ffff:a.b.c.d``, 6to4, Teredo, NAT64) are judged by the
    embedded address, so ``::ffff:127.0.0.1`` is loopback. Anything not globally routable is refused, which also
    covers carrier-grade NAT (100.64.0.0/10), documentation and benchmark ranges.
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            inner = blocked_reason(str(embedded))
            return f"{inner} (embedded IPv4)" if inner else None
    for reason, hit in (("unspecified", ip.is_unspecified), ("loopback", ip.is_loopback),
                        ("link-local", ip.is_link_local), ("site-local", getattr(ip, "is_site_local", False)),
                        ("multicast", ip.is_multicast),
                        ("private", ip.is_private), ("reserved", ip.is_reserved)):
        if hit:
            return reason
    return None if ip.is_global else "non-global"


def literal_ip(host: str) -> str | None:
    """The host as an IP address string when it is a literal (``[::1]`` included), else None."""
    try:
        return str(ipaddress.ip_address(host.strip("[]").split("%", 1)[0]))
    except ValueError:
        return None


def check_address(host: str, address: str) -> None:
    reason = blocked_reason(address)
    if reason:
        shown = host if literal_ip(host) == address else f"{host} resolves to {address}, which"
        raise BlockedAddressError(f"refused: {shown} is a {reason} address; set allow_private = true on the "
                                  f"endpoint to allow it")


class GuardedResolver(ThreadedResolver):
    """Resolves like aiohttp's default resolver, then refuses the host if ANY of its addresses is blocked.

    The connector connects to exactly the addresses returned here, so the check holds at send time even when DNS
    changes between the config check and the request (DNS rebinding). Literal IP hosts never reach a resolver:
    the dispatcher checks those itself before sending.
    """

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET):
        results = await super().resolve(host, port, family)
        for result in results:
            check_address(host, result["host"])
        return results


async def checked_address(host: str, port: int) -> str:
    """An address of ``host`` after checking every one it resolves to (a literal IP is checked as it is); raises
    BlockedAddressError for a refused one, OSError when it does not resolve."""
    literal = literal_ip(host)
    if literal:
        check_address(host, literal)
        return literal
    results = await GuardedResolver().resolve(host, port, socket.AF_UNSPEC)
    return results[0]["host"]


async def preflight(endpoint: "Endpoint") -> str:
    """What `finpulse dispatch --check` says of an endpoint, or raise OSError saying what is wrong.

    The target's host is resolved and checked by the address guard, as a delivery does (with a proxy too). An https
    endpoint is then connected to the way a delivery would be, directly or through its proxy, up to the end of the
    TLS handshake (its certificate verified with ``ca_file``, the client certificate offered); no request is sent.
    An http endpoint behind a proxy gets the proxy connected to."""
    settings = endpoint.settings
    url = endpoint.url.reveal()
    host, port = host_and_port(url)
    address = None if settings.allow_private else await checked_address(host, port)
    verdict = "ok (private addresses allowed)" if settings.allow_private else "ok"
    tls = endpoint.tls if url.startswith("https:") else None
    if tls is None and endpoint.proxy is None:
        return verdict
    return f"{verdict}; " + await check_connection(host, port, address, tls, endpoint.proxy, settings.timeout_s)


# ---------------------------------------------------------------- loading and validation

def load_delivery_config(settings: Settings) -> AlertDeliveryConfig:
    """Read and validate ``[alerts]`` and its endpoints; raise ConfigError saying what is wrong."""
    options = settings.section("alerts", AlertsSettings)
    if not all(isinstance(e, Mapping) for e in options.endpoints):
        raise ConfigError("[alerts] endpoints must be a list of tables ([[alerts.endpoints]])")
    endpoints = [build_dataclass(EndpointSettings, e, where=f"alerts.endpoints[{i}]") for i, e in enumerate(options.endpoints)]
    config = AlertDeliveryConfig(endpoints=endpoints, options=options)
    _validate(config)
    return config


def _validate(config: AlertDeliveryConfig) -> None:
    seen: set[str] = set()
    for ep in config.endpoints:
        where = f"[[alerts.endpoints]] {ep.name!r}"
        if not ep.name or "|" in ep.name or ep.name != ep.name.strip():
            raise ConfigError(f"{where}: name must be non-empty, without '|' or surrounding spaces")
        if ep.name in seen:
            raise ConfigError(f"{where}: two endpoints have this name")
        seen.add(ep.name)
        if ep.format not in FORMATS:
            raise ConfigError(f"{where}: format must be one of {', '.join(FORMATS)}")
        if ep.min_severity not in SEVERITIES:
            raise ConfigError(f"{where}: min_severity must be one of {', '.join(SEVERITIES)}")
        bad_types = sorted(set(ep.key_types) - set(KEY_TYPES))
        if bad_types:
            raise ConfigError(f"{where}: key_types {bad_types} unknown (use {', '.join(KEY_TYPES)})")
        bad_events = sorted(set(ep.events) - set(EVENT_KINDS))
        if bad_events:
            raise ConfigError(f"{where}: events {bad_events} unknown (use {', '.join(EVENT_KINDS)})")
        if ep.timeout_s <= 0 or ep.retry_horizon_s <= 0:
            raise ConfigError(f"{where}: timeout_s and retry_horizon_s must be positive")
        if ep.max_concurrency < 1 or ep.breaker_failures < 0:
            raise ConfigError(f"{where}: max_concurrency must be at least 1, breaker_failures at least 0 (0 = off)")
        if ep.client_key_file and not ep.client_cert_file:
            raise ConfigError(f"{where}: client_key_file needs client_cert_file (the certificate it belongs to)")
        check_headers(ep.headers, ep.headers_env, where)
        _check_templates(ep, where)
        check_grouping(ep, where)
        if ep.proxy and ep.proxy_env:
            raise ConfigError(f"{where}: set proxy or proxy_env, not both")
        if ep.proxy:
            check_proxy_url(ep.proxy, where)
        if ep.url and ep.url_env:
            raise ConfigError(f"{where}: set url or url_env, not both")
        if ep.format == "pagerduty" and not ep.routing_key_env:
            raise ConfigError(f"{where}: a pagerduty endpoint needs routing_key_env (the env var with the routing key)")
        if ep.format == "native" and not ep.secret_env:
            raise ConfigError(f"{where}: a native endpoint is signed, so it needs secret_env (the env var with a whsec_ secret)")
        if ep.format in ("slack", "teams") and ep.url:
            what = ("a Slack webhook URL carries its token in the path" if ep.format == "slack" else
                    "a Teams Workflows webhook URL carries its signature (sig=) in the query")
            raise ConfigError(f"{where}: {what}, so it is a secret and never a value in the config: put it in an "
                              f"environment variable and name that in url_env")
        if ep.url:
            check_url(ep.url, ep.allow_private, where)
            check_no_secrets_in(ep.url, "url", where)
        elif not ep.url_env and ep.format != "pagerduty":
            raise ConfigError(f"{where}: url (or url_env) is required")
    o = config.options
    if o.backoff_initial_s <= 0 or o.backoff_max_s < o.backoff_initial_s:
        raise ConfigError("[alerts] needs 0 < backoff_initial_s <= backoff_max_s")
    if o.max_concurrency < 1:
        raise ConfigError("[alerts] max_concurrency must be at least 1")
    if o.max_alert_age_s <= 0:
        raise ConfigError("[alerts] max_alert_age_s must be positive")
    if not 0 <= o.metrics_port <= 65535:
        raise ConfigError("[alerts] metrics_port must be a TCP port (0 = no metrics server)")
    if o.replay_endpoint and o.replay_endpoint not in seen:
        raise ConfigError(f"[alerts] replay_endpoint {o.replay_endpoint!r} names no endpoint")
    from .inhibition import parse_rules
    config.inhibit_rules = parse_rules(o.inhibit)


def _check_templates(ep: EndpointSettings, where: str) -> None:
    """A template endpoint has its body template(s), parsed and checked here once; no other endpoint has any."""
    ep.resolve_method, ep.update_method = str(ep.resolve_method).upper(), str(ep.update_method).upper()
    given = [name for name in ("template", "group_template", "resolve_url", "resolve_url_env", "resolve_template",
                               "incident_id_from", "update_template", "update_url", "update_method")
             if getattr(ep, name) not in (None, "", {})]
    given += ["resolve_method"] * (ep.resolve_method != "POST")
    if "update_template" not in given:
        ep.update_template = None    # an empty one is none: escalations of an open incident are not sent
    if ep.format != "template":
        if given:
            raise ConfigError(f"{where}: {' and '.join(given)} only {'means' if len(given) == 1 else 'mean'} something "
                              f"with format = \"template\"")
        return
    if "template" not in given:
        raise ConfigError(f"{where}: a template endpoint needs template, the body to send (e.g. template = "
                          f"{{ text = \"{{headline}}\" }}; fields: {', '.join(TEMPLATE_FIELDS)})")
    ep.template = check_template(ep.template, TEMPLATE_FIELDS, f"{where} template", TEMPLATE_FIELD_VALUES)
    if ep.group_by and "group_template" not in given:
        raise ConfigError(f"{where}: a grouped template endpoint needs group_template, the body of a group "
                          f"notification (fields: {', '.join(GROUP_TEMPLATE_FIELDS)}); or remove group_by")
    if "group_template" in given:
        if not ep.group_by:
            raise ConfigError(f"{where}: group_template is only sent with group_by; set group_by or remove it")
        ep.group_template = check_template(ep.group_template, GROUP_TEMPLATE_FIELDS, f"{where} group_template")
    _check_resolve(ep, given, where)
    _check_incident_id(ep, where)
    _check_update(ep, given, where)


def _check_incident_id(ep: EndpointSettings, where: str) -> None:
    """``incident_id_from`` names where the answer to a firing holds the tool's id for what it opened; a resolve
    fills ``{incident_id}`` with it (and is sent with ``resolve_method``)."""
    if ep.resolve_method not in REQUEST_METHODS:
        raise ConfigError(f"{where}: resolve_method must be one of {', '.join(REQUEST_METHODS)}, not "
                          f"{ep.resolve_method!r}")
    if ep.resolve_method != "POST" and not (ep.resolve_url or ep.resolve_url_env):
        raise ConfigError(f"{where}: resolve_method = \"{ep.resolve_method}\" updates a record at its own URL: set "
                          f"resolve_url (e.g. \".../incident/{{incident_id}}\"), or it would {ep.resolve_method} url")
    if ep.resolve_method != "POST" and ep.events and "resolved" not in ep.events:
        raise ConfigError(f"{where}: resolve_method is for resolves, and events = {ep.events} takes none")
    uses = sorted(name for name in ("template", "resolve_url", "resolve_template")
                  if "incident_id" in fields_used(getattr(ep, name)))
    if not ep.incident_id_from:
        if uses:
            raise ConfigError(f"{where}: {' and '.join(uses)} fill {{incident_id}}, which comes from the answer to "
                              f"the firing: set incident_id_from, a JSON pointer to it (e.g. \"/result/sys_id\")")
        return
    check_json_pointer(ep.incident_id_from, f"{where} incident_id_from")
    if ep.group_by:
        raise ConfigError(f"{where}: incident_id_from cannot go with group_by: a group notification opens one thing "
                          f"for many episodes")
    if ep.events and not {"firing", "resolved"} <= set(ep.events):
        raise ConfigError(f"{where}: incident_id_from reads the answer to a firing for its resolve, and events = "
                          f"{ep.events} does not take both")
    if ep.events and "escalation" not in ep.events and ep.min_severity != SEVERITIES[0]:
        raise ConfigError(f"{where}: with min_severity = \"{ep.min_severity}\", an episode that fires lower opens its "
                          f"incident here when it escalates, and events = {ep.events} leaves escalations out: add "
                          f"\"escalation\" (one incident an episode all the same: later escalations update it, with "
                          f"update_template, or are not sent)")
    if not {"resolve_url", "resolve_template"} & set(uses) and not ep.resolve_url_env:
        raise ConfigError(f"{where}: incident_id_from is read for the resolve, and neither resolve_url nor "
                          f"resolve_template fills {{incident_id}}: the resolve would go to url and open another "
                          f"incident (e.g. resolve_url = \".../incident/{{incident_id}}\")")


def _check_update(ep: EndpointSettings, given: list[str], where: str) -> None:
    """An endpoint that opens incidents may send an escalation of an open one as an update of it: ``update_template``
    is its body, sent to ``update_url`` (default: ``resolve_url``, the incident's own URL) with ``update_method``."""
    named = [name for name in ("update_template", "update_url", "update_method") if name in given]
    if not named:
        return
    if not ep.incident_id_from:
        raise ConfigError(f"{where}: {' and '.join(named)} {'is' if len(named) == 1 else 'are'} for updating the "
                          f"incident an episode opened, and without incident_id_from nothing names it: set "
                          f"incident_id_from, a JSON pointer to the id in the answer to the firing")
    if "update_template" not in named:
        raise ConfigError(f"{where}: {' and '.join(named)} without update_template, the update's body: set it (e.g. "
                          f"update_template = {{ urgency = \"{{severity|map:critical=1,*=2}}\" }})")
    if ep.update_method and ep.update_method not in REQUEST_METHODS:
        raise ConfigError(f"{where}: update_method must be one of {', '.join(REQUEST_METHODS)}, not "
                          f"{ep.update_method!r}")
    # To the incident's own URL, by default as its resolve goes there (ServiceNow's PATCH); elsewhere, POST.
    ep.update_method = ep.update_method or ("POST" if ep.update_url else ep.resolve_method)
    if ep.min_severity == SEVERITIES[-1]:
        raise ConfigError(f"{where}: update_template is sent when an open incident escalates, and with min_severity = "
                          f"\"{ep.min_severity}\" the escalation that opens it is the highest: nothing is ever "
                          f"updated; remove it (or lower min_severity)")
    if ep.events and "escalation" not in ep.events:
        raise ConfigError(f"{where}: update_template is sent for escalations, and events = {ep.events} takes none; "
                          f"add \"escalation\" to events or remove it")
    ep.update_template = check_template(ep.update_template, TEMPLATE_FIELDS, f"{where} update_template",
                                        TEMPLATE_FIELD_VALUES)
    if ep.update_url:
        check_url(ep.update_url, ep.allow_private, f"{where} update_url")
        check_no_secrets_in(ep.update_url, "update_url", where, "updates to a URL that carries a secret go to the "
                            "resolve's: put that URL in resolve_url_env and leave update_url out")
        check_url_template(ep.update_url, TEMPLATE_FIELDS, f"{where} update_url", TEMPLATE_FIELD_VALUES)
        if ep.url:
            check_same_origin(ep.url, ep.update_url, where, "update_url")
    elif not (ep.resolve_url or ep.resolve_url_env):
        raise ConfigError(f"{where}: update_template needs update_url, where the update goes (e.g. "
                          f"\".../incident/{{incident_id}}\"), or a resolve_url it goes to")
    goes_to = ep.update_url or ep.resolve_url      # a resolve_url_env's is checked once read (Endpoint)
    if goes_to and "incident_id" not in fields_used(goes_to) | fields_used(ep.update_template):
        raise ConfigError(f"{where}: neither {'update_url' if ep.update_url else 'resolve_url'} nor update_template "
                          f"fills {{incident_id}}: the update could not say which incident (e.g. "
                          f"\".../incident/{{incident_id}}\")")


def _check_resolve(ep: EndpointSettings, given: list[str], where: str) -> None:
    """A template endpoint's resolve may go elsewhere (``resolve_url``) with a body of its own (``resolve_template``)."""
    elsewhere = [name for name in ("resolve_url", "resolve_url_env", "resolve_template") if name in given]
    if not elsewhere:
        return
    if ep.resolve_url and ep.resolve_url_env:
        raise ConfigError(f"{where}: set resolve_url or resolve_url_env, not both")
    if ep.group_by:
        raise ConfigError(f"{where}: {' and '.join(elsewhere)} cannot go with group_by: a group notification "
                          f"carries firings and resolves together; send resolves to an endpoint of their own")
    if ep.events and "resolved" not in ep.events:
        raise ConfigError(f"{where}: {' and '.join(elsewhere)} {'is' if len(elsewhere) == 1 else 'are'} for resolves, "
                          f"and events = {ep.events} takes none; add \"resolved\" to events or remove "
                          f"{'it' if len(elsewhere) == 1 else 'them'}")
    if ep.resolve_url:
        check_url(ep.resolve_url, ep.allow_private, f"{where} resolve_url")
        check_no_secrets_in(ep.resolve_url, "resolve_url", where)
        check_url_template(ep.resolve_url, TEMPLATE_FIELDS, f"{where} resolve_url", TEMPLATE_FIELD_VALUES)
        if ep.url:
            check_same_origin(ep.url, ep.resolve_url, where)
    if "resolve_template" in given:
        ep.resolve_template = check_template(ep.resolve_template, TEMPLATE_FIELDS, f"{where} resolve_template",
                                             TEMPLATE_FIELD_VALUES)


REQUEST_METHODS = ("POST", "PUT", "PATCH")   # how a resolve or an update may be sent
TOKEN_LIKE = 8     # a path segment or query value of a secret URL this long is scrubbed on its own


def check_same_origin(url: str, other_url: str, where: str, setting: str = "resolve_url") -> None:
    """A resolve or an update goes to the host the endpoint's other requests go to: one host is checked
    (``--check``), trusted (``ca_file``) and proxied per endpoint."""
    def origin(u: str):
        return urlsplit(u).scheme, *host_and_port(u)
    if origin(url) != origin(other_url):
        raise ConfigError(f"{where}: {setting} must be on url's scheme, host and port ({redact_url(url)}), "
                          f"not {redact_url(other_url)}")


def updates_incident(settings: EndpointSettings, alert, opened: bool) -> bool:
    """Whether ``alert`` goes as an update of the incident an endpoint with these settings opened for its episode:
    an escalation, where an earlier event of the episode was delivered (``opened``), to an endpoint with an
    ``update_template``. Where none was (below ``min_severity``, refused, silenced, expired), the escalation opens
    the incident."""
    return (settings.update_template is not None and alert.status == "firing" and bool(alert.escalated_from)
            and opened)


def check_url(url: str, allow_private: bool, where: str) -> None:
    """Static checks that need no DNS: an http(s) URL with a host, and no literal blocked IP unless allowed."""
    try:
        parts = urlsplit(url)
        parts.port
    except ValueError:   # a port that is no number or out of range, a broken [IPv6] host: the text may be a secret
        raise ConfigError(f"{where}: the url's host or port cannot be read (a port is a number from 1 to 65535)") \
            from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}: the url must be http:// or https:// with a host (got {redact_url(url)})")
    literal = literal_ip(parts.hostname)
    if literal and not allow_private:
        try:
            check_address(parts.hostname, literal)
        except BlockedAddressError as exc:
            raise ConfigError(f"{where}: {exc}") from None


# A query parameter named like this holds a secret: SECRET_NAME's names, Google's key=, Azure's sig= and code=.
_SECRET_PARAM = re.compile(rf"^(key|sig|signature|code)$|{SECRET_NAME.pattern}", re.IGNORECASE)


def check_no_secrets_in(url: str, setting: str, where: str, instead: str = "") -> None:
    """A URL written in the config (``url``, ``resolve_url``, ``update_url``) holds no credentials and no literal
    value of a query parameter named like a secret: those go in the environment (``url_env``, ``resolve_url_env``;
    ``instead`` says where when the setting has no ``_env`` of its own)."""
    parts = urlsplit(url)
    named = [name for name, value in parse_qsl(parts.query, keep_blank_values=True)
             if _SECRET_PARAM.search(name) and value and "{" not in value]
    what = ("credentials (user:password@)" if parts.username or parts.password else
            f"a secret in its query ({', '.join(named)}=)" if named else "")
    if what:
        instead = instead or f"put the URL in an environment variable and name that in {setting}_env"
        raise ConfigError(f"{where}: {setting} carries {what}, so it is a secret and never a value in the config: "
                          f"{instead} (value not shown)")


def redact_url(url: str) -> str:
    """What logs may show of a URL: scheme, host and port. Paths and queries can carry tokens (Slack's do)."""
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<invalid url>"
    if not parts.hostname:
        return "<invalid url>"
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    tail = "/…" if parts.path not in ("", "/") or parts.query else ""
    return f"{parts.scheme}://{host}{port}{tail}"


# ---------------------------------------------------------------- runtime endpoints

class Endpoint:
    """An endpoint ready to send to: its settings plus the secrets read from the environment."""

    def __init__(self, settings: EndpointSettings, environ: Mapping[str, str] | None = None):
        environ = os.environ if environ is None else environ
        self.settings = settings
        self.name = settings.name
        self.format = settings.format
        where = f"endpoint {settings.name!r}"
        url = _env(environ, settings.url_env, where) if settings.url_env else settings.url
        if not url and settings.format == "pagerduty":
            url = PAGERDUTY_EVENTS_URL
        if settings.url_env:
            check_url(url, settings.allow_private, f"{where} (url from ${settings.url_env})")
        self.url = Secret(url)
        self.display_url = redact_url(url)
        # Where a template endpoint's resolve goes, a URL template (alerts.templates.fill_url); None: to url.
        resolve_url = (_env(environ, settings.resolve_url_env, where) if settings.resolve_url_env
                       else settings.resolve_url)
        if settings.resolve_url_env:
            from_env = f"{where} (resolve_url from ${settings.resolve_url_env})"
            check_url(resolve_url, settings.allow_private, from_env)
            check_url_template(resolve_url, TEMPLATE_FIELDS, from_env, TEMPLATE_FIELD_VALUES)
            fills_id = "incident_id" in fields_used(resolve_url)
            if fills_id and not settings.incident_id_from:
                raise ConfigError(f"{from_env}: it fills {{incident_id}}, which comes from the answer to the firing: "
                                  f"set incident_id_from, a JSON pointer to it (e.g. \"/result/sys_id\")")
            if settings.incident_id_from and not fills_id and "incident_id" not in fields_used(
                    settings.resolve_template):
                raise ConfigError(f"{from_env}: incident_id_from is read for the resolve, and neither this URL nor "
                                  f"resolve_template fills {{incident_id}}: the resolve could not say which incident")
            if (settings.update_template is not None and not settings.update_url
                    and "incident_id" not in fields_used(resolve_url) | fields_used(settings.update_template)):
                raise ConfigError(f"{from_env}: updates go there (no update_url), and neither this URL nor "
                                  f"update_template fills {{incident_id}}: an update could not say which incident")
        if settings.resolve_url_env or (resolve_url and settings.url_env):
            check_same_origin(url, resolve_url, where)
        if settings.update_url and settings.url_env:
            check_same_origin(url, settings.update_url, where, "update_url")
        self.resolve_url = Secret(resolve_url) if resolve_url else None
        # Where an update of an open incident goes: the incident's own URL unless update_url says otherwise.
        self.update_url = Secret(settings.update_url) if settings.update_url else self.resolve_url
        self.signing_secrets: list[Secret] = []
        for var in settings.secret_env:
            for secret in split_secrets(_env(environ, var, where)):
                try:
                    decode_secret(secret)
                except ValueError as exc:
                    raise ConfigError(f"{where}: ${var}: {exc}") from None
                self.signing_secrets.append(Secret(secret))
        self.routing_key = Secret(_env(environ, settings.routing_key_env, where)) if settings.routing_key_env else None
        password = _env(environ, settings.client_key_password_env, where) if settings.client_key_password_env else None
        self.tls = tls_context(settings.ca_file, settings.client_cert_file, settings.client_key_file, password, where)
        self.headers = dict(settings.headers)
        self.secret_headers = {name: Secret(_env(environ, var, where)) for name, var in settings.headers_env.items()}
        for name, value in self.secret_headers.items():
            if "\r" in value.reveal() or "\n" in value.reveal():
                raise ConfigError(f"{where}: the value of header {name} (from ${settings.headers_env[name]}) must be "
                                  f"one line")
        proxy_url = _env(environ, settings.proxy_env, where) if settings.proxy_env else settings.proxy
        if settings.proxy_env:
            check_proxy_url(proxy_url, f"{where} (proxy from ${settings.proxy_env})", from_env=True)
        self.proxy = Proxy.from_url(proxy_url) if proxy_url else None
        self._proxy_secrets = [Secret(proxy_url), Secret(urlsplit(proxy_url).password or ""),
                               Secret(self.proxy.authorization if self.proxy else "")]
        self.grouping = GroupPolicy.of(settings)
        # The earliest time the next request to this endpoint may go out (a Retry-After pauses the whole endpoint).
        self.not_before = 0.0

    def accepts(self, alert) -> bool:
        """Whether this endpoint's severity and key filters let ``alert`` through."""
        s = self.settings
        if severity_rank(alert.severity) < SEVERITIES.index(s.min_severity):
            return False
        if s.key_types and alert.key_type not in s.key_types:
            return False
        return not s.keys or any(fnmatch.fnmatchcase(alert.key, pattern) for pattern in s.keys)

    def wants(self, alert) -> bool:
        """Whether this endpoint takes this kind of event (``events``: firing, escalation, resolved) at all."""
        return not self.settings.events or alert.event_kind in self.settings.events

    def url_for(self, alert, ctx) -> str | None:
        """Where this endpoint takes ``alert`` (sent under ``ctx``, an ``alerts.formats.DeliveryContext``): a
        resolve's ``resolve_url`` or an update's ``update_url`` filled with its fields, when the endpoint has one;
        None: its url. ValueError for a resolve or an update of an endpoint that opens incidents when no incident id
        is known: it has nowhere to go."""
        updating = ctx.update
        if (alert.status == "resolved" or updating) and self.opens_incidents and not ctx.incident_id:
            # Sent without it, a resolve would update the collection (PATCH .../incident/) or nothing at all.
            what, act = ("resolve", "close") if alert.status == "resolved" else ("update", "update")
            raise ValueError(f"no incident id to {what}: nothing {self.name!r} was sent of this episode named one "
                             f"(its firing was not delivered, or the answer to it had no id where incident_id_from "
                             f"said when it was read), so it cannot say which incident to {act}")
        goes_to = self.update_url if updating else self.resolve_url if alert.status == "resolved" else None
        return None if goes_to is None else fill_url(goes_to.reveal(), template_fields(alert, ctx))

    def updates(self, alert, opened: bool) -> bool:
        """Whether ``alert`` goes as an update of the incident this endpoint opened for its episode, ``opened``
        saying whether an earlier event of it was delivered here (see ``updates_incident``)."""
        return updates_incident(self.settings, alert, opened)

    def opens_incident_with(self, alert, ctx) -> bool:
        """Whether ``alert``, sent under ``ctx``, opens the incident of its episode here: the answer names it."""
        return self.opens_incidents and alert.status == "firing" and not ctx.update

    @property
    def sends_updates(self) -> bool:
        """Whether an escalation of an incident this endpoint opened is sent to it, as an update."""
        return self.opens_incidents and self.settings.update_template is not None

    @property
    def opens_incidents(self) -> bool:
        """Whether this endpoint's tool names what it opens, and is told to close that (``incident_id_from``)."""
        return bool(self.settings.incident_id_from)

    def method_for(self, alert, ctx) -> str:
        """The HTTP method ``alert`` is sent with under ``ctx``: a template endpoint's ``resolve_method`` for a
        resolve, its ``update_method`` for an update, else POST."""
        if alert.status == "resolved":
            return self.settings.resolve_method
        return self.settings.update_method if ctx.update else "POST"

    def incident_id_in(self, answer: bytes) -> str:
        """The id at ``incident_id_from`` in the answer to a firing, as text; "" where there is none."""
        try:
            found = at_json_pointer(json.loads(answer), self.settings.incident_id_from)
        except ValueError:
            return ""
        return str(found).strip() if isinstance(found, (str, int)) and not isinstance(found, bool) else ""

    def scrub(self, text: str, sent_to: str = "") -> str:
        """``text`` with every secret of this endpoint replaced by ***: error messages can echo URLs or keys, and
        an answer's body the path or query it was sent to (``sent_to``: the URL of the request, when a filled
        ``resolve_url``), which are secrets when the URL came from the environment."""
        secrets = [self.url, self.resolve_url, self.routing_key, *self.signing_secrets, *self.secret_headers.values(),
                   *self._proxy_secrets]
        if self.settings.url_env:
            secrets += _path_and_query(self.url.reveal())
        if sent_to:
            secrets += [Secret(sent_to), *(_path_and_query(sent_to) if self.settings.resolve_url_env else ())]
        for secret in sorted(secrets, key=lambda s: -len(s.reveal()) if s is not None else 0):
            if secret is not None and secret.reveal():
                text = text.replace(secret.reveal(), "***")
        return text

    def request_headers(self) -> dict[str, str]:
        """The endpoint's own headers, static and secret, for one request (the dispatcher adds its own after)."""
        return {**self.headers, **{name: value.reveal() for name, value in self.secret_headers.items()}}

    def __repr__(self) -> str:
        via = f", proxy={self.proxy.url!r}" if self.proxy else ""
        return f"Endpoint(name={self.name!r}, format={self.format!r}, url={self.display_url!r}{via})"


def _path_and_query(url: str) -> list[Secret]:
    """What an answer may echo of a URL: its path and query together and each alone (not a bare "/"), and each
    path segment and query value long enough to be a token ("bad signature QUERYSIG123 for segment s3cr3t...")."""
    parts = urlsplit(url)
    shown = [parts.path + (f"?{parts.query}" if parts.query else ""), parts.path, parts.query]
    pieces = [segment for segment in parts.path.split("/") if "{" not in segment]
    pieces += [value for _, value in parse_qsl(parts.query, keep_blank_values=True) if "{" not in value]
    return [Secret(text) for text in shown if len(text) > 1] + [Secret(p) for p in pieces if len(p) >= TOKEN_LIKE]


def _env(environ: Mapping[str, str], var: str, where: str) -> str:
    value = environ.get(var, "").strip()
    if not value:
        raise ConfigError(f"{where}: environment variable {var} is not set (it holds a secret, so it is never read "
                          f"from the config file)")
    return value


def build_endpoints(config: AlertDeliveryConfig, environ: Mapping[str, str] | None = None) -> list[Endpoint]:
    return [Endpoint(e, environ) for e in config.endpoints]

