"""``finpulse score`` (texts given as arguments, files of lines, CSV and JSONL, standard input; bad rows and bad
files), ``finpulse models`` (what is trained, how good, which one the worker loads) and ``finpulse evaluate
--against`` (two models on the same rows)."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from models import score_files
from models.cli import main
from models.scorer import BatchScorer
from tests.models_fixtures import CLI_ENV, make_model_copy, make_tiny_base, save_tiny_model, write_tiny_csv

HEADLINES = ["Shares of Foo jump 20% after an earnings beat", "Oil slides as OPEC+ talks stall",
             "Board declares a quarterly dividend of 50 cents", "Fed holds rates; markets shrug",
             "CEO resigns after accounting probe", "Bank appoints a new chairman"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(make_tiny_base(tmp_path_factory.mktemp("tiny-bert")),
                           tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def expected(model_dir):
    """What the worker's scorer says of each headline: every path of the command must say the same."""
    scorer = BatchScorer.from_pretrained(model_dir, device="cpu")
    return scorer.model_version, dict(zip(HEADLINES, scorer.score(HEADLINES)))


def score(model_dir: Path, *args: str) -> int:
    return main(["score", "--model", str(model_dir), "--device", "cpu", "--cpu-precision", "float32", *args])


def test_texts_given_as_arguments_print_a_table_row_each_in_order(model_dir, expected, capsys):
    assert score(model_dir, HEADLINES[0], "   ", HEADLINES[1]) == 0
    header, first, blank, second = capsys.readouterr().out.splitlines()
    assert header.split() == ["score", "sentiment", "topic", "(confidence)", "text"]
    for line, text in ((first, HEADLINES[0]), (second, HEADLINES[1])):
        prediction = expected[1][text]
        assert line.split()[:2] == [f"{prediction.sentiment_score:+.2f}", prediction.sentiment]
        assert f"{prediction.topic} ({prediction.topic_confidence:.2f})" in line and line.endswith(text)
    assert "cannot score: empty text" in blank


def test_a_csv_keeps_its_columns_and_order_and_a_labeled_column_is_kept_beside_the_prediction(model_dir, expected,
                                                                                              tmp_path, capsys):
    source = tmp_path / "headlines.csv"
    with source.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text", "topic"])
        writer.writerows([[i, text, "Energy | Oil"] for i, text in enumerate(HEADLINES)] + [[99, "", "Dividend"]])
    out = tmp_path / "out" / "scored.csv"
    assert score(model_dir, "--input", str(source), "--out", str(out)) == 0
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["id", "text", "input_topic", *score_files.PREDICTION_FIELDS]
    assert [r["id"] for r in rows] == [str(i) for i in range(len(HEADLINES))] + ["99"]
    version, predictions = expected
    for row in rows[:-1]:
        prediction = predictions[row["text"]]
        assert row["input_topic"] == "Energy | Oil" and row["topic"] == prediction.topic
        assert row["sentiment"] == prediction.sentiment and row["model_version"] == version and not row["error"]
        assert float(row["sentiment_score"]) == pytest.approx(prediction.sentiment_score, abs=1e-4)
    assert rows[-1]["error"] == "empty text" and rows[-1]["topic"] == "" and rows[-1]["input_topic"] == "Dividend"
    assert [p.name for p in out.parent.iterdir()] == ["scored.csv"]
    err = capsys.readouterr().err
    assert f"scored {len(rows) - 1} of {len(rows)} texts" in err and "1 of 7 texts could not be scored" in err


