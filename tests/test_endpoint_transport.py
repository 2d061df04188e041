"""Per-endpoint isolation and transport, with real parts: a real tansu broker and Dispatcher, real HTTP and HTTPS
receivers on 127.0.0.1 (certificates from a test CA made with the openssl CLI), and a tiny real forwarding proxy
(absolute-form requests for http targets, CONNECT tunnels for https ones)."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import sys
from collections import Counter
from urllib.parse import urlsplit

import pytest
from aiohttp import encode_basic_auth, web
from aiokafka import AIOKafkaProducer

from alerts.breaker import CircuitBreaker
from alerts.deliveries import DELIVERED, FAILED, PENDING, delivery_key, webhook_id
from alerts.dispatch import Dispatcher
from alerts.endpoints import Endpoint, load_delivery_config
from alerts.receiver import Receiver, ReceiverOptions, server_tls
from alerts.signing import HEADER_ID, generate_secret
from stream.config import ConfigError, Settings
from stream.broker import free_port
from tests.test_delivery import REPO, finpulse, make_alert

GATEWAY_TOKEN = "Bearer gw-7f3c9a1e5b2d4c6e8f0a"
PROXY_PASSWORD = "pr0xy-s3cret-pw"


# ---------------------------------------------------------------- real parts: a test CA, servers, a proxy

def server_tls_of(pki, require_client_cert: bool) -> ssl.SSLContext:
    """The TLS of `finpulse receiver --tls-cert --tls-key [--client-ca]`, with the test CA's server certificate."""
    return server_tls(str(pki["server.pem"]), str(pki["server.key"]), str(pki["ca.pem"]) if require_client_cert else None)


async def serve(app: web.Application, tls: ssl.SSLContext | None = None) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls).start()
    return runner, runner.addresses[0][1]


def recording_headers(receiver: Receiver, seen: list[dict]) -> web.Application:
    """The receiver's app, noting every request's headers (the test's own view of what arrived)."""
    @web.middleware
    async def note(request, handler):
        seen.append({"path": request.path, **{k.lower(): v for k, v in request.headers.items()}})
        return await handler(request)
    app = receiver.app()
    app.middlewares.append(note)
    return app


class ForwardProxy:
    """A tiny real HTTP proxy: forwards absolute-form requests (http targets) and opens CONNECT tunnels (https
    targets). It reaches loopback targets only (the tests run offline) and answers 502 for any other; it notes each
    request's method, target and Proxy-Authorization, and answers 407 when that is not ``credentials`` (if set)."""

    def __init__(self, credentials: str = ""):
        self.credentials = credentials
        self.seen: list[dict] = []
        self.port = 0
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> "ForwardProxy":
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        request_line, *header_lines = [line for line in head.split("\r\n") if line]
        method, target, version = request_line.split(" ")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in header_lines)}
        self.seen.append({"method": method, "target": target, "proxy_auth": headers.get("proxy-authorization")})
        host, port = (target.rsplit(":", 1) if method == "CONNECT"
                      else (urlsplit(target).hostname, urlsplit(target).port or 80))
        wrong_credentials = self.credentials and headers.get("proxy-authorization") != self.credentials
        refusal = (b"407 Proxy Authentication Required" if wrong_credentials
                   else b"502 Bad Gateway" if host not in ("127.0.0.1", "localhost") else None)
        if refusal:
            writer.write(b"HTTP/1.1 " + refusal + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
            writer.close()
            return
        upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
        if method == "CONNECT":
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            parts = urlsplit(target)
            kept = [line for line in header_lines
                    if not line.lower().startswith(("proxy-authorization:", "proxy-connection:", "connection:"))]
            origin_form = parts.path + (f"?{parts.query}" if parts.query else "")
            head = [f"{method} {origin_form} {version}", *kept, "Connection: close", "", ""]
            upstream_writer.write("\r\n".join(head).encode("latin-1"))
        await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer), return_exceptions=True)


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    finally:
        sink.close()


def produce_in_order(settings: Settings, topic: str, alerts) -> None:
    """Put alerts on partition 0 in this order, so that the dispatcher takes them on (and starts them) in it."""
    async def _send():
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")
        await producer.start()
        try:
            for alert in alerts:
                await producer.send_and_wait(topic, alert.to_json(), key=alert.key.encode(), partition=0)
        finally:
            await producer.stop()
    asyncio.run(_send())


