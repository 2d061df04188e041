"""Settings for every FinPulse command, merged in one order: defaults < config file < environment < flags.

The config file is TOML (``--config FILE``, else ``$FINPULSE_CONFIG``, else ``./finpulse.toml`` when present).
Environment variables name a section and a key with a double underscore:
``FINPULSE_KAFKA__BOOTSTRAP_SERVERS=broker:9092``, ``FINPULSE_WORKER__MAX_BATCH=512``.

Each package declares its own section as a dataclass and reads it with ``settings.section("alerts", AlertSettings)``,
so adding a setting never means editing this module. Secrets are never values in a file: sections name the
environment variable that holds them (see ``alerts``), and ``redacted()`` is what gets logged.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tomllib
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

ENV_PREFIX = "FINPULSE_"
DEFAULT_CONFIG_FILE = "finpulse.toml"
SectionT = TypeVar("SectionT")


class ConfigError(ValueError):
    """A setting that cannot be used; the message says which one and why."""


SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_SSL", "SASL_PLAINTEXT")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclasses.dataclass
class KafkaSettings:
    bootstrap_servers: str = "127.0.0.1:9092"
    # Every FinPulse topic is created up front with this many partitions (tansu auto-creates 4).
    partitions: int = 4
    replication_factor: int = 1
    # "auto": detect the embedded tansu broker and apply stream.tansu_compat; "on"/"off" force it.
    tansu_compat: str = "auto"
    # Group joins take half the session timeout on tansu: keep these small locally.
    session_timeout_s: float = 6.0
    heartbeat_interval_s: float = 1.5
    topic_prefix: str = "finpulse"
    # Where `finpulse broker` and `make demo` put the embedded broker.
    embedded_port: int = 9092
    # How long ingest, simulate and replay wait while the broker takes none of their records (as Kafka's
    # delivery.timeout.ms): then they stop with an error saying how many it took.
    delivery_timeout_s: float = 120.0
    # How every FinPulse client connects (stream.kafka_security): "PLAINTEXT" (the embedded broker, a local Kafka),
    # "SSL" (TLS), "SASL_SSL" (TLS and a user: Confluent Cloud, Amazon MSK, Aiven, most clusters a company runs)
    # or "SASL_PLAINTEXT" (a user, no TLS).
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = ""                # "PLAIN" | "SCRAM-SHA-256" | "SCRAM-SHA-512", as the cluster's docs say
    sasl_username: str = ""
    # The SASL password is a secret: it is read from the environment variable named here, never from a file.
    sasl_password_env: str = "FINPULSE_KAFKA_PASSWORD"
    # TLS: a PEM bundle of the CA(s) that signed the brokers' certificates, trusted beside the system's; a client
    # certificate and its key for mTLS (client_key_password_env names the variable holding an encrypted key's
    # passphrase). check_hostname = false only for brokers whose certificates do not name the hosts they serve.
    ca_file: str = ""
    client_cert_file: str = ""
    client_key_file: str = ""
    client_key_password_env: str = ""
    check_hostname: bool = True

    def __post_init__(self) -> None:
        self._check_security()
        if self.delivery_timeout_s <= 0:
            raise ConfigError("[kafka] delivery_timeout_s must be above 0")
        if self.partitions < 1 or self.replication_factor < 1:
            raise ConfigError("[kafka] partitions and replication_factor must be 1 or more")
        if not 0 < self.heartbeat_interval_s < self.session_timeout_s:
            raise ConfigError("[kafka] heartbeat_interval_s must be above 0 and below session_timeout_s (a member "
                              "that beats less often than its session lasts is dropped from the group)")
        check_port("[kafka] embedded_port", self.embedded_port, zero_allowed=False)

    def _check_security(self) -> None:
        """Refuse a security setting that would be ignored (credentials over a protocol that sends none, a CA file
        without TLS) as well as one that is missing: a cluster then refuses the connection with no word of why."""
        self.security_protocol = self.security_protocol.strip().upper()
        self.sasl_mechanism = self.sasl_mechanism.strip().upper()
        if self.security_protocol not in SECURITY_PROTOCOLS:
            raise ConfigError(f"[kafka] security_protocol = {self.security_protocol!r}: use PLAINTEXT, SSL (TLS, as "
                              f"Kafka names it), SASL_SSL (TLS and a user) or SASL_PLAINTEXT")
        sasl, tls = self.security_protocol.startswith("SASL_"), self.security_protocol.endswith("SSL")
        if sasl:
            if self.sasl_mechanism not in SASL_MECHANISMS:
                raise ConfigError(f"[kafka] security_protocol = {self.security_protocol} needs sasl_mechanism: one of "
                                  f"{', '.join(SASL_MECHANISMS)} (the cluster's documentation names it)"
                                  + (f", not {self.sasl_mechanism!r}: FinPulse takes no other (GSSAPI/Kerberos, "
                                     f"OAUTHBEARER and AWS_MSK_IAM are not supported; Amazon MSK also takes "
                                     f"SCRAM-SHA-512)" if self.sasl_mechanism else ""))
            if not self.sasl_username.strip():
                raise ConfigError(f"[kafka] security_protocol = {self.security_protocol} needs sasl_username (its "
                                  f"password goes in the environment variable sasl_password_env names)")
        else:
            given = [name for name in ("sasl_mechanism", "sasl_username") if getattr(self, name)]
            if given:
                raise ConfigError(f"[kafka] {' and '.join(given)} set, but security_protocol = "
                                  f"{self.security_protocol} sends no credentials: use SASL_SSL (or SASL_PLAINTEXT)")
        if not tls:
            given = [name for name in ("ca_file", "client_cert_file", "client_key_file") if getattr(self, name)]
            if given:
                raise ConfigError(f"[kafka] {' and '.join(given)} set, but security_protocol = "
                                  f"{self.security_protocol} does not use TLS: use SSL or SASL_SSL")
        if self.client_key_file and not self.client_cert_file:
            raise ConfigError("[kafka] client_key_file is set without client_cert_file (the certificate it is the "
                              "key of)")


@dataclasses.dataclass
class WorkerSettings:
    app_id: str = "finpulse-worker"
    max_batch: int = 256
    max_wait_s: float = 0.5
    # The most one fetch takes from one partition. Small, so that in a backlog the input partitions take turns: a
    # window waits for the slowest partition with a backlog (stream.input_watermark), and at Kafka's 1 MB each
    # partition's prefetched thousands of messages were scored in turn, one partition unread for minutes.
    fetch_bytes_per_partition: int = 64 * 1024
    # Longer texts are dead-lettered as oversized rather than silently cut (the scorer truncates tokens anyway).
    max_text_chars: int = 20_000
    # "auto" (newest trained model, else baseline) | "model" | "baseline" | "noop"
    scorer: str = "auto"
    model_dir: str = ""
    device: str = "auto"
    # Processes that tokenize for a GPU scorer; -1: as measured best (4 on a GPU host, none on a CPU).
    tokenizer_processes: int = -1
    # How the model computes on a CPU (models.precision): "auto" (bf16 where the CPU has bfloat16 instructions:
    # about 3x float32 with AMX, float32's labels for 99.9% of texts; else float32) | "float32" | "bf16" | "int8".
    cpu_precision: str = "auto"
    data_dir: str = "var/worker"
    web_port: int = 6066
    log_level: str = "info"
    # A stop (SIGTERM, Ctrl-C) waits for the batch in hand to reach the broker; this long after the signal, or at a
    # second one, the worker exits without committing it instead (a broker gone away would keep it waiting for ever).
    stop_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.stop_timeout_s <= 0:
            raise ConfigError("[worker] stop_timeout_s must be above 0 (seconds a stop may wait for the broker)")
        if self.max_batch < 1 or self.max_wait_s <= 0 or self.max_text_chars < 1:
            raise ConfigError("[worker] max_batch and max_text_chars must be 1 or more, and max_wait_s above 0")
        if self.fetch_bytes_per_partition <= 0:
            raise ConfigError("[worker] fetch_bytes_per_partition must be positive (a larger record still comes whole)")
        if self.tokenizer_processes < -1:
            raise ConfigError("[worker] tokenizer_processes: -1 (as measured best), 0 (none) or more")
        check_port("[worker] web_port", self.web_port)


def check_port(name: str, port: int, zero_allowed: bool = True) -> None:
    """A port setting; where ``zero_allowed``, 0 turns the server off."""
    if not (0 if zero_allowed else 1) <= port <= 65535:
        raise ConfigError(f"{name} = {port}: not a TCP port ({'0' if zero_allowed else '1'}-65535"
                          f"{', 0: none' if zero_allowed else ''})")


@dataclasses.dataclass
class Settings:
    """The merged configuration: typed core sections plus the raw mapping for package-owned sections."""

    raw: dict[str, Any]
    source_file: str | None = None

    @property
    def kafka(self) -> KafkaSettings:
        return self.section("kafka", KafkaSettings)

    @property
    def worker(self) -> WorkerSettings:
        return self.section("worker", WorkerSettings)

    def section(self, name: str, cls: type[SectionT]) -> SectionT:
        return build_dataclass(cls, self.raw.get(name, {}), where=name)

    def with_overrides(self, overrides: Mapping[str, Mapping[str, Any]]) -> "Settings":
        merged = _deep_merge(self.raw, {k: {kk: vv for kk, vv in v.items() if vv is not None} for k, v in overrides.items()})
        return Settings(raw=merged, source_file=self.source_file)

    def fingerprint(self, *sections: str) -> str:
        """A short stable hash of the named sections (all when none named): stamped on replay/backtest output."""
        chosen = {k: v for k, v in sorted(self.raw.items()) if not sections or k in sections}
        blob = json.dumps(chosen, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def redacted(self) -> dict[str, Any]:
        return _redact(self.raw)


def tcp_port(text: str) -> int:
    """The argparse type of every port flag: a TCP port, 0-65535, said plainly (not a traceback from bind())."""
    import argparse
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (0-65535)")
    return port


def load_settings(config_file: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    environ = os.environ if environ is None else environ
    path = config_file or environ.get(ENV_PREFIX + "CONFIG") or (DEFAULT_CONFIG_FILE if Path(DEFAULT_CONFIG_FILE).exists() else None)
    raw: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            raw = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
    raw = _deep_merge(raw, _from_environ(environ))
    return Settings(raw=raw, source_file=str(path) if path else None)


def _from_environ(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, dict[str, Any]] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX):].partition("__")
        out.setdefault(section.lower(), {})[key.lower()] = value
    return out


def build_dataclass(cls: type[SectionT], values: Mapping[str, Any], where: str = "") -> SectionT:
    """Make ``cls`` from a mapping, coercing strings (from the environment) to each field's type."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown setting(s) in [{where}]: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in values.items():
        try:
            kwargs[name] = _coerce(value, hints[name])
        except (TypeError, ValueError) as exc:
            shown = "(value not shown)" if _may_hold_secret(name) or _structured(value) else repr(value)
            raise ConfigError(f"[{where}] {name} = {shown}: {exc}") from None
        if name.endswith("_env"):
            _check_env_names(name, kwargs[name], where)
    return cls(**kwargs)