def test_jsonl_rows_that_cannot_be_read_get_an_error_and_the_others_are_scored(model_dir, expected, tmp_path,
                                                                              capsys):
    source = tmp_path / "posts.jsonl"
    source.write_text("\n".join([json.dumps({"id": 1, "body": HEADLINES[2], "user": "ana"}), "", "{not json",
                                 "[1, 2]", json.dumps({"id": 4}), json.dumps({"id": 5, "body": 7}),
                                 json.dumps({"id": 6, "Body": HEADLINES[3], "source": "reuters"})]) + "\n")
    assert score(model_dir, "--input", str(source), "--text-field", "body") == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r.get("id") for r in rows] == [1, None, None, 4, 5, 6]
    assert rows[0]["user"] == "ana" and rows[0]["topic"] == expected[1][HEADLINES[2]].topic
    assert rows[-1]["sentiment"] == expected[1][HEADLINES[3]].sentiment and rows[-1]["error"] is None
    assert [r["error"] for r in rows[1:5]] == ["line 3: not JSON (Expecting property name enclosed in double quotes "
                                               "at column 2)", "line 4: not a JSON object",
                                               "line 5: no 'body' field", "not a text (int)"]
    assert all(r["topic"] is None and r["model_version"] == expected[0] for r in rows[1:5])
    # Its last row's text is under "Body": found as a spreadsheet's titled column is (it was "no 'body' field").
    # As CSV: the columns of the first row's fields, then the prediction's, then the fields a later row adds (they
    # were dropped, without a word).
    assert score(model_dir, "--input", str(source), "--text-field", "body", "--format", "csv") == 0
    table = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert list(table[0]) == ["id", "body", "user", *score_files.PREDICTION_FIELDS, "other_fields"]
    assert len(table) == 6 and table[0]["user"] == "ana" and table[0]["topic"] == rows[0]["topic"]
    assert table[0]["other_fields"] == "" and json.loads(table[-1]["other_fields"]) == {"Body": HEADLINES[3],
                                                                                      "source": "reuters"}


def test_a_csv_row_cut_by_an_unquoted_comma_is_not_scored_on_its_cut_text(model_dir, tmp_path, capsys):
    source = tmp_path / "headlines.csv"
    source.write_text(f"id,text\n1,Apple misses estimates, but shares jump 10% on buyback\n2,{HEADLINES[1]}\n")
    assert score(model_dir, "--input", str(source), "--format", "csv") == 0
    cut, whole = csv.DictReader(capsys.readouterr().out.splitlines())
    assert cut["topic"] == "" and cut["error"] == (
        "line 2 has 1 field(s) more than the header: an unquoted separator in a field? Scored, its rest (' but shares "
        "jump 10% on buyback') would be left out: quote the field")
    assert whole["error"] == "" and whole["topic"]
    # The text in the middle: what is lost is not "the rest" (the last fields); a short row is said to be short (it
    # was "not a text (NoneType)"); neither row carries the reader's own extra_values key.
    source.write_text(f"id;text;source\n1;Oil slides; talks stall;wire\n2\n3;{HEADLINES[1]};wire\n")
    assert score(model_dir, "--input", str(source)) == 0
    shifted, short, fine = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert shifted["error"] == ("line 2 has 1 field(s) more than the header: an unquoted separator in a field? "
                                "Scored, its fields no longer line up with the header's: quote the field")
    assert short["error"] == "line 3 has fewer fields than the header: none for 'text'" and short["id"] == "2"
    assert fine["error"] is None and "extra_values" not in shifted and "text" not in short


@pytest.mark.parametrize("out, refusal", [
    ("{tmp}/", "is a directory: name the file to write"),
    ("{tmp}/scored.parquet", "FinPulse writes JSONL or CSV, and .parquet is neither"),
    ("{tmp}/headlines.csv", "is the input file: scoring it would replace it"),
    ("/proc/nope/scored.csv", "cannot make its directory /proc/nope (No such file or directory)"),
    ("{tmp}/scored.txt", "and .txt is neither: name the file .jsonl, .csv or .tsv"),   # it wrote JSONL
    # A directory that takes no new file, though writable by root (as os.access says): a traceback before.
    ("/proc/scored.csv", "--out /proc/scored.csv: cannot write"),   # as root: its .partial file; else: in /proc
])
def test_an_output_that_cannot_be_written_is_refused_before_scoring(model_dir, tmp_path, capsys, out, refusal):
    source = tmp_path / "headlines.csv"
    source.write_text("text\n" + "\n".join(HEADLINES) + "\n")
    assert score(model_dir, "--input", str(source), "--out", out.replace("{tmp}", str(tmp_path))) == 2
    captured = capsys.readouterr()
    assert refusal in captured.err and "scored " not in captured.err and "Traceback" not in captured.err
    assert source.read_text().startswith("text\n" + HEADLINES[0])