async def until(predicate, polls: int = 600):
    """Poll ``predicate`` every tenth of a second until it is truthy; its last value."""
    for _ in range(polls):
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.1)
    return predicate()


# ---------------------------------------------------------------- configuration

def test_transport_settings_are_checked_and_their_secrets_never_shown(monkeypatch, pki):
    secret = generate_secret()
    monkeypatch.setenv("T_TR_SECRET", secret)
    monkeypatch.setenv("T_TR_GATEWAY", GATEWAY_TOKEN)
    monkeypatch.setenv("T_TR_PROXY", f"http://finpulse:{PROXY_PASSWORD}@proxy.internal:3128")

    def config(**endpoint):
        return load_delivery_config(Settings(raw={"alerts": {"endpoints": [
            {"name": "e", "url": "https://risk.example.com/hook", "secret_env": "T_TR_SECRET", **endpoint}]}}))

    refusals = [
        (dict(headers={"Content-Type": "text/plain"}), "set by FinPulse itself"),
        (dict(headers={"webhook-signature": "v1,x"}), "set by FinPulse itself"),
        (dict(headers={"Host": "elsewhere"}), "set by FinPulse itself"),
        (dict(headers={"User-Agent": "curl"}), "set by FinPulse itself"),
        (dict(headers_env={"Content-Length": "T_TR_GATEWAY"}), "set by FinPulse itself"),
        (dict(headers={"Bad Name": "x"}), "not a valid HTTP header name"),
        (dict(headers={"X-Team": "risk\r\nX-Evil: 1"}), "one line"),
        (dict(headers={"X-Team": 3}), "must be a string"),
        (dict(headers={"x-team": "risk"}, headers_env={"X-Team": "T_TR_GATEWAY"}), "set twice"),
        (dict(headers_env={"Authorization": GATEWAY_TOKEN}), "must name an environment variable"),
        (dict(proxy="socks5://proxy.internal:1080"), "http:// or https://"),
        (dict(proxy="http://proxy.internal:3128", proxy_env="T_TR_PROXY"), "not both"),
        (dict(client_key_file=str(pki["client.key"])), "needs client_cert_file"),
        (dict(max_concurrency=0), "max_concurrency"),
        (dict(breaker_failures=-1), "breaker_failures"),
    ]
    for endpoint, match in refusals:
        with pytest.raises(ConfigError, match=match):
            config(**endpoint)
    # A secret where a static value belongs is refused without being echoed, saying where it goes instead.
    for endpoint in (dict(headers={"Authorization": GATEWAY_TOKEN}), dict(headers={"X-Api-Key": GATEWAY_TOKEN}),
                     dict(proxy=f"http://finpulse:{PROXY_PASSWORD}@proxy.internal:3128")):
        with pytest.raises(ConfigError) as refused:
            config(**endpoint)
        assert GATEWAY_TOKEN not in str(refused.value) and PROXY_PASSWORD not in str(refused.value)
        assert "headers_env" in str(refused.value) or "proxy_env" in str(refused.value)
    # Files are read when the endpoint is built (at worker start): a missing or non-PEM one is named.
    for files, match in ((dict(ca_file="/nonexistent/ca.pem"), "ca_file /nonexistent/ca.pem cannot be read"),
                         (dict(ca_file=str(pki["server.key"])), "cannot be read as a PEM bundle"),
                         (dict(client_cert_file=str(pki["client.pem"])), "cannot be loaded")):
        with pytest.raises(ConfigError, match=match):
            Endpoint(config(**files).endpoints[0])

    endpoint = Endpoint(config(headers={"X-Team": "risk"}, headers_env={"Authorization": "T_TR_GATEWAY"},
                               proxy_env="T_TR_PROXY", ca_file=str(pki["ca.pem"]),
                               client_cert_file=str(pki["client.pem"]), client_key_file=str(pki["client.key"])).endpoints[0])
    assert endpoint.request_headers() == {"X-Team": "risk", "Authorization": GATEWAY_TOKEN}
    assert endpoint.proxy.url == "http://proxy.internal:3128" and endpoint.proxy.headers()["Proxy-Authorization"].startswith("Basic ")
    assert isinstance(endpoint.tls, ssl.SSLContext)
    shown = repr(endpoint) + repr(endpoint.secret_headers)
    assert GATEWAY_TOKEN not in shown and PROXY_PASSWORD not in shown and "proxy.internal:3128" in shown
    leaked = (f"401 from gateway: token {GATEWAY_TOKEN} rejected; proxy http://finpulse:{PROXY_PASSWORD}@proxy.internal"
              f":3128 said {endpoint.proxy.headers()['Proxy-Authorization']}")
    scrubbed = endpoint.scrub(leaked)
    assert GATEWAY_TOKEN not in scrubbed and PROXY_PASSWORD not in scrubbed and "Basic " not in scrubbed


