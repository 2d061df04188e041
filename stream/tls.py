"""TLS client contexts from settings: a CA bundle to trust beside the system's, and a client certificate (mTLS).

Kafka's connections (``stream.kafka_security``) and webhook endpoints (``alerts.endpoints``) build theirs here, so
both read the same settings the same way and a file that cannot be used is refused in one line that names it.
"""
from __future__ import annotations

import ssl

from .config import ConfigError


def client_tls_context(ca_file: str, client_cert_file: str, client_key_file: str, key_password: str | None,
                       where: str, check_hostname: bool = True) -> ssl.SSLContext:
    """A verifying client context that trusts the system's CAs and ``ca_file``'s, presenting ``client_cert_file``
    (its key in ``client_key_file``, or in the certificate file) when one is set."""
    context = ssl.create_default_context()
    if not check_hostname:
        context.check_hostname = False      # the chain is still verified: a certificate the CA did not sign fails
    if ca_file:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{where}: ca_file {ca_file} cannot be read as a PEM bundle of CA certificates "
                              f"({exc})") from None
    if client_cert_file:
        key_file = client_key_file or client_cert_file
        if key_password is None and _encrypted(key_file):
            raise ConfigError(f"{where}: the private key in {key_file} is encrypted: name the environment variable "
                              f"that holds its passphrase in client_key_password_env")
        try:
            # Never OpenSSL's own prompt: on a terminal it waited for a passphrase nobody would type.
            context.load_cert_chain(client_cert_file, client_key_file or None,
                                    password=key_password if key_password is not None else _no_passphrase)
        except (OSError, ssl.SSLError) as exc:
            if "KEY_VALUES_MISMATCH" in str(exc):
                why = f"the key in {key_file} is not the key of the certificate in {client_cert_file}"
            elif key_password is not None:
                why = (f"{client_cert_file} and its key {key_file} cannot be loaded with the passphrase from "
                       f"client_key_password_env: is it that key's?")
            else:
                why = (f"client_cert_file {client_cert_file} / its key {key_file} cannot be loaded as a PEM "
                       f"certificate and its private key")
            raise ConfigError(f"{where}: {why} ({exc})") from None
    return context


def _no_passphrase() -> bytes:
    return b""


def _encrypted(key_file: str) -> bool:
    """A PEM private key protected by a passphrase (PKCS#8 or the older OpenSSL headers)."""
    try:
        text = open(key_file, encoding="ascii", errors="replace").read(1 << 20)
    except OSError:
        return False        # said by load_cert_chain, naming the file
    return "BEGIN ENCRYPTED PRIVATE KEY" in text or "Proc-Type: 4,ENCRYPTED" in text
