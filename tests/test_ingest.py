"""Getting data in: ``finpulse ingest file`` (JSONL, CSV), ``finpulse ingest rss`` (a real feed over local HTTP
with ETag/Last-Modified) and ``finpulse simulate`` (the generator and the command), all against the real broker."""
from __future__ import annotations

import asyncio
import json
import re
import sys
import threading
import time
import uuid
from collections import Counter
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from models.baseline import KeywordBaselineScorer
from stream.broker import EmbeddedBroker, free_port
from stream.config import ConfigError
from stream.ingest import ingest_file, ingest_rss
from stream.kafka_io import DeliveryStalled, RecordSender, gave_up_retrying
from stream.records import epoch_ms, format_time, parse_input
from stream.simulate import COMMENTS, HEADLINES, WORLD, Shock, generate, shock_truth
from stream.topics import TopicNames
from tests.network import broker_behind_link
from tests.procs import (ManagedProcess, isolated_settings, read_all, run_finpulse, run_without_broker, start_finpulse,
                         wait_for_records)

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)


def by_id(records) -> dict[str, tuple[dict, int, bytes]]:
    return {json.loads(r.value)["id"]: (json.loads(r.value), r.timestamp_ms, r.key) for r in records}


# ---------------------------------------------------------------- files

def test_jsonl_file_is_validated_and_bad_lines_reported_without_stopping(fp_settings, topics, tmp_path, capsys):
    lines = [json.dumps({"id": f"n{i}", "published_at": f"2026-03-02T09:0{i}:00Z", "headline": f"$XOM falls {i}",
                         "source": "wire"}) for i in range(5)]
    lines[1:1] = ["{not json", ""]                                              # line 2 bad, line 3 blank
    lines.append(json.dumps({"id": "n9", "headline": "no time"}))               # line 8: missing published_at
    path = tmp_path / "news.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert ingest_file(fp_settings, path, kind="news") == 1                    # 1: some lines were rejected
    err = capsys.readouterr().err
    assert "line 2: rejected (invalid_json)" in err and "line 8: rejected (missing_field)" in err
    got = by_id(read_all(fp_settings, topics.news))
    assert sorted(got) == [f"n{i}" for i in range(5)]
    value, timestamp_ms, key = got["n3"]
    assert timestamp_ms == epoch_ms(T0 + timedelta(minutes=3)) and key == b"n3"
    assert value["tickers"] == ["XOM"]                                          # normalised on the way in


def test_csv_file_with_tickers_epoch_times_multiline_text_and_bad_bytes(fp_settings, topics, tmp_path):
    t = int(T0.timestamp())
    rows = ("id,created_at,text,author,tickers,parent_id\r\n"
            f'c1,{t},"Buying more,\nlong term",ann,AAPL;msft,\r\n'
            f"c2,2026-03-02T09:00:05Z,$TSLA looks weak,bob,,c1\r\n").encode()
    rows += f"c3,{t},caf\xe9 text,eve,,\r\n".encode("latin-1")                   # not UTF-8
    rows += f"c4,{t},,zed,,\r\n".encode()                                        # empty text
    path = tmp_path / "comments.csv"
    path.write_bytes(rows)
    assert ingest_file(fp_settings, path, kind="comments") == 1
    got = by_id(read_all(fp_settings, topics.comments))
    assert sorted(got) == ["c1", "c2"]
    assert got["c1"][0]["text"] == "Buying more,\nlong term" and got["c1"][0]["tickers"] == ["AAPL", "MSFT"]
    assert got["c1"][1] == epoch_ms(T0)
    assert got["c2"][0]["parent_id"] == "c1" and got["c2"][0]["tickers"] == ["TSLA"]