def test_an_output_named_otherwise_takes_the_format_given(model_dir, tmp_path, capsys):
    source = tmp_path / "headlines.csv"
    source.write_text("text\n" + "\n".join(HEADLINES[:2]) + "\n")
    assert score(model_dir, "--input", str(source), "--out", str(tmp_path / "scored.dat"), "--format", "csv") == 0
    assert list(csv.DictReader((tmp_path / "scored.dat").open()))[1]["text"] == HEADLINES[1]
    # A .tsv is tab-separated (it was written with commas).
    assert score(model_dir, "--input", str(source), "--out", str(tmp_path / "scored.tsv")) == 0
    header, first, _ = (tmp_path / "scored.tsv").read_text().splitlines()
    assert header.split("\t") == ["text", *score_files.PREDICTION_FIELDS] and first.startswith(HEADLINES[0] + "\t")


def test_a_jsonl_text_field_its_first_object_lacks_is_refused_as_a_csv_column_is(model_dir, tmp_path, capsys):
    """A wrong --text-field on a JSONL file wrote a file of errors and exited 0."""
    source = tmp_path / "posts.jsonl"
    source.write_text("\n" + json.dumps({"id": 1, "headline": HEADLINES[0]}) + "\n")
    assert score(model_dir, "--input", str(source), "--out", str(tmp_path / "scored.jsonl")) == 2
    assert (f"{source} has no 'text' field in its first object, line 2 (its fields: id, headline): name the one to "
            f"score with --text-field") in capsys.readouterr().err
    assert not (tmp_path / "scored.jsonl").exists() and not (tmp_path / "scored.jsonl.partial").exists()
    # A first line that is not JSON: the CSV's columns are the first object's (every field went to other_fields).
    source.write_text("{bad\n" + json.dumps({"id": 1, "text": HEADLINES[0], "src": "wire"}) + "\n")
    assert score(model_dir, "--input", str(source), "--format", "csv") == 0
    bad, good = csv.DictReader(capsys.readouterr().out.splitlines())
    assert list(good) == ["id", "text", "src", *score_files.PREDICTION_FIELDS, "other_fields"]
    assert (good["src"], good["other_fields"], bad["error"]) == ("wire", "", "line 1: not JSON (Expecting property "
                                                                              "name enclosed in double quotes at column 2)")


def test_explain_says_which_words_pushed_each_score_in_every_format(model_dir, tmp_path, capsys):
    from models.explain import read_texts
    scorer = BatchScorer.from_pretrained(model_dir, device="cpu", tokenizer_processes=0)
    texts = [HEADLINES[1], "Rally", HEADLINES[4]]
    readings = read_texts(scorer, texts)
    source = tmp_path / "posts.jsonl"
    # Fields of its own named as those explaining adds ("words_note" was overwritten, "other_fields" doubled).
    source.write_text(json.dumps({"text": texts[0], "words": 7, "words_note": "mine", "other_fields": "x"}) + "\n" +
                      json.dumps({"text": texts[1]}) + "\n" + "{bad\n" + json.dumps({"text": texts[2]}) + "\n")
    assert score(model_dir, "--input", str(source), "--explain") == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["error"] is None for r in rows] == [True, True, False, True]
    for row, reading in zip([rows[0], rows[1], rows[3]], readings):
        assert [w for w, _ in row["words"]] == [p.word for p in reading.words]
        assert [push for _, push in row["words"]] == pytest.approx([p.sentiment for p in reading.words], abs=1e-4)
    assert rows[1]["words"] == [] and rows[2]["words"] == []     # one word has nothing to weigh; a bad row no text
    # Why not, said (before, an explained text of one word or of more than 80 showed nothing at all).
    assert rows[1]["words_note"] == "a single word: nothing to weigh it against" and "words_note" not in rows[2]
    long_text = " ".join(["oil"] * 90)
    assert score(model_dir, "--explain", long_text) == 0
    assert capsys.readouterr().out.splitlines()[2].strip() == ("not weighed: 90 words: longer than 80, so no word is "
                                                                "weighed on its own")
    assert (rows[0]["input_words"], rows[0]["input_words_note"], rows[0]["input_other_fields"]) == (7, "mine", "x")
    assert "words_note" not in rows[0]
    # A table and CSV name the strongest pushes, strongest first.
    strongest = sorted(readings[0].words, key=lambda p: -abs(p.sentiment))[:3]
    named = ", ".join(f"{p.word} {p.sentiment:+.2f}" for p in strongest)
    assert score(model_dir, "--explain", texts[0]) == 0
    assert capsys.readouterr().out.splitlines()[2].strip() == f"pushed by: {named}"
    assert score(model_dir, "--input", str(source), "--explain", "--format", "csv") == 0
    table = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert list(table[0]) == ["text", "input_words", "input_words_note", "input_other_fields",
                              *score_files.PREDICTION_FIELDS, "words", "other_fields"]
    assert table[0]["words"].startswith(named) and table[0]["input_words"] == "7"
    assert (table[0]["input_words_note"], table[0]["input_other_fields"], table[0]["other_fields"]) == ("mine", "x", "")
    assert table[1]["words"] == "(not weighed: a single word: nothing to weigh it against)"