# ---------------------------------------------------------------- TLS, headers and proxy, end to end

def test_custom_ca_client_certificate_headers_and_proxy_deliver_for_real(fp_settings, topics, monkeypatch, caplog, pki):
    """A TLS receiver whose certificate comes from a test CA and that requires a client certificate, a plain one,
    and a forwarding proxy with credentials. Endpoints with the CA and client certificate get their alert, directly
    and through the proxy's CONNECT tunnel, with their extra headers; one without ca_file fails at once, saying to
    set it; the address guard refuses a loopback target before the proxy sees it, and lets a guarded endpoint use
    a proxy on loopback for a public target. No secret reaches the logs or the recorded errors."""
    secret = generate_secret()
    monkeypatch.setenv("T_TLS_SECRET", secret)
    monkeypatch.setenv("T_TLS_GATEWAY", GATEWAY_TOKEN)
    produce_in_order(fp_settings, topics.alerts, [make_alert("firing", id="tls1")])

    async def scenario():
        receiver = Receiver(ReceiverOptions(secrets=[secret], quiet=True))
        headers: list[dict] = []
        tls_runner, tls_port = await serve(recording_headers(receiver, headers), server_tls_of(pki, require_client_cert=True))
        plain_runner, plain_port = await serve(recording_headers(receiver, headers))
        proxy = await ForwardProxy(credentials=encode_basic_auth("finpulse", PROXY_PASSWORD)).start()
        monkeypatch.setenv("T_TLS_PROXY", f"http://finpulse:{PROXY_PASSWORD}@127.0.0.1:{proxy.port}")
        monkeypatch.setenv("T_TLS_BAD_PROXY", f"http://finpulse:not-{PROXY_PASSWORD}@127.0.0.1:{proxy.port}")
        mtls = {"ca_file": str(pki["ca.pem"]), "client_cert_file": str(pki["client.pem"]),
                "client_key_file": str(pki["client.key"])}
        common = {"secret_env": "T_TLS_SECRET", "allow_private": True, "retry_horizon_s": 600}
        settings = fp_settings.with_overrides({"alerts": {"backoff_initial_s": 0.05, "backoff_max_s": 0.2, "endpoints": [
            {"name": "internal-ca", "url": f"https://localhost:{tls_port}/direct", **mtls, **common,
             "headers": {"X-Team": "risk"}, "headers_env": {"Authorization": "T_TLS_GATEWAY"}},
            {"name": "no-ca", "url": f"https://localhost:{tls_port}/no-ca", **common},
            {"name": "tunnelled", "url": f"https://localhost:{tls_port}/tunnelled", "proxy_env": "T_TLS_PROXY",
             **mtls, **common},
            {"name": "proxied", "url": f"http://127.0.0.1:{plain_port}/proxied", "proxy_env": "T_TLS_PROXY",
             "headers_env": {"Authorization": "T_TLS_GATEWAY"}, **common},
            {"name": "guarded", "url": f"http://localhost:{plain_port}/guarded", "proxy_env": "T_TLS_PROXY",
             "secret_env": "T_TLS_SECRET"},
            {"name": "public", "url": "http://93.184.216.34/public", "proxy_env": "T_TLS_PROXY",
             "secret_env": "T_TLS_SECRET", "retry_horizon_s": 600},
            {"name": "bad-proxy-password", "url": f"https://localhost:{tls_port}/bad", "proxy_env": "T_TLS_BAD_PROXY",
             **mtls, **common},
        ]}})
        dispatcher = Dispatcher(settings, topics)
        await dispatcher.start()
        try:
            public = delivery_key("tls1:firing", "public")
            await until(lambda: len(dispatcher.log.states) == 7
                        and all(s.terminal for k, s in dispatcher.log.states.items() if k != public)
                        and dispatcher.log.states[public].attempts >= 1)
            return receiver, headers, proxy.seen, dict(dispatcher.log.states), tls_port
        finally:
            await dispatcher.stop()
            await proxy.stop()
            await tls_runner.cleanup()
            await plain_runner.cleanup()

    with caplog.at_level(logging.DEBUG):
        receiver, headers, proxied, states, tls_port = asyncio.run(scenario())

    state = {s.endpoint: s for s in states.values()}
    for name in ("internal-ca", "tunnelled", "proxied"):
        assert state[name].state == DELIVERED and state[name].attempts == 1, state[name]
    assert Counter(item["path"] for item in receiver.items) == Counter({"/direct": 1, "/tunnelled": 1, "/proxied": 1})
    by_path = {h["path"]: h for h in headers}
    assert by_path["/direct"]["x-team"] == "risk" and by_path["/direct"]["authorization"] == GATEWAY_TOKEN
    assert by_path["/proxied"]["authorization"] == GATEWAY_TOKEN and "x-team" not in by_path["/proxied"]
    assert "proxy-authorization" not in by_path["/proxied"]  # for the proxy's eyes only
    assert by_path["/direct"][HEADER_ID] == webhook_id(delivery_key("tls1:firing", "internal-ca"))

    # No CA: failed at the first attempt, and the error says what to set.
    no_ca = state["no-ca"]
    assert no_ca.state == FAILED and no_ca.attempts == 1
    assert "failed verification" in no_ca.last_error and "ca_file" in no_ca.last_error
    # Wrong proxy credentials: the tunnel is refused (407), failed at once, saying where the credentials come from.
    bad_proxy = state["bad-proxy-password"]
    assert bad_proxy.state == FAILED and bad_proxy.attempts == 1 and "407" in bad_proxy.last_error
    assert "proxy_env" in bad_proxy.last_error
    # The guard: a loopback target is refused before the proxy is asked; a public one goes to the (loopback) proxy.
    assert state["guarded"].state == FAILED and "loopback" in state["guarded"].last_error
    assert state["guarded"].attempts == 1
    targets = [(p["method"], p["target"]) for p in proxied]
    assert not any("guarded" in target for _, target in targets)
    assert ("POST", "http://93.184.216.34/public") in targets and "HTTP 502" in state["public"].last_error
    assert ("CONNECT", f"localhost:{tls_port}") in targets
    assert all(p["proxy_auth"] and p["proxy_auth"].startswith("Basic ") for p in proxied), proxied
    # Secrets: neither the gateway token nor the proxy's password is logged or recorded.
    recorded = " ".join(s.last_error for s in states.values())
    for value in (GATEWAY_TOKEN, PROXY_PASSWORD, secret):
        assert value not in caplog.text and value not in recorded


