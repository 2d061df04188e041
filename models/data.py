"""Labeled data for the two heads: loaders, validation and the held-out splits.

A ``LabeledSet`` is texts with an optional topic and an optional sentiment per row (``-1`` = no label), so the
shared sets (topic rows and sentiment rows come from different public data sets) and a user's own files with one
or both columns look the same to training; each head learns only from the rows that carry its label.

Sources (``--data``): ``shared`` (the two CSVs in the shared data directory), a directory with that layout, a
user CSV/JSONL file (``text`` plus ``topic`` and/or ``sentiment``: names or integer ids; or a public set's file as
published, ``text,label``, named like it: ``sent_valid.csv``, ``topic_valid.csv``), ``hub:NAME[:SPLIT]``
for the public sets by name when the machine is online, ``news-train``: 788 newswire sentences written for FinPulse
(``datasets/``) that every recipe trains on by default, or ``news-probe``: 400 more (``probes/``), an out-of-domain
check that no recipe trains on.

A source can be weighted (``--weight SOURCE=W``): each of its rows counts W times in the training loss. A few
hundred labeled sentences of the text a deployment reads would otherwise be lost among 21,000 tweets.

``split`` cuts a set into train/validation/test slices, stratified by head and label and deterministic in the
seed: validation drives model selection and early stopping, test is only ever reported. Each source is split on
its own, so adding a file of yours leaves the shared sets' slices (and the figures measured on them) as they were,
unless it repeats their texts: twins (the same post but for links, case, punctuation or a prefix) share one slice.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .labels import SENTIMENT_SYNONYMS, SENTIMENTS, SENTIMENTS_BY_DATASET_ID, TOPICS
from .textprep import twin_key

SENTIMENT_FILE = "sentiment_train.csv"
TOPIC_FILE = "topic_train.csv"
DATA_DIR_ENV = "FINPULSE_DATA_DIR"
# The public data sets (MIT licence) the shared files come from, and their files on the Hugging Face hub.
HUB_SETS = {
    "twitter-financial-news-sentiment": ("zeroshot/twitter-financial-news-sentiment", "sentiment",
                                         {"train": "sent_train.csv", "validation": "sent_valid.csv"}),
    "twitter-financial-news-topic": ("zeroshot/twitter-financial-news-topic", "topic",
                                     {"train": "topic_train.csv", "validation": "topic_valid.csv"}),
}
MISSING = -1
NEWS_PROBE = "news-probe"
NEWS_PROBE_FILE = Path(__file__).parent / "probes" / "news_sentences.csv"
NEWS_TRAIN = "news-train"
NEWS_TRAIN_FILE = Path(__file__).parent / "datasets" / "news_train.csv"
# What `finpulse train` learns from without --data: the tweets, and newswire sentences so it reads news too.
DEFAULT_TRAINING_SOURCES = ("shared", NEWS_TRAIN)


class DataError(ValueError):
    """Data that cannot be used for training or evaluation; the message says which file/row and why."""


@dataclass
class LabeledSet:
    texts: list[str]
    topic: np.ndarray       # int64 index into TOPICS, MISSING where the row has no topic label
    sentiment: np.ndarray   # int64 index into SENTIMENTS, MISSING where the row has no sentiment label
    sources: list[str] = field(default_factory=list)
    weight: np.ndarray | None = None  # float32 per row: how many times it counts in training (default 1)
    origin: np.ndarray | None = None  # int64 per row: the position of its --data source (0 for a single source)
    file: list[str] | None = None     # per row: the file it was read from ("" where none), to find it by ``line``
    line: np.ndarray | None = None    # int64 per row: its line in that file (0 where unknown)

    def __post_init__(self):
        self.topic = np.asarray(self.topic, dtype=np.int64)
        self.sentiment = np.asarray(self.sentiment, dtype=np.int64)
        self.weight = np.asarray(np.ones(len(self.texts)) if self.weight is None else self.weight, np.float32)
        self.origin = np.asarray(np.zeros(len(self.texts)) if self.origin is None else self.origin, np.int64)
        self.file = [""] * len(self.texts) if self.file is None else list(self.file)
        self.line = np.asarray(np.zeros(len(self.texts)) if self.line is None else self.line, np.int64)
        if not (len(self.texts) == len(self.topic) == len(self.sentiment) == len(self.weight) == len(self.origin)
                == len(self.file) == len(self.line)):
            raise ValueError("texts, label, weight, origin, file and line arrays differ in length")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: Sequence[int] | np.ndarray) -> "LabeledSet":
        index = np.asarray(index, dtype=np.int64)
        return LabeledSet([self.texts[i] for i in index], self.topic[index], self.sentiment[index], list(self.sources),
                          self.weight[index], self.origin[index], [self.file[i] for i in index], self.line[index])

    @staticmethod
    def concat(sets: Sequence["LabeledSet"]) -> "LabeledSet":
        return LabeledSet([t for s in sets for t in s.texts], np.concatenate([s.topic for s in sets]),
                          np.concatenate([s.sentiment for s in sets]), [src for s in sets for src in s.sources],
                          np.concatenate([s.weight for s in sets]), np.concatenate([s.origin for s in sets]),
                          [f for s in sets for f in s.file], np.concatenate([s.line for s in sets]))

    def weighed(self, origins: Sequence[int] | np.ndarray, factor: float) -> "LabeledSet":
        """A copy in which the rows of these sources (``origin``) count ``factor`` times as much in training."""
        weight = np.where(np.isin(self.origin, origins), self.weight * factor, self.weight)
        return LabeledSet(self.texts, self.topic, self.sentiment, list(self.sources), weight, self.origin, self.file,
                          self.line)

    def summary(self) -> dict[str, int]:
        return {"rows": len(self), "topic_rows": int((self.topic >= 0).sum()),
                "sentiment_rows": int((self.sentiment >= 0).sum())}


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def default_data_dir(configured: str | None = None) -> Path:
    """``configured`` (flag or setting), else $FINPULSE_DATA_DIR, else ../shared/data/finance beside the repo."""
    chosen = configured or os.environ.get(DATA_DIR_ENV)
    return Path(chosen).expanduser() if chosen else repo_root().parent / "shared" / "data" / "finance"


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_shared(data_dir: Path) -> LabeledSet:
    """The two shared CSVs (``text,label``): sentiment ids 0 bearish / 1 bullish / 2 neutral, topic ids 0-19."""
    sentiment_csv, topic_csv = data_dir / SENTIMENT_FILE, data_dir / TOPIC_FILE
    missing = [p.name for p in (sentiment_csv, topic_csv) if not p.is_file()]
    if missing:
        others = sorted(p.name for p in data_dir.glob("*.csv") if p.name not in (SENTIMENT_FILE, TOPIC_FILE))
        hint = (f"it holds {', '.join(others[:6])}: pass each file on its own (--data {data_dir / others[0]})"
                if others else f"point --data-dir or ${DATA_DIR_ENV} at the shared finance data, pass your own "
                "file with --data FILE, or (online) --data hub:twitter-financial-news-sentiment "
                "--data hub:twitter-financial-news-topic")
        raise DataError(f"no {' or '.join(missing)} in {data_dir}: {hint}")
    _check_topic_names(data_dir / "labels.json")
    sentiment = _read_id_csv(sentiment_csv, "sentiment")
    topic = _read_id_csv(topic_csv, "topic")
    return LabeledSet.concat([sentiment, topic])


def _check_topic_names(labels_json: Path) -> None:
    if not labels_json.is_file():
        return
    names = json.loads(labels_json.read_text()).get("topic", {})
    if names and [names[str(i)] for i in range(len(names))] != list(TOPICS):
        raise DataError(f"{labels_json} names other topics than this FinPulse build (models/labels.py)")


def _read_id_csv(path: Path, head: str) -> LabeledSet:
    import pandas as pd
    frame = pd.read_csv(path, dtype={"text": str}, keep_default_na=False)
    if list(frame.columns[:2]) != ["text", "label"]:
        raise DataError(f"{path}: expected columns text,label, found {', '.join(map(str, frame.columns))}")
    frame = frame.rename(columns={"label": head})
    return _from_frame(frame, str(path), csv_line_numbers(path, ",", len(frame)))


def load_file(path: Path) -> LabeledSet:
    """A user's CSV (any usual separator), TSV or JSONL: ``text`` plus ``topic`` and/or ``sentiment`` (label
    names or public-set ids)."""
    import pandas as pd
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    line_numbers = None
    try:
        if suffix in (".csv", ".tsv"):
            with open(path, encoding="utf-8-sig", errors="replace") as handle:
                separator = csv_separator(handle.readline())
            frame = pd.read_csv(path, sep=separator, dtype=str, keep_default_na=False)
            line_numbers = csv_line_numbers(path, separator, len(frame))
        elif suffix == ".json":
            frame = pd.read_json(path, dtype=False)
            line_numbers = range(1, len(frame) + 1)     # a JSON array's rows, by their place in it
        elif suffix in (".jsonl", ".ndjson"):
            frame, line_numbers = _read_json_lines(path)
        else:
            sheet = " (from a spreadsheet: save it as CSV)" if suffix in SPREADSHEET_SUFFIXES else ""
            raise DataError(f"{path}: use a .csv, .tsv, .json or .jsonl file{sheet}")
    except ValueError as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path} cannot be parsed: {exc}") from None
    given = list(frame.columns)
    frame = frame.rename(columns=_known_columns(frame.columns))
    if "label" in frame.columns and not {"topic", "sentiment"} & set(frame.columns):
        frame = frame.rename(columns={"label": _label_column_head(path)})
    loaded = _from_frame(frame, str(path), line_numbers, given)
    if suffix == ".json":
        loaded.line[:] = 0    # a JSON array's rows are numbered by their place in it, not by a line to go to
    return loaded


KNOWN_COLUMNS = ("text", "topic", "sentiment", "label")
SPREADSHEET_SUFFIXES = (".xlsx", ".xls", ".ods")  # read by saving them as CSV: no spreadsheet reader is a dependency


def _known_columns(columns) -> dict[str, str]:
    """The known columns a spreadsheet titled ("Text", "Sentiment "), to rename to the names they stand for."""
    found = {name: titled_column(list(columns), name) for name in KNOWN_COLUMNS}
    return {column: name for name, column in found.items() if column not in (None, name)}


def titled_column(columns: Sequence[str], name: str) -> str | None:
    """The column called ``name``, else the one column a spreadsheet titled so (any case, spaces around); None if
    there is neither, or several titled so."""
    if name in columns:
        return name
    titled = [c for c in columns if str(c).strip().lower() == name.lower()]
    return titled[0] if len(titled) == 1 else None


def csv_separator(header: str) -> str:
    """The separator a CSV's header line uses: spreadsheets write the locale's list separator (a semicolon across
    much of Europe), so the most frequent of comma, semicolon, tab and bar; a comma where none is there."""
    return max((",", ";", "\t", "|"), key=header.count)


def csv_line_numbers(path: Path, separator: str, rows: int) -> list[int] | None:
    """The line each data row of a CSV starts on, as pandas read it (blank lines skipped, a quoted text may span
    lines), so that an error or a mistake names the line to mend; None (numbered as if one line a row, after the
    header) where the two readers do not count the same rows."""
    import csv
    starts, previous = [], 0
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as handle:
        reader = csv.reader(handle, delimiter=separator)
        try:
            for record in reader:
                start, previous = previous + 1, reader.line_num
                if record:
                    starts.append(start)
        except csv.Error:
            return None
    return starts[1:] if len(starts) == rows + 1 else None


def _read_json_lines(path: Path):
    """A JSONL file as a frame and each row's line number, blank lines skipped. A line that is not a JSON object
    is named by its number (pandas' own reader says only where in the file its parser stopped)."""
    import pandas as pd
    records, line_numbers, problems = [], [], []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                problems.append(f"line {number}: not JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(record, dict):
                problems.append(f"line {number}: a JSON {type(record).__name__}, not an object with a 'text' field")
                continue
            records.append(record)
            line_numbers.append(number)
    if problems:
        raise _bad_rows(str(path), problems)
    return pd.DataFrame.from_records(records), line_numbers


def _bad_rows(source: str, problems: list[str], hint: str = "") -> DataError:
    shown = "; ".join(problems[:5]) + (f"; ... {len(problems) - 5} more" if len(problems) > 5 else "")
    return DataError(f"{source}: {len(problems)} bad row(s), nothing loaded: {shown}{hint}")


class LabelIdOutOfRange(ValueError):
    """A label given as a number that is not one of the public sets' ids."""


class UnknownLabel(ValueError):
    """A label name that is none of the head's (a typo, another taxonomy)."""

    def __init__(self, head: str, message: str):
        super().__init__(message)
        self.head = head


# Said once per file: a -1/0/1 sentiment scale fails on -1 but would read 0 as bearish, so the names are the way.
LABEL_ID_HINT = (". Label ids are the public sets' (sentiment 0 bearish, 1 bullish, 2 neutral; topic 0-19): for "
                 "another scale, such as -1/0/1, write the names (bearish, neutral, bullish)")


# A public set's files as published (text,label; sent_train.csv, sent_valid.csv, topic_valid.csv, ...) say which
# head their label column is for by their name only.
PUBLISHED_NAME_HEADS = (("sent", "sentiment"), ("topic", "topic"))


def _label_column_head(path: Path) -> str:
    for prefix, head in PUBLISHED_NAME_HEADS:
        if path.name.lower().startswith(prefix):
            return head
    raise DataError(f"{path}: a 'label' column, but for which head? Rename it to 'sentiment' or 'topic' (names, or "
                    "the public sets' ids: sentiment 0 bearish / 1 bullish / 2 neutral, topic 0-19)")


def _from_frame(frame, source: str, line_numbers: Sequence[int] | None = None,
                given_columns: Sequence[str] | None = None) -> LabeledSet:
    """``line_numbers``: each row's line in its file, for the errors (default: one line a row, after a header);
    ``given_columns``: the file's own column names, where the frame's were renamed."""
    if "text" not in frame.columns:
        given = ", ".join(map(str, frame.columns if given_columns is None else given_columns))
        raise DataError(f"{source}: no 'text' column (columns: {given}): name the column that holds the texts 'text'")
    heads = [h for h in ("topic", "sentiment") if h in frame.columns]
    if not heads:
        raise DataError(f"{source}: needs a 'topic' and/or a 'sentiment' column")
    labels = {h: np.full(len(frame), MISSING, dtype=np.int64) for h in ("topic", "sentiment")}
    problems: list[str] = []
    hint = ""
    texts, lines = [], []
    for row, record in enumerate(frame.to_dict("records")):
        line = line_numbers[row] if line_numbers is not None else row + 2
        lines.append(line)
        text = record["text"]
        text_problem = _text_problem(text)
        row_problems = [text_problem] if text_problem else []
        texts.append(text if isinstance(text, str) else "")
        for head in heads:
            try:
                labels[head][row] = parse_label(head, record[head])
            except ValueError as exc:
                row_problems.append(str(exc))
                if isinstance(exc, LabelIdOutOfRange):
                    hint = LABEL_ID_HINT
                elif isinstance(exc, UnknownLabel) and f"The {exc.head}s:" not in hint and hint != LABEL_ID_HINT:
                    hint += f". The {exc.head}s: {', '.join(TOPICS if exc.head == 'topic' else SENTIMENTS)}"
        if not row_problems and all(labels[h][row] == MISSING for h in heads):
            row_problems.append(f"no {' or '.join(heads)} label")
        problems += [f"row {line}: {p}" for p in row_problems]
    if problems:
        raise _bad_rows(source, problems, hint)
    return LabeledSet(texts, labels["topic"], labels["sentiment"], [source], file=[source] * len(texts), line=lines)


def _text_problem(text) -> str | None:
    if isinstance(text, str):
        return None if text.strip() else "empty text"
    if text is None or isinstance(text, float) and np.isnan(text):   # JSON null, or a record without the field
        return "empty text"
    return f"text is not a string: {str(text)[:40]!r} ({type(text).__name__})"


# Label name (any case) -> index, per head: built once, not per row loaded.
LABEL_INDEX: dict[str, dict[str, int]] = {
    "topic": {name.lower(): i for i, name in enumerate(TOPICS)},
    "sentiment": {**{name: SENTIMENTS.index(meant) for name, meant in SENTIMENT_SYNONYMS.items()},
                  **{name.lower(): i for i, name in enumerate(SENTIMENTS)}},
}


def parse_label(head: str, value) -> int:
    """A label cell -> index into TOPICS/SENTIMENTS; empty -> MISSING. Integer sentiment ids follow the public set
    (0 bearish, 1 bullish, 2 neutral); topic ids are the public set's 0-19."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == "":
        return MISSING
    text = str(value).strip()
    number = _as_integer(text)
    if number is not None:
        if head == "topic" and 0 <= number < len(TOPICS):
            return number
        if head == "sentiment" and 0 <= number < len(SENTIMENTS_BY_DATASET_ID):
            return SENTIMENTS.index(SENTIMENTS_BY_DATASET_ID[number])
        raise LabelIdOutOfRange(f"{head} id {number} out of range")
    index = LABEL_INDEX[head].get(text.lower())
    if index is None:
        names = TOPICS if head == "topic" else SENTIMENTS
        close = difflib.get_close_matches(text.lower(), [n.lower() for n in names], n=1, cutoff=0.75)
        meant = next((n for n in names if close and n.lower() == close[0]), None)
        raise UnknownLabel(head, f"unknown {head} {text!r}" + (f" (did you mean {meant!r}?)" if meant else ""))
    return index


def _as_integer(text: str) -> int | None:
    """"3" and "3.0" (what spreadsheets and pandas write for ids) are 3; anything else is not an id."""
    try:
        number = float(text)
    except ValueError:
        return None
    return int(number) if number.is_integer() else None


def load_hub(spec: str) -> LabeledSet:
    """``NAME[:SPLIT]`` for one of HUB_SETS (split: train or validation), downloaded from the Hugging Face hub."""
    name, _, split = spec.partition(":")
    split = split or "train"
    key = name.split("/")[-1]
    if key not in HUB_SETS or split not in HUB_SETS[key][2]:
        raise DataError(f"unknown public set {spec!r}: use one of "
                        + ", ".join(f"hub:{k}:{s}" for k, v in HUB_SETS.items() for s in v[2]))
    repo_id, head, files = HUB_SETS[key]
    try:
        from huggingface_hub import hf_hub_download
        local = hf_hub_download(repo_id, files[split], repo_type="dataset")
    except Exception as exc:  # offline, hub down, package missing: all mean "cannot fetch", said plainly
        raise DataError(f"cannot fetch {repo_id} ({files[split]}) from the Hugging Face hub: {exc.__class__.__name__}: "
                        f"{str(exc)[:200]}. Offline? Use the shared data directory (--data-dir) or your own file.") from None
    loaded = _read_id_csv(Path(local), head)
    loaded.sources = [f"hub:{repo_id}:{split}"]
    return loaded


def load_data(specs: Iterable[str], data_dir: Path, weights: dict[str, float] | None = None) -> LabeledSet:
    """Load and concatenate every ``--data`` source (see the module docstring); ``weights``: source -> the weight of
    each of its rows (sources not named weigh 1)."""
    specs, weights = list(specs), weights or {}
    unknown = sorted(set(weights) - set(specs))
    if unknown:
        raise DataError(f"--weight names {', '.join(unknown)}, which is not a --data source ({', '.join(specs)})")
    sets = []
    for spec in specs:
        if spec == "shared":
            loaded = load_shared(data_dir)
        elif spec.startswith("hub:"):
            loaded = load_hub(spec[4:])
        elif Path(spec).expanduser().is_dir():
            loaded = load_shared(Path(spec).expanduser())
        else:
            loaded = load_file(_local_file(spec))
        loaded.weight[:] = weights.get(spec, 1.0)
        loaded.origin[:] = len(sets)
        sets.append(loaded)
    if not sets:
        raise DataError("no data sources given")
    return LabeledSet.concat(sets)


MAX_WEIGHT = 1000.0


def parse_weights(items: Iterable[str]) -> dict[str, float]:
    """``--weight SOURCE=W`` flags -> {source: W}, W in (0, MAX_WEIGHT]."""
    weights = {}
    for item in items:
        spec, sep, value = item.rpartition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = float("nan")
        if not sep or not spec or not 0 < weight <= MAX_WEIGHT:
            raise DataError(f"--weight {item!r}: use SOURCE=W, a --data source and a weight above 0 and at most "
                            f"{MAX_WEIGHT:g} (e.g. --weight my_news.csv=10)")
        weights[spec] = weight
    return weights


def fingerprint(specs: Iterable[str], data_dir: Path) -> dict[str, str]:
    """sha256 of every local file behind ``specs``: recorded with a model, checked when its test slice is rebuilt."""
    out = {}
    for spec in specs:
        if spec == "shared" or Path(spec).expanduser().is_dir():
            folder = data_dir if spec == "shared" else Path(spec).expanduser()
            for name in (SENTIMENT_FILE, TOPIC_FILE):
                out[name] = file_sha256(folder / name)
        elif not spec.startswith("hub:"):
            path = _local_file(spec)
            out[path.name] = file_sha256(path)
    return out


def _local_file(spec: str) -> Path:
    """The file behind a file source: the packaged news sets by name, else the path given."""
    return {NEWS_PROBE: NEWS_PROBE_FILE, NEWS_TRAIN: NEWS_TRAIN_FILE}.get(spec) or Path(spec).expanduser()


def stratum_keys(data: LabeledSet) -> np.ndarray:
    """One key per row: its topic (0-19) when it has one, else 100 + its sentiment; plus 1000 per --data source
    before it, so each source is split on its own: adding a source leaves the others' slices as they were."""
    return 1000 * data.origin + np.where(data.topic >= 0, data.topic, 100 + data.sentiment)


# Recorded with a model, so its slices can be rebuilt. "per-source": each source split on its own, twins left where
# they fell (under it, 383 of the tweets' 1,779 topic test rows had a twin in training or validation). Models
# trained on several sources before "per-source" have none: their slices cannot be rebuilt by this code.
SPLIT_SCHEME = "per-source-twins-together"
SPLIT_SCHEME_BEFORE_TWINS = "per-source"
PARTS = ("train", "val", "test")


def split(data: LabeledSet, test_fraction: float, val_fraction: float, seed: int,
          twins_together: bool = True) -> dict[str, np.ndarray]:
    """Disjoint train/val/test row indices, stratified by head and label, deterministic in ``seed``.

    ``twins_together``: twins (``twin_groups``: the same headline posted again with another link, or behind a
    cashtag prefix) all go to the first of train, val, test that any of them drew, so no test or validation row is
    a text the model trained on. Twins only move to an earlier slice, so the test slice is the one drawn without
    this rule less its rows with a twin in training or validation (the tweets' topic test slice: 1,396 rows
    instead of 1,779), and a model split that way is measured on these same rows."""
    rng = np.random.default_rng(seed)
    keys = stratum_keys(data)
    part_of = np.empty(len(data), dtype=np.int64)
    for key in np.unique(keys):
        rows = rng.permutation(np.flatnonzero(keys == key))
        n_test = int(round(len(rows) * test_fraction))
        n_val = int(round(len(rows) * val_fraction))
        part_of[rows[:n_test]] = PARTS.index("test")
        part_of[rows[n_test:n_test + n_val]] = PARTS.index("val")
        part_of[rows[n_test + n_val:]] = PARTS.index("train")
    if twins_together and len(data):
        group = twin_groups(data.texts)
        earliest = np.full(len(data), len(PARTS))
        np.minimum.at(earliest, group, part_of)
        part_of = earliest[group]
    return {name: np.flatnonzero(part_of == i) for i, name in enumerate(PARTS)}


def without_twins_of(data: LabeledSet, rows: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """``rows`` less those with a twin among ``seen``: a slice drawn before twins were kept together, made honest."""
    group = twin_groups(data.texts)
    return rows[~np.isin(group[rows], group[seen])]


# A post inside a longer one is the same post (behind a cashtag prefix or "UPDATE 1-", before a "-sources" suffix)
# when it has at least this many words; shorter, a common phrase would join posts that only share it.
MIN_CONTAINED_WORDS = 6


def twin_groups(texts: Sequence[str]) -> np.ndarray:
    """A group id per text (the index of one of its members): texts with the same ``twin_key`` are twins, and so
    are two whose keys hold one another whole, word for word; twins of twins share the group."""
    keys = [twin_key(text) for text in texts]
    first: dict[str, int] = {}
    parent = [first.setdefault(key, i) for i, key in enumerate(keys)]

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    # A key inside another is found through its first MIN_CONTAINED_WORDS words: where else does that run occur?
    def runs(key: str) -> list[str]:
        words = key.split()
        return [" ".join(words[at:at + MIN_CONTAINED_WORDS]) for at in range(len(words) - MIN_CONTAINED_WORDS + 1)]
    holders: dict[str, list[int]] = {found[0]: [] for found in map(runs, first) if found}
    for key, i in first.items():
        for run in runs(key):
            if run in holders:  # only runs that open some key: memory stays in proportion to the rows
                holders[run].append(i)
    for key, i in first.items():
        for j in holders.get(" ".join(key.split()[:MIN_CONTAINED_WORDS]), []):
            if f" {key} " in f" {keys[j]} ":
                parent[root(i)] = root(j)
    return np.array([root(i) for i in range(len(keys))], dtype=np.int64)


# A --data source with fewer rows than this share of a sample's limit is kept whole: sampled down in proportion
# with the tweets, a few hundred labeled sentences would shrink to a few dozen.
SMALL_SOURCE_SHARE = 0.1


def kept_whole(data: LabeledSet, index: np.ndarray, limit: int) -> np.ndarray:
    """The sources (``origin`` values) of ``index`` that a sample of ``limit`` rows keeps whole: those small beside
    ``limit``, where there is a sample to make and a larger source to sample from."""
    if limit <= 0 or len(index) <= limit:
        return np.array([], dtype=np.int64)
    origins, counts = np.unique(data.origin[index], return_counts=True)
    small = counts < SMALL_SOURCE_SHARE * limit
    if small.all() or counts[small].sum() >= limit:
        return np.array([], dtype=np.int64)
    return origins[small]


def stratified_sample(data: LabeledSet, index: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """At most ``limit`` rows of ``index``, keeping each stratum's share (every stratum keeps at least one row), and
    every row of the sources that are small beside ``limit`` (they take their place in it)."""
    if limit <= 0 or len(index) <= limit:
        return index
    whole = np.isin(data.origin[index], kept_whole(data, index, limit))
    if whole.any():
        rest = stratified_sample(data, index[~whole], limit - int(whole.sum()), seed)
        return np.sort(np.concatenate([index[whole], rest]))
    rng = np.random.default_rng(seed)
    keys = stratum_keys(data)[index]
    chosen = []
    for key in np.unique(keys):
        rows = index[keys == key]
        take = max(1, int(round(len(rows) * limit / len(index))))
        chosen.append(rng.choice(rows, size=min(take, len(rows)), replace=False))
    return np.sort(np.concatenate(chosen))
