"""``finpulse export``: the input topics archived to Parquet, partitioned by event-time day, so a replay can reach
past Kafka's retention; and reading such an archive back as the same ordered selection a Kafka replay makes.

Layout (``DIR``)::

    finpulse-archive.json                      {"format": "finpulse-input-archive", "schema_version": 1, "exports": [...]}
    day=2026-11-22/part-<from>_<to>.parquet    one file per exported range and day, rows in replay order

Each row is one Kafka record exactly as consumed: ``kind`` (news | comment), ``topic``, ``partition``, ``offset``,
``event_time`` (the time it is selected by, see ``select.event_time_ms``), ``timestamp`` (the Kafka timestamp),
``key`` and ``value`` (the original bytes, so a replay parses them exactly as the worker did). A replay from an
archive yields the same messages in the same order as a replay from Kafka over the same range; messages exported
twice (overlapping exports) are read once. The archive's topic names do not matter: a message belongs to the
replay's news or comments topic by its ``kind``.

An archive whose marker file or file schemas are not this version's is refused (``ArchiveError``) before a replay
writes anything.
"""
from __future__ import annotations

import heapq
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from stream.records import epoch_ms, parse_time

from .parquet import StreamingFile, with_metadata
from .select import KafkaSelection, TimedMessage, format_ms

ARCHIVE_FORMAT = "finpulse-input-archive"
SCHEMA_VERSION = 1
MARKER = "finpulse-archive.json"
DAY_MS = 86_400_000
ROWS_PER_GROUP = 20_000

ARCHIVE_SCHEMA = with_metadata(pa.schema([
    pa.field("kind", pa.string(), nullable=False),
    pa.field("topic", pa.string(), nullable=False),
    pa.field("partition", pa.int32(), nullable=False),
    pa.field("offset", pa.int64(), nullable=False),
    pa.field("event_time", pa.timestamp("ms", tz="UTC"), nullable=False),
    pa.field("timestamp", pa.timestamp("ms", tz="UTC"), nullable=False),
    pa.field("key", pa.binary()),
    pa.field("value", pa.binary()),
]), {"finpulse.archive.format": ARCHIVE_FORMAT, "finpulse.archive.schema_version": str(SCHEMA_VERSION)})


class ArchiveError(ValueError):
    """An archive that cannot be read by this version of FinPulse; the message says why."""


