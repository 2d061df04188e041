"""``finpulse replay`` and ``finpulse export`` end to end on a real tansu broker: inputs come from the real
``finpulse simulate``; replays run the real command (in-process, or as a process where Ctrl-C is needed); alerts
go to real ``finpulse receiver`` processes over HTTP; the live comparison runs the real worker."""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import time
import urllib.request
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest

from alerts.signing import generate_secret
from stream.broker import free_port
from stream.cli import main
from stream.config import Settings
from stream.kafka_io import RecordSender
from stream.records import AlertRecord, ScoredRecord, TrendRecord, epoch_ms, format_time
from stream.replay.archive import MARKER
from stream.replay.output import read_table
from stream.replay.plan import output_topics, parse_range
from stream.replay.runs import format_runs, read_run_dir
from stream.simulate import Shock, generate
from stream.topics import TopicNames, admin_client, ensure_topics
from stream.replay.archive import ArchiveSelection, check_export_dir, export_archive
from stream.replay.select import TimedMessage
from tests.network import broker_behind_link
from tests.procs import (isolated_settings, json_values, read_all, run_finpulse, start_finpulse, start_worker,
                         wait_for_records, write_config)

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)
T2 = T0 + timedelta(minutes=7)
RANGE = ["--from", format_time(T0), "--to", format_time(T2)]
SIMULATION = {"seed": 11, "rate": 10.0, "count": 5000, "malformed_share": 0.01}
SHOCK = Shock("Energy | Oil", at_s=180, duration_s=120)     # 09:03-09:05; calm after, so the episode resolves
# Settings every replay here shares (a live worker in the last test uses them too): a short detector warm-up so a
# few minutes of simulated stream are enough; small Parquet parts so resuming has parts to resume from.
SECTIONS = {"detect": {"warmup_windows": 3}, "replay": {"batch_size": 128, "part_records": 1024}}


def simulate(settings: Settings, log_dir: Path, spec: dict = SIMULATION, shock: Shock = SHOCK,
             max_speed: bool = True) -> None:
    """The real simulator (Kafka timestamps = event times); paced by the wall clock unless ``max_speed``."""
    code, out = run_finpulse(settings, "simulate", "--start", format_time(T0), "--seed", str(spec["seed"]),
                             "--rate", str(spec["rate"]), "--count", str(spec["count"]),
                             "--malformed-share", str(spec["malformed_share"]), "--shock-topic", shock.topic,
                             "--shock-at", str(shock.at_s), "--shock-duration", str(shock.duration_s),
                             *(["--max-speed"] if max_speed else []), log_dir=log_dir, name="simulate", timeout=300)
    assert code == 0, out[-3000:]


def expected_inputs() -> list:
    s = SIMULATION
    return [m for m in generate(s["seed"], T0, s["rate"], s["count"], SHOCK, malformed_share=s["malformed_share"])
            if T0 <= m.event_time < T2]


@pytest.fixture(scope="module")
def dataset(broker, tmp_path_factory):
    """A simulated stream on its own topics, shared by the tests of this module (none of them writes to it)."""
    log_dir = tmp_path_factory.mktemp("replay-dataset")
    prefix = f"r{uuid.uuid4().hex[:10]}"
    settings = Settings(raw={
        "kafka": {"bootstrap_servers": broker.bootstrap_servers, "partitions": 4, "topic_prefix": prefix},
        "worker": {"scorer": "baseline", "app_id": f"{prefix}-worker", "max_wait_s": 0.2}, **SECTIONS})
    names = TopicNames(prefix)
    ensure_topics(settings.kafka, names.all(), names.compacted())
    simulate(settings, log_dir)
    return {"settings": settings, "names": names, "config": write_config(settings, log_dir / "finpulse.toml"),
            "log_dir": log_dir}


