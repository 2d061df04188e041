"""A replay's Parquet outputs: the schemas of ``scored``, ``trends`` and ``alerts``, and the part files.

Layout of ``<out_dir>`` (default ``var/replay/<run-id>/``)::

    scored/part-00000.parquet   one row per scored message, in replay order (event time, topic, partition, offset)
    trends/part-00000.parquet   one row per closed window, in the order the windows closed
    alerts/part-00000.parquet   one row per alert event (firing, escalation, resolved; ``escalated_from`` tells an
                                escalation: count episodes by the rows where it is empty and status is firing)

``topic`` in trends and alerts is what a row is about: a topic row's own key, a ticker row's dominant topic (the
topic most of its window's messages were classified as); null where unknown (parts written before schema 3).
    manifest.json               what the run was (range, topics, model version, config hash, counts, files)

Part ``k`` holds the rows produced while replaying input messages ``[k*P, (k+1)*P)`` (``P`` =
``[replay] part_records``); a part with no rows for a table has no file. Every row carries ``model_version`` and
``config_hash``; nothing in a row comes from the wall clock: ``emitted_at`` is *event* time (a window's end plus the
allowed lateness: when a live worker would close it at the earliest; an alert's is its window's). The run id is in
the topic records and the manifest, not in the Parquet rows, so two runs of the same inputs, model and config are
byte-identical whatever their run ids (see ``stream.replay`` for the full recipe).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa

from stream.records import AlertRecord, ScoredRecord, TrendRecord, epoch_ms

from .parquet import with_metadata, write_atomic

OUTPUT_SCHEMA_VERSION = 3     # 2: alerts have escalated_from; 3: trends and alerts have topic
TABLES = ("scored", "trends", "alerts")
TIME = pa.timestamp("ms", tz="UTC")

_PROVENANCE = [pa.field("model_version", pa.string(), nullable=False),
               pa.field("config_hash", pa.string(), nullable=False)]

SCHEMAS = {
    "scored": pa.schema([
        pa.field("id", pa.string(), nullable=False), pa.field("kind", pa.string(), nullable=False),
        pa.field("event_time", TIME, nullable=False), pa.field("topic", pa.string(), nullable=False),
        pa.field("topic_confidence", pa.float64(), nullable=False), pa.field("sentiment", pa.string(), nullable=False),
        pa.field("sentiment_score", pa.float64(), nullable=False), pa.field("tickers", pa.list_(pa.string())),
        pa.field("text", pa.string()), pa.field("source", pa.string()), pa.field("url", pa.string()),
        pa.field("input_topic", pa.string(), nullable=False), pa.field("input_partition", pa.int32(), nullable=False),
        pa.field("input_offset", pa.int64(), nullable=False), *_PROVENANCE]),
    "trends": pa.schema([
        pa.field("key_type", pa.string(), nullable=False), pa.field("key", pa.string(), nullable=False),
        pa.field("topic", pa.string()),
        pa.field("window_s", pa.int32(), nullable=False), pa.field("window_start", TIME, nullable=False),
        pa.field("window_end", TIME, nullable=False), pa.field("count", pa.int64(), nullable=False),
        pa.field("mean_score", pa.float64(), nullable=False), pa.field("bearish_share", pa.float64(), nullable=False),
        pa.field("bullish_share", pa.float64(), nullable=False), pa.field("news_count", pa.int64(), nullable=False),
        pa.field("comment_count", pa.int64(), nullable=False), pa.field("emitted_at", TIME, nullable=False),
        pa.field("most_negative", pa.string()), *_PROVENANCE]),
    "alerts": pa.schema([
        pa.field("id", pa.string(), nullable=False), pa.field("status", pa.string(), nullable=False),
        pa.field("key_type", pa.string(), nullable=False), pa.field("key", pa.string(), nullable=False),
        pa.field("topic", pa.string()),
        pa.field("window_s", pa.int32(), nullable=False), pa.field("window_start", TIME, nullable=False),
        pa.field("window_end", TIME, nullable=False), pa.field("severity", pa.string(), nullable=False),
        pa.field("deviation", pa.float64(), nullable=False), pa.field("observed", pa.string()),
        pa.field("baseline", pa.string()), pa.field("started_at", TIME, nullable=False),
        pa.field("emitted_at", TIME, nullable=False), pa.field("resolved_at", TIME), pa.field("summary", pa.string()),
        pa.field("messages", pa.string()), pa.field("escalated_from", pa.string(), nullable=False), *_PROVENANCE]),
}


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _ms(value) -> int | None:
    return None if value is None else epoch_ms(value)


def scored_row(record: ScoredRecord, topic: str, partition: int, offset: int) -> dict[str, Any]:
    return {"id": record.id, "kind": record.kind, "event_time": _ms(record.event_time), "topic": record.topic,
            "topic_confidence": record.topic_confidence, "sentiment": record.sentiment,
            "sentiment_score": record.sentiment_score, "tickers": list(record.tickers), "text": record.text,
            "source": record.source, "url": record.url, "input_topic": topic, "input_partition": partition,
            "input_offset": offset, "model_version": record.model_version}


def trend_row(trend: TrendRecord) -> dict[str, Any]:
    return {"key_type": trend.key_type, "key": trend.key, "topic": trend.about_topic or None, "window_s": trend.window_s,
            "window_start": _ms(trend.window_start), "window_end": _ms(trend.window_end), "count": trend.count,
            "mean_score": trend.mean_score, "bearish_share": trend.bearish_share, "bullish_share": trend.bullish_share,
            "news_count": trend.news_count, "comment_count": trend.comment_count, "emitted_at": _ms(trend.emitted_at),
            "most_negative": _json(list(trend.most_negative)), "model_version": trend.model_version}


def alert_row(alert: AlertRecord) -> dict[str, Any]:
    return {"id": alert.id, "status": alert.status, "key_type": alert.key_type, "key": alert.key,
            "topic": alert.about_topic or None, "window_s": alert.window_s, "window_start": _ms(alert.window_start), "window_end": _ms(alert.window_end),
            "severity": alert.severity, "deviation": alert.deviation, "observed": _json(alert.observed),
            "baseline": _json(alert.baseline), "started_at": _ms(alert.started_at), "emitted_at": _ms(alert.emitted_at),
            "resolved_at": _ms(alert.resolved_at), "summary": alert.summary, "messages": _json(list(alert.messages)),
            "escalated_from": alert.escalated_from, "model_version": alert.model_version}


ROW_OF: dict[str, Callable[..., dict[str, Any]]] = {"trends": trend_row, "alerts": alert_row}


class PartSink:
    """Collects one part's rows per table, then writes them (``write``) as that part's files."""

    def __init__(self, out_dir: Path, model_version: str, config_hash: str):
        self.out_dir = out_dir
        self.config_hash = config_hash
        metadata = {"finpulse.replay.schema_version": str(OUTPUT_SCHEMA_VERSION), "finpulse.model_version": model_version,
                    "finpulse.config_hash": config_hash}
        self.schemas = {name: with_metadata(schema, {**metadata, "finpulse.table": name})
                        for name, schema in SCHEMAS.items()}
        self.rows: dict[str, list[dict]] = {name: [] for name in TABLES}

    def add(self, table: str, row: dict[str, Any]) -> None:
        row["config_hash"] = self.config_hash
        self.rows[table].append(row)

    def write(self, part: int) -> list[str]:
        """Write this part's non-empty tables; returns their paths relative to the output directory."""
        written = []
        for name in TABLES:
            rows = self.rows[name]
            if rows:
                relative = f"{name}/part-{part:05d}.parquet"
                schema = self.schemas[name]
                columns = {f.name: [row[f.name] for row in rows] for f in schema}
                write_atomic(pa.Table.from_pydict(columns, schema=schema), self.out_dir / relative)
                written.append(relative)
            self.rows[name] = []
        return written


def read_table(out_dir: Path, name: str):
    """A replay output table as a pandas DataFrame (empty, with the right columns, when the run produced none)."""
    import pyarrow.parquet as pq
    files = sorted((Path(out_dir) / name).glob("part-*.parquet"))
    if not files:
        return SCHEMAS[name].empty_table().to_pandas()
    frame = pa.concat_tables([pq.read_table(f) for f in files], promote_options="default").to_pandas()
    if name == "alerts":
        # Parts written before escalations existed have no escalated_from: none of their alerts is an escalation.
        frame["escalated_from"] = frame["escalated_from"].fillna("") if "escalated_from" in frame else ""
    return frame
