"""Shared fixtures: one real tansu broker per test session, isolated topic names per test, and a test CA with
its certificates (``pki``)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from stream.broker import EmbeddedBroker
from stream.config import Settings
from stream.topics import TopicNames
from tests.procs import isolated_settings


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    log_file = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(log_file=log_file) as b:
        yield b


@pytest.fixture
def fp_settings(broker, tmp_path) -> Settings:
    """Settings pointing at the session broker, with a topic prefix and app id of this test's own,
    and every FinPulse topic created up front (4 partitions)."""
    return isolated_settings(broker.bootstrap_servers, tmp_path)


@pytest.fixture
def topics(fp_settings) -> TopicNames:
    return TopicNames(fp_settings.kafka.topic_prefix)


@pytest.fixture(scope="session")
def artifacts_dir():
    path = os.environ.get("FINPULSE_ARTIFACTS", "artifacts")
    os.makedirs(path, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> dict[str, Path]:
    """Real certificates for TLS tests: a test CA and, signed by it, a server certificate for localhost/127.0.0.1
    and a client certificate (PEM files, made with the openssl CLI)."""
    if shutil.which("openssl") is None:
        pytest.fail("these tests make their certificates with the openssl command-line tool: install openssl")
    d = tmp_path_factory.mktemp("pki")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=FinPulse Test CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, extensions in (("server", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
                             ("client", "extendedKeyUsage=clientAuth\n")):
        (d / f"{name}.ext").write_text(extensions)
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    return {name: d / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}