def finpulse(config: Path, *args: str) -> tuple[int, str, str]:
    """``finpulse --config CONFIG ARGS`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["--config", str(config), *args])
    return code, out.getvalue(), err.getvalue()


def replay(config: Path, run_id: str, out_dir: Path, *args: str) -> dict:
    code, out, err = finpulse(config, "replay", *RANGE, "--run-id", run_id, "--parquet", str(out_dir),
                              "--no-progress", *args)
    assert code == 0, out + err
    return json.loads((out_dir / "manifest.json").read_text())


def digests(out_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(out_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out_dir.glob("*/part-*.parquet"))}


def without_provenance(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=["config_hash"]).reset_index(drop=True)


def topic_counts(settings: Settings, topics: list[str]) -> dict[str, int]:
    return {t: len(read_all(settings, t)) for t in topics}


def broker_topics(settings: Settings) -> set[str]:
    admin = admin_client(settings.kafka)
    try:
        return set(admin.list_topics())
    finally:
        admin.close()


# ---------------------------------------------------------------- outputs and isolation

def test_replay_scores_aggregates_and_alerts_into_isolated_topics_and_parquet(dataset, tmp_path):
    settings, names = dataset["settings"], dataset["names"]
    live_before = topic_counts(settings, list(names.all()))
    manifest = replay(dataset["config"], "basic", tmp_path / "basic")

    inputs = expected_inputs()
    valid = {m.id for m in inputs if not m.expected_reason}
    scored = read_table(tmp_path / "basic", "scored")
    assert set(scored["id"]) == valid and len(scored) == len(valid)
    assert manifest["counts"]["inputs"] == len(inputs)
    assert sum(manifest["counts"]["rejected"].values()) == len(inputs) - len(valid)
    assert (scored["model_version"] == "baseline-keywords-1").all()
    assert manifest["scored_on"] == {"device": "-", "precision": "-"}     # the keyword baseline runs no model
    assert (scored["config_hash"] == manifest["config_hash"]).all()
    assert list(scored["event_time"]) == sorted(scored["event_time"])
    trends = read_table(tmp_path / "basic", "trends")
    assert (trends["window_start"] >= pd.Timestamp(T0)).all() and (trends["window_end"] <= pd.Timestamp(T2)).all()
    alerts = read_table(tmp_path / "basic", "alerts")
    shock = alerts[(alerts["key"] == SHOCK.topic) & (alerts["status"] == "firing") & (alerts["escalated_from"] == "")]
    assert len(shock) == 1
    assert pd.Timestamp(T0) + pd.Timedelta(seconds=SHOCK.at_s) <= shock["window_start"].iloc[0] < \
        pd.Timestamp(T0) + pd.Timedelta(seconds=SHOCK.at_s + SHOCK.duration_s)
    assert "resolved" in set(alerts[alerts["id"] == shock["id"].iloc[0]]["status"])

    out = TopicNames(settings.kafka.topic_prefix).replay("basic")
    on_topics = {t: json_values(read_all(settings, t)) for t in (out.scored, out.trends, out.alerts)}
    assert {r["id"] for r in on_topics[out.scored]} == valid
    assert all(r["run_id"] == "basic" and r["model_version"] == "baseline-keywords-1" for r in on_topics[out.scored])
    assert {TrendRecord.from_dict(t).window_id for t in on_topics[out.trends]} == {
        f"{r.key_type}:{r.key}:{r.window_s}:{format_time(r.window_start)}" for r in trends.itertuples()}
    assert sorted((a["id"], a["status"]) for a in on_topics[out.alerts]) == sorted(zip(alerts["id"], alerts["status"]))
    assert all(a["run_id"] == "basic" for a in on_topics[out.alerts])
    # What each trend and alert is about, in the Parquet as on the topics: a topic row's key, a ticker row's
    # dominant topic.
    assert (trends[trends["key_type"] == "topic"]["topic"] == trends[trends["key_type"] == "topic"]["key"]).all()
    about = {TrendRecord.from_dict(t).window_id: t["topic"] for t in on_topics[out.trends] if t["key_type"] == "ticker"}
    ticker_trends = trends[trends["key_type"] == "ticker"]
    assert len(ticker_trends) and ticker_trends["topic"].notna().all()
    assert {f"{r.key_type}:{r.key}:{r.window_s}:{format_time(r.window_start)}": r.topic
            for r in ticker_trends.itertuples()} == about
    assert (shock["topic"] == SHOCK.topic).all() and alerts["topic"].notna().all()
    assert topic_counts(settings, list(names.all())) == live_before


def test_two_threshold_sets_differ_only_in_alerts(dataset, tmp_path):
    """Same inputs and model, the shocked topic's threshold raised out of reach in the second run: scored records
    and windows are identical, alerts lose exactly that topic's, and the live topics never change."""
    settings, names = dataset["settings"], dataset["names"]
    live_before = topic_counts(settings, list(names.all()))
    strict = tmp_path / "strict.toml"
    strict.write_text(f'[detect.overrides."topic:{SHOCK.topic}"]\nfire_z = 1000.0\n')
    default = replay(dataset["config"], "thresholds-a", tmp_path / "a")
    raised = replay(dataset["config"], "thresholds-b", tmp_path / "b", "--config", str(strict))

    assert default["config_hash"] != raised["config_hash"]
    assert default["model_version"] == raised["model_version"]
    for table in ("scored", "trends"):
        pd.testing.assert_frame_equal(without_provenance(read_table(tmp_path / "a", table)),
                                      without_provenance(read_table(tmp_path / "b", table)))
    alerts_a, alerts_b = read_table(tmp_path / "a", "alerts"), read_table(tmp_path / "b", "alerts")
    assert (alerts_a["key"] == SHOCK.topic).any()
    pd.testing.assert_frame_equal(without_provenance(alerts_a[alerts_a["key"] != SHOCK.topic]),
                                  without_provenance(alerts_b))
    assert topic_counts(settings, list(names.all())) == live_before


def test_a_threshold_trial_on_an_earlier_runs_scores_equals_a_full_replay(dataset, tmp_path):
    """--scores-from: run A scores everything with the default thresholds; run C takes A's scores and applies
    strict ones; its Parquet is byte-identical to B's, a full replay with the strict thresholds. Only what A has no
    score for (its warm-up, which a replay never writes) is scored again."""
    config = dataset["config"]
    strict = tmp_path / "strict.toml"
    strict.write_text(f'[detect.overrides."topic:{SHOCK.topic}"]\nfire_z = 1000.0\n')
    a, _ = warm_replay(config, "reuse-a", tmp_path / "a", "--warmup", "2m")
    b, _ = warm_replay(config, "reuse-b", tmp_path / "b", "--warmup", "2m", "--config", str(strict))
    c, _ = warm_replay(config, "reuse-c", tmp_path / "c", "--warmup", "2m", "--config", str(strict),
                       "--scores-from", str(tmp_path / "a"))
    assert shock_firings(tmp_path / "a").shape[0] == 1 and shock_firings(tmp_path / "c").empty   # the trial mattered
    assert digests(tmp_path / "c") == digests(tmp_path / "b") and digests(tmp_path / "c")
    assert c["scores_from"] == "reuse-a" and c["model_version"] == a["model_version"] == b["model_version"]
    assert c["counts"]["scores_reused"] == a["counts"]["scored"]
    assert c["counts"]["scores_computed"] == c["warmup"]["scored"] > 0
    assert {k: v for k, v in c["counts"].items() if not k.startswith("scores_")} == b["counts"]
    listed = read_run_dir(tmp_path / "c")
    assert listed.scores_from == "reuse-a" and f"{a['model_version']} (scores of reuse-a)" in format_runs([listed])

    # The trial judged beside the run it came from: one table, the threshold that differs, each run's figures.
    events = tmp_path / "events.csv"
    events.write_text(f"key,start,end\ntopic:{SHOCK.topic},{format_time(T0 + timedelta(seconds=SHOCK.at_s))},"
                      f"{format_time(T0 + timedelta(seconds=SHOCK.at_s + SHOCK.duration_s))}\n")
    code, out, err = finpulse(config, "backtest", "--run-id", str(tmp_path / "a"), "--run-id", str(tmp_path / "c"),
                              "--events", str(events), "--out", str(tmp_path / "cmp"))
    assert code == 0, out + err
    comparison = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    threshold = f"detect.overrides.topic:{SHOCK.topic}.fire_z"
    assert comparison["differing"] == [threshold]
    first, trial = comparison["runs"]
    assert (first["run_id"], first["settings"][threshold], first["recall"]) == ("reuse-a", None, 1.0)
    assert (trial["run_id"], trial["settings"][threshold], trial["recall"]) == ("reuse-c", 1000.0, 0.0)
    assert trial["scores_from"] == "reuse-a" and first["alerts"] > trial["alerts"]
    assert out.splitlines()[0].startswith(f"RUN ID   {threshold}  ALERTS")
    assert "(scores of reuse-a)" in out.splitlines()[2]

    # C's scores are A's: a trial on C is pointed at A while A is there (its directory: it is not under
    # [replay] out_dir, where the id alone would not find it); with A deleted, C's Parquet is where they are left.
    code, out, err = finpulse(config, "replay", *WARM_RANGE, "--run-id", "reuse-d", "--parquet", str(tmp_path / "d"),
                              "--no-progress", "--warmup", "2m", "--scores-from", str(tmp_path / "c"))
    assert code == 2 and f"that run reused the scores of reuse-a; use --scores-from {tmp_path / 'a'}" in err, err
    shutil.rmtree(tmp_path / "a")
    d, _ = warm_replay(config, "reuse-d", tmp_path / "d", "--warmup", "2m", "--config", str(strict),
                       "--scores-from", str(tmp_path / "c"))
    assert digests(tmp_path / "d") == digests(tmp_path / "b") and d["scores_from"] == "reuse-c"
    assert d["counts"]["scores_reused"] == c["counts"]["scored"]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def wait_until_listening(port: int, proc) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            get_json(f"http://127.0.0.1:{port}/healthz")
            return
        assert proc.running(), proc.tail()
        time.sleep(0.2)
    raise AssertionError(f"receiver on {port} never listened:\n{proc.tail()}")


