"""How FinPulse's Kafka clients connect to a secured cluster: TLS, a SASL user, or both.

``[kafka] security_protocol`` and the settings beside it (``stream.config.KafkaSettings``) become each client
library's arguments here, in one place: the worker's Faust app takes ``faust_credentials``, and every aiokafka or
kafka-python client (ingest, simulate, topic creation, replay, the dispatcher, the delivery log, silences, the
dashboard's feed) takes ``client_security``, so none is left connecting in plain text to a cluster that wants TLS::

    [kafka]
    bootstrap_servers = "pkc-xxxxx.eu-west-1.aws.confluent.cloud:9092"
    security_protocol = "SASL_SSL"
    sasl_mechanism = "PLAIN"
    sasl_username = "ABCDEFGH12345678"       # the API key; its secret in $FINPULSE_KAFKA_PASSWORD

Secrets stay out of files, logs and messages: the SASL password is read from the environment variable
``sasl_password_env`` names (default ``FINPULSE_KAFKA_PASSWORD``) and an encrypted client key's passphrase from
``client_key_password_env``, when a client is made; ``describe`` (what errors and start-up lines say) names the
user, never the password.

A refused connection is explained (``why_unreachable``): the Kafka clients say only "unable to bootstrap" when TLS or
a login fails, so the broker is asked again, directly, and the command (or the dashboard) says what to set.

One aiokafka defect is mended while SCRAM is in use (``_say_scram_refusals``): a broker that refuses a SCRAM proof
in its final message, as RFC 5802 allows (tansu does; Apache Kafka answers with an error code, which aiokafka reads),
made aiokafka 0.14 raise ``KeyError: 'v'``; it raises ``SaslAuthenticationFailed`` with the broker's reason now.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
import socket
import ssl
import struct
from typing import Any, Mapping

from .config import ConfigError, KafkaSettings
from .tls import client_tls_context

X509_HOSTNAME_MISMATCH, X509_IP_ADDRESS_MISMATCH = 62, 64
# Unable to get the issuer (locally), a self-signed certificate in the chain, unable to verify the first certificate.
X509_UNKNOWN_ISSUER = (2, 18, 19, 20, 21)


def uses_sasl(kafka: KafkaSettings) -> bool:
    return kafka.security_protocol.startswith("SASL_")


def uses_tls(kafka: KafkaSettings) -> bool:
    return kafka.security_protocol.endswith("SSL")


def describe(kafka: KafkaSettings) -> str:
    """How the clients connect, for start-up lines and errors: "SASL_SSL, SCRAM-SHA-512 as user finpulse"."""
    if uses_sasl(kafka):
        return f"{kafka.security_protocol}, {kafka.sasl_mechanism} as user {kafka.sasl_username}"
    return kafka.security_protocol


# The settings that make a connection secured, and their plain-text values.
_PLAIN_CONNECTION = {"security_protocol": "PLAINTEXT", "sasl_mechanism": "", "sasl_username": "", "ca_file": "",
                     "client_cert_file": "", "client_key_file": "", "client_key_password_env": ""}


def embedded_broker_connection(kafka: KafkaSettings, bootstrap_servers: str) -> KafkaSettings:
    """``kafka`` pointed at the embedded broker, which takes plain connections only: a secured cluster's settings
    (in ./finpulse.toml or the environment, for the real cluster) are not for it."""
    return dataclasses.replace(kafka, bootstrap_servers=bootstrap_servers, **_PLAIN_CONNECTION)


def without_connection_settings(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` without the ``FINPULSE_KAFKA__*`` variables that would secure a connection: for the processes
    ``finpulse demo`` starts against its embedded broker."""
    secured = {f"FINPULSE_KAFKA__{name.upper()}" for name in _PLAIN_CONNECTION}
    return {name: value for name, value in environ.items() if name.upper() not in secured}


def client_security(kafka: KafkaSettings) -> dict[str, Any]:
    """Keyword arguments for an aiokafka or kafka-python client (both take these names)."""
    options: dict[str, Any] = {"security_protocol": kafka.security_protocol}
    if uses_tls(kafka):
        options["ssl_context"] = tls_context(kafka)
    if uses_sasl(kafka):
        username, password = _sasl_login(kafka)
        options.update(sasl_mechanism=kafka.sasl_mechanism, sasl_plain_username=username,
                       sasl_plain_password=password)
    return options


def faust_credentials(kafka: KafkaSettings):
    """The Faust app's ``broker_credentials``: None for PLAINTEXT."""
    import faust

    if uses_sasl(kafka):
        username, password = _sasl_login(kafka)
        return faust.SASLCredentials(username=username, password=password, mechanism=kafka.sasl_mechanism,
                                     ssl_context=tls_context(kafka) if uses_tls(kafka) else None)
    if uses_tls(kafka):
        return faust.SSLCredentials(tls_context(kafka))
    return None