def test_spreadsheet_exports_with_a_byte_order_mark_and_semicolons_ingest_as_plain_files(fp_settings, topics,
                                                                                          tmp_path):
    """Excel's "CSV UTF-8" starts with a byte-order mark, in much of Europe separates with semicolons, and a
    spreadsheet titles its columns."""
    excel = tmp_path / "news.csv"
    excel.write_bytes("\ufeffID;Published_At;Headline;Tickers\r\n"
                      "n1;2026-03-02T09:00:00Z;Oil slides, OPEC meets;XOM\r\n".encode())
    marked = tmp_path / "news.jsonl"
    marked.write_bytes("\ufeff".encode() + json.dumps({"id": "n2", "published_at": "2026-03-02T09:01:00Z",
                                                      "headline": "Gold rises"}).encode() + b"\n")
    tabs = tmp_path / "news.tsv"
    tabs.write_text("id\tpublished_at\theadline\nn3\t2026-03-02T09:02:00Z\tBanks rally, yields fall\n")
    assert ingest_file(fp_settings, excel, kind="news") == 0 and ingest_file(fp_settings, marked, kind="news") == 0
    assert ingest_file(fp_settings, tabs, kind="news") == 0
    got = by_id(read_all(fp_settings, topics.news))
    assert sorted(got) == ["n1", "n2", "n3"]
    assert got["n1"][0]["headline"] == "Oil slides, OPEC meets" and got["n1"][0]["tickers"] == ["XOM"]
    assert got["n3"][0]["headline"] == "Banks rally, yields fall"
    # The spreadsheet's own file is not text: it is told to be saved as CSV, not to name a format.
    (tmp_path / "news.xlsx").write_bytes(b"PK\x03\x04")
    with pytest.raises(ConfigError, match=r"news.xlsx is a spreadsheet: save it as CSV and ingest that"):
        ingest_file(fp_settings, tmp_path / "news.xlsx", kind="news")


def test_history_written_after_newer_data_is_warned_of_as_a_replay_would_miss_it(fp_settings, topics, tmp_path,
                                                                                   capsys):
    """A replay finds records assuming each partition was written in about event-time order ([replay]
    max_disorder_s, 15 minutes). A week's history loaded after newer data, or a file newest first, breaks that, and
    the replay then misses the records without a word; the ingest that wrote them says so, with the --max-disorder
    that would cover the gap."""
    def news(name: str, times: list[datetime]) -> Path:
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"id": f"{name}{i}", "published_at": format_time(t), "headline": "Oil slides"})
                                + "\n" for i, t in enumerate(times)))
        return path

    assert ingest_file(fp_settings, news("now", [T0 + timedelta(minutes=m) for m in range(20)]), kind="news") == 0
    assert "warning" not in capsys.readouterr().err
    assert ingest_file(fp_settings, news("later", [T0 + timedelta(minutes=m) for m in range(10, 40)]), kind="news") == 0
    assert "warning" not in capsys.readouterr().err        # 10 minutes back: within the 15 a replay allows
    week_ago = [T0 - timedelta(days=7, minutes=-m) for m in range(12)]
    assert ingest_file(fp_settings, news("history", week_ago), kind="news") == 0
    err = capsys.readouterr().err
    assert (f"warning: 12 of these records are more than 900 s older than {topics.news}'s newest records "
            f"(2026-03-02T09:3") in err, err
    assert "unless its --max-disorder covers the gap (here 8d)" in err and "load history oldest first" in err
    fresh = isolated_settings(fp_settings.kafka.bootstrap_servers, tmp_path)
    backwards = list(reversed([T0 + timedelta(hours=h) for h in range(3)]))
    assert ingest_file(fresh, news("backwards", backwards), kind="news") == 0
    err = capsys.readouterr().err
    assert "warning: 2 of these records are more than 900 s older than earlier lines of this file" in err, err
    assert "(here 2h)" in err, err


def test_ingest_file_command(fp_settings, topics, tmp_path):
    path = tmp_path / "n.jsonl"
    path.write_text(json.dumps({"id": "x1", "published_at": 1772442000, "headline": "Gold soars"}) + "\n")
    code, out = run_finpulse(fp_settings, "ingest", "file", str(path), "--kind", "news", log_dir=tmp_path)
    assert code == 0, out
    assert "ingested 1 of 1 news records" in out
    assert list(by_id(read_all(fp_settings, topics.news))) == ["x1"]


