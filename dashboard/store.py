"""The dashboard's bounded in-memory window of FinPulse's output topics, as pandas frames.

The background consumer hands raw Kafka values to ``LiveStore.add``; views read immutable ``Snapshot`` frames.
New records wait in a small list and are folded into the frames when a view asks (or when the list grows
large), so a busy stream costs one concat per refresh rather than one per record.

What is kept (see ``DashboardSettings``):
- trends: one row per window (``window_id``); a final window beats a partial one, otherwise the latest emitted;
- window_messages: the MessageRefs of each window, one row per message, replaced when the window is re-emitted;
- scored: one row per message id (at-least-once duplicates collapse);
- alerts: one row per alert event (``event_id``: an episode's firing, each escalation, its resolve), the latest
  emitted;
- deliveries: one row per compacted key ``<event_id>|<endpoint>``, one alert event to one endpoint (with the group
  notification that carried it, for a grouped endpoint); a tombstone removes it. Group notification records are
  left out: their members carry the state, per episode;
- silences: one row per silence id (``alerts.silences``), the latest written; all of them (a handful).
Every kind is bounded by ``retention_hours`` back from its newest record and by a row cap.
Malformed records are counted in ``bad_records`` and skipped: one bad record never hides the others.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import pandas as pd

from stream.records import alert_event_id

from .settings import DashboardSettings

TREND_COLUMNS = ("window_id", "key_type", "key", "window_s", "window_start", "window_end", "count", "mean_score",
                 "bearish_share", "bullish_share", "news_count", "comment_count", "final", "model_version",
                 "emitted_at")
MESSAGE_COLUMNS = ("window_id", "key_type", "key", "window_s", "window_end", "id", "text", "sentiment_score",
                   "kind", "url", "event_time", "final", "emitted_at")
SCORED_COLUMNS = ("id", "kind", "event_time", "text", "topic", "topic_confidence", "sentiment", "sentiment_score",
                  "tickers", "model_version", "scored_at", "source", "url")
ALERT_COLUMNS = ("id", "status", "event_id", "key_type", "key", "window_s", "window_start", "window_end",
                 "severity", "deviation", "observed_bearish_share", "observed_mean_score", "observed_count",
                 "baseline_bearish_share", "baseline_bearish_share_std", "baseline_mean_score",
                 "baseline_mean_score_std", "started_at", "emitted_at", "resolved_at", "summary", "model_version",
                 "messages", "escalated_from", "topic")
DELIVERY_COLUMNS = ("delivery_key", "event_id", "alert_id", "endpoint", "status", "attempts", "last_error",
                    "group", "updated_at")
SILENCE_COLUMNS = ("id", "matchers", "starts_at", "ends_at", "created_by", "comment", "updated_at")

_TIME_COLUMNS = {"window_start", "window_end", "emitted_at", "event_time", "scored_at", "started_at",
                 "resolved_at", "updated_at", "starts_at", "ends_at"}
# Columns that must parse for a row to be usable at all.
_REQUIRED_TIMES = {"trends": ("window_start", "window_end"), "scored": ("event_time",), "alerts": ("window_end",),
                   "window_messages": (), "deliveries": (), "silences": ("starts_at", "ends_at")}
# Pending rows above this are folded in straight away, so a catch-up read never piles up unbounded.
_PENDING_LIMIT = 20_000
_NEVER = datetime.min.replace(tzinfo=timezone.utc)


class BadRecord(ValueError):
    """A record the dashboard cannot show: wrong JSON, or a field it needs is missing."""


def empty_frame(columns: tuple[str, ...]) -> pd.DataFrame:
    frame = pd.DataFrame({c: pd.Series(dtype="datetime64[ns, UTC]" if c in _TIME_COLUMNS else "object") for c in columns})
    return frame


@dataclass(frozen=True)
class Snapshot:
    """What the views read. Treat the frames as read-only: the store hands the same ones to every session."""
    trends: pd.DataFrame
    window_messages: pd.DataFrame
    scored: pd.DataFrame
    alerts: pd.DataFrame
    deliveries: pd.DataFrame
    silences: pd.DataFrame = field(default_factory=lambda: empty_frame(SILENCE_COLUMNS))
    version: int = 0
    bad_records: int = 0

    @property
    def empty(self) -> bool:
        return self.trends.empty and self.scored.empty and self.alerts.empty

    def memory_bytes(self) -> int:
        return int(sum(f.memory_usage(deep=True).sum() for f in
                       (self.trends, self.window_messages, self.scored, self.alerts, self.deliveries)))

    @classmethod
    def nothing(cls) -> "Snapshot":
        return cls(trends=empty_frame(TREND_COLUMNS), window_messages=empty_frame(MESSAGE_COLUMNS),
                   scored=empty_frame(SCORED_COLUMNS), alerts=empty_frame(ALERT_COLUMNS),
                   deliveries=empty_frame(DELIVERY_COLUMNS))


# ---------------------------------------------------------------- parsing one record into rows

def _decode(value: bytes | str | dict | None) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    if value is None:
        raise BadRecord("no value (a tombstone)")
    try:
        data = json.loads(value)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRecord(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRecord("not a JSON object")
    return data


def _need(data: dict[str, Any], *names: str) -> None:
    missing = [n for n in names if data.get(n) is None]
    if missing:
        raise BadRecord(f"missing {', '.join(missing)}")


def _number(value: Any, default: float = float("nan")) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def trend_row(data: dict[str, Any]) -> dict[str, Any]:
    """A TrendRecord as one trends row (its messages: ``message_rows``)."""
    _need(data, "key_type", "key", "window_s", "window_start", "window_end")
    if data.get("run_id"):
        raise BadRecord("a replay record on a live topic")
    window_s = int(_number(data["window_s"], 0))
    window_id = f"{data['key_type']}:{data['key']}:{window_s}:{data['window_start']}"
    row = {
        "window_id": window_id, "key_type": str(data["key_type"]), "key": str(data["key"]), "window_s": window_s,
        "window_start": data["window_start"], "window_end": data["window_end"],
        "count": int(_number(data.get("count"), 0)), "mean_score": _number(data.get("mean_score")),
        "bearish_share": _number(data.get("bearish_share")), "bullish_share": _number(data.get("bullish_share")),
        "news_count": int(_number(data.get("news_count"), 0)), "comment_count": int(_number(data.get("comment_count"), 0)),
        "final": bool(data.get("final", False)), "model_version": str(data.get("model_version") or ""),
        "emitted_at": data.get("emitted_at") or data["window_end"],
    }
    return row


def message_rows(trend: dict[str, Any], refs: Any) -> list[dict[str, Any]]:
    """The window_messages rows of a trends row: the MessageRefs its record carried (``most_negative``)."""
    shared = {name: trend[name] for name in ("window_id", "key_type", "key", "window_s", "window_end", "final",
                                             "emitted_at")}
    return [{**shared, "id": str(ref.get("id", "")), "text": str(ref.get("text", "")),
             "sentiment_score": _number(ref.get("sentiment_score")), "kind": str(ref.get("kind") or ""),
             "url": str(ref.get("url") or ""), "event_time": ref.get("event_time") or None}
            for ref in (refs or ()) if isinstance(ref, dict)]


def _precedence(trend: dict[str, Any]) -> tuple[bool, datetime]:
    """Which of a window's records the dashboard keeps: a final one beats a partial one, then the latest emitted.
    Records of one window can arrive out of order (read from two partitions or topics), so arrival cannot decide."""
    try:
        emitted = datetime.fromisoformat(str(trend["emitted_at"]))
    except ValueError:
        emitted = _NEVER
    return bool(trend["final"]), emitted if emitted.tzinfo else emitted.replace(tzinfo=timezone.utc)


def scored_row(data: dict[str, Any]) -> dict[str, Any]:
    _need(data, "id", "event_time", "sentiment_score")
    if data.get("run_id"):
        raise BadRecord("a replay record on a live topic")
    row = {c: data.get(c) for c in SCORED_COLUMNS}
    row["id"] = str(row["id"])
    row["sentiment_score"] = _number(row["sentiment_score"])
    row["topic_confidence"] = _number(row["topic_confidence"])
    row["tickers"] = tuple(str(t) for t in (row["tickers"] or ()))
    for name in ("kind", "text", "topic", "sentiment", "model_version", "source", "url"):
        row[name] = str(row[name] or "")
    return row


def alert_row(data: dict[str, Any]) -> dict[str, Any]:
    _need(data, "id", "status", "key_type", "key", "window_end")
    if data.get("run_id"):
        raise BadRecord("a replay record on a live topic")
    observed = data.get("observed") if isinstance(data.get("observed"), dict) else {}
    baseline = data.get("baseline") if isinstance(data.get("baseline"), dict) else {}
    severity, escalated_from = str(data.get("severity") or "info"), str(data.get("escalated_from") or "")
    row = {c: data.get(c) for c in ALERT_COLUMNS}
    row.update({
        "id": str(data["id"]), "status": str(data["status"]),
        "event_id": alert_event_id(str(data["id"]), str(data["status"]), severity if escalated_from else ""),
        "window_s": int(_number(data.get("window_s"), 0)), "severity": severity, "escalated_from": escalated_from,
        "deviation": _number(data.get("deviation")),
        "observed_bearish_share": _number(observed.get("bearish_share")),
        "observed_mean_score": _number(observed.get("mean_score")),
        "observed_count": _number(observed.get("count")),
        "baseline_bearish_share": _number(baseline.get("bearish_share")),
        "baseline_bearish_share_std": _number(baseline.get("bearish_share_std")),
        "baseline_mean_score": _number(baseline.get("mean_score")),
        "baseline_mean_score_std": _number(baseline.get("mean_score_std")),
        "emitted_at": data.get("emitted_at") or data["window_end"],
        "summary": str(data.get("summary") or ""), "model_version": str(data.get("model_version") or ""),
        # What it is about: a topic alert's key, a ticker alert's dominant topic ("" for older ticker alerts).
        "topic": str(data.get("topic") or (data["key"] if data["key_type"] == "topic" else "")),
        "messages": tuple(m for m in (data.get("messages") or ()) if isinstance(m, dict)),
    })
    return row


def delivery_row(key: str, data: dict[str, Any]) -> dict[str, Any] | None:
    """The dispatcher's delivery state; every field is read defensively, falling back on the compacted key. None for
    a group notification (it lists its members, whose own records map to their episodes)."""
    if data.get("members"):
        return None
    event_from_key, _, endpoint_from_key = key.rpartition("|")
    event_id = str(data.get("event_id") or event_from_key or "")
    if not event_id:
        raise BadRecord("a delivery without an event id")
    attempts = _number(data.get("attempts"), 0)
    return {
        "delivery_key": key or f"{event_id}|{data.get('endpoint', '')}", "event_id": event_id,
        # The episode: event ids are <episode>:<status>[:<severity>], and no alert or run id holds a colon.
        "alert_id": str(data.get("alert_id") or event_id.partition(":")[0]),
        "endpoint": str(data.get("endpoint") or endpoint_from_key or "?"),
        # The dispatcher writes "state" (DeliveryState); "status" is read too, as older tools wrote it. An event an
        # inhibition rule muted is recorded silenced with silence "inhibited:<alert id>" (alerts.inhibition): shown
        # as such, since no silence a risk team set is behind it.
        "status": ("inhibited" if str(data.get("silence") or "").startswith("inhibited:") else
                   str(data.get("state") or data.get("status") or "unknown")), "attempts": int(attempts),
        "last_error": str(data.get("last_error") or ""), "group": str(data.get("group") or "").rpartition("|")[0],
        "updated_at": data.get("updated_at"),
    }


def silence_row(data: dict[str, Any]) -> dict[str, Any]:
    _need(data, "id", "matchers", "starts_at", "ends_at")
    matchers = data["matchers"] if isinstance(data["matchers"], list) else [data["matchers"]]
    return {"id": str(data["id"]), "matchers": ", ".join(str(m) for m in matchers),
            "starts_at": data["starts_at"], "ends_at": data["ends_at"],
            "created_by": str(data.get("created_by") or ""), "comment": str(data.get("comment") or ""),
            "updated_at": data.get("updated_at") or data["starts_at"]}


# ---------------------------------------------------------------- folding rows into bounded frames

def _frame(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> pd.DataFrame:
    frame = pd.DataFrame.from_records(rows, columns=list(columns))
    for name in columns:
        if name in _TIME_COLUMNS:
            frame[name] = pd.to_datetime(frame[name], utc=True, format="ISO8601", errors="coerce")
    return frame


def _latest_per(frame: pd.DataFrame, key: list[str], order: list[str]) -> pd.DataFrame:
    return frame.sort_values(order, kind="stable").drop_duplicates(key, keep="last")


def _merge(old: pd.DataFrame, new: pd.DataFrame, key: list[str], order: list[str]) -> pd.DataFrame:
    """Old rows plus new rows, one per key: only rows whose key occurs in ``new`` are re-sorted."""
    new = _latest_per(new, key, order)
    if old.empty:
        return new
    if len(key) == 1:
        overlap = old[key[0]].isin(new[key[0]])
    else:
        overlap = pd.MultiIndex.from_frame(old[key]).isin(pd.MultiIndex.from_frame(new[key]))
    if overlap.any():
        resolved = _latest_per(pd.concat([old[overlap], new], ignore_index=True), key, order)
        return pd.concat([old[~overlap], resolved], ignore_index=True)
    return pd.concat([old, new], ignore_index=True)


def _replace_messages(old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """A window's messages are those of its record the trends frame keeps (``_precedence``): new rows replace a
    window's old ones unless the old came from a record that takes precedence."""
    touched = old["window_id"].isin(new["window_id"]) if not old.empty else None
    both = pd.concat([old[touched], new], ignore_index=True) if touched is not None else new
    rank = both["final"].astype("int64") * 2**62 + both["emitted_at"].astype("int64").clip(lower=0)
    kept = both[rank == rank.groupby(both["window_id"]).transform("max")]
    return pd.concat([old[~touched], kept], ignore_index=True) if touched is not None else kept