def tls_context(kafka: KafkaSettings) -> ssl.SSLContext:
    password = _from_environment(kafka.client_key_password_env, "client_key_password_env",
                                 "an encrypted client key's passphrase") if kafka.client_key_password_env else None
    return client_tls_context(kafka.ca_file, kafka.client_cert_file, kafka.client_key_file, password, "[kafka]",
                              check_hostname=kafka.check_hostname)


def _sasl_login(kafka: KafkaSettings) -> tuple[str, str]:
    """The user and password every client logs in with (aiokafka's SCRAM refusals mended first)."""
    if kafka.sasl_mechanism.startswith("SCRAM"):
        _say_scram_refusals()
    return kafka.sasl_username, _from_environment(kafka.sasl_password_env, "sasl_password_env",
                                                  f"the password of {kafka.sasl_username}")


def _from_environment(variable: str, setting: str, what: str) -> str:
    value = os.environ.get(variable, "") if variable else ""
    if not value:
        raise ConfigError(f"[kafka] {what} is read from the environment variable {variable or '(none named)'} "
                          f"({setting}), which is not set")
    return value


def _say_scram_refusals() -> None:
    from aiokafka import conn, errors

    authenticator = conn.ScramAuthenticator
    read_verifier = authenticator.process_server_final_message
    if getattr(read_verifier, "finpulse_reads_refusals", False):
        return

    def process_server_final_message(self, server_final):
        fields = dict(pair.split("=", 1) for pair in server_final.split(",") if "=" in pair)
        if "e" in fields and "v" not in fields:
            raise errors.SaslAuthenticationFailed(f"the broker refused the SCRAM credentials ({fields['e']})")
        return read_verifier(self, server_final)

    process_server_final_message.finpulse_reads_refusals = True
    authenticator.process_server_final_message = process_server_final_message


def why_unreachable(kafka: KafkaSettings, timeout_s: float = 5.0) -> str | None:
    """Why the clients could not connect, where a broker does answer: the Kafka clients say only "unable to
    bootstrap" when TLS or SASL fails (the reason goes to a log line), so this asks again itself: a TLS handshake
    with the clients' own context, a TLS probe where no TLS is configured, and a SASL login with aiokafka's client.
    None: no broker took a TCP connection at all, or nothing was found wrong."""
    from .kafka_io import bootstrap_list    # kafka_io makes its clients with this module's settings

    address, unresolved = None, []
    servers = bootstrap_list(kafka.bootstrap_servers)
    for server in servers:
        host, _, port = server.rpartition(":")
        try:
            candidate = (host.strip("[]"), int(port))
            socket.create_connection(candidate, timeout=timeout_s).close()
        except socket.gaierror:
            unresolved.append(host)
            continue
        except (OSError, ValueError):
            continue
        address = candidate
        break
    if address is None:
        if unresolved and len(unresolved) == len(servers):
            return (f"the host name{'s' if len(unresolved) > 1 else ''} {', '.join(unresolved)} cannot be resolved "
                    f"(DNS): check [kafka] bootstrap_servers")
        return None
    shown = f"{address[0]}:{address[1]}"
    if uses_tls(kafka):
        try:
            _tls_handshake(address, tls_context(kafka), timeout_s)
        except ssl.SSLCertVerificationError as exc:
            if exc.verify_code in (X509_HOSTNAME_MISMATCH, X509_IP_ADDRESS_MISMATCH):
                advice = ("list the brokers by a host name (or address) their certificate names (or, only if they "
                          "name none, [kafka] check_hostname = false)")
            elif exc.verify_code not in X509_UNKNOWN_ISSUER:
                advice = "the broker's certificate itself must be mended (its owner's work)"
            elif kafka.ca_file:
                advice = (f"the CA certificates in {kafka.ca_file} did not sign it: ca_file needs the CA that did (its "
                          f"root, and any intermediate the broker does not send)")
            else:
                advice = "set [kafka] ca_file to a PEM bundle with the CA that signed it (its root and intermediates)"
            return f"TLS: the certificate of the broker at {shown} failed verification ({exc.verify_message}): {advice}"
        except ssl.SSLError as exc:
            needs_certificate = "CERTIFICATE_REQUIRED" in str(exc).upper() or "HANDSHAKE_FAILURE" in str(exc).upper()
            return (f"TLS: the handshake with {shown} failed ({exc.reason or exc})"
                    + ("; a broker that wants a client certificate needs [kafka] client_cert_file and client_key_file"
                       if needs_certificate and not kafka.client_cert_file else ""))
        except _ClosedAfterHandshake:
            return (f"TLS: the broker at {shown} closed the connection after the TLS handshake"
                    + (": a broker that wants a client certificate needs [kafka] client_cert_file and client_key_file"
                       if not kafka.client_cert_file else ": does it trust the CA that signed client_cert_file?"))
        except OSError as exc:
            return (f"TLS: {shown} took the connection but no TLS handshake ({exc or type(exc).__name__}): is "
                    f"that a TLS listener? (a plain one needs security_protocol = "
                    f"{'SASL_PLAINTEXT' if uses_sasl(kafka) else 'PLAINTEXT'})")
    else:
        probe = ssl.create_default_context()
        probe.check_hostname, probe.verify_mode = False, ssl.CERT_NONE
        try:
            _tls_handshake(address, probe, min(timeout_s, 3.0), then_request=False)
            return (f"the broker at {shown} speaks TLS: set [kafka] security_protocol = "
                    f"{'SASL_SSL' if uses_sasl(kafka) else 'SSL (or SASL_SSL, if it also wants a user)'}")
        except (OSError, ssl.SSLError):
            pass
        if not uses_sasl(kafka) and _refuses_requests_without_login(address, timeout_s):
            return (f"the broker at {shown} answers, but closed the connection on a request made without a login: "
                    f"if it wants a user, set [kafka] security_protocol = SASL_PLAINTEXT (SASL_SSL over TLS), "
                    f"sasl_mechanism and sasl_username, and the password in ${kafka.sasl_password_env}")
    if uses_sasl(kafka):
        return _run_to_end(_sasl_refusal(kafka, address, timeout_s))
    return None