def day_of(event_ms: int) -> str:
    return datetime.fromtimestamp(event_ms // DAY_MS * 86_400, tz=timezone.utc).strftime("%Y-%m-%d")


def range_tag(from_ms: int, to_ms: int) -> str:
    """``20261122T120000.000Z_20261123T000000.000Z``: names an export's files, so re-exporting a range replaces them."""
    def stamp(ms: int) -> str:
        return datetime.fromtimestamp(ms // 1000, tz=timezone.utc).strftime("%Y%m%dT%H%M%S") + f".{ms % 1000:03d}Z"
    return f"{stamp(from_ms)}_{stamp(to_ms)}"


# ---------------------------------------------------------------- writing

@dataclass
class ExportResult:
    rows: int = 0
    files: list[str] = field(default_factory=list)
    days: list[str] = field(default_factory=list)


class _DayWriter:
    """Rows of one day, written in row groups to that day's file for this export."""

    def __init__(self, root: Path, day: str, tag: str, sequence: int):
        suffix = f"-{sequence}" if sequence else ""
        path = root / f"day={day}" / f"part-{tag}{suffix}.parquet"
        self.replaces = path.exists()       # an earlier export of the same range: kept should this one fail
        self.file = StreamingFile(path, ARCHIVE_SCHEMA)
        self.rows: list[TimedMessage] = []

    def add(self, message: TimedMessage) -> None:
        self.rows.append(message)
        if len(self.rows) >= ROWS_PER_GROUP:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.file.write(_table(self.rows))
            self.rows = []

    def close(self) -> Path:
        self.flush()
        return self.file.close()


def _table(rows: list[TimedMessage]) -> pa.Table:
    return pa.Table.from_pydict({
        "kind": [m.kind for m in rows], "topic": [m.topic for m in rows],
        "partition": [m.partition for m in rows], "offset": [m.offset for m in rows],
        "event_time": [m.event_ms for m in rows], "timestamp": [m.timestamp_ms for m in rows],
        "key": [m.key for m in rows], "value": [m.value for m in rows],
    }, schema=ARCHIVE_SCHEMA)


def check_export_dir(root: Path) -> None:
    """An export may go to a new or empty directory, or add to an existing archive of this version."""
    if root.exists() and not root.is_dir():
        raise ArchiveError(f"{root} exists and is not a directory")
    if root.is_dir() and any(root.iterdir()):
        read_marker(root)


async def export_archive(selection: KafkaSelection, root: Path, from_ms: int, to_ms: int, topics: list[str],
                         progress=None, covered: tuple[int, int] | None = None) -> ExportResult:
    """Write every message of an entered ``selection`` (in its order) to ``root``, one file per day. ``covered``
    is the part of the range the selection could vouch for having whole (``select.complete_span``), when not all."""
    tag = range_tag(from_ms, to_ms)
    result = ExportResult()
    written_days: dict[str, int] = {}
    writer: _DayWriter | None = None
    writer_day = None
    new_files: list[Path] = []
    try:
        async for message in selection:
            day = day_of(message.event_ms)
            if day != writer_day:
                if writer is not None:
                    result.files.append(str(writer.close()))
                    new_files += [] if writer.replaces else [writer.file.path]
                sequence = written_days.get(day, 0)
                written_days[day] = sequence + 1    # a day seen again (disorder): its own file, never overwritten
                writer, writer_day = _DayWriter(root, day, tag, sequence), day
            writer.add(message)
            result.rows += 1
            if progress is not None:
                progress.update(1)
        if writer is not None:
            result.files.append(str(writer.close()))
    except BaseException:
        if writer is not None:
            writer.file.abort()
        _discard(root, new_files)
        raise
    result.days = sorted(written_days)
    export = {"from": format_ms(from_ms), "to": format_ms(to_ms), "topics": topics, "rows": result.rows,
              "days": result.days}
    # What a replay may take the archive to hold whole: not the part of the range the selection could not vouch for
    # (messages that may still be written, or that retention may have deleted).
    if covered is not None and covered != (from_ms, to_ms):
        export |= {"covered_from": format_ms(covered[0]), "covered_to": format_ms(covered[1])}
    _record_export(root, export)
    return result


def _discard(root: Path, files: list[Path]) -> None:
    """The files of an export that did not finish: the marker does not name it, so a reader would not know what
    they hold, and a directory of them without a marker is no archive (running the export again was refused)."""
    for path in files:
        path.unlink(missing_ok=True)
    for directory in [*root.glob("day=*"), root]:
        if directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()


def _record_export(root: Path, export: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)      # an export of no message wrote no day directory
    marker = root / MARKER
    data = read_marker(root) if marker.exists() else {"format": ARCHIVE_FORMAT, "schema_version": SCHEMA_VERSION,
                                                       "exports": []}
    data["exports"] = [e for e in data["exports"] if (e["from"], e["to"]) != (export["from"], export["to"])] + [export]
    tmp = marker.with_name(f".{MARKER}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, marker)


# ---------------------------------------------------------------- reading

def read_marker(root: Path) -> dict:
    marker = root / MARKER
    if not marker.is_file():
        raise ArchiveError(f"{root} is not a FinPulse archive: {MARKER} is missing (make one with `finpulse export`)")
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError) as exc:
        raise ArchiveError(f"{marker} is not readable JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != ARCHIVE_FORMAT:
        raise ArchiveError(f"{marker} does not describe a {ARCHIVE_FORMAT}")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ArchiveError(f"archive {root} has schema version {data.get('schema_version')!r}; this FinPulse reads "
                           f"version {SCHEMA_VERSION} (re-export it with this version)")
    return data


class ArchiveSelection:
    """The archived messages of ``kinds`` with event time in [from_ms, to_ms), in replay order, as
    ``(TimedMessage with topic = the current name for its kind)``. ``validate()`` checks every file it will read
    (called by the constructor, so a wrong schema fails before anything is written)."""

    def __init__(self, root: str | os.PathLike, topics: dict[str, str], from_ms: int, to_ms: int):
        self.root = Path(root)
        self.topic_of_kind = {kind: topic for topic, kind in topics.items()}
        self.from_ms, self.to_ms = from_ms, to_ms
        self.files_by_day = self._files()
        self.uncovered = uncovered(read_marker(self.root)["exports"], from_ms, to_ms)
        self.total = sum(self._rows_in_range(f) for files in self.files_by_day.values() for f in files)

    def _files(self) -> dict[str, list[Path]]:
        if not self.root.is_dir():
            raise ArchiveError(f"archive directory {self.root} does not exist")
        read_marker(self.root)
        wanted = {}
        day_ms = self.from_ms - self.from_ms % DAY_MS
        while day_ms < self.to_ms:
            day = day_of(day_ms)
            files = sorted((self.root / f"day={day}").glob("*.parquet"))
            if files:
                wanted[day] = files
            day_ms += DAY_MS
        for files in wanted.values():
            for path in files:
                _check_schema(path)
        return wanted

    def _rows_in_range(self, path: Path) -> int:
        """Rows of ``path`` this selection yields (rows exported twice count twice): the progress bar's total. Reads
        two columns only."""
        import pyarrow.compute as pc
        table = pq.read_table(path, columns=["kind", "event_time"])
        times = table.column("event_time").cast(pa.int64())
        wanted = pc.and_(pc.is_in(table.column("kind"), value_set=pa.array(sorted(self.topic_of_kind))),
                         pc.and_(pc.greater_equal(times, self.from_ms), pc.less(times, self.to_ms)))
        return pc.sum(pc.cast(wanted, pa.int64())).as_py() or 0

    def __iter__(self) -> Iterator[TimedMessage]:
        previous = None
        for day in sorted(self.files_by_day):
            for message in heapq.merge(*(self._read(path) for path in self.files_by_day[day])):
                identity = (message.event_ms, message.topic, message.partition, message.offset)
                if identity != previous:
                    previous = identity
                    yield message

    def _read(self, path: Path) -> Iterator[TimedMessage]:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=ROWS_PER_GROUP):
            # Only the columns read as Python objects: the time columns are read as int64 below.
            columns = {name: batch.column(name).to_pylist() for name in ("kind", "partition", "offset", "key", "value")}
            event_ms = batch.column("event_time").cast(pa.int64()).to_pylist()
            timestamps = batch.column("timestamp").cast(pa.int64()).to_pylist()
            for i, kind in enumerate(columns["kind"]):
                topic = self.topic_of_kind.get(kind)
                if topic is None or not self.from_ms <= event_ms[i] < self.to_ms:
                    continue
                yield TimedMessage(event_ms[i], topic, columns["partition"][i], columns["offset"][i], kind,
                                   columns["key"][i], columns["value"][i], timestamps[i])


def uncovered(exports: list[dict], from_ms: int, to_ms: int) -> list[tuple[int, int]]:
    """The parts of [from_ms, to_ms) that no export in ``exports`` (the marker's list) covered, in order. An export
    covered its range, or the part of it it could vouch for (``covered_from``/``covered_to``)."""
    gaps, start = [], from_ms
    spans = [(export.get("covered_from", export["from"]), export.get("covered_to", export["to"]))
             for export in exports]
    for span in sorted(spans):
        begin, end = (epoch_ms(parse_time(t)) for t in span)
        if begin >= end:
            continue        # an export that could vouch for none of its range
        if begin > start:
            gaps.append((start, min(begin, to_ms)))
        start = max(start, end)
        if start >= to_ms:
            break
    if start < to_ms:
        gaps.append((start, to_ms))
    return [(a, b) for a, b in gaps if a < b]


def _check_schema(path: Path) -> None:
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as exc:
        raise ArchiveError(f"{path} is not a readable Parquet file: {exc}") from None
    version = (schema.metadata or {}).get(b"finpulse.archive.schema_version", b"").decode()
    if version != str(SCHEMA_VERSION):
        raise ArchiveError(f"{path} has archive schema version {version or 'none'!r}; this FinPulse reads "
                           f"version {SCHEMA_VERSION}")
    if not schema.remove_metadata().equals(ARCHIVE_SCHEMA.remove_metadata()):
        raise ArchiveError(f"{path} does not have the archive schema: expected {ARCHIVE_SCHEMA.remove_metadata()}, "
                           f"found {schema.remove_metadata()}")


__all__ = ["ARCHIVE_SCHEMA", "ArchiveError", "ArchiveSelection", "ExportResult", "SCHEMA_VERSION", "check_export_dir",
           "export_archive", "read_marker"]
