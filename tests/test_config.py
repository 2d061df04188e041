"""Settings merge in one order (defaults < file < environment < flags) and fail loudly on mistakes."""
import pytest

from stream.config import ConfigError, KafkaSettings, load_settings


def test_precedence_file_then_env_then_flags(tmp_path):
    cfg = tmp_path / "f.toml"
    cfg.write_text('[kafka]\nbootstrap_servers = "file:1"\npartitions = 8\n[worker]\nmax_batch = 64\n')
    settings = load_settings(cfg, environ={"FINPULSE_KAFKA__BOOTSTRAP_SERVERS": "env:2"})
    assert settings.kafka.bootstrap_servers == "env:2"
    assert settings.kafka.partitions == 8
    assert settings.worker.max_batch == 64
    assert settings.worker.max_wait_s == 0.5  # default survives
    flagged = settings.with_overrides({"kafka": {"bootstrap_servers": "flag:3", "partitions": None}})
    assert flagged.kafka.bootstrap_servers == "flag:3"
    assert flagged.kafka.partitions == 8  # a flag left unset does not override


def test_environment_strings_are_coerced_to_field_types():
    settings = load_settings(None, environ={"FINPULSE_WORKER__MAX_WAIT_S": "0.25", "FINPULSE_KAFKA__PARTITIONS": "2"})
    assert settings.worker.max_wait_s == 0.25 and settings.kafka.partitions == 2


def test_a_list_of_tables_from_the_environment_that_is_not_one_is_named_without_echoing_it():
    """Endpoint tables in FINPULSE_ALERTS__ENDPOINTS can hold webhook URLs with tokens: a mistake in the JSON names the
    setting and what is wrong, never the value."""
    from alerts.endpoints import AlertsSettings
    url = "https://chat.googleapis.com/v1/spaces/S/messages?key=K&token=FAKETOKEN123"
    for value, problem in ((f'[{{"name": "gc", "url": "{url}"}},]', "Expecting value"),
                           (f'{{"name": "gc", "url": "{url}"}}', "expected a JSON list")):
        with pytest.raises(ConfigError) as caught:
            load_settings(None, environ={"FINPULSE_ALERTS__ENDPOINTS": value}).section("alerts", AlertsSettings)
        assert "[alerts] endpoints = (value not shown)" in str(caught.value) and problem in str(caught.value)
        assert "FAKETOKEN123" not in str(caught.value)


def test_bad_values_and_unknown_keys_name_the_setting(tmp_path):
    with pytest.raises(ConfigError, match=r"\[kafka\] partitions"):
        load_settings(None, environ={"FINPULSE_KAFKA__PARTITIONS": "many"}).kafka
    with pytest.raises(ConfigError, match="unknown setting.*bootstrap"):
        load_settings(None, environ={"FINPULSE_KAFKA__BOOTSTRAP": "x"}).kafka
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml", environ={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[kafka\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(bad, environ={})


@pytest.mark.parametrize("key, value, message", [
    ("KAFKA__PARTITIONS", "0", r"\[kafka\] partitions and replication_factor must be 1 or more"),
    ("KAFKA__HEARTBEAT_INTERVAL_S", "10", r"\[kafka\] heartbeat_interval_s must be above 0 and below session"),
    ("KAFKA__EMBEDDED_PORT", "99999", r"\[kafka\] embedded_port = 99999: not a TCP port"),
    ("WORKER__MAX_BATCH", "0", r"\[worker\] max_batch"),
    ("WORKER__MAX_WAIT_S", "-1", r"max_wait_s above 0"),
    ("WORKER__WEB_PORT", "70000", r"\[worker\] web_port = 70000: not a TCP port \(0-65535, 0: none\)"),
    ("WORKER__TOKENIZER_PROCESSES", "-2", r"\[worker\] tokenizer_processes"),
])
def test_numbers_that_cannot_work_are_refused_when_read_naming_the_setting(key, value, message):
    """Before, a zero batch or an impossible port reached Faust or bind() and failed there, far from the cause."""
    settings = load_settings(None, environ={f"FINPULSE_{key}": value})
    with pytest.raises(ConfigError, match=message):
        settings.kafka, settings.worker


def test_sections_read_by_their_own_package_check_their_ports_too():
    from dashboard.settings import dashboard_settings
    from stream.ingest import IngestSettings
    with pytest.raises(ConfigError, match=r"\[dashboard\] port = 99999"):
        dashboard_settings(load_settings(None, environ={"FINPULSE_DASHBOARD__PORT": "99999"}))
    with pytest.raises(ConfigError, match=r"\[ingest\] metrics_port = -5"):
        load_settings(None, environ={"FINPULSE_INGEST__METRICS_PORT": "-5"}).section("ingest", IngestSettings)
    assert dashboard_settings(load_settings(None, environ={})).port == 8501


