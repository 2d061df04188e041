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
        try:
            context.load_cert_chain(client_cert_file, client_key_file or None, password=key_password)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{where}: client_cert_file {client_cert_file} / client_key_file "
                              f"{client_key_file or '(in the certificate file)'} cannot be loaded as a PEM "
                              f"certificate and its private key ({exc}); an encrypted key needs "
                              f"client_key_password_env") from None
    return context