def _run_to_end(coroutine):
    """``asyncio.run``, also where the caller runs in an event loop (a command's async code creating topics): there
    on a thread of its own, as the blocking admin client around it does."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="finpulse-kafka-check") as pool:
        return pool.submit(asyncio.run, coroutine).result()


def refusal_before_connecting(kafka: KafkaSettings) -> str | None:
    """For a kafka-python client about to connect by TLS: why it would fail, asked first with a time limit, because
    kafka-python (3.0) waits without one for a TLS handshake that a listener never answers (a plain listener that
    holds the connection, a load balancer). None: nothing found, or no TLS."""
    return why_unreachable(kafka) if uses_tls(kafka) else None


# An ApiVersions request (v0, no client id): under TLS 1.3 a server that wants a client certificate says so only
# after the handshake, in answer to the first bytes sent.
_API_VERSIONS_REQUEST = struct.pack(">ihhih", 10, 18, 0, 1, -1)
_METADATA_REQUEST = struct.pack(">ihhihi", 14, 3, 0, 2, -1, 0)      # v0, every topic


def _tls_handshake(address: tuple[str, int], context: ssl.SSLContext, timeout_s: float,
                   then_request: bool = True) -> None:
    """A TLS handshake and (``then_request``) one Kafka request through it; raises what either met."""
    with socket.create_connection(address, timeout=timeout_s) as raw:
        with context.wrap_socket(raw, server_hostname=address[0]) as tls:
            if not then_request:
                return
            tls.sendall(_API_VERSIONS_REQUEST)
            if len(tls.recv(4)) < 4:
                raise _ClosedAfterHandshake()


def _refuses_requests_without_login(address: tuple[str, int], timeout_s: float) -> bool:
    """Whether a broker answers ApiVersions in plain text but ends the connection on a Metadata request: what a
    listener that wants a SASL login does (those two are the requests it takes before one)."""
    try:
        with socket.create_connection(address, timeout=timeout_s) as plain:
            plain.sendall(_API_VERSIONS_REQUEST)
            size = struct.unpack(">i", _read_exactly(plain, 4))[0]
            _read_exactly(plain, size)
            plain.sendall(_METADATA_REQUEST)
            return len(plain.recv(4)) == 0
    except (OSError, struct.error):
        return False


def _read_exactly(connection: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = connection.recv(min(65536, size - len(data)))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


class _ClosedAfterHandshake(ConnectionError):
    """The server ended the connection after the handshake, before any answer."""


async def _sasl_refusal(kafka: KafkaSettings, address: tuple[str, int], timeout_s: float) -> str | None:
    """A SASL login with aiokafka's own connection: its client only logs why a login failed."""
    from aiokafka.conn import create_conn
    from aiokafka.errors import AuthenticationFailedError, KafkaConnectionError, KafkaError, \
        SaslAuthenticationFailed, UnsupportedSaslMechanismError

    try:
        connection = await asyncio.wait_for(create_conn(*address, request_timeout_ms=int(timeout_s * 1000),
                                                        **client_security(kafka)), timeout_s)
    except UnsupportedSaslMechanismError:
        return (f"the broker does not take SASL mechanism {kafka.sasl_mechanism}: set [kafka] sasl_mechanism to "
                f"one it does (its documentation names it)")
    except (SaslAuthenticationFailed, AuthenticationFailedError) as exc:
        said = exc.args[0] if exc.args else type(exc).__name__
        return (f"the broker did not accept the credentials ({describe(kafka)}): {said}; check [kafka] sasl_username "
                f"and sasl_mechanism and the password in ${kafka.sasl_password_env}")
    except KafkaConnectionError:
        if _refuses_requests_without_login(address, timeout_s) or uses_tls(kafka):
            return (f"the broker closed the connection during the SASL login ({describe(kafka)}): does it take "
                    f"sasl_mechanism {kafka.sasl_mechanism}? (its documentation names the ones it does)")
        return None
    except (KafkaError, OSError, TimeoutError):
        return None
    connection.close()
    return None
