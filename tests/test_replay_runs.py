"""Managing replay runs on a real tansu broker: ``finpulse runs`` lists them and deletes one (and nothing that is not
a run's); a run id cannot be reused with other arguments; a thresholds file holds only thresholds; the progress
bar's total is about the messages the run reads."""
from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer

from stream.records import format_time
from stream.replay.output import read_table
from stream.replay.plan import dispatcher_group, output_topics
from stream.replay.select import NEIGHBOURS
from stream.topics import TopicNames, admin_client, ensure_topics
from tests.procs import write_config
from tests import test_replay
from tests.test_replay import (RANGE, T0, T2, broker_topics, expected_inputs, finpulse, interrupted_run,
                               replay)

dataset = test_replay.dataset       # the same simulated stream, made once for this module too


def runs_config(dataset: dict, tmp_path: Path):
    """(settings, their config file): the dataset's, with a [replay] out_dir of this test's own, where
    `finpulse runs` looks."""
    settings = dataset["settings"].with_overrides({"replay": {"out_dir": str(tmp_path / "var-replay")}})
    return settings, write_config(settings, tmp_path / "finpulse.toml")


def listed(config: Path) -> dict[str, dict]:
    """What `finpulse runs --json` lists; `runs --json list` and `runs list --json` list the same (the first
    printed the table)."""
    printed = [finpulse(config, *args) for args in (("runs", "--json"), ("runs", "--json", "list"),
                                                    ("runs", "list", "--json"))]
    for code, out, err in printed:
        assert code == 0 and "warning" not in err and out == printed[0][1], out + err
    return {run["run_id"]: run for run in map(json.loads, printed[0][1].splitlines())}


def commit_an_offset(settings, group: str, topic: str) -> None:
    """Leave a consumer group with a committed offset, as a test-endpoint dispatcher does."""
    async def commit():
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=settings.kafka.bootstrap_servers, group_id=group,
                                    auto_offset_reset="earliest", enable_auto_commit=False)
        await consumer.start()
        try:
            await consumer.getmany(timeout_ms=2000)
            await consumer.commit()
        finally:
            await consumer.stop()
    asyncio.run(commit())


def groups(settings) -> set[str]:
    admin = admin_client(settings.kafka)
    try:
        return {g["group_id"] for g in admin.list_groups()}
    finally:
        admin.close()


def test_runs_lists_complete_interrupted_and_topics_only_runs_and_deletes_one(dataset, tmp_path):
    settings, config = runs_config(dataset, tmp_path)
    root = tmp_path / "var-replay"
    code, out, err = finpulse(config, "replay", *RANGE, "--run-id", "kept", "--no-progress")
    assert code == 0, out + err
    code, out, err = finpulse(config, "replay", *RANGE, "--run-id", "doomed", "--no-progress")
    assert code == 0, out + err
    replay(config, "elsewhere", tmp_path / "elsewhere")          # its directory is not under out_dir
    names = TopicNames(settings.kafka.topic_prefix)
    halted_topics = set(output_topics(names.replay("halted")))
    interrupted_run(settings, ["replay", *RANGE, "--run-id", "halted"], "1x",
                    lambda: halted_topics <= broker_topics(settings), tmp_path)

    runs = listed(config)
    assert {k: runs[k]["status"] for k in ("kept", "doomed", "elsewhere", "halted")} == {
        "kept": "complete", "doomed": "complete", "elsewhere": "topics only", "halted": "interrupted"}
    kept = runs["kept"]
    assert (kept["start"], kept["end"], kept["warmup_s"]) == (format_time(T0), format_time(T2), 180)
    assert kept["model_version"] == "baseline-keywords-1" and kept["inputs"] == len(expected_inputs())
    assert kept["alerts_firing"] >= 1 and len(kept["topics"]) == 3 and kept["created_at"].startswith("20")
    assert kept["directory"] == str(root / "kept")
    code, table, _ = finpulse(config, "runs")
    assert code == 0 and table.splitlines()[0].split() == ["RUN", "ID", "STATUS", "FROM", "TO", "WARM-UP", "MODEL",
                                                            "INPUTS", "SCORED", "ALERTS", "TOPICS", "CREATED"]
    assert re.search(r"^halted +interrupted +2026-03-02T09:00:00.000Z", table, re.M), table

    doomed_topics = set(output_topics(names.replay("doomed"), with_deliveries=True))
    ensure_topics(settings.kafka, [names.replay("doomed").deliveries])     # as a --test-endpoint run leaves them
    commit_an_offset(settings, dispatcher_group(settings, "doomed"), names.replay("doomed").alerts)
    assert dispatcher_group(settings, "doomed") in groups(settings)

    code, out, err = finpulse(config, "runs", "delete", "doomed")
    assert code == 1 and "would delete run doomed: directory" in out and "--yes" in out, out + err
    assert doomed_topics <= broker_topics(settings) and (root / "doomed").is_dir()

    code, out, err = finpulse(config, "runs", "delete", "doomed", "--yes")
    assert code == 0 and out.startswith("deleted run doomed"), out + err
    assert not doomed_topics & broker_topics(settings) and not (root / "doomed").exists()
    assert dispatcher_group(settings, "doomed") not in groups(settings)
    assert set(listed(config)) >= {"kept", "elsewhere", "halted"} and "doomed" not in listed(config)
    assert (root / "kept" / "manifest.json").is_file()

    # The id is free again: the same run id runs afresh.
    code, out, err = finpulse(config, "replay", *RANGE, "--run-id", "doomed", "--no-progress")
    assert code == 0, out + err
    # Without --parquet its topics go, and the command says its directory may be elsewhere (before, it said nothing,
    # and the next replay of the id told the user to run this same command again).
    code, out, err = finpulse(config, "runs", "delete", "elsewhere", "--yes")
    assert code == 0 and (tmp_path / "elsewhere" / "manifest.json").is_file(), out + err
    assert "delete it with `finpulse runs delete elsewhere --parquet DIR --yes`" in out, out
    code, out, err = finpulse(config, "replay", *RANGE, "--run-id", "elsewhere", "--parquet", str(tmp_path / "elsewhere"),
                              "--no-progress")
    assert code == 2 and f"`finpulse runs delete elsewhere --parquet {tmp_path / 'elsewhere'} --yes`" in err, out + err
    code, out, err = finpulse(config, "runs", "delete", "elsewhere", "--parquet", str(tmp_path / "elsewhere"), "--yes")
    assert code == 0 and not (tmp_path / "elsewhere").exists(), out + err