def test_an_ingest_whose_broker_went_away_stops_and_says_how_far_it_got(tmp_path):
    """The broker goes away in the middle of `finpulse ingest file`: aiokafka retries its records for ever while
    their partition's leader is known. The command stops once the broker has taken none of them for
    ``[kafka] delivery_timeout_s``, saying how many it took and to run it again (before: it never ended).
    The broker is cut off (``tests.network``, as a restart: connections reset, new ones refused) rather than
    stopped: tansu went on serving its clients for seconds after being told to stop, and on a fast run the whole
    file was taken first (a CI failure)."""
    path = tmp_path / "big.jsonl"
    lines = 200_000
    with open(path, "w") as out:
        for i in range(lines):
            out.write(json.dumps({"id": f"n{i}", "published_at": 1772442000 + i,
                                  "headline": f"Oil falls for the {i}th time " + "as crude slides " * 8}) + "\n")
    ingest = None
    try:
        with broker_behind_link(tmp_path / "tansu.log") as (link, own_broker):
            env = {"FINPULSE_KAFKA__BOOTSTRAP_SERVERS": own_broker.bootstrap_servers,
                   "FINPULSE_KAFKA__TOPIC_PREFIX": f"t{uuid.uuid4().hex[:10]}", "FINPULSE_KAFKA__DELIVERY_TIMEOUT_S": "3"}
            ingest = ManagedProcess([sys.executable, "-m", "stream.cli", "ingest", "file", str(path), "--kind", "news"],
                                    tmp_path, "ingest", env=env).start()
            ingest.wait_for("ingest big.jsonl", timeout=60)     # its progress bar: reading and sending
            link.cut("refuse")
            code = ingest.wait(timeout=60)
    finally:
        if ingest is not None:
            ingest.kill()
    output = " ".join(ingest.output().split())
    took = re.search(r"stopped: (\d+) of the first (\d+) news records", output)
    assert code == 2 and took and "took none of the" in output and "delivery_timeout_s" in output, ingest.tail()
    assert int(took[1]) <= int(took[2]) < lines, f"the file was ingested before the broker stopped: {took[0]}"
    assert "Run the same command again" in output and "never retrieved" not in output, ingest.tail()


def test_a_send_the_producer_gives_up_on_first_is_the_same_stall(tmp_path):
    """The producer's request timeout and the sender's stall timer are both ``delivery_timeout_s``: when aiokafka's
    runs out first it fails the records with the retriable error it last met (NodeNotReadyError), which reached the
    command as "refused the request" instead of the stall and its counts (seen in a fresh-clone CI run). Here aiokafka's
    always runs out first: the sender still raises ``DeliveryStalled``, with what the broker had taken."""
    async def send_until_stalled(broker, topic) -> DeliveryStalled:
        async with RecordSender(settings.kafka) as sender:
            sender._stall_timeout_s = 60            # aiokafka gives up after 2 s, long before this
            for i in range(500):
                await sender.send(topic, b"taken", key=str(i).encode())
            await sender.flush()
            broker.stop()
            with pytest.raises(DeliveryStalled) as stalled:
                for i in range(500):
                    await sender.send(topic, b"never taken", key=str(i).encode())
                await sender.flush()
            return stalled.value

    with EmbeddedBroker(log_file=tmp_path / "tansu.log") as own_broker:
        settings = isolated_settings(own_broker.bootstrap_servers, tmp_path, kafka={"delivery_timeout_s": 2})
        stalled = asyncio.run(send_until_stalled(own_broker, TopicNames(settings.kafka.topic_prefix).news))
    assert stalled.delivered == 500 and "took none of the 500 records waiting for it" in str(stalled)
    assert gave_up_retrying(stalled.__cause__), repr(stalled.__cause__)


# ---------------------------------------------------------------- RSS

def rss(items: list[str]) -> bytes:
    return f"""<?xml version="1.0"?><rss version="2.0"><channel><title>Test Wire</title>
<link>http://example.test/</link><description>d</description>{''.join(items)}</channel></rss>""".encode()