def test_a_semicolon_csv_from_a_spreadsheet_is_read_by_its_own_separator(model_dir, expected, tmp_path, capsys):
    source = tmp_path / "excel.csv"   # with the byte-order mark Excel's "CSV UTF-8" starts with
    source.write_text("\ufeffid;text\n" + "".join(f'{i};"{text}"\n' for i, text in enumerate(HEADLINES)))
    out = tmp_path / "scored.jsonl"
    assert score(model_dir, "--input", str(source), "--out", str(out)) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [str(i) for i in range(len(HEADLINES))]
    assert [r["topic"] for r in rows] == [expected[1][text].topic for text in HEADLINES]


def test_a_file_is_scored_in_chunks_to_the_same_result(model_dir, tmp_path, capsys, monkeypatch):
    source = tmp_path / "many.txt"
    source.write_text("".join(f"{HEADLINES[i % len(HEADLINES)]} #{i}\n" for i in range(25)))
    assert score(model_dir, "--input", str(source)) == 0
    whole = capsys.readouterr().out
    monkeypatch.setattr(score_files, "CHUNK", 4)
    assert score(model_dir, "--input", str(source)) == 0
    chunked = capsys.readouterr().out
    assert chunked == whole and len(whole.splitlines()) == 25
    assert [json.loads(line)["text"] for line in chunked.splitlines()] == source.read_text().splitlines()


def test_a_file_of_lines_gives_a_row_for_each_line_as_wc_counts_them(model_dir, tmp_path, capsys):
    """A CRLF file whose lines a Unix editor ended again (\\r\\r\\n), or a stray \\r inside one: a \\r alone made a row
    of its own, so row N was no longer line N."""
    source = tmp_path / "lines.txt"
    source.write_bytes(f"{HEADLINES[0]}\r\r\n{HEADLINES[1]}\r\nOil\rslides\n{HEADLINES[2]}\n".encode())
    assert score(model_dir, "--input", str(source)) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == source.read_bytes().count(b"\n") == 4
    assert [r["text"] for r in rows] == [HEADLINES[0], HEADLINES[1], "Oil\rslides", HEADLINES[2]]


def test_a_spreadsheets_titled_text_column_is_the_one_scored(model_dir, expected, tmp_path, capsys):
    """Spreadsheets title their columns: "Text " holds the texts when no column is named text exactly."""
    source = tmp_path / "sheet.csv"
    source.write_text(f"Text ,Sentiment\n{HEADLINES[0]},bearish\n")
    assert score(model_dir, "--input", str(source), "--format", "table") == 0
    header, row = capsys.readouterr().out.splitlines()
    assert row.endswith(HEADLINES[0]) and expected[1][HEADLINES[0]].topic in row
    assert score(model_dir, "--input", str(source)) == 0
    [record] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert record["Text "] == HEADLINES[0] and record["topic"] == expected[1][HEADLINES[0]].topic