def test_alerts_reach_only_the_named_test_endpoint(dataset, tmp_path, monkeypatch):
    """A live endpoint and the replay endpoint, each a real receiver: a replay without --test-endpoint sends
    nothing; with it, exactly the run's alert events reach the test receiver (signed, verified) and the live
    receiver gets no request at all."""
    secret = generate_secret()
    monkeypatch.setenv("T_REPLAY_SECRET", secret)
    ports = {"live-hook": free_port(), "test-hook": free_port()}
    alerts_toml = '[alerts]\nreplay_endpoint = "test-hook"\nbackoff_initial_s = 0.2\nbackoff_max_s = 1.0\n' + "".join(
        f'[[alerts.endpoints]]\nname = "{name}"\nurl = "http://127.0.0.1:{port}/hook"\n'
        f'secret_env = ["T_REPLAY_SECRET"]\nallow_private = true\n' for name, port in ports.items())
    # Endpoints are not thresholds: they belong in the main configuration, not in replay --config.
    config = tmp_path / "with-endpoints.toml"
    config.write_text(dataset["config"].read_text() + "\n" + alerts_toml)
    receivers = {name: start_finpulse(dataset["settings"], "receiver", "--port", str(port), "--store", "",
                                      "--secret-env", "T_REPLAY_SECRET", "--quiet", log_dir=tmp_path, name=name,
                                      env={"T_REPLAY_SECRET": secret})
                 for name, port in ports.items()}
    try:
        for name, proc in receivers.items():
            wait_until_listening(ports[name], proc)
        replay(config, "quiet-run", tmp_path / "quiet")
        code, out, err = finpulse(config, "replay", *RANGE, "--run-id", "hooked-run", "--parquet",
                                  str(tmp_path / "hooked"), "--no-progress", "--test-endpoint", "test-hook")
        assert code == 0, out + err
        seen = {name: get_json(f"http://127.0.0.1:{port}/received") for name, port in ports.items()}
    finally:
        for proc in receivers.values():
            proc.stop()
    alerts = read_table(tmp_path / "hooked", "alerts")
    assert len(alerts) >= 2 and f"{len(alerts)} delivered, 0 failed, 0 unfinished" in out
    assert seen["live-hook"]["requests"] == [] and seen["live-hook"]["count"] == 0
    received = [item["payload"]["data"] for item in seen["test-hook"]["items"]]
    assert sorted((a["id"], a["status"]) for a in received) == sorted(zip(alerts["id"], alerts["status"]))
    assert {a["run_id"] for a in received} == {"hooked-run"}
    assert seen["test-hook"]["rejected"] == {} and len(seen["test-hook"]["requests"]) == len(alerts)


# ---------------------------------------------------------------- warm-up

# The shock starts at 09:03. A run from 09:02 starting cold judges 09:02-09:04 with no baseline (warmup_windows = 3):
# it learns the shock's windows as normal and never alerts. Two minutes of warm-up (09:00-09:02) make its baseline
# what a live worker's was at 09:02, and the shock fires at 09:03, as it did live.
WARM_FROM = T0 + timedelta(minutes=2)
WARM_RANGE = ["--from", format_time(WARM_FROM), "--to", format_time(T2)]


def warm_replay(config: Path, run_id: str, out_dir: Path, *args: str) -> tuple[dict, str]:
    code, out, err = finpulse(config, "replay", *WARM_RANGE, "--run-id", run_id, "--parquet", str(out_dir),
                              "--no-progress", *args)
    assert code == 0, out + err
    return json.loads((out_dir / "manifest.json").read_text()), err


def shock_firings(out_dir: Path) -> pd.DataFrame:
    alerts = read_table(out_dir, "alerts")
    return alerts[(alerts["key"] == SHOCK.topic) & (alerts["status"] == "firing")]