# Upper case only, as POSIX names its variables: a secret pasted where the name belongs (whsec_…, a PagerDuty key,
# a Slack URL) is mixed or lower case, and an error saying "variable <name> is not set" would print it.
ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")


def _check_env_names(name: str, value: Any, where: str) -> None:
    """A ``*_env`` setting holds the NAME of an environment variable (or a list of them, or a table whose values are
    names, like ``headers_env``); refuse anything else without echoing it."""
    if isinstance(value, Mapping):
        value = list(value.values())
    for var in value if isinstance(value, (list, tuple)) else [value]:
        if var and not (isinstance(var, str) and ENV_NAME.fullmatch(var)):
            raise ConfigError(f"[{where}] {name} must name an environment variable (upper-case letters, digits and _, "
                              f"e.g. FINPULSE_WEBHOOK_SECRET); its value looks like a secret, so it is not shown. "
                              f"Put the secret in the environment and name that variable here")


def _structured(value: Any) -> bool:
    """A table or list, or JSON text of one (from the environment): it can hold URLs with tokens, so an error about
    it names the setting only."""
    return isinstance(value, (Mapping, list)) or (isinstance(value, str) and value.strip()[:1] in ("[", "{"))


def _may_hold_secret(key: str) -> bool:
    """A setting whose value may be a secret: one named like a secret, or a ``*_env`` a secret was pasted into."""
    return key.lower().endswith("_env") or names_a_secret(key)