def test_a_file_that_cannot_be_read_is_refused_and_leaves_no_output(model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "scored.jsonl"
    no_text = tmp_path / "labels.csv"
    no_text.write_text("headline,label\nStocks rally,bullish\n")
    assert score(model_dir, "--input", str(no_text), "--out", str(out)) == 2
    assert "has no 'text' column (its columns: headline, label): name the one to score with --text-field" in \
        capsys.readouterr().err
    sheet = tmp_path / "posts.xlsx"
    sheet.write_bytes(b"PK\x03\x04\x14\x00\x06\x00\xff\xfe")  # a zip, as .xlsx files are: not text in any encoding
    assert score(model_dir, "--input", str(sheet), "--out", str(out)) == 2
    assert "posts.xlsx is a spreadsheet: save it as CSV" in capsys.readouterr().err
    # Not UTF-8 after rows already scored and written: the output file does not appear half written.
    monkeypatch.setattr(score_files, "CHUNK", 2)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(("Stocks rally\n" * 3000).encode() + "Caf\u00e9 chain beats estimates\n".encode("latin-1"))
    assert score(model_dir, "--input", str(latin1), "--out", str(out)) == 2
    assert "is not utf-8 text" in capsys.readouterr().err
    assert list(tmp_path.glob("scored*")) == []
    # Named, its encoding reads: every row is scored, and the output is UTF-8.
    assert score(model_dir, "--input", str(latin1), "--out", str(out), "--encoding", "latin-1") == 0
    assert json.loads(out.read_text(encoding="utf-8").splitlines()[-1])["text"] == "Caf\u00e9 chain beats estimates"
    out.unlink()
    assert score(model_dir, "--input", str(latin1), "--encoding", "no-such-codec") == 2
    assert "unknown encoding 'no-such-codec'" in capsys.readouterr().err
    assert score(model_dir, "--input", str(tmp_path / "missing.txt")) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main(["score", "--model", str(tmp_path), "Stocks rally"]) == 2
    assert "finpulse score:" in capsys.readouterr().err


def test_standard_input_is_scored_line_by_line_as_the_worker_is_configured_to(model_dir, expected):
    def score_stdin(*flags: str, **env: str) -> list[dict]:
        done = subprocess.run([sys.executable, "-m", "models.cli", "score", "--format", "csv", *flags],
                              input="\n".join(HEADLINES[:3]) + "\n", capture_output=True, text=True, timeout=120,
                              env={**CLI_ENV, **env})
        assert done.returncode == 0, done.stderr
        assert "scored 3 texts" in done.stderr
        return list(csv.DictReader(done.stdout.splitlines()))
    rows = score_stdin("--model", str(model_dir), "--device", "cpu", "--cpu-precision", "float32")
    assert [r["text"] for r in rows] == HEADLINES[:3]
    assert [r["topic"] for r in rows] == [expected[1][t].topic for t in HEADLINES[:3]]
    # No flags: the worker's model and CPU precision, from its settings.
    rows = score_stdin(FINPULSE_WORKER__MODEL_DIR=str(model_dir), FINPULSE_WORKER__CPU_PRECISION="int8")
    assert {r["model_version"] for r in rows} == {expected[0] + "+int8"}


def test_models_lists_newest_first_with_figures_and_marks_the_one_the_worker_loads(model_dir, tmp_path, capsys,
                                                                                  monkeypatch):
    root = tmp_path / "models"
    older = make_model_copy(model_dir, root / "a-older", "2026-01-01T00:00:00+00:00")
    newer = make_model_copy(model_dir, root / "b-newer", "2026-02-01T09:30:00+00:00")
    (root / ".incomplete-c").mkdir()  # a model still being written: not listed
    report = {"sentiment": {"accuracy": 0.861, "macro_f1": 0.822}, "topic": {"accuracy": 0.9051, "macro_f1": 0.9}}
    (newer / "metrics.json").write_text(json.dumps({"refit_of": "v-ref", "test": report,
                                                    "out_of_domain": {"sentiment": report["sentiment"]}}))
    monkeypatch.setenv("FINPULSE_MODELS__MODELS_DIR", str(root))
    monkeypatch.delenv("FINPULSE_WORKER__MODEL_DIR", raising=False)
    monkeypatch.delenv("FINPULSE_MODEL_DIR", raising=False)

    assert main(["models"]) == 0
    header, first, second, *notes = capsys.readouterr().out.splitlines()
    assert first.startswith("* ") and "2026-02-01 09:30" in first and "test, refit" in first
    assert second.startswith("  ") and "2026-01-01 00:00" in second and "refit" not in second
    assert "0.861 / 0.822" in first and "0.905 / 0.900" in first and first.count(" - ") == 1  # probe topic: none
    assert "a refit" in notes[-1]

    monkeypatch.setenv("FINPULSE_WORKER__MODEL_DIR", str(older))  # the worker pinned to a model: so marked
    assert main(["models", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(m["path"], m["worker_loads"]) for m in listed] == [(str(newer), False), (str(older), True)]
    assert listed[0]["held_out"]["topic_accuracy"] == 0.9051 and listed[1]["held_out"] == {}
    assert listed[0]["megabytes"] > 0


def test_a_damaged_newest_model_is_named_never_listed_or_loaded_and_the_one_before_is(model_dir, tmp_path, capsys,
                                                                                     monkeypatch):
    """Its weights cut short (an interrupted copy, a full disk): before, it was listed as the model the worker loads,
    and loading it ended in safetensors' traceback."""
    root = tmp_path / "models"
    older = make_model_copy(model_dir, root / "a-older", "2026-01-01T00:00:00+00:00")
    cut = make_model_copy(model_dir, root / "b-cut", "2026-02-01T00:00:00+00:00")
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])
    monkeypatch.setenv("FINPULSE_MODELS__MODELS_DIR", str(root))
    monkeypatch.delenv("FINPULSE_WORKER__MODEL_DIR", raising=False)
    monkeypatch.delenv("FINPULSE_MODEL_DIR", raising=False)
    assert main(["models", "--json"]) == 0
    captured = capsys.readouterr()
    assert [(m["path"], m["worker_loads"]) for m in json.loads(captured.out)] == [(str(older), True)]
    assert f"not listed, and never loaded: {weights} is cut short: 100,000 bytes of the" in captured.err
    assert main(["score", "--device", "cpu", "--cpu-precision", "float32", "--format", "jsonl", HEADLINES[0]]) == 0
    [row] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["model_version"] == json.loads((older / "config.json").read_text())["model_version"]


