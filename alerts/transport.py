"""How a webhook travels to its endpoint: the TLS trust and client certificate, the extra headers and the HTTP
proxy of each endpoint, what a TLS failure means, and the connection ``finpulse dispatch --check`` makes.

- TLS: ``ca_file`` adds a PEM bundle of CA certificates to the system's trust store for that endpoint (an internal
  CA); ``client_cert_file`` / ``client_key_file`` (and ``client_key_password_env`` for an encrypted key) present a
  client certificate (mTLS). A certificate that fails verification is a configuration error: the delivery fails at
  once with a text that says what to set, and is not retried.
- Headers: ``headers`` are static and must not look like secrets; ``headers_env`` maps a header name to the
  environment variable holding its value (an auth gateway's token). Headers that would break the signature or the
  framing of the request are refused (``RESERVED_HEADERS``, ``webhook-*``).
- Proxy: ``proxy`` is an http(s) URL without credentials; a proxy URL with ``user:password@`` is a secret and comes
  from the environment variable named by ``proxy_env``. https targets go through the proxy as a CONNECT tunnel, so
  the TLS session (and ``ca_file``) is still with the endpoint. The SSRF guard still holds: the dispatcher resolves
  and checks the target's host before it hands the request to the proxy (``alerts.attempts``). Environment
  proxies (HTTP_PROXY...) are never picked up.
"""
from __future__ import annotations

import asyncio
import re
import ssl
from dataclasses import dataclass
from typing import Mapping
from urllib.parse import unquote, urlsplit

import aiohttp

from stream.config import ConfigError, names_a_secret
from stream.tls import client_tls_context

# Headers the dispatcher sets itself, or that frame the request: a user's value would break the signature or the
# message. User-Agent identifies FinPulse in receivers' logs; a proxy's credentials come from proxy_env.
RESERVED_HEADERS = frozenset({"content-type", "content-length", "content-encoding", "transfer-encoding", "host",
                              "connection", "keep-alive", "te", "trailer", "upgrade", "expect", "user-agent",
                              "proxy-authorization", "proxy-connection"})
SIGNATURE_HEADER_PREFIX = "webhook-"  # webhook-id, webhook-timestamp, webhook-signature (Standard Webhooks)
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an RFC 9110 token
X509_HOSTNAME_MISMATCH, X509_CERT_HAS_EXPIRED = 62, 10


def check_headers(static: Mapping, from_env: Mapping, where: str) -> None:
    """Refuse header names that are not tokens or are reserved, static values that are not one-line strings, static
    headers that look like they carry a secret, and a header set both ways. Values are never echoed."""
    seen: set[str] = set()
    for setting, headers in (("headers", static), ("headers_env", from_env)):
        for name, value in headers.items():
            lowered = str(name).lower()
            if not _HEADER_NAME.fullmatch(str(name)):
                raise ConfigError(f"{where}: {setting}: {name!r} is not a valid HTTP header name")
            if lowered in RESERVED_HEADERS or lowered.startswith(SIGNATURE_HEADER_PREFIX):
                raise ConfigError(f"{where}: {setting}: {name} is set by FinPulse itself (it frames or signs the "
                                  f"request), so it cannot be configured")
            if lowered in seen:
                raise ConfigError(f"{where}: header {name} is set twice (headers and headers_env take distinct names)")
            seen.add(lowered)
            if not isinstance(value, str):
                raise ConfigError(f"{where}: {setting}: the value of {name} must be a string")
            if setting == "headers":
                if names_a_secret(lowered) or lowered == "cookie":
                    raise ConfigError(f"{where}: headers: {name} looks like it carries a secret, and secrets never go "
                                      f"in the config: put the value in an environment variable and name it in "
                                      f"headers_env = {{ \"{name}\" = \"VAR\" }} (value not shown)")
                if "\r" in value or "\n" in value:
                    raise ConfigError(f"{where}: headers: the value of {name} must be one line")