def _coerce(value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null") and type(None) in args):
            return None
        hint = next(a for a in args if a is not type(None))
        return _coerce(value, hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError("expected a boolean (true/false)")
    if hint in (int, float, str):
        if isinstance(value, bool) and hint is not str:
            raise ValueError(f"expected {hint.__name__}")
        return hint(value)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = json.loads(value) if value.strip()[:1] in ("[", "{") else [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise ValueError("expected a JSON list: [...]")
        items = [_coerce(v, args[0]) if args else v for v in value]
        return items if origin is list else tuple(items)
    if origin is dict or hint is dict:
        if isinstance(value, str):
            value = json.loads(value)
        if not isinstance(value, Mapping):
            raise ValueError("expected a table/mapping")
        return dict(value)
    return value


def _deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


_SECRET_MARKERS = ("secret", "password", "token", "key", "authorization")


def names_a_secret(key: str) -> bool:
    """Whether a setting (or header) named ``key`` holds a secret by its name: its value is redacted and never echoed."""
    return any(m in key.lower() for m in _SECRET_MARKERS)


def _redact(value: Any, key: str = "") -> Any:
    if isinstance(value, Mapping):
        return {k: _redact(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v, key) for v in value]
    if names_a_secret(key) and not key.lower().endswith("_env"):
        return "***"
    return value