def test_runs_delete_refuses_what_is_not_a_replay_runs(dataset, tmp_path):
    """A directory that holds no run, or holds more than a run wrote, a run id whose topics are another FinPulse's
    live ones, and a run that does not exist: refused, and nothing is deleted (not even the topics)."""
    settings, config = runs_config(dataset, tmp_path)
    root = tmp_path / "var-replay"
    (root / "notes").mkdir(parents=True)
    (root / "notes" / "todo.txt").write_text("keep me")
    code, out, err = finpulse(config, "replay", *RANGE, "--run-id", "annotated", "--no-progress")
    assert code == 0, out + err
    (root / "annotated" / "my-analysis.ipynb").write_text("{}")
    prefix = settings.kafka.topic_prefix
    ensure_topics(settings.kafka, [f"{prefix}.replay.deployed2.news", f"{prefix}.replay.deployed2.scored"])
    topics_before = broker_topics(settings)

    cases = [("notes", "holds no replay run"), ("annotated", "holds what a replay does not write"),
             ("deployed2", "are the live topics of another FinPulse"), ("never-ran", "there is no replay run 'never-ran'"),
             ("bad.id", "must be 1-64 letters")]
    for run_id, message in cases:
        code, out, err = finpulse(config, "runs", "delete", run_id, "--yes")
        assert code == 2 and message in err and err.startswith("finpulse runs delete: error: "), (run_id, out + err)
    assert broker_topics(settings) == topics_before
    assert (root / "notes" / "todo.txt").is_file() and (root / "annotated" / "manifest.json").is_file()
    assert "deployed2" not in listed(config) and "notes" not in listed(config)


def test_a_run_id_cannot_be_reused_with_other_arguments(dataset, tmp_path):
    """Complete, the same id with another range is refused, saying what differs; with another directory, the
    broker still knows the id. Before, the first refusal did not say why and neither said how to free the id."""
    config = dataset["config"]
    replay(config, "reused", tmp_path / "reused")
    other_end = format_time(T2.replace(minute=T2.minute - 1))
    code, out, err = finpulse(config, "replay", "--from", format_time(T0), "--to", other_end, "--run-id", "reused",
                              "--parquet", str(tmp_path / "reused"), "--no-progress")
    assert code == 2, out + err
    assert f"run 'reused' is already complete in {tmp_path / 'reused'} with other arguments (to: " \
           f"'{format_time(T2)}' then, '{other_end}' now)" in err
    assert f"`finpulse runs delete reused --parquet {tmp_path / 'reused'} --yes`" in err
    code, out, err = finpulse(config, "replay", *RANGE, "--run-id", "reused", "--parquet", str(tmp_path / "other"),
                              "--no-progress")
    assert code == 2 and "run id 'reused' is already used on this broker" in err, out + err
    assert not (tmp_path / "other").exists()