def test_a_warm_up_finds_the_alert_near_from_that_a_cold_start_misses_and_writes_nothing_of_itself(dataset, tmp_path):
    settings, config = dataset["settings"], dataset["config"]
    cold, _ = warm_replay(config, "cold", tmp_path / "cold", "--warmup", "0")
    warm, warnings = warm_replay(config, "warm", tmp_path / "warm", "--warmup", "2m")

    assert shock_firings(tmp_path / "cold").empty
    fired = shock_firings(tmp_path / "warm")
    assert list(fired["window_start"]) == [pd.Timestamp(T0 + timedelta(seconds=SHOCK.at_s))]
    # 2 minutes is less than the 3 the detector learns (warmup_windows x window_s): said, as the only warning; the
    # shock, one window after --from, is far enough from it to alert all the same.
    assert warnings.strip().splitlines() == [
        "finpulse replay: warning: --warmup 2m is shorter than the 180s the detector learns before it may alert "
        "([detect] warmup_windows x window_s): keys are not warm at --from, so alerts near it may be missing "
        "(--warmup auto reads just enough)"], warnings
    assert warm["warmup"]["from"] == format_time(T0) and 119 <= warm["warmup"]["covered_s"] <= 120   # first input
    assert not warm["warmup"]["short"] and warm["warmup"]["inputs"] > 1000 and warm["warmup"]["windows"] > 0
    assert cold["warmup"]["inputs"] == 0 and cold["warmup_from"] == cold["from"]

    # Nothing of the warm-up in the outputs: the scored records and windows are exactly the cold run's (every
    # window wholly inside the range has all its messages either way; they close in other batches, so in another
    # order); only the alerts differ.
    in_range = [m for m in expected_inputs() if m.event_time >= WARM_FROM]
    scored = read_table(tmp_path / "warm", "scored")
    assert set(scored["id"]) == {m.id for m in in_range if not m.expected_reason}
    assert warm["counts"]["inputs"] == cold["counts"]["inputs"] == len(in_range)
    assert warm["counts"]["rejected"] == cold["counts"]["rejected"]
    pd.testing.assert_frame_equal(read_table(tmp_path / "warm", "scored"), read_table(tmp_path / "cold", "scored"))
    window = ["key_type", "key", "window_s", "window_start"]
    trends, cold_trends = (read_table(tmp_path / run, "trends").sort_values(window).reset_index(drop=True)
                           for run in ("warm", "cold"))
    pd.testing.assert_frame_equal(trends, cold_trends)
    assert (trends["window_start"] >= pd.Timestamp(WARM_FROM)).all()
    assert (read_table(tmp_path / "warm", "alerts")["started_at"] >= pd.Timestamp(WARM_FROM)).all()
    out = TopicNames(settings.kafka.topic_prefix).replay("warm")
    assert {r["id"] for r in json_values(read_all(settings, out.scored))} == set(scored["id"])
    assert all(TrendRecord.from_dict(t).window_start >= WARM_FROM for t in json_values(read_all(settings, out.trends)))
    assert sorted(a["id"] for a in json_values(read_all(settings, out.alerts))) == \
        sorted(read_table(tmp_path / "warm", "alerts")["id"])


def test_a_warm_up_the_input_does_not_reach_is_warned_about_and_recorded(dataset, tmp_path):
    """The default warm-up (auto: warmup_windows x window_s = 3 min, from 08:59) reaches back before the input's
    first message (09:00): the run says so, and records how far the input did reach."""
    manifest, warnings = warm_replay(dataset["config"], "auto-warm", tmp_path / "auto")
    warmup = manifest["warmup"]
    assert (warmup["asked"], warmup["seconds"], warmup["from"]) == ("auto", 180, format_time(T0 - timedelta(minutes=1)))
    assert warmup["short"] and warmup["first_input"].startswith("2026-03-02T09:00:0") and warmup["covered_s"] <= 120
    assert "warmup_windows x window_s = 3 x 60s" in warmup["rule"]
    assert "warning: the warm-up asked for [2026-03-02T08:59:00.000Z, 2026-03-02T09:02:00.000Z)" in warnings
    assert "the input reaches back only to 2026-03-02T09:00:0" in warnings
    assert len(shock_firings(tmp_path / "auto")) == 1      # two minutes were there: enough here


def test_ctrl_c_in_the_warm_up_then_rerun_resumes_to_identical_output(dataset, tmp_path):
    """Its first checkpoint (1024 inputs) falls inside the warm-up (1200 messages): resumed from there, the run
    equals an uninterrupted one, warm-up record included. The same command with another warm-up is refused."""
    out_dir = tmp_path / "warm-resumed"
    args = ["replay", *WARM_RANGE, "--run-id", "warm-resumable", "--parquet", str(out_dir), "--warmup", "2m"]
    interrupted_run(dataset["settings"], args, "5x", lambda: inputs_checkpointed(out_dir), tmp_path)
    checkpoint = json.loads((out_dir / "_checkpoint.json").read_text())
    assert checkpoint["inputs_done"] == 1024 and checkpoint["warmup"]["inputs"] == 1024

    code, out, err = finpulse(dataset["config"], *args[:-1], "1m", "--no-progress")
    assert code == 2 and "holds interrupted run 'warm-resumable' with other arguments (warmup_from: " in err, err
    code, out, err = finpulse(dataset["config"], *args)
    assert code == 0 and "resuming run warm-resumable after input message 1024" in out, out + err
    # The bar starts at the checkpoint (before, at 0, counting the messages read past as replayed: its rate too).
    first_bar = re.search(r"replay warm-resumable: +(\d+)%\|[^|]*\| (\d+)/(\d+) ", err)
    assert first_bar and first_bar.group(2) == "1024" and first_bar.group(1) != "0", err[:2000]
    assert "reading past the 1024 messages done before" in err
    reference, _ = warm_replay(dataset["config"], "warm-reference", tmp_path / "reference", "--warmup", "2m")
    assert digests(out_dir) == digests(tmp_path / "reference")
    resumed = json.loads((out_dir / "manifest.json").read_text())
    assert resumed["counts"] == reference["counts"] and resumed["warmup"] == reference["warmup"]
    assert len(shock_firings(out_dir)) == 1


# ---------------------------------------------------------------- reproducibility