# ---------------------------------------------------------------- `finpulse dispatch --check`

def test_dispatch_check_reports_tls_problems_and_what_to_set(pki, tmp_path):
    """`finpulse dispatch --check` connects to https endpoints (directly or through their proxy) up to the end of
    the TLS handshake: a verified one says so; a missing ca_file, a missing client certificate and a proxy that
    wants a login are reported, saying what to set (exit 1). The mTLS endpoint is a real `finpulse receiver --tls-cert --client-ca`."""
    secret = generate_secret()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINPULSE_")}
    env["T_CHK_SECRET"] = secret
    mtls_port = free_port()
    receiver = finpulse(["receiver", "--port", str(mtls_port), "--store", "", "--secret-env", "T_CHK_SECRET",
                         "--tls-cert", str(pki["server.pem"]), "--tls-key", str(pki["server.key"]),
                         "--client-ca", str(pki["ca.pem"])], env, tmp_path, "receiver")

    async def scenario():
        tls_runner, tls_port = await serve(web.Application(), server_tls_of(pki, require_client_cert=False))
        proxy = await ForwardProxy().start()
        guarded_proxy = await ForwardProxy(credentials=encode_basic_auth("finpulse", PROXY_PASSWORD)).start()
        ca, client = {"ca_file": str(pki["ca.pem"])}, {"client_cert_file": str(pki["client.pem"]),
                                                       "client_key_file": str(pki["client.key"])}
        common = {"secret_env": "T_CHK_SECRET", "allow_private": True}
        endpoints = [
            {"name": "verified", "url": f"https://localhost:{mtls_port}/x", **ca, **client, **common},
            {"name": "tunnelled", "url": f"https://localhost:{tls_port}/x", "proxy": f"http://127.0.0.1:{proxy.port}",
             **ca, **common},
            {"name": "no-ca", "url": f"https://localhost:{tls_port}/x", **common},
            {"name": "no-client-cert", "url": f"https://localhost:{mtls_port}/x", **ca, **common},
            {"name": "no-proxy-login", "url": f"https://localhost:{tls_port}/x",
             "proxy": f"http://127.0.0.1:{guarded_proxy.port}", **ca, **common},
        ]
        env["FINPULSE_ALERTS__ENDPOINTS"] = json.dumps(endpoints)
        try:
            check = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "stream.cli", "dispatch", "--check", cwd=REPO, env=env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(check.communicate(), 120)
            return check.returncode, out.decode(), err.decode(), proxy.seen
        finally:
            await proxy.stop()
            await guarded_proxy.stop()
            await tls_runner.cleanup()

    try:
        receiver.wait_for(f"receiver listening on https://127.0.0.1:{mtls_port} (client certificates required)")
        returncode, out, err, proxied = asyncio.run(scenario())
    finally:
        receiver.kill()
    assert returncode == 1, out + err
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "TLS verified" in lines["verified"], out
    assert "TLS verified through proxy" in lines["tunnelled"] and proxied[0]["method"] == "CONNECT", out
    assert "REFUSED" in lines["no-ca"] and "failed verification" in lines["no-ca"] and "ca_file" in lines["no-ca"], out
    assert "REFUSED" in lines["no-client-cert"] and "client_cert_file" in lines["no-client-cert"], out
    assert "REFUSED" in lines["no-proxy-login"] and "407" in lines["no-proxy-login"] and "proxy_env" in lines["no-proxy-login"], out
    assert secret not in out + err