ITEMS = [
    "<item><title>Oil prices plunge as $XOM cuts output</title><guid>g-1</guid><link>http://example.test/1</link>"
    "<description>&lt;p&gt;Crude &lt;b&gt;fell&lt;/b&gt; 5%&lt;/p&gt;</description>"
    "<pubDate>Mon, 02 Mar 2026 09:00:00 GMT</pubDate></item>",
    "<item><title>Gold rallies</title><link>http://example.test/2</link>"
    "<pubDate>Mon, 02 Mar 2026 09:05:00 GMT</pubDate></item>",                       # no guid: the link is the key
    "<item><title>Fed holds rates</title><guid>g-3</guid><pubDate>Mon, 02 Mar 2026 09:10:00 GMT</pubDate></item>",
]


class FeedServer:
    """A real HTTP server for one feed, honouring If-None-Match / If-Modified-Since, recording each request."""

    def __init__(self):
        self.body, self.version, self.conditional, self.failing = rss(ITEMS), 1, True, False
        self.requests: list[dict[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                etag = f'"v{server.version}"'
                modified = format_datetime(T0 + timedelta(hours=server.version), usegmt=True)
                server.requests.append({"if_none_match": self.headers.get("If-None-Match"),
                                        "if_modified_since": self.headers.get("If-Modified-Since")})
                if server.failing:
                    self.send_response(503)
                    self.end_headers()
                    return
                if server.conditional and self.headers.get("If-None-Match") == etag:
                    self.send_response(304)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/rss+xml")
                if server.conditional:
                    self.send_header("ETag", etag)
                    self.send_header("Last-Modified", modified)
                self.end_headers()
                self.wfile.write(server.body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/feed.xml"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_rss_maps_entries_dedupes_across_restarts_and_sends_validators(fp_settings, topics, tmp_path):
    state = tmp_path / "rss-state.json"
    with FeedServer() as feed:
        assert ingest_rss(fp_settings, [feed.url], once=True, state_path=state) == 0
        first = by_id(read_all(fp_settings, topics.news))
        assert len(first) == 3
        oil = next(v for v, _, _ in first.values() if v["url"] == "http://example.test/1")
        assert oil["headline"] == "Oil prices plunge as $XOM cuts output" and oil["body"] == "Crude fell 5%"
        assert oil["tickers"] == ["XOM"] and oil["source"] == "Test Wire"
        assert oil["published_at"] == "2026-03-02T09:00:00.000Z"
        assert parse_input(json.dumps(oil).encode(), "news", 1000)      # valid NewsItem JSON

        # A new process (state from the file): the server sees the validators and answers 304.
        assert ingest_rss(fp_settings, [feed.url], once=True, state_path=state) == 0
        assert feed.requests[-1] == {"if_none_match": '"v1"', "if_modified_since": "Mon, 02 Mar 2026 10:00:00 GMT"}
        assert len(read_all(fp_settings, topics.news)) == 3

        # The feed changes: only the new entry is produced.
        feed.body, feed.version = rss(ITEMS + ["<item><title>Banks tumble</title><guid>g-4</guid></item>"]), 2
        ingest_rss(fp_settings, [feed.url], once=True, state_path=state)
        assert len(read_all(fp_settings, topics.news)) == 4

        # A server that ignores validators: the guid/link memory alone prevents duplicates.
        feed.conditional = False
        ingest_rss(fp_settings, [feed.url], once=True, state_path=state)
        assert len(read_all(fp_settings, topics.news)) == 4


@pytest.mark.parametrize("mode", ["refuse", "blackhole"])
def test_the_rss_poller_rides_out_a_broker_outage_and_sends_what_it_missed(tmp_path, mode):
    """`finpulse ingest rss` polling every second while its broker is cut off (``tests.network``, as a restart and as
    a partition): it keeps polling, says each poll's new entries were not sent, and sends them once the broker is
    back; nothing is lost, nothing sent twice."""
    with broker_behind_link(tmp_path / "tansu.log") as (link, own_broker), FeedServer() as feed:
        settings = isolated_settings(own_broker.bootstrap_servers, tmp_path, kafka={"delivery_timeout_s": 3})
        news = TopicNames(settings.kafka.topic_prefix).news
        proc = start_finpulse(settings, "ingest", "rss", feed.url, "--every", "1s", "--state",
                              str(tmp_path / "state.json"), "--metrics-port", str(free_port()), log_dir=tmp_path)
        try:
            wait_for_records(settings, news, lambda records: len(records) == 3, timeout=60, what="the first 3 entries")
            link.cut(mode)
            feed.body, feed.version = rss(ITEMS + ["<item><title>Banks tumble</title><guid>g-4</guid></item>"]), 2
            proc.wait_for("1 new entries not sent", timeout=60, count=2)    # and polling on
            link.restore()
            wait_for_records(settings, news, lambda records: len(records) >= 4, timeout=60,
                             what="the entry published during the outage")
            assert proc.stop() == 0, proc.tail()
        finally:
            proc.stop()
        everything = read_all(settings, news)
    assert len(by_id(everything)) == 4 and len(everything) == 4, f"lost or sent twice: {sorted(by_id(everything))}"
    assert "Unclosed AIOKafkaProducer" not in proc.output(), proc.tail()


def test_rss_unreachable_feed_is_reported_not_fatal(fp_settings, tmp_path, capsys):
    code = ingest_rss(fp_settings, [f"http://127.0.0.1:{free_port()}/none.xml"], once=True,
                      state_path=tmp_path / "s.json")
    assert code == 1 and "fetch failed" in capsys.readouterr().err


def test_rss_poller_serves_metrics_and_readiness_per_feed(fp_settings, topics, tmp_path):
    """`finpulse ingest rss` polling every second, scraped over HTTP: the first poll produces the three entries,
    the next ones are 304s; when the feed breaks, failed polls are counted and /readyz turns 503 naming the feed,
    which metrics show without the access token of its URL. SIGTERM stops it cleanly."""
    import urllib.request

    from tests.exposition import probe, scrape

    port = free_port()
    base = f"http://127.0.0.1:{port}"

    def until(what, check, timeout_s=60):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                found = check()
            except (OSError, KeyError):
                found = None
            if found:
                return found
            time.sleep(0.2)
        pytest.fail(f"never saw {what}; output: {proc.tail()}")

    with FeedServer() as feed:
        label = feed.url
        proc = start_finpulse(fp_settings, "ingest", "rss", feed.url + "?token=s3cr3t", "--every", "1s",
                              "--metrics-port", str(port), "--state", str(tmp_path / "state.json"), log_dir=tmp_path)
        try:
            m = until("a 304 after the first poll", lambda: (e := scrape(f"{base}/metrics")).value(
                "finpulse_rss_polls_total", feed=label, outcome="not_modified") >= 1 and e)
            assert m.value("finpulse_rss_polls_total", feed=label, outcome="ok") == 1
            assert m.value("finpulse_rss_entries_total", feed=label, outcome="produced") == len(ITEMS)
            assert m.types["finpulse_rss_last_success_timestamp_seconds"] == "gauge"
            assert m.value("finpulse_rss_last_success_timestamp_seconds", feed=label) > time.time() - 60
            assert len(read_all(fp_settings, topics.news)) == len(ITEMS)
            status, body = probe(f"{base}/readyz")
            assert status == 200 and body["checks"]["feeds"]["ok"], body

            feed.failing = True
            until("a failed poll", lambda: scrape(f"{base}/metrics").value(
                "finpulse_rss_polls_total", feed=label, outcome="failed") >= 1)
            status, body = until("readiness turning 503", lambda: (r := probe(f"{base}/readyz"))[0] == 503 and r)
            assert label in body["reason"] and "503" in body["reason"]
            with urllib.request.urlopen(f"{base}/metrics") as response:
                assert "s3cr3t" not in response.read().decode()
        finally:
            code = proc.stop()
        assert code == 0, proc.tail()


# ---------------------------------------------------------------- simulate

def test_every_template_reads_as_intended_by_the_baseline():
    scorer = KeywordBaselineScorer()
    for topic, by_sentiment in HEADLINES.items():
        for sentiment, templates in by_sentiment.items():
            for template in templates:
                for company, ticker in WORLD[topic][1]:
                    text = template.format(co=company, tk=ticker, pct=5, n=10)
                    prediction = scorer.score([text])[0]
                    assert (prediction.sentiment, prediction.topic) == (sentiment, topic), text
    for sentiment, templates in COMMENTS.items():
        for template in templates:
            text = template.format(tk="XOM", hook="oil", pct=5)
            assert scorer.score([text])[0].sentiment == sentiment, text


def test_generator_is_deterministic_paced_and_carries_the_shock():
    shock = Shock("Energy | Oil", at_s=600, duration_s=600, strength=0.85, volume_factor=3.0)
    messages = list(generate(seed=4, start=T0, rate=10, count=12_000, shock=shock))
    assert [m.payload for m in messages[:50]] == [m.payload for m in generate(seed=4, start=T0, rate=10, count=50,
                                                                               shock=shock)]
    assert len({m.id for m in messages}) == len(messages)
    times = [m.event_time for m in messages]
    assert times == sorted(times) and times[0] > T0
    truth = shock_truth(T0, shock)
    assert (truth.start, truth.end, truth.topic) == (T0 + timedelta(seconds=600), T0 + timedelta(seconds=1200),
                                                     "Energy | Oil")
    before = [m for m in messages if m.event_time < truth.start]
    assert len(before) / 600 == pytest.approx(10, rel=0.1)                   # --rate in messages per event-second
    kinds = Counter(m.kind for m in messages)
    assert kinds["comment"] / len(messages) == pytest.approx(0.6, abs=0.03)
    threads = [m for m in messages if m.kind == "comment" and m.payload["parent_id"]]
    assert threads and all(m.payload["text"].startswith("@") for m in threads)

    scorer = KeywordBaselineScorer()

    def oil(window):
        picked = [m for m in messages if m.topic == "Energy | Oil" and window(m.event_time)]
        texts = [parse_input(m.value(), m.kind, 20_000).text for m in picked]
        bearish = sum(p.sentiment == "bearish" for p in scorer.score(texts)) / len(texts)
        return len(picked), bearish

    normal_count, normal_bearish = oil(lambda t: t < truth.start)
    shock_count, shock_bearish = oil(truth.contains)
    assert shock_bearish > 0.8 > 0.35 > normal_bearish                       # the baseline sees the shock
    assert shock_count > 2 * normal_count                                    # and its extra volume (same span)
    assert all(m.in_shock == (m.topic == "Energy | Oil" and truth.contains(m.event_time)) for m in messages)


def test_simulate_refuses_bad_arguments_before_it_touches_kafka(tmp_path):
    """No broker at all: the answer is about the argument, at once, not a Kafka timeout."""
    for bad, message in ((["--rate", "-1"], "--rate must be > 0"), (["--comment-share", "2"], "--comment-share")):
        done = run_without_broker("simulate", *bad, timeout=60)
        assert done.returncode == 2 and message in done.stderr and "Kafka" not in done.stderr, done.stderr


def test_simulate_command_produces_the_generated_stream(fp_settings, topics, tmp_path):
    code, out = run_finpulse(fp_settings, "simulate", "--count", "300", "--max-speed", "--seed", "5", "--rate", "50",
                             "--start", "2026-03-02T09:00:00Z", "--malformed-share", "0.05", log_dir=tmp_path)
    assert code == 0, out
    assert "SIMULATED" in out.splitlines()[0]
    expected = list(generate(seed=5, start=T0, rate=50, count=300, shock=Shock(), malformed_share=0.05))
    produced = read_all(fp_settings, topics.news) + read_all(fp_settings, topics.comments)
    assert sorted(r.value for r in produced) == sorted(m.value() for m in expected)
    timestamps = {m.value(): epoch_ms(m.event_time) for m in expected}
    assert all(r.timestamp_ms == timestamps[r.value] for r in produced)
    assert "produced 300 SIMULATED messages" in out