def _bound(frame: pd.DataFrame, time_column: str, span: pd.Timedelta, max_rows: int) -> pd.DataFrame:
    if frame.empty:
        return frame
    newest = frame[time_column].max()
    if pd.notna(newest):
        frame = frame[frame[time_column] >= newest - span]
    if len(frame) > max_rows:
        frame = frame.nlargest(max_rows, time_column)
    return frame.reset_index(drop=True)


@dataclass
class _Kind:
    columns: tuple[str, ...]
    fold: Callable[[pd.DataFrame, pd.DataFrame], pd.DataFrame]
    frame: pd.DataFrame = field(init=False)
    pending: list = field(default_factory=list)

    def __post_init__(self):
        self.frame = empty_frame(self.columns)


class LiveStore:
    """Thread-safe: the consumer thread calls ``add``; any number of sessions call ``snapshot``."""

    def __init__(self, cfg: DashboardSettings):
        span = pd.Timedelta(hours=cfg.retention_hours)
        self._lock = threading.Lock()
        self._version = 0
        self._snapshot_version = -1
        self._snapshot: Snapshot | None = None
        self.bad_records = 0
        # Per window, the record its messages will come from: (precedence, trends row, its raw MessageRefs).
        self._pending_refs: dict[str, tuple[tuple[bool, datetime], dict[str, Any], Any]] = {}
        self._kinds = {
            "trends": _Kind(TREND_COLUMNS, lambda old, new: _bound(
                _merge(old, new, ["window_id"], ["final", "emitted_at"]), "window_end", span, cfg.max_trend_rows)),
            "window_messages": _Kind(MESSAGE_COLUMNS, lambda old, new: _bound(
                _replace_messages(old, new), "window_end", span, cfg.max_window_message_rows)),
            "scored": _Kind(SCORED_COLUMNS, lambda old, new: _bound(
                _merge(old, new, ["id"], ["scored_at"]), "event_time", span, cfg.max_scored_rows)),
            "alerts": _Kind(ALERT_COLUMNS, lambda old, new: _bound(
                _merge(old, new, ["event_id"], ["emitted_at"]), "emitted_at", span, cfg.max_alert_rows)),
            # Arrival order is the compacted topic's order within a key, so the last row per key wins.
            "deliveries": _Kind(DELIVERY_COLUMNS, lambda old, new: pd.concat([old, new], ignore_index=True)
                                .drop_duplicates("delivery_key", keep="last").tail(cfg.max_delivery_rows)
                                .reset_index(drop=True)),
            "silences": _Kind(SILENCE_COLUMNS, lambda old, new: _merge(old, new, ["id"], ["updated_at"])
                              .reset_index(drop=True)),
        }

    # -------------------------------------------------------- writing (consumer thread)

    def add(self, kind: str, value: bytes | str | dict | None, key: bytes | str | None = None) -> bool:
        """Queue one record of ``kind`` (trends, scored, alerts, deliveries, silences); False when it was malformed."""
        key_text = key.decode("utf-8", "replace") if isinstance(key, bytes) else (key or "")
        try:
            if kind == "deliveries" and value is None:
                self._delete_delivery(key_text)
                return True
            data = _decode(value)
            if kind == "trends":
                row = trend_row(data)
                rows = {"trends": [row]}
            elif kind == "scored":
                rows = {"scored": [scored_row(data)]}
            elif kind == "alerts":
                rows = {"alerts": [alert_row(data)]}
            elif kind == "deliveries":
                row = delivery_row(key_text, data)
                rows = {"deliveries": [row] if row is not None else []}
            elif kind == "silences":
                rows = {"silences": [silence_row(data)]}
            else:
                raise ValueError(f"unknown record kind {kind!r}")
        except BadRecord:
            with self._lock:
                self.bad_records += 1
            return False
        with self._lock:
            for name, new in rows.items():
                self._kinds[name].pending.extend(new)
            if kind == "trends":
                # A re-emitted window replaces its messages, so only the list that takes precedence waits here
                # (its rows are built when folded: most records of a busy window are superseded before then).
                precedence, held = _precedence(row), self._pending_refs.get(row["window_id"])
                if held is None or precedence >= held[0]:
                    self._pending_refs[row["window_id"]] = (precedence, row, data.get("most_negative"))
            self._version += 1
            if len(self._pending_refs) > _PENDING_LIMIT or any(len(k.pending) > _PENDING_LIMIT for k in self._kinds.values()):
                self._fold_pending_locked()
        return True

    def _delete_delivery(self, key: str) -> None:
        """A tombstone: rows queued before it are folded first, so a later state for the key is kept."""
        with self._lock:
            self._fold_pending_locked()
            kind = self._kinds["deliveries"]
            kind.frame = kind.frame[kind.frame["delivery_key"] != key].reset_index(drop=True)
            self._version += 1

    def _fold_pending_locked(self) -> None:
        if self._pending_refs:
            self._kinds["window_messages"].pending = [
                r for _, row, refs in self._pending_refs.values() for r in message_rows(row, refs)]
            self._pending_refs = {}
        for name, kind in self._kinds.items():
            if not kind.pending:
                continue
            new = _frame(kind.pending, kind.columns)
            kind.pending = []
            required = _REQUIRED_TIMES[name]
            if required:
                usable = new[list(required)].notna().all(axis=1)
                self.bad_records += int((~usable).sum())
                new = new[usable]
            kind.frame = kind.fold(kind.frame, new)

    # -------------------------------------------------------- reading (sessions)

    @property
    def version(self) -> int:
        return self._version

    def snapshot(self) -> Snapshot:
        with self._lock:
            if self._snapshot is None or self._snapshot_version != self._version:
                self._fold_pending_locked()
                k = self._kinds
                self._snapshot = Snapshot(trends=k["trends"].frame, window_messages=k["window_messages"].frame,
                                          scored=k["scored"].frame, alerts=k["alerts"].frame,
                                          deliveries=k["deliveries"].frame, silences=k["silences"].frame,
                                          version=self._version,
                                          bad_records=self.bad_records)
                self._snapshot_version = self._version
            return self._snapshot