def test_a_thresholds_file_may_set_only_thresholds(dataset, tmp_path):
    """Before, replay --config laid every section over the settings: a copied finpulse.toml could point the
    replay at another broker or topic prefix. Now anything but [aggregate]/[detect] is refused, naming it."""
    copied = tmp_path / "thresholds.toml"
    copied.write_text('[kafka]\nbootstrap_servers = "127.0.0.1:1"\ntopic_prefix = "elsewhere"\n\n'
                      '[replay]\nout_dir = "/tmp/elsewhere"\n\n[detect]\nfire_z = 7.0\n')
    topics_before = broker_topics(dataset["settings"])
    code, out, err = finpulse(dataset["config"], "replay", *RANGE, "--run-id", "copied", "--parquet",
                              str(tmp_path / "copied"), "--no-progress", "--config", str(copied))
    assert code == 2 and "may hold only the replay's thresholds ([aggregate], [detect]); it also has [kafka], " \
                         "[replay]: put those in the main configuration" in err, out + err
    assert not (tmp_path / "copied").exists() and broker_topics(dataset["settings"]) == topics_before

    copied.write_text('[detect]\nfire_z = 7.0\n\n[aggregate]\nallowed_lateness_s = 20\n')
    manifest = replay(dataset["config"], "thresholds-only", tmp_path / "thresholds-only", "--config", str(copied))
    assert manifest["config"]["detect"]["fire_z"] == 7.0 and manifest["config"]["aggregate"]["allowed_lateness_s"] == 20


@pytest.mark.parametrize("disorder", ["10s", "15m"])
def test_the_progress_bar_counts_about_the_messages_read_and_shows_a_rate(dataset, tmp_path, disorder):
    """Two minutes out of the stream's eight (plus the warm-up): the bar's total is near what the run reads, not
    the whole topic (its end was the partitions' end), nor, with the default --max-disorder of 15 minutes, up to
    that much more at each end (its total was the whole stream: the bar stalled at 60%, then jumped to its end)."""
    code, out, err = finpulse(dataset["config"], "replay", "--from", format_time(T0.replace(minute=3)), "--to",
                              format_time(T0.replace(minute=5)), "--run-id", f"progress-{disorder}", "--parquet",
                              str(tmp_path / "progress"), "--max-disorder", disorder)
    assert code == 0, out + err
    manifest = json.loads((tmp_path / "progress" / "manifest.json").read_text())
    read = manifest["counts"]["inputs"] + manifest["warmup"]["inputs"]
    total = int(re.search(rf"replay progress-{disorder}: +0%\|[^|]*\| 0/(\d+) ", err).group(1))
    # Each of the two boundaries is found within a few records in each of the 8 partitions (news and comments).
    assert abs(total - read) <= 2 * 8 * NEIGHBOURS < read / 10, (read, total)
    final = err.rsplit("\r", 1)[-1]
    assert re.search(rf"100%\|[^|]*\| {read}/{read} \[.*msg/s", final), final
    assert len(read_table(tmp_path / "progress", "scored")) > 0


def test_runs_with_the_broker_down_lists_the_directories_and_does_not_count_their_topics(tmp_path):
    """Before, a run's TOPICS showed 0 when the broker did not answer, which reads as "it has none"."""
    from stream.config import Settings
    from stream.replay.runs import format_runs, list_runs

    run = tmp_path / "var-replay" / "offline"
    run.mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"run_id": "offline", "from": format_time(T0), "to": format_time(T2),
                                                   "counts": {"inputs": 3}}))
    settings = Settings(raw={"kafka": {"bootstrap_servers": "127.0.0.1:9"},
                             "replay": {"out_dir": str(tmp_path / "var-replay")}})
    runs, warnings = list_runs(settings)
    assert [(r.run_id, r.status, r.topics) for r in runs] == [("offline", "complete", None)]
    assert warnings and "the runs' topics are not shown" in warnings[0]
    assert format_runs(runs).splitlines()[1].split()[-2] == "?"