def test_identical_runs_and_an_archive_replay_are_byte_identical(dataset, tmp_path):
    config = dataset["config"]
    first = replay(config, "same-1", tmp_path / "one")
    second = replay(config, "same-2", tmp_path / "two")
    code, out, err = finpulse(config, "export", *RANGE, "--out", str(tmp_path / "archive"), "--no-progress")
    assert code == 0, out + err
    marker = json.loads((tmp_path / "archive" / MARKER).read_text())
    assert marker["schema_version"] == 1 and marker["exports"][0]["rows"] == first["counts"]["inputs"]
    from_archive = replay(config, "same-3", tmp_path / "three", "--archive", str(tmp_path / "archive"))

    reference = digests(tmp_path / "one")
    assert len(reference) >= 6 and any(name.startswith("alerts/") for name in reference)
    assert digests(tmp_path / "two") == reference
    assert digests(tmp_path / "three") == reference
    per_run = ("run_id", "source", "topics_out", "created_at")
    same = {k: v for k, v in first.items() if k not in per_run}
    assert {k: v for k, v in second.items() if k not in per_run} == same
    assert {k: v for k, v in from_archive.items() if k not in per_run} == same
    assert from_archive["source"] == "archive"


def test_an_archive_short_of_the_range_and_an_empty_selection_are_warned_about(dataset, tmp_path):
    config, middle = dataset["config"], format_time(T0 + timedelta(minutes=3))
    code, out, err = finpulse(config, "export", "--from", format_time(T0), "--to", middle, "--out",
                              str(tmp_path / "archive"), "--no-progress")
    assert code == 0 and "warning" not in err, out + err
    code, out, err = finpulse(config, "replay", *RANGE, "--run-id", "half", "--parquet", str(tmp_path / "half"),
                              "--archive", str(tmp_path / "archive"), "--no-progress")
    assert code == 0, out + err
    assert f"warning: the archive holds no export of {middle} to {format_time(T2)}:" in err, err

    code, out, err = finpulse(config, "export", "--from", "2020-01-01T00:00:00Z", "--to", "2020-01-02T00:00:00Z",
                              "--out", str(tmp_path / "nothing"), "--no-progress")
    assert code == 0 and "exported 0 message(s)" in out
    assert "warning: no input message has an event time in [--from, --to)" in err, err


def test_a_range_reaching_past_now_is_not_recorded_as_exported_where_messages_may_still_come(dataset, tmp_path):
    """Messages written after an export began may belong to a range that reaches that far (less --max-disorder):
    before, the archive recorded it all as exported, and a replay of it later read the archive's gap as "no message
    then", silently. A replay from Kafka over such a range says so too."""
    config, later = dataset["config"], format_time(datetime.now(timezone.utc) + timedelta(hours=1))
    before_ms = epoch_ms(datetime.now(timezone.utc))
    code, out, err = finpulse(config, "export", "--from", format_time(T0), "--to", later, "--out",
                              str(tmp_path / "archive"), "--no-progress", "--max-disorder", "60s")
    after_ms = epoch_ms(datetime.now(timezone.utc))
    assert code == 0 and f"exported {SIMULATION['count']} message(s)" in out, out + err
    [export] = json.loads((tmp_path / "archive" / MARKER).read_text())["exports"]
    covered_to = export["covered_to"]
    assert (export["from"], export["to"], export["covered_from"]) == (format_time(T0), later, format_time(T0))
    assert before_ms - 60_000 <= epoch_ms(datetime.fromisoformat(covered_to)) <= after_ms - 60_000
    assert err.strip().splitlines() == [
        f"finpulse export: warning: the range reaches past {covered_to} (when reading began, less --max-disorder): "
        f"messages of that time may still be written: the archive records only {format_time(T0)} to {covered_to} "
        "of the range as exported (run it again later for the rest)"], err

    code, out, err = finpulse(config, "replay", "--from", format_time(T2), "--to", later, "--run-id", "to-later",
                              "--parquet", str(tmp_path / "from-archive"), "--archive", str(tmp_path / "archive"),
                              "--no-progress", "--max-disorder", "60s")
    assert code == 0 and f"warning: the archive holds no export of {covered_to} to {later}:" in err, out + err
    code, out, err = finpulse(config, "replay", "--from", format_time(T2), "--to", later, "--run-id", "to-later-kafka",
                              "--parquet", str(tmp_path / "from-kafka"), "--no-progress", "--max-disorder", "60s")
    assert code == 0 and "messages of that time may still be written: they are missing from this replay" in err, err
    incomplete = json.loads((tmp_path / "from-kafka" / "manifest.json").read_text())["incomplete_input"]
    assert incomplete["deleted"] == {} and incomplete["complete_to_ms"] == incomplete["arriving_from_ms"] < \
        epoch_ms(datetime.fromisoformat(later))


def inputs_checkpointed(out_dir: Path) -> int:
    checkpoint = out_dir / "_checkpoint.json"
    return json.loads(checkpoint.read_text())["inputs_done"] if checkpoint.exists() else 0