# ---------------------------------------------------------------- isolation

def test_a_hanging_endpoint_cannot_hold_the_slots_a_healthy_one_needs(fp_settings, topics, monkeypatch):
    """Three shared slots; the hanging endpoint may use two. Its deliveries are taken on first, and its server
    never answers while the test runs: the healthy endpoint still gets every one of its deliveries while exactly two
    of the hanging one's requests are in flight and the rest wait, unattempted. Released, those arrive too."""
    secret = generate_secret()
    monkeypatch.setenv("T_HANG_SECRET", secret)
    stuck_alerts = [make_alert("firing", id=f"s{i}", key=f"Stuck {i}") for i in range(4)]
    fine_alerts = [make_alert("firing", id=f"f{i}", key=f"Fine {i}") for i in range(4)]
    produce_in_order(fp_settings, topics.alerts, stuck_alerts + fine_alerts)

    async def scenario():
        release = asyncio.Event()
        in_flight, most_in_flight, stuck_got = [0], [0], []

        async def hang(request):
            in_flight[0] += 1
            most_in_flight[0] = max(most_in_flight[0], in_flight[0])
            await release.wait()
            in_flight[0] -= 1
            stuck_got.append(request.headers[HEADER_ID])
            return web.json_response({"ok": True})

        stuck_app = web.Application()
        stuck_app.router.add_post("/{path:.*}", hang)
        stuck_runner, stuck_port = await serve(stuck_app)
        receiver = Receiver(ReceiverOptions(secrets=[secret], quiet=True))
        fine_runner, fine_port = await serve(receiver.app())
        common = {"secret_env": "T_HANG_SECRET", "allow_private": True, "max_concurrency": 2, "timeout_s": 600,
                  "retry_horizon_s": 600}
        settings = fp_settings.with_overrides({"alerts": {"max_concurrency": 3, "endpoints": [
            {"name": "stuck", "url": f"http://127.0.0.1:{stuck_port}/x", "keys": ["Stuck*"], **common},
            {"name": "fine", "url": f"http://127.0.0.1:{fine_port}/x", "keys": ["Fine*"], **common}]}})
        dispatcher = Dispatcher(settings, topics)
        await dispatcher.start()
        try:
            def fine_done():
                fine = [s for s in dispatcher.log.states.values() if s.endpoint == "fine"]
                return len(fine) == 4 and all(s.state == DELIVERED for s in fine)
            healthy_all_delivered = await until(fine_done)
            while_hanging = {k: (s.state, s.attempts) for k, s in dispatcher.log.states.items() if s.endpoint == "stuck"}
            hanging_in_flight = in_flight[0]
            release.set()
            await until(lambda: all(s.state == DELIVERED for s in dispatcher.log.states.values()))
            return (healthy_all_delivered, while_hanging, hanging_in_flight, most_in_flight[0], stuck_got,
                    receiver, dict(dispatcher.log.states))
        finally:
            release.set()
            await dispatcher.stop()
            await stuck_runner.cleanup()
            await fine_runner.cleanup()

    healthy_all_delivered, while_hanging, hanging_in_flight, most_in_flight, stuck_got, receiver, states = asyncio.run(scenario())
    assert healthy_all_delivered, states
    assert Counter(item["webhook_id"] for item in receiver.items) == Counter(
        {webhook_id(delivery_key(a.event_id, "fine")): 1 for a in fine_alerts})
    # While the healthy endpoint got everything, the hanging one held its two requests and nothing else moved.
    assert hanging_in_flight == 2 and sorted(while_hanging.values()) == [(PENDING, 0)] * 4
    assert most_in_flight == 2
    assert sorted(stuck_got) == sorted(webhook_id(delivery_key(a.event_id, "stuck")) for a in stuck_alerts)
    assert all(s.state == DELIVERED for s in states.values())


