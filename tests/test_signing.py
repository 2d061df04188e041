"""Standard Webhooks signing and verification, and the receiver refusing what is not properly signed (real HTTP on
127.0.0.1: the receiver's aiohttp app served by a real server, requests from a real client)."""
from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
from aiohttp import web

from alerts.receiver import Receiver, ReceiverOptions
from alerts.signing import (BadSignature, FutureTimestamp, MissingHeaders, StaleTimestamp, decode_secret,
                            generate_secret, sign, signature_headers, split_secrets, verify)

# The reference vector published with the Standard Webhooks libraries.
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TIMESTAMP = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_signature_matches_the_spec_reference_vector():
    assert sign(SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY, SPEC_SECRET) == SPEC_SIGNATURE
    headers = {"webhook-id": SPEC_ID, "webhook-timestamp": str(SPEC_TIMESTAMP), "webhook-signature": SPEC_SIGNATURE}
    assert verify(headers, SPEC_BODY, [SPEC_SECRET], now=SPEC_TIMESTAMP + 10) == SPEC_ID


def test_roundtrip_and_rejections():
    secret, other = generate_secret(), generate_secret()
    body = b'{"alert": 1}'
    headers = signature_headers("msg_1", body, [secret])
    assert verify(headers, body, [secret]) == "msg_1"
    with pytest.raises(BadSignature):
        verify(headers, b'{"alert": 2}', [secret])
    with pytest.raises(BadSignature):
        verify(headers, body, [other])
    with pytest.raises(BadSignature):  # the id is signed too
        verify({**headers, "webhook-id": "msg_2"}, body, [secret])
    with pytest.raises(MissingHeaders):
        verify({"webhook-id": "msg_1"}, body, [secret])
    old = signature_headers("msg_1", body, [secret], timestamp=int(time.time()) - 301)
    with pytest.raises(StaleTimestamp):
        verify(old, body, [secret])
    assert verify(old, body, [secret], tolerance_s=600) == "msg_1"
    future = signature_headers("msg_1", body, [secret], timestamp=int(time.time()) + 301)
    with pytest.raises(FutureTimestamp):
        verify(future, body, [secret])


def test_key_rotation_signs_with_every_key_and_verifies_with_any():
    new, old = generate_secret(), generate_secret()
    body = b"{}"
    headers = signature_headers("msg_r", body, [new, old])
    assert len(headers["webhook-signature"].split()) == 2
    assert verify(headers, body, [old]) == "msg_r"          # a receiver not rotated yet
    assert verify(headers, body, [new]) == "msg_r"          # a receiver already rotated
    assert verify(signature_headers("msg_r", body, [old]), body, [new, old]) == "msg_r"  # receiver accepting both
    assert split_secrets(f" {new}, {old} ") == [new, old]


def test_secret_parsing():
    assert len(decode_secret(generate_secret())) == 24
    assert len(decode_secret("whsec_" + "A-_b" * 8)) == 24      # URL-safe alphabet accepted
    for bad in ("whsec_not base64!", "whsec_c2hvcnQ="):
        with pytest.raises(ValueError) as info:
            decode_secret(bad)
        assert bad[6:] not in str(info.value)


# ---------------------------------------------------------------- the receiver over HTTP

async def _serve(receiver: Receiver):
    runner = web.AppRunner(receiver.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


def test_receiver_accepts_signed_rejects_tampered_wrong_key_stale_and_replays(tmp_path):
    secret, wrong = generate_secret(), generate_secret()
    store = tmp_path / "received.jsonl"

    async def scenario():
        receiver = Receiver(ReceiverOptions(secrets=[secret], store=store, quiet=True))
        runner, base = await _serve(receiver)
        try:
            async with aiohttp.ClientSession() as http:
                async def post(body: bytes, headers: dict) -> tuple[int, dict]:
                    async with http.post(f"{base}/webhook", data=body, headers=headers) as r:
                        return r.status, await r.json()

                body = json.dumps({"data": {"id": "a1", "status": "firing"}}).encode()
                good = signature_headers("msg_good", body, [secret])
                results = {
                    "good": await post(body, good),
                    "replay": await post(body, good),
                    "tampered": await post(body.replace(b"a1", b"a2"), good),
                    "wrong_key": await post(body, signature_headers("msg_w", body, [wrong])),
                    "stale": await post(body, signature_headers("msg_s", body, [secret], timestamp=int(time.time()) - 3600)),
                    "future": await post(body, signature_headers("msg_f", body, [secret], timestamp=int(time.time()) + 3600)),
                    "unsigned": await post(body, {}),
                }
                async with http.get(f"{base}/received") as r:
                    seen = await r.json()
            return results, seen
        finally:
            await runner.cleanup()

    results, seen = asyncio.run(scenario())
    assert results["good"] == (200, {"ok": True, "id": "1"})
    assert results["replay"] == (200, {"ok": True, "duplicate": True, "id": "1"})    # what it was stored as
    assert results["tampered"][0] == 401 and results["tampered"][1]["error"] == "bad_signature"
    assert results["wrong_key"][0] == 401 and results["wrong_key"][1]["error"] == "bad_signature"
    assert results["stale"][0] == 401 and results["stale"][1]["error"] == "stale_timestamp"
    assert results["future"][0] == 401 and results["future"][1]["error"] == "future_timestamp"
    assert results["unsigned"][0] == 400
    assert seen["count"] == 1 and seen["items"][0]["webhook_id"] == "msg_good"
    assert seen["duplicates"] == {"msg_good": 1}
    assert seen["rejected"] == {"bad_signature": 2, "stale_timestamp": 1, "future_timestamp": 1, "missing_headers": 1}
    lines = store.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["payload"]["data"]["id"] == "a1"
    # A restarted receiver remembers what it stored: the replay is still recognised.
    assert Receiver(ReceiverOptions(secrets=[secret], store=store, quiet=True)).seen == {"msg_good": "1"}


def test_receiver_failure_injection_then_success():
    secret = generate_secret()

    async def scenario():
        receiver = Receiver(ReceiverOptions(secrets=[secret], fail_first=2, throttle=1, retry_after_s=7, quiet=True))
        runner, base = await _serve(receiver)
        try:
            statuses = []
            async with aiohttp.ClientSession() as http:
                for _ in range(4):
                    body = b"{}"
                    async with http.post(f"{base}/x", data=body, headers=signature_headers("msg_i", body, [secret])) as r:
                        statuses.append((r.status, r.headers.get("Retry-After")))
            return statuses
        finally:
            await runner.cleanup()

    assert asyncio.run(scenario()) == [(500, None), (500, None), (429, "7"), (200, None)]