def wait_while_running(proc, ready, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.running() and time.monotonic() < deadline, proc.tail()
        time.sleep(0.1)


def rerun_resumes_like_an_uninterrupted_run(config: Path, args: list[str], out_dir: Path, tmp_path) -> None:
    """A run stopped after a checkpoint: the same command resumes from it, and its Parquet (byte for byte) and counts
    equal an uninterrupted run's."""
    done_before = inputs_checkpointed(out_dir)
    assert 0 < done_before < len(expected_inputs()) and not (out_dir / "manifest.json").exists()
    code, out, err = finpulse(config, *args, "--no-progress")
    assert code == 0, out + err
    assert f"resuming run {args[args.index('--run-id') + 1]} after input message {done_before}" in out
    reference = replay(config, "uninterrupted", tmp_path / "reference")
    assert digests(out_dir) == digests(tmp_path / "reference")
    assert json.loads((out_dir / "manifest.json").read_text())["counts"] == reference["counts"]


def interrupted_run(settings, args: list[str], speed: str, ready, tmp_path):
    """``finpulse ARGS --speed SPEED`` (paced, so it is still running), Ctrl-C'd as soon as ``ready()`` holds; it
    must stop with exit status 130. Returns the stopped process (its output tells what it printed)."""
    proc = start_finpulse(settings, *args, "--speed", speed, log_dir=tmp_path, name="interrupted")
    try:
        wait_while_running(proc, ready)
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(60) == 130, proc.tail()
    finally:
        proc.stop()
    return proc


def test_ctrl_c_then_rerun_resumes_to_identical_output(dataset, tmp_path):
    """Interrupted by SIGINT after a checkpoint (paced, so it is still running), then run again: it resumes from
    the checkpoint and its Parquet equals an uninterrupted run's, byte for byte."""
    config = dataset["config"]
    out_dir = tmp_path / "resumed"
    args = ["replay", *RANGE, "--run-id", "resumable", "--parquet", str(out_dir)]
    proc = interrupted_run(dataset["settings"], args, "20x", lambda: inputs_checkpointed(out_dir), tmp_path)
    assert "Run the same command again to resume" in proc.output()
    rerun_resumes_like_an_uninterrupted_run(config, args, out_dir, tmp_path)
    assert not (out_dir / "_checkpoint.json").exists()


def test_ctrl_c_before_the_first_checkpoint_leaves_a_run_that_resumes(dataset, tmp_path):
    """Interrupted once its topics exist but long before its first part is done (paced at event time): the same
    command runs it to the end (before, the run id was taken: its topics existed and no checkpoint did)."""
    out_dir = tmp_path / "early"
    args = ["replay", *RANGE, "--run-id", "stopped-early", "--parquet", str(out_dir)]
    run_topics = set(output_topics(TopicNames(dataset["settings"].kafka.topic_prefix).replay("stopped-early")))
    interrupted_run(dataset["settings"], args, "1x", lambda: run_topics <= broker_topics(dataset["settings"]), tmp_path)
    assert json.loads((out_dir / "_checkpoint.json").read_text())["inputs_done"] == 0

    code, out, err = finpulse(dataset["config"], *args, "--no-progress")
    assert code == 0, out + err
    assert "resuming run stopped-early after input message 0" in out
    assert json.loads((out_dir / "manifest.json").read_text())["counts"]["inputs"] == len(expected_inputs())


def test_resuming_over_a_changed_input_fails_clearly(fp_settings, tmp_path):
    """Interrupted after a checkpoint; then a message older than those done arrives, so the input is no longer the
    one the checkpoint covers. The rerun says so and exits 2 (before, the error stayed in the reading task and the
    replay waited for its next batch forever)."""
    settings = fp_settings.with_overrides(SECTIONS)
    simulate(settings, tmp_path, {**SIMULATION, "count": 3000})
    out_dir = tmp_path / "changed"
    args = ["replay", *RANGE, "--run-id", "changed", "--parquet", str(out_dir), "--no-progress"]
    interrupted_run(settings, args, "10x", lambda: inputs_checkpointed(out_dir), tmp_path)

    async def send_a_late_arrival():
        async with RecordSender(settings.kafka) as sender:
            value = {"id": "late-arrival", "source": "wire", "published_at": format_time(T0), "headline": "Oil rises"}
            await sender.send(TopicNames(settings.kafka.topic_prefix).news, json.dumps(value).encode(), event_time=T0)

    asyncio.run(send_a_late_arrival())
    code, out = run_finpulse(settings, *args, log_dir=tmp_path, name="resumed", timeout=120)
    assert code == 2 and "finpulse replay: error: the input changed since the checkpoint" in out, out[-3000:]
    assert inputs_checkpointed(out_dir) and not (out_dir / "manifest.json").exists()


@pytest.mark.parametrize("mode", ["blackhole", "refuse"])
def test_a_broker_gone_mid_replay_stops_it_where_it_stands_and_the_same_command_resumes(tmp_path, mode):
    """The broker cut off mid-replay (``tests.network``: a partition, or a restart that refuses connections): the
    replay read empty fetches and waited for ever. It now stops after ``[kafka] delivery_timeout_s`` (4 s here),
    saying where its outputs stand; with the broker back, the same command resumes from its checkpoint, and its
    Parquet equals an uninterrupted run's."""
    with broker_behind_link(tmp_path / "broker.log") as (link, broker):
        settings = isolated_settings(broker.bootstrap_servers, tmp_path, kafka={"delivery_timeout_s": 4}, **SECTIONS)
        simulate(settings, tmp_path)
        config = write_config(settings, tmp_path / "finpulse.toml")
        out_dir = tmp_path / "cut"
        args = ["replay", *RANGE, "--run-id", "cut", "--parquet", str(out_dir)]
        proc = start_finpulse(settings, *args, "--speed", "20x", log_dir=tmp_path, name="replay-cut")
        try:
            wait_while_running(proc, lambda: inputs_checkpointed(out_dir))
            link.cut(mode)
            assert proc.wait(60) == 2, proc.tail()
        finally:
            proc.stop()
            link.restore()
        output = proc.output()
        assert "[kafka] delivery_timeout_s" in output and "Run the same command again to resume" in output, output[-3000:]
        rerun_resumes_like_an_uninterrupted_run(config, args, out_dir, tmp_path)


def test_an_export_that_fails_midway_keeps_nothing_so_it_can_run_again(tmp_path):
    """An export stopped midway (the broker gone, Ctrl-C) left the days it had finished without a marker naming
    them: the directory was then refused as an archive, and an archive reader would read the files all the same.
    They are removed; an earlier export of the same range that this one was rewriting keeps its files."""
    start = epoch_ms(T0)
    day = 24 * 3600 * 1000
    messages = [TimedMessage(start + i * day // 4, "news", 0, i, "news", b"k", b"{}", start + i * day // 4)
                for i in range(12)]           # three days

    async def export(root: Path, fail_after: int | None = None):
        async def selection():
            for i, message in enumerate(messages):
                if i == fail_after:
                    raise TimeoutError("the broker went away")
                yield message
        return await export_archive(selection(), root, start, start + 3 * day, ["news"])

    root = tmp_path / "archive"
    with pytest.raises(TimeoutError):
        asyncio.run(export(root, fail_after=9))      # two days finished, the third cut short
    assert not root.exists()
    assert asyncio.run(export(root)).rows == 12
    check_export_dir(root)
    files = sorted(root.rglob("*.parquet"))
    with pytest.raises(TimeoutError):
        asyncio.run(export(root, fail_after=9))      # the same range again: it rewrites the same files
    assert sorted(root.rglob("*.parquet")) == files
    assert len(list(ArchiveSelection(root, {"news": "news"}, start, start + 3 * day))) == 12


# ---------------------------------------------------------------- bad arguments

def _archive_without_marker(root: Path) -> None:
    (root / "day=2026-03-02").mkdir(parents=True)


def _archive_of_version_2(root: Path) -> None:
    root.mkdir(parents=True)
    (root / MARKER).write_text(json.dumps({"format": "finpulse-input-archive", "schema_version": 2, "exports": []}))


def _archive_with_other_columns(root: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    (root / "day=2026-03-02").mkdir(parents=True)
    (root / MARKER).write_text(json.dumps({"format": "finpulse-input-archive", "schema_version": 1, "exports": []}))
    table = pa.table({"kind": ["news"], "value": [b"{}"]}).replace_schema_metadata(
        {"finpulse.archive.schema_version": "1"})
    pq.write_table(table, root / "day=2026-03-02" / "part-x.parquet")


def _not_a_model(root: Path) -> None:
    root.mkdir(parents=True)
    (root / "config.json").write_text('{"hello": "world"}')


def _run_of_a_missing_model(root: Path) -> None:
    root.mkdir(parents=True)
    (root / "manifest.json").write_text(json.dumps({"run_id": "elsewhere", "model_version": "finpulse-minilm-gone",
                                                    "files": []}))


BAD_ARGUMENTS = {
    "to before from": (["--from", format_time(T2), "--to", format_time(T0)], None, "must be after --from"),
    "empty range": (["--from", format_time(T0), "--to", format_time(T0)], None, "is empty"),
    "not a time": (["--from", "yesterday", "--to", format_time(T2)], None, "is not ISO-8601"),
    "unknown topic": ([*RANGE, "--topics", "news,tweets"], None, "unknown topic(s) tweets"),
    "bad run id": ([*RANGE, "--run-id", "my run.1"], None, "must be 1-64 letters"),
    "not a model": ([*RANGE, "--model", "{tmp}/model"], _not_a_model, "not a FinPulse model directory"),
    "no archive": ([*RANGE, "--archive", "{tmp}/nowhere"], None, "does not exist"),
    "archive without marker": ([*RANGE, "--archive", "{tmp}/archive"], _archive_without_marker,
                               "is not a FinPulse archive"),
    "archive version 2": ([*RANGE, "--archive", "{tmp}/archive"], _archive_of_version_2, "schema version 2"),
    "archive of other columns": ([*RANGE, "--archive", "{tmp}/archive"], _archive_with_other_columns,
                                 "does not have the archive schema"),
    "bad speed": ([*RANGE, "--speed", "fast"], None, "--speed 'fast'"),
    "bad warm-up": ([*RANGE, "--warmup", "a while"], None, "--warmup: 'a while' is not a duration"),
    "a warm-up without a unit": ([*RANGE, "--warmup", "5"], None, "--warmup 5 has no unit: write 5m or 5h (5s for "
                                                                   "seconds), or auto"),
    "bad thresholds": ([*RANGE, "--config", "{tmp}/bad.toml"], None, "resolve_z < fire_z"),
    "a window no aggregation makes": ([*RANGE, "--config", "{tmp}/window.toml"], None,
                                      "[detect] window_s = 120 is not a window [aggregate] windows makes (60, 300, "
                                      "3600 s): no window of that size closes, so nothing would ever alert"),
    "test endpoint not set aside": ([*RANGE, "--test-endpoint", "desk"], None, "names no endpoint"),
    "scores of no run": ([*RANGE, "--scores-from", "never-ran"], None, "--scores-from never-ran: no finished run"),
    "scores and a scorer": ([*RANGE, "--scores-from", "x", "--scorer", "baseline"], None, "--scorer does not go with it"),
    "scores and a cpu precision": ([*RANGE, "--scores-from", "x", "--cpu-precision", "int8"], None,
                                   "--cpu-precision does not go with it"),
    "scores of a model not here": ([*RANGE, "--scores-from", "{tmp}/model"], _run_of_a_missing_model,
                                   "its model finpulse-minilm-gone is not in"),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_arguments_fail_clearly_before_anything_is_written(dataset, tmp_path, case):
    args, prepare, message = BAD_ARGUMENTS[case]
    if prepare:
        prepare(tmp_path / ("model" if "model" in case else "archive"))
    (tmp_path / "bad.toml").write_text("[detect]\nfire_z = 1.0\nresolve_z = 2.0\n")
    (tmp_path / "window.toml").write_text("[detect]\nwindow_s = 120\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--run-id" not in args:
        args += ["--run-id", f"bad-{uuid.uuid4().hex[:6]}"]
    topics_before = broker_topics(dataset["settings"])
    code, out, err = finpulse(dataset["config"], "replay", *args, "--parquet", str(tmp_path / "out"), "--no-progress")
    assert code == 2, out + err
    assert message in err and err.startswith("finpulse replay: error: ")
    assert not (tmp_path / "out").exists()
    assert broker_topics(dataset["settings"]) == topics_before


def test_an_unknown_device_is_refused_with_the_arguments(capsys):
    """Before, --device tpu was accepted and ignored by the baseline scorer, or failed after the input was read."""
    from stream.cli import main
    with pytest.raises(SystemExit) as exit_info:
        main(["replay", *RANGE, "--run-id", "dev", "--device", "tpu"])
    assert exit_info.value.code == 2
    assert "argument --device: 'tpu' is not auto, cpu, cuda or cuda:N" in capsys.readouterr().err


def test_the_range_may_be_written_in_epoch_seconds_or_milliseconds():
    """As the error message and the docs offer (before, any string had to be ISO-8601)."""
    seconds = int(T0.timestamp())
    iso = parse_range(format_time(T0), format_time(T2))
    assert parse_range(str(seconds), str(int(T2.timestamp() * 1000))) == iso
    assert parse_range(f" {seconds}.000", f"{int(T2.timestamp())}") == iso


def test_run_ids_already_taken_are_refused(dataset, tmp_path):
    """One whose topics exist from an earlier run, and one that names the live topics of another FinPulse (whose
    prefix is <prefix>.replay.<id>)."""
    settings = dataset["settings"]
    prefix = settings.kafka.topic_prefix
    ensure_topics(settings.kafka, [f"{prefix}.replay.used.scored", f"{prefix}.replay.deployed.news"])
    for run_id, message in (("used", "is already used on this broker"), ("deployed", "collides with the live topics")):
        topics_before = broker_topics(settings)
        code, out, err = finpulse(dataset["config"], "replay", *RANGE, "--run-id", run_id, "--parquet",
                                  str(tmp_path / run_id), "--no-progress")
        assert code == 2 and message in err, out + err
        assert not (tmp_path / run_id).exists() and broker_topics(settings) == topics_before
    code, out, err = finpulse(dataset["config"], "export", *RANGE, "--topics", "news,tweets", "--out", str(tmp_path / "x"))
    assert code == 2 and "unknown topic(s) tweets" in err and not (tmp_path / "x").exists()


# ---------------------------------------------------------------- against the live worker

# Live, the input waits as a backlog read at full speed, as after an outage: the worker does not read it in
# event-time order, and its windows must still count what a replay, reading in event-time order, counts (close
# grace, stream.input_watermark). The windows are seconds long so that warm-up, shock and recovery fit in 85 s.
LIVE_SECTIONS = {
    "aggregate": {"windows": ["10s/10s", "30s/10s"], "allowed_lateness_s": 10},
    "detect": {"window_s": 10, "min_count": 8, "warmup_windows": 3, "cooldown_s": 30},
    "replay": {"batch_size": 64, "part_records": 1024},
}
LIVE_SIMULATION = {"seed": 5, "rate": 40.0, "count": 3400, "malformed_share": 0.01}
LIVE_SHOCK = Shock("Energy | Oil", at_s=35, duration_s=15)
LIVE_RANGE = ["--from", format_time(T0), "--to", format_time(T0 + timedelta(seconds=70))]


def window_id(row) -> str:
    return f"{row.key_type}:{row.key}:{row.window_s}:{format_time(row.window_start)}"


@pytest.mark.slow
def test_replay_reproduces_what_the_live_worker_said(fp_settings, topics, tmp_path):
    """The real worker scores, aggregates and alerts on a simulated stream read as a backlog; a replay of the
    range over the same input topics gives the same scored records (ids, labels, scores), the same closed windows
    and the same alerts (ids and statuses) for every window the live worker closed."""
    settings = fp_settings.with_overrides(LIVE_SECTIONS)
    config = write_config(settings, tmp_path / "finpulse.toml")
    end = T0 + timedelta(seconds=70)
    with start_worker(settings, tmp_path):
        simulate(settings, tmp_path, LIVE_SIMULATION, LIVE_SHOCK, max_speed=True)
        code, out, err = finpulse(config, "replay", *LIVE_RANGE, "--run-id", "versus-live", "--parquet",
                                  str(tmp_path / "replay"), "--no-progress")
        assert code == 0, out + err
        replayed = read_table(tmp_path / "replay", "scored")
        replay_trends = read_table(tmp_path / "replay", "trends")
        replay_alerts = read_table(tmp_path / "replay", "alerts")
        live_scored = wait_for_records(settings, topics.scored, timeout=120, what="every valid message scored",
                                       until=lambda rs: set(replayed["id"]) <= {json.loads(r.value)["id"] for r in rs})
        # A window closes once the stream is 10 s (the lateness) past its end: the stream runs 15 s past the range,
        # so every window (topics and tickers) up to 20 s before the range's end closes.
        must_close = {window_id(r) for r in replay_trends.itertuples()
                      if r.window_end <= pd.Timestamp(end - timedelta(seconds=20))}
        live_trends = wait_for_records(
            settings, topics.trends, timeout=120, what="the replayed windows closed live",
            until=lambda rs: must_close <= {TrendRecord.from_json(r.value).window_id for r in rs
                                            if json.loads(r.value)["final"]})
        closed = {}
        for record in live_trends:
            trend = TrendRecord.from_json(record.value)
            if trend.final and T0 <= trend.window_start and trend.window_end <= end:
                closed[trend.window_id] = trend
        judged = {wid for wid, t in closed.items() if t.window_s == LIVE_SECTIONS["detect"]["window_s"]}
        expected_alerts = sorted((r.id, r.status, r.escalated_from) for r in replay_alerts.itertuples()
                                 if window_id(r) in judged)
        assert any(key == LIVE_SHOCK.topic for key in replay_alerts["key"]), "the replay should alert on the shock"
        assert ("firing" in {status for _, status, _ in expected_alerts}), "the live worker closed the shock's windows"

        def live_alerts(records) -> list:
            return sorted({(a.id, a.status, a.escalated_from) for a in (AlertRecord.from_json(r.value) for r in records)
                           if window_id(a) in judged})

        try:
            wait_for_records(settings, topics.alerts, lambda rs: live_alerts(rs) == expected_alerts, timeout=60)
        except AssertionError:
            pass     # compared below, with both sides shown
        assert live_alerts(read_all(settings, topics.alerts)) == expected_alerts

    live = {}
    for record in live_scored:
        scored = ScoredRecord.from_json(record.value)
        if T0 <= scored.event_time < end:
            live[scored.id] = scored
    assert set(live) == set(replayed["id"])
    for row in replayed.itertuples():
        other = live[row.id]
        assert (other.topic, other.sentiment, other.kind, list(other.tickers), other.text) == \
            (row.topic, row.sentiment, row.kind, list(row.tickers), row.text)
        assert other.sentiment_score == pytest.approx(row.sentiment_score, abs=1e-6)
        assert other.model_version == row.model_version
    replay_by_window = {window_id(r): r for r in replay_trends.itertuples()}
    assert must_close <= set(closed) and len(must_close) >= 0.6 * len(replay_by_window)
    for wid, trend in closed.items():
        mine = replay_by_window[wid]
        assert (trend.count, trend.news_count, trend.comment_count) == (mine.count, mine.news_count, mine.comment_count), wid
        # Both are rounded to 6 decimals after summing in their own order: one rounding step apart at most.
        assert trend.mean_score == pytest.approx(mine.mean_score, abs=2e-6)
        assert trend.bearish_share == pytest.approx(mine.bearish_share, abs=2e-6)