def test_secrets_are_redacted_but_env_var_names_are_not():
    settings = load_settings(None, environ={"FINPULSE_ALERTS__SECRET": "s3cr3t", "FINPULSE_ALERTS__SECRET_ENV": "MY_VAR"})
    shown = settings.redacted()["alerts"]
    assert shown["secret"] == "***" and shown["secret_env"] == "MY_VAR"


def test_a_secret_where_an_env_var_name_belongs_is_refused_and_never_echoed():
    """Every `*_env` setting, in any section: a pasted secret is refused, and no error shows it."""
    from dashboard.settings import DashboardSettings
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # matches [A-Za-z_][A-Za-z0-9_]*: case is what gives it away
    settings = load_settings(None, environ={"FINPULSE_DASHBOARD__PASSWORD_ENV": secret})
    with pytest.raises(ConfigError, match="password_env must name an environment variable") as refused:
        settings.section("dashboard", DashboardSettings)
    assert secret not in str(refused.value)
    assert load_settings(None, environ={"FINPULSE_DASHBOARD__PASSWORD_ENV": "MY_PASSWORD"}).section(
        "dashboard", DashboardSettings).password_env == "MY_PASSWORD"


def test_fingerprint_changes_with_settings():
    a = load_settings(None, environ={"FINPULSE_DETECT__THRESHOLD": "3"})
    b = load_settings(None, environ={"FINPULSE_DETECT__THRESHOLD": "4"})
    assert a.fingerprint("detect") != b.fingerprint("detect")
    assert a.fingerprint("detect") == load_settings(None, environ={"FINPULSE_DETECT__THRESHOLD": "3"}).fingerprint("detect")
    assert KafkaSettings().partitions == 4


def test_the_example_config_documents_every_setting_with_its_default():
    """finpulse.example.toml is the reference for users: each section loads, and lists every field its dataclass has,
    at the default value (the demo-receiver endpoint, its dashboard link and an inhibition rule are the example's only
    additions)."""
    import dataclasses
    import tomllib
    from pathlib import Path

    from alerts.detect import DetectSettings
    from alerts.endpoints import AlertsSettings
    from dashboard.settings import DashboardSettings
    from models.settings import ModelSettings
    from stream.aggregate import AggregateSettings
    from stream.config import WorkerSettings
    from stream.ingest import IngestSettings
    from stream.replay.plan import ReplaySettings

    path = Path(__file__).resolve().parent.parent / "finpulse.example.toml"
    document = tomllib.loads(path.read_text())
    settings = load_settings(path, environ={})
    sections = {"kafka": KafkaSettings, "worker": WorkerSettings, "ingest": IngestSettings,
                "aggregate": AggregateSettings, "detect": DetectSettings,
                "alerts": AlertsSettings, "dashboard": DashboardSettings, "models": ModelSettings, "replay": ReplaySettings}
    assert set(document) == set(sections)
    additions = {("alerts", "endpoints"), ("alerts", "dashboard_url"), ("alerts", "inhibit"), ("detect", "overrides")}
    for name, cls in sections.items():
        loaded = settings.section(name, cls)
        default = cls()
        for f in dataclasses.fields(cls):
            if (name, f.name) in additions:
                continue
            assert f.name in document[name], f"[{name}] {f.name} is missing from finpulse.example.toml"
            assert getattr(loaded, f.name) == getattr(default, f.name), f"[{name}] {f.name} differs from its default"


@pytest.mark.parametrize("args", [["receiver", "--port", "99999"], ["dashboard", "--port", "-1"],
                                  ["worker", "--web-port", "65536"], ["broker", "--port", "x"],
                                  ["demo", "--receiver-port", "70000"], ["dispatch", "--metrics-port", "1e3"]])
def test_every_port_flag_refuses_what_is_not_a_tcp_port(args, capsys):
    """Before, a port past 65535 reached bind() and ended in an OverflowError traceback."""
    from stream.cli import build_parser
    with pytest.raises(SystemExit):
        build_parser().parse_args(args)
    err = capsys.readouterr().err
    assert "is not a TCP port (0-65535)" in err or "is not a port number" in err, err


def test_every_flag_and_argument_of_every_command_says_what_it_is_for():
    import argparse

    from stream.cli import build_parser

    silent = []

    def walk(parser: argparse.ArgumentParser, command: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{command} {name}")
            elif not action.help and not isinstance(action, argparse._HelpAction):
                silent.append(f"{command} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "finpulse")
    assert not silent, f"--help says nothing of: {', '.join(silent)}"
