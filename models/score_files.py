"""``finpulse score``: the classifier on texts outside the stream. An analyst types a headline to see what the model
makes of it; a data engineer scores a file (one text a line, CSV or JSONL with a text field) without Kafka.

A file is read and scored in chunks, so memory stays flat whatever its size, and each input row comes out as one
output row, in order: its own fields, then what the worker stamps on a scored record (``PREDICTION_FIELDS``).
A row that cannot be scored (empty, not a text, a JSONL line that is not JSON) gets ``error`` and the rest go on. An
input field named like a field scoring adds (a labeled file's ``topic``) is kept as ``input_<name>``. A CSV row with
more fields than its header (a comma in the text, unquoted) is not scored on its cut text: it gets ``error``, which
quotes the rest when the text is the last column; a row with too few fields to hold the text, likewise. CSV written
from JSONL ends with ``other_fields``: what a row has that the first row had not.
A text field that a CSV's header or a JSONL file's first object lacks is refused before anything is scored.
An output file is written whole or not at all: it appears under its name only once every row is in it; a ``.tsv``
one is CSV separated by tabs.
"""
from __future__ import annotations

import codecs
import contextlib
import csv
import io
import itertools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Sequence

from .data import SPREADSHEET_SUFFIXES, csv_separator, titled_column
from .explain import WordPush, push_pairs, read_texts, strongest
from .interface import Prediction

PREDICTED = ("topic", "topic_confidence", "sentiment", "sentiment_score")
PREDICTION_FIELDS = PREDICTED + ("model_version", "error")
OTHER_FIELDS = "other_fields"   # CSV from JSONL: the fields a row has that the first row did not, as a JSON object
OUTPUT_SUFFIXES = (".jsonl", ".ndjson", ".csv", ".tsv")   # .tsv: CSV separated by tabs
WORDS = "words"   # with --explain: [[word, push], ...] in JSONL; the strongest pushes as one text in CSV and tables
WORDS_NOTE = "words_note"   # with --explain, in JSONL: why a text's words were not weighed (in CSV: in words)
INPUT_FORMATS = ("lines", "csv", "jsonl")
OUTPUT_FORMATS = ("table", "jsonl", "csv")
CHUNK = 2048  # rows read and scored at a time: the scorer batches and pipelines inside each chunk


class ScoreInputError(ValueError):
    """Input that cannot be read at all (a missing file or text column), said plainly."""


@dataclass(slots=True)
class Row:
    """One input row: its fields as read, the text to score, and why it cannot be scored (if it cannot)."""
    fields: dict[str, Any]
    text: Any
    error: str | None = None