def test_the_breaker_counts_consecutive_failures_and_admits_one_probe_at_a_time(caplog):
    breaker = CircuitBreaker("desk", threshold=3, initial_pause_s=1.0, max_pause_s=5.0)
    with caplog.at_level(logging.INFO, logger="alerts"):
        assert not breaker.record(failed=True, answered=False) and not breaker.record(failed=True, answered=False)
        breaker.record(failed=False, answered=True)  # a 4xx answer: the endpoint works, the count starts again
        assert not breaker.record(failed=True, answered=False) and not breaker.record(failed=True, answered=False)
        assert not breaker.record(failed=False, answered=False)  # a refused address says nothing either way
        assert breaker.record(failed=True, answered=False, error="HTTP 503") and breaker.is_open
        assert breaker.pause_s == 1.0
        turn_changed = breaker.turn_changed
        with breaker.admission("a") as probe:
            with breaker.admission("b") as second:
                assert probe and not second and not turn_changed.is_set()
            assert breaker.record(failed=True, answered=False)  # the probe failed: still open, a longer pause
        assert turn_changed.is_set() and not breaker.turn_changed.is_set() and breaker.pause_s == 2.0
        for _ in range(5):
            breaker.record(failed=True, answered=False)
        assert breaker.pause_s == 5.0
        with breaker.admission("b") as probe:
            assert probe
            assert not breaker.record(failed=False, answered=True)
        assert not breaker.is_open
        with breaker.admission("a") as first, breaker.admission("b") as second:
            assert first and second  # closed: no limit from the breaker
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "3 consecutive failed attempts (last: HTTP 503)" in m]) == 1, messages
    assert len([m for m in messages if "answers again" in m]) == 1 and len(messages) == 2, messages
    never = CircuitBreaker("desk", threshold=0, initial_pause_s=1.0, max_pause_s=5.0)
    assert not any(never.record(failed=True, answered=False) for _ in range(50))


def test_an_open_breaker_hands_the_probe_round_in_the_order_deliveries_came():
    """While open, the deliveries take turns: one that arrives out of its turn is refused and keeps its place, one
    that has probed queues again at the back, one that ends gives up its turn, and closing lets everyone through."""
    breaker = CircuitBreaker("desk", threshold=1, initial_pause_s=1.0, max_pause_s=5.0)
    breaker.record(failed=True, answered=False)

    def probes(delivery: str) -> bool:
        with breaker.admission(delivery) as admitted:
            if admitted:
                breaker.record(failed=True, answered=False)
            return admitted

    with breaker.admission("a") as probe:  # a probes; b, c and d come while its probe is out
        assert probe and [probes(d) for d in "bcd"] == [False] * 3
        breaker.record(failed=True, answered=False)
    assert breaker.waiting == ["b", "c", "d"]
    assert [probes(d) for d in "acb"] == [False, False, True]  # a is behind d now; c waits for b
    assert breaker.waiting == ["c", "d", "a"]
    assert [probes(d) for d in "bdc"] == [False, False, True]
    breaker.leave("d")  # d's retry window ended: a is next
    assert breaker.waiting == ["a", "b"] and probes("a") and breaker.waiting == ["b"]
    turn_changed = breaker.turn_changed
    with breaker.admission("b") as probe:
        assert probe and not probes("c")
        breaker.record(failed=False, answered=True)  # up again: nobody waits for a turn any more
    assert turn_changed.is_set() and breaker.waiting == [] and not breaker.is_open
    with breaker.admission("c") as first, breaker.admission("a") as second:
        assert first and second