def check_proxy_url(url: str, where: str, from_env: bool = False) -> None:
    """An http(s) proxy URL with a host (never echoed: it may carry credentials). Credentials are refused in the
    config; a URL from the environment (``proxy_env``) may carry them."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}: the proxy must be an http:// or https:// URL with a host (value not shown)")
    if (parts.username or parts.password) and not from_env:
        raise ConfigError(f"{where}: a proxy URL with credentials is a secret: put it in an environment variable and "
                          f"name that in proxy_env (value not shown)")


@dataclass(frozen=True)
class Proxy:
    """A proxy ready to use: its URL without credentials, and the Proxy-Authorization its credentials make."""
    url: str
    authorization: str = ""

    @classmethod
    def from_url(cls, url: str) -> "Proxy":
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
        host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname
        # Credentials in a URL are percent-encoded (a password may hold '@' or ':').
        auth = aiohttp.encode_basic_auth(unquote(parts.username), unquote(parts.password or "")) if parts.username else ""
        return cls(url=f"{parts.scheme}://{host}{port}", authorization=auth)

    def headers(self) -> dict[str, str]:
        return {"Proxy-Authorization": self.authorization} if self.authorization else {}


def tls_context(ca_file: str, client_cert_file: str, client_key_file: str, key_password: str | None,
                where: str) -> ssl.SSLContext | bool:
    """The TLS settings of an endpoint's requests: True (the system's trust store, verified) unless a CA bundle or a
    client certificate is configured; then a verifying context that trusts the system's CAs and ``ca_file``'s."""
    if not (ca_file or client_cert_file):
        return True
    return client_tls_context(ca_file, client_cert_file, client_key_file, key_password, where)


def certificate_failure(exc: aiohttp.ClientConnectorCertificateError | ssl.SSLCertVerificationError,
                        host: str) -> str:
    """What a failed verification of the endpoint's certificate means and what to set: a configuration error."""
    error = exc.certificate_error if isinstance(exc, aiohttp.ClientConnectorCertificateError) else exc
    detail = getattr(error, "verify_message", "") or str(error)
    code = getattr(error, "verify_code", None)
    if code == X509_HOSTNAME_MISMATCH:
        advice = "use a URL whose host the certificate names"
    elif code == X509_CERT_HAS_EXPIRED:
        advice = "its owner must renew it"
    else:
        advice = "if an internal CA signs it, set ca_file = \"<PEM bundle with that CA>\" on the endpoint"
    return f"TLS: {host}'s certificate failed verification: {advice} ({detail})"


# ---------------------------------------------------------------- `finpulse dispatch --check`

async def check_connection(host: str, port: int, address: str | None, tls: ssl.SSLContext | bool | None,
                           proxy: Proxy | None, timeout_s: float) -> str:
    """Connect the way a delivery would, without sending a request: to ``address`` (the checked address of
    ``host``) or through ``proxy`` (a CONNECT tunnel to ``host:port``), then the TLS handshake when ``tls`` is set.
    Returns what was verified; raises ConnectionError saying what is wrong (and what to set)."""
    try:
        return await asyncio.wait_for(_connect(host, port, address, tls, proxy, timeout_s), timeout_s)
    except asyncio.TimeoutError:
        raise ConnectionError(f"no answer within timeout_s ({timeout_s:g}s)") from None
    except asyncio.IncompleteReadError:
        raise ConnectionError("the proxy closed the connection before answering the CONNECT") from None
    except ssl.SSLCertVerificationError as exc:
        raise ConnectionError(certificate_failure(exc, host)) from None
    except ssl.SSLError as exc:
        raise ConnectionError(f"TLS handshake with {host} failed ({exc.reason or exc})") from None


async def _connect(host: str, port: int, address: str | None, tls, proxy: Proxy | None, timeout_s: float) -> str:
    context = None if tls is None else (tls if isinstance(tls, ssl.SSLContext) else ssl.create_default_context())
    if proxy is None:
        reader, writer = await asyncio.open_connection(address or host, port, ssl=context,
                                                       server_hostname=host if context else None)
        via = ""
    else:
        parts = urlsplit(proxy.url)
        if parts.scheme == "https":
            return "not checked through an https:// proxy"
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
        via = f" through proxy {proxy.url}"
        if context is None:
            writer.close()
            return f"proxy {proxy.url} reachable"
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        auth = "".join(f"{k}: {v}\r\n" for k, v in proxy.headers().items())
        writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n".encode())
        answer = (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n", 1)[0].decode("latin-1")
        status = answer.split()[1:2]
        if status != ["200"]:
            writer.close()
            hint = ": check the credentials in the proxy URL (proxy_env)" if status == ["407"] else ""
            raise ConnectionError(f"proxy {proxy.url} refused the tunnel to {target} ({answer}){hint}")
        await writer.start_tls(context, server_hostname=host)
    try:
        if context is None:
            return f"reachable{via}"
        # A server that requires a client certificate it did not get says so right after the handshake (TLS 1.3
        # sends that alert then): wait briefly for it.
        try:
            closed = await asyncio.wait_for(reader.read(1), min(1.0, timeout_s / 2)) == b""
            why = "it closed the connection"
        except asyncio.TimeoutError:
            closed = False  # it waits for a request, as it should
        except (ssl.SSLError, ConnectionResetError) as exc:
            closed, why = True, str(getattr(exc, "reason", None) or exc)
        if closed:
            raise ConnectionError(f"{host} ended the TLS session right after the handshake ({why}): it probably "
                                  f"requires a client certificate (set client_cert_file and client_key_file) or "
                                  f"does not accept the one configured")
        return f"TLS verified{via}"
    finally:
        writer.close()


def host_and_port(url: str) -> tuple[str, int]:
    """The host of an http(s) URL and its port (the scheme's default when none is given)."""
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)