def _edit_config(**changes):
    def edit(model: Path) -> None:
        config = json.loads((model / "config.json").read_text())
        for key, value in changes.items():
            if value is None:
                config.pop(key)
            else:
                config[key] = value
        (model / "config.json").write_text(json.dumps(config))
    return edit


def _garbage_tokenizer(model: Path) -> None:
    (model / "tokenizer.json").write_text('{"version": "1.0", garbage')


def _wider_encoder(model: Path) -> None:
    config = json.loads((model / "config.json").read_text())
    config["encoder"]["hidden_size"] = 64
    (model / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("damage, refusal", [
    (_edit_config(finpulse_format="1"), "finpulse_format must be a number, not '1'"),
    (_edit_config(topics=5), "predicts other labels than this FinPulse build"),
    (_edit_config(encoder=None), "was changed or damaged: encoder (an object"),
    (_edit_config(max_length="abc"), "was changed or damaged: max_length (a positive whole number)"),
    (_edit_config(pooling="max"), "was changed or damaged: pooling (mean or cls)"),
    (_garbage_tokenizer, "tokenizer.json is not a readable tokenizer"),
    (_wider_encoder, "model.safetensors does not fit the architecture config.json describes: "),
])
def test_a_model_directory_changed_by_hand_is_refused_saying_what_is_wrong(model_dir, tmp_path, capsys, damage,
                                                                           refusal):
    """Before, each of these ended in a traceback (TypeError, KeyError, ValueError, torch's list of every key)."""
    model = make_model_copy(model_dir, tmp_path / "edited", "2026-01-01T00:00:00+00:00")
    damage(model)
    assert score(model, HEADLINES[0]) == 2
    err = capsys.readouterr().err
    assert refusal in err and "Traceback" not in err and len(err.splitlines()) == 1, err


def test_evaluate_against_another_model_gives_both_figures_on_the_same_rows_and_their_difference(model_dir, tmp_path,
                                                                                                capsys):
    from safetensors.torch import load_file, save_file
    other = make_model_copy(model_dir, tmp_path / "other", "2026-01-01T00:00:00+00:00")
    weights = load_file(other / "model.safetensors")
    weights["sentiment_head.weight"] = -weights["sentiment_head.weight"]    # another sentiment head, the same topic one
    save_file(weights, other / "model.safetensors")
    data = str(write_tiny_csv(tmp_path / "labeled.csv", repeat=3))
    evaluate = ["evaluate", "--data", data, "--device", "cpu", "--out"]
    assert main([*evaluate, str(tmp_path / "b.json"), str(other)]) == 0
    capsys.readouterr()
    assert main([*evaluate, str(tmp_path / "a.json"), str(model_dir), "--against", str(other)]) == 0
    printed = capsys.readouterr().out
    a, b = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("a", "b"))
    assert a["against"]["rows"] == a["rows"] == 51
    for head in ("topic", "sentiment"):
        assert a[head]["interval_95"]["accuracy"][0] <= a[head]["accuracy"] <= a[head]["interval_95"]["accuracy"][1]
        for metric in ("accuracy", "macro_f1"):
            compared = a["against"]["heads"][head][metric]
            assert (compared["a"], compared["b"]) == (round(a[head][metric], 4), round(b[head][metric], 4))
            low, high = compared["interval"]
            assert low <= compared["difference"] <= high
            assert (f"  {head} {metric.replace('_f1', '-F1')}: {compared['a']:.4f} vs {compared['b']:.4f}, "
                    f"{compared['difference']:+.4f} ({low:+.4f} to {high:+.4f}): {compared['verdict']}") in printed
    assert a["against"]["heads"]["topic"]["accuracy"]["interval"] == [0.0, 0.0]
    assert a["sentiment"]["accuracy"] != b["sentiment"]["accuracy"]