def format_of(path: str | None, given: str | None, choices: Sequence[str], default: str) -> str:
    """``given``, else the one ``path``'s suffix names (if it is one of ``choices``), else ``default``."""
    if given:
        return given
    suffix = Path(path).suffix.lower() if path and path != "-" else ""
    guessed = {".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".txt": "lines"}.get(suffix)
    return guessed if guessed in choices else default


def read_rows(handle: Iterable[str], input_format: str, text_field: str, name: str) -> Iterator[Row]:
    """Rows of an open text file, in order (``name`` says which file in errors)."""
    lines = iter(handle)
    first = next(lines, None)
    # A byte-order mark (Excel's "CSV UTF-8" starts with one) is not part of the first column's name or text.
    handle = itertools.chain([] if first is None else [first.removeprefix("\ufeff")], lines)
    if input_format == "lines":
        for line in handle:
            text = line.rstrip("\r\n")
            yield Row({"text": text}, text)
    elif input_format == "csv":
        header = next(handle, "")
        separator = csv_separator(header)
        reader = csv.DictReader(itertools.chain([header], handle), delimiter=separator,
                                restkey="extra_values")  # a row longer than the header
        if reader.fieldnames is None:
            return
        text_field = titled_column(reader.fieldnames, text_field) or text_field
        if text_field not in reader.fieldnames:
            raise ScoreInputError(f"{name} has no {text_field!r} column (its columns: {', '.join(reader.fieldnames)}):"
                                  f" name the one to score with --text-field")
        last = reader.fieldnames[-1] == text_field
        for fields in reader:
            extra = fields.pop("extra_values", None)
            number = reader.line_num
            if extra:
                # Scored, the cut text would say something else than the whole (a comma in a headline, unquoted).
                rest = separator.join(extra)
                lost = (f"its rest ({rest[:80]!r}) would be left out" if last else
                        "its fields no longer line up with the header's")
                yield Row(fields, None, f"line {number} has {len(extra)} field(s) more than the header: an unquoted "
                                        f"separator in a field? Scored, {lost}: quote the field")
                continue
            if fields[text_field] is None:
                yield Row({k: v for k, v in fields.items() if v is not None}, None,
                          f"line {number} has fewer fields than the header: none for {text_field!r}")
                continue
            yield Row(fields, fields[text_field])
    else:
        first_object = True
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                fields = json.loads(line)
            except json.JSONDecodeError as exc:
                yield Row({}, None, f"line {number}: not JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(fields, dict):
                yield Row({}, None, f"line {number}: not a JSON object")
                continue
            field_name = titled_column(list(fields), text_field)   # "Text", as a CSV's column would be found
            if field_name is None and first_object:
                # As a CSV without the column: a wrong --text-field, not a file of rows that cannot be scored.
                raise ScoreInputError(f"{name} has no {text_field!r} field in its first object, line {number} (its "
                                      f"fields: {', '.join(fields) or 'none'}): name the one to score with "
                                      f"--text-field")
            first_object = False
            if field_name is None:
                yield Row(fields, None, f"line {number}: no {text_field!r} field")
            else:
                yield Row(fields, fields[field_name])


def _decoded(rows: Iterator[Row], name: str, encoding: str) -> Iterator[Row]:
    """``rows``, with a file not in ``encoding`` said plainly (the decoder reads ahead: "near", not "at")."""
    read = 0
    try:
        for row in rows:
            read += 1
            yield row
    except UnicodeDecodeError as exc:
        raise ScoreInputError(f"{name} is not {encoding} text ({exc.reason}) near row {read + 1:,}: name its "
                              f"encoding with --encoding (cp1252 for a spreadsheet saved on Windows)") from None


def chunks(rows: Iterator[Row], size: int | None = None) -> Iterator[list[Row]]:
    size = size or CHUNK
    chunk: list[Row] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def output_fields(explain: bool) -> tuple[str, ...]:
    """The fields scoring adds to a row."""
    return PREDICTION_FIELDS + (WORDS,) * explain


def reserved_fields(explain: bool) -> tuple[str, ...]:
    """The names an input field cannot keep (it is kept as ``input_<name>``): those scoring adds, in any format."""
    return output_fields(explain) + (WORDS_NOTE,) * explain + (OTHER_FIELDS,)


def score_rows(scorer, rows: list[Row], explain: bool = False) -> list[dict[str, Any]]:
    """Each row's own fields (a clashing name as ``input_<name>``), then its prediction's; with ``explain``, also
    ``words``: each word of the text and its push on the sentiment score (``models.explain``)."""
    readable = [i for i, row in enumerate(rows) if row.error is None]
    texts = [rows[i].text for i in readable]
    reserved = reserved_fields(explain)
    predictions: list[Prediction | None] = [None] * len(rows)  # None: the row could not even be read
    pushes: list[list[WordPush]] = [[] for _ in rows]
    notes = [""] * len(rows)     # why a scored text's words were not weighed (too long, one word)
    if explain:
        for i, reading in zip(readable, read_texts(scorer, texts)):
            predictions[i], pushes[i], notes[i] = reading.prediction, reading.words, reading.note
    else:
        for i, prediction in zip(readable, scorer.score(texts)):
            predictions[i] = prediction
    out = []
    for row, prediction, words, note in zip(rows, predictions, pushes, notes):
        own = {(f"input_{k}" if k in reserved else k): v for k, v in row.fields.items()}
        error = row.error or prediction.error
        predicted = dict.fromkeys(PREDICTED) if error else {
            "topic": prediction.topic, "topic_confidence": round(prediction.topic_confidence, 4),
            "sentiment": prediction.sentiment, "sentiment_score": round(prediction.sentiment_score, 4)}
        record = {**own, **predicted, "model_version": scorer.model_version, "error": error}
        if explain:
            record[WORDS] = push_pairs(words)
            if note:
                record[WORDS_NOTE] = note
        out.append(record)
    return out


class Writer:
    """Writes scored rows as JSONL, CSV (the input's columns: a CSV's header, the fields of a JSONL's first row,
    then with ``other_fields`` a column for the fields a later row adds, as a JSON object) or a table for a
    terminal."""

    def __init__(self, handle: IO[str], output_format: str, input_columns: list[str] | None, text_field: str,
                 explain: bool = False, other_fields: bool = False, delimiter: str = ","):
        self.handle, self.format, self.text_field, self.delimiter = handle, output_format, text_field, delimiter
        self.input_columns, self.explain, self.other_fields = input_columns, explain, other_fields
        self._csv: csv.DictWriter | None = None
        if output_format == "table":
            self.width = max(40, min(200, _terminal_columns()) - 40)
            handle.write(f"{'score':>6}  {'sentiment':<9}  {'topic (confidence)':<34}  text\n")

    def write(self, records: list[dict[str, Any]]) -> None:
        if self.format == "jsonl":
            self.handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        elif self.format == "csv":
            if self._csv is None:
                columns = self.input_columns or [self.text_field]
                added, reserved = output_fields(self.explain), reserved_fields(self.explain)
                renamed = [f"input_{c}" if c in reserved else c for c in columns]
                self._csv = csv.DictWriter(self.handle, renamed + list(added) + [OTHER_FIELDS] * self.other_fields,
                                           extrasaction="ignore", delimiter=self.delimiter)
                self._csv.writeheader()
            self._csv.writerows(self._csv_row(r) for r in records)
        else:
            for r in records:
                text = " ".join(str(r.get(self.text_field, "")).split())
                text = text if len(text) <= self.width else text[:self.width - 1] + "…"
                if r["error"]:
                    self.handle.write(f"{'-':>6}  {'-':<9}  {'cannot score: ' + r['error']:<34}  {text}\n")
                else:
                    topic = f"{r['topic']} ({r['topic_confidence']:.2f})"
                    self.handle.write(f"{r['sentiment_score']:>+6.2f}  {r['sentiment']:<9}  {topic:<34}  {text}\n")
                    if self.explain and r[WORDS]:
                        self.handle.write(f"{'':>6}  {'':<9}  {'':<34}  pushed by: {strongest(r[WORDS])}\n")
                    elif self.explain and r.get(WORDS_NOTE):
                        self.handle.write(f"{'':>6}  {'':<9}  {'':<34}  not weighed: {r[WORDS_NOTE]}\n")


    def _csv_row(self, record: dict[str, Any]) -> dict[str, Any]:
        row = record
        if self.explain:
            note = record.get(WORDS_NOTE)
            row = {**record, WORDS: strongest(record[WORDS], 5) or (f"(not weighed: {note})" if note else "")}
        if self.other_fields:
            columns = self._csv.fieldnames
            other = {k: v for k, v in record.items() if k not in columns and k != WORDS_NOTE}
            row = {**row, OTHER_FIELDS: json.dumps(other, ensure_ascii=False) if other else ""}
        return row


def check_output_path(out_path: str, input_path: str | None, format_given: bool = False) -> None:
    """Before anything is scored: the output is a file that can be written, and not the input; its suffix says
    its format unless ``--format`` did."""
    out = Path(out_path)
    if out.is_dir() or out_path.endswith(os.sep):
        raise ScoreInputError(f"--out {out_path} is a directory: name the file to write (e.g. {out / 'scored.jsonl'})")
    suffix = out.suffix.lower()
    if suffix and suffix not in OUTPUT_SUFFIXES and not format_given:
        raise ScoreInputError(f"--out {out_path}: FinPulse writes JSONL or CSV, and {suffix} is neither: name the file "
                              f".jsonl, .csv or .tsv (or give --format)")
    if input_path not in (None, "-") and out.exists() and out.resolve() == Path(input_path).resolve():
        raise ScoreInputError(f"--out {out_path} is the input file: scoring it would replace it; write elsewhere")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ScoreInputError(f"--out {out_path}: cannot make its directory {out.parent} ({exc.strerror})") from None
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise ScoreInputError(f"--out {out_path}: cannot write in {out.parent}")


def _terminal_columns() -> int:
    try:
        return os.get_terminal_size(sys.stdout.fileno()).columns
    except (OSError, ValueError, io.UnsupportedOperation):
        return 120


def score_into(scorer, texts: Sequence[str], input_path: str | None, input_format: str, text_field: str,
               out_path: str | None, output_format: str, encoding: str = "utf-8",
               explain: bool = False, format_given: bool = False) -> tuple[int, int]:
    """Score ``texts``, or the rows of ``input_path`` ("-": standard input) in ``encoding``, into ``out_path`` (None:
    standard output, else a UTF-8 file); returns (rows written, rows that could not be scored). ``explain`` adds
    each row's word pushes (one more sequence scored per word). Progress goes to standard error."""
    from tqdm import tqdm
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ScoreInputError(f"unknown encoding {encoding!r} (utf-8, cp1252, latin-1, ...)") from None
    if texts:  # one a line, as a file of lines would give them
        input_path, input_format = None, "lines"
    if input_format == "lines":
        text_field = "text"
    if out_path:
        check_output_path(out_path, input_path, format_given)
    partial = Path(f"{out_path}.partial") if out_path else None
    # A file of lines ends its lines at \n alone, as `wc -l` counts them: a stray \r (a CRLF file edited on Unix)
    # made a row of its own. CSV and JSONL are read as the csv module asks, \r\n inside a quoted field kept.
    newline = "\n" if input_format == "lines" else ""
    written = failed = 0
    with contextlib.ExitStack() as stack:
        if texts:
            source, name = io.StringIO("".join(" ".join(t.splitlines()) + "\n" for t in texts)), "the command line"
        elif input_path in (None, "-"):
            source, name = sys.stdin, "standard input"
            if hasattr(sys.stdin, "buffer"):  # in ``encoding``, not the locale's
                source = io.TextIOWrapper(sys.stdin.buffer, encoding=encoding, newline=newline)
                stack.callback(source.detach)  # leaves standard input itself open
        elif Path(input_path).suffix.lower() in SPREADSHEET_SUFFIXES:
            raise ScoreInputError(f"{input_path} is a spreadsheet: save it as CSV and score that")
        else:
            try:
                source = stack.enter_context(open(input_path, newline=newline, encoding=encoding))
            except OSError as exc:
                raise ScoreInputError(f"cannot read {input_path}: {exc.strerror}") from None
            name = input_path
        if partial:   # its directory was made by check_output_path
            try:
                sink = stack.enter_context(partial.open("w", newline="", encoding="utf-8"))
            except OSError as exc:   # a name too long, a directory that takes no files (/proc), a full disk
                raise ScoreInputError(f"--out {out_path}: cannot write {partial.name} there ({exc.strerror})") \
                    from None
            stack.callback(lambda: partial.unlink(missing_ok=True))  # left only by a failure: done, it is renamed
        else:
            sink = sys.stdout
        rows = chunks(_decoded(read_rows(source, input_format, text_field, name), name, encoding))
        first_chunk = next(rows, [])
        # The columns: a CSV's header, a JSONL file's first object that could be read (a bad first line had every
        # column of CSV output go to other_fields).
        first = next((row for row in first_chunk if row.error is None and row.fields),
                     next((row for row in first_chunk if row.fields), None))
        columns = list(first.fields) if first is not None else None
        if input_format == "csv":
            text_field = titled_column(columns or [], text_field) or text_field
        tabs = bool(out_path) and Path(out_path).suffix.lower() == ".tsv"
        writer = Writer(sink, output_format, columns, text_field, explain, other_fields=input_format == "jsonl",
                        delimiter="\t" if tabs else ",")
        interactive = sys.stderr.isatty()
        # Shown once scoring takes a while: a short file left a "scoring: 0 texts" line in a log.
        bar = stack.enter_context(tqdm(desc="scoring", unit=" texts", file=sys.stderr, disable=bool(texts),
                                       dynamic_ncols=True, leave=False, delay=2.0,
                                       mininterval=0.5 if interactive else 15.0))
        for chunk in itertools.chain([first_chunk] if first_chunk else [], rows):
            records = score_rows(scorer, chunk, explain)
            writer.write(records)
            written += len(records)
            failed += sum(r["error"] is not None for r in records)
            bar.update(len(records))
        sink.flush()
        if partial:
            partial.replace(out_path)
    return written, failed