def test_the_breaker_pauses_a_failing_endpoint_and_probes_it_one_request_at_a_time(fp_settings, topics, monkeypatch, caplog):
    """Four deliveries go to an endpoint together; it answers 503 (slowly). Its breaker (breaker_failures = 1)
    opens at the first failure, logged once. From then on, while the endpoint is down, its requests come strictly
    one at a time: the other deliveries wait for each probe instead of retrying on their own, and take turns to
    probe, in a fixed round. Once it is up, the next probe closes the breaker (logged once) and every delivery
    arrives, once."""
    secret = generate_secret()
    monkeypatch.setenv("T_BRK_SECRET", secret)
    alerts = [make_alert("firing", id=f"b{i}", key=f"Topic {i}") for i in range(4)]
    produce_in_order(fp_settings, topics.alerts, alerts)

    async def scenario():
        events: list[tuple[str, int]] = []  # ("arrive" | "leave", request number), in the order they happened
        answered_up: list[int] = []
        down = [True]
        got: list[str] = []
        senders: list[str] = []  # the delivery of each request, in the order they arrived

        async def flaky(request):
            number = sum(kind == "arrive" for kind, _ in events)
            events.append(("arrive", number))
            senders.append(request.headers[HEADER_ID])
            try:
                if down[0]:
                    await asyncio.sleep(0.3)  # held a while: requests sent concurrently would overlap here
                    return web.json_response({"error": "down"}, status=503)
                answered_up.append(number)
                got.append(request.headers[HEADER_ID])
                return web.json_response({"ok": True})
            finally:
                events.append(("leave", number))

        app = web.Application()
        app.router.add_post("/{path:.*}", flaky)
        runner, port = await serve(app)
        settings = fp_settings.with_overrides({"alerts": {
            # Backoff and pause both 0.2 s, under the 0.3 s a request is held: every delivery of the first wave is
            # in line before the first probe ends, which makes the round's order that of the line.
            "backoff_initial_s": 0.2, "backoff_max_s": 0.2, "max_concurrency": 8, "endpoints": [
                {"name": "flaky", "url": f"http://127.0.0.1:{port}/x", "secret_env": "T_BRK_SECRET",
                 "allow_private": True, "max_concurrency": 4, "breaker_failures": 1, "retry_horizon_s": 600}]}})
        dispatcher = Dispatcher(settings, topics)
        await dispatcher.start()
        try:
            probed = await until(lambda: sum(kind == "arrive" for kind, _ in events) >= 4 + 2 * 4)
            down[0] = False
            await until(lambda: len(dispatcher.log.states) == 4
                        and all(s.state == DELIVERED for s in dispatcher.log.states.values()))
            return probed, events, answered_up, got, senders, dict(dispatcher.log.states)
        finally:
            await dispatcher.stop()
            await runner.cleanup()

    with caplog.at_level(logging.INFO, logger="alerts"):
        probed, events, answered_up, got, senders, states = asyncio.run(scenario())
    assert probed and all(s.state == DELIVERED for s in states.values()), states
    assert Counter(got) == Counter({webhook_id(delivery_key(a.event_id, "flaky")): 1 for a in alerts})
    # The first wave: four requests in flight together, all answered before any other request arrives.
    assert events[:4] == [("arrive", n) for n in range(4)], events
    assert sorted(events[4:8]) == [("leave", n) for n in range(4)], events
    # Then, until the probe that found the endpoint up has left: strictly one request at a time.
    closing_probe = answered_up[0]
    probes = events[8:events.index(("leave", closing_probe)) + 1]
    assert len(probes) >= 2 * (2 * 4 + 1), events  # two rounds of probes while down, then the closing one
    assert probes == [(kind, n) for n in range(4, closing_probe + 1) for kind in ("arrive", "leave")], events
    # The probes go round: each delivery once, then again in the same order.
    first_round, second_round = senders[4:8], senders[8:12]
    assert len(set(first_round)) == 4 and second_round == first_round, senders
    opened = [r for r in caplog.records if "consecutive failed attempts" in r.getMessage()]
    closed = [r for r in caplog.records if "answers again" in r.getMessage()]
    assert len(opened) == 1 and len(closed) == 1, caplog.text