def test_a_reader_that_stops_early_ends_the_command_quietly(model_dir, tmp_path):
    """`finpulse score -i big.txt | head -1`: no BrokenPipeError traceback, as a shell tool behaves."""
    source = tmp_path / "many.txt"
    source.write_text("".join(f"Stocks rally on day {i}\n" for i in range(3 * score_files.CHUNK)))
    proc = subprocess.Popen([sys.executable, "-m", "models.cli", "score", "--model", str(model_dir), "--device", "cpu",
                             "--input", str(source)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=CLI_ENV)
    assert json.loads(proc.stdout.readline())["text"] == "Stocks rally on day 0"
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and "Traceback" not in err and "BrokenPipe" not in err


def test_evaluating_or_calibrating_on_a_file_without_a_labeled_row_is_refused(model_dir, tmp_path, capsys):
    """Before, evaluate printed "(0 rows...)", no figure, wrote a report of nothing and exited 0."""
    header_only = tmp_path / "header_only.csv"
    header_only.write_text("text,topic,sentiment\n")
    for command in ("evaluate", "calibrate"):
        assert main([command, str(model_dir), "--data", str(header_only), "--device", "cpu"]) == 2
        assert f"finpulse {command}: {header_only} holds no labeled row: nothing to measure" in capsys.readouterr().err


def test_two_files_of_the_same_name_get_a_report_each(model_dir, tmp_path, capsys, monkeypatch):
    """Two folders' valid.csv: the second's default report overwrote the first's."""
    monkeypatch.chdir(tmp_path)
    written = []
    for folder in ("a", "b", "a"):
        (tmp_path / folder).mkdir(exist_ok=True)
        data = write_tiny_csv(tmp_path / folder / "valid.csv", repeat=1 + (folder == "b"))
        assert main(["evaluate", str(model_dir), "--data", str(data), "--device", "cpu"]) == 0
        written.append(capsys.readouterr().out.rsplit("report written to ", 1)[1].strip())
    first, second, again = written
    assert first != second and again == first      # the same file again: its own report, replaced
    assert {json.loads(Path(p).read_text())["rows"] for p in (first, second)} == {17, 34}
