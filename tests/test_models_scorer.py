"""The saved-model format, the batched scorer, the model registry, the data loaders and the metrics."""
from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from models.data import DataError, MISSING, LabeledSet, load_data, load_file, load_shared, split
from models.interface import Prediction, load_scorer
from models.labels import SENTIMENTS, TOPICS
from models import metrics
from models.evaluation import rows_in_both
from models.metrics import bootstrap_intervals, head_report, paired_difference, resampled_scores
from models.modeling import FinPulseClassifier, TextEncoder, load_model, save_model
from models.registry import NotAModelDir, find_model_dir, list_models
from models.scorer import BatchScorer
from models.tokenizer_pool import PieceTokenizer, native_ids
from tests.models_fixtures import (make_model_copy, make_tiny_base, save_tiny_model, tiny_set, write_shared_layout,
                                   write_tiny_csv)
from tests.procs import orphans_left, run_without_broker

TEXTS = [
    "$ACME shares soar to a record after strong results https://t.co/xyz",
    "Fed holds rates",
    "Oil &amp; gas producers cut output as crude slides; OPEC+ meets on Sunday to weigh deeper cuts " * 3,
    "CEO resigns",
    "Board declares a quarterly dividend",
    "Stocks rally",
]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(make_tiny_base(tmp_path_factory.mktemp("tiny-bert")),
                           tmp_path_factory.mktemp("models") / "tiny")


def unbatched_probabilities(loaded, text: str) -> np.ndarray:
    ids = loaded.text_encoder.ids([text])[0]
    with torch.no_grad():
        topic, sentiment = loaded.model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
    return torch.cat([topic.softmax(-1), sentiment.softmax(-1)], 1)[0].numpy()


def test_saved_directory_is_complete_and_self_describing(tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert re.fullmatch(r"finpulse-tiny-bert\d*-test-\d{8}-[0-9a-f]{8}", config["model_version"])
    assert config["topics"] == list(TOPICS) and config["sentiments"] == list(SENTIMENTS)
    assert config["id2label_sentiment"] == {"0": "bearish", "1": "neutral", "2": "bullish"}
    assert config["encoder"]["model_type"] == "bert" and config["max_length"] == 48
    assert {p.name for p in tiny_model_dir.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    # Readable as its other files are (safetensors writes 0600: a worker running as another user could not load it).
    assert {p.name: oct(p.stat().st_mode & 0o044) for p in tiny_model_dir.iterdir()} == \
        {p.name: oct(0o044) for p in tiny_model_dir.iterdir()}


def test_save_then_load_gives_identical_outputs(tiny_model_dir, tmp_path):
    first = load_model(tiny_model_dir)
    resaved = tmp_path / "again"
    save_model(first.model, tiny_model_dir, resaved, base_model="tiny", recipe="test", max_length=48)
    second = load_model(resaved)
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[key]), key
    a = BatchScorer(first.model, first.text_encoder, first.version, device="cpu").probabilities(TEXTS)
    b = BatchScorer(second.model, second.text_encoder, second.version, device="cpu").probabilities(TEXTS)
    assert np.array_equal(a.topic, b.topic) and np.array_equal(a.sentiment, b.sentiment)


def test_float16_weights_load_close_to_float32(tiny_model_dir, tmp_path):
    full = load_model(tiny_model_dir)
    save_model(full.model, tiny_model_dir, tmp_path / "half", base_model="tiny", recipe="test", max_length=48,
               dtype=torch.float16)
    half = load_model(tmp_path / "half")
    assert half.model.topic_head.weight.dtype == torch.float32
    p_full = BatchScorer(full.model, full.text_encoder, "a", device="cpu").probabilities(TEXTS)
    p_half = BatchScorer(half.model, half.text_encoder, "b", device="cpu").probabilities(TEXTS)
    assert np.abs(p_full.topic - p_half.topic).max() < 1e-2


def test_scorer_matches_a_plain_unbatched_forward(tiny_model_dir):
    loaded = load_model(tiny_model_dir)
    scorer = BatchScorer(loaded.model, loaded.text_encoder, loaded.version, device="cpu", batch_size=4)
    texts = TEXTS * 3  # several batches of mixed lengths, each padded only to its own longest text
    probs = scorer.probabilities(texts)
    for i, text in enumerate(texts):
        expected = unbatched_probabilities(loaded, text)
        assert np.allclose(np.concatenate([probs.topic[i], probs.sentiment[i]]), expected, atol=1e-5), text
    predictions = scorer.score(texts)
    assert [p.topic for p in predictions] == [TOPICS[int(np.argmax(probs.topic[i]))] for i in range(len(texts))]
    for p, s in zip(predictions, probs.sentiment):
        assert p.sentiment_score == pytest.approx(s[SENTIMENTS.index("bullish")] - s[SENTIMENTS.index("bearish")])
        assert -1.0 <= p.sentiment_score <= 1.0 and 0.0 < p.topic_confidence <= 1.0


def test_bad_inputs_are_reported_per_item_and_never_fail_the_batch(tiny_model_dir):
    scorer = BatchScorer.from_pretrained(tiny_model_dir, device="cpu", batch_size=3)
    huge = "Markets rally on strong data. " * 3500  # ~100 KB
    batch = ["", "   \n\t", None, 42, "https://t.co/onlyalink", "Stocks rally", "株価が大幅に上昇した",
             "Les marchés chutent après l'annonce", huge, "Oil slips"]
    predictions = scorer.score(batch)
    assert len(predictions) == len(batch)
    errors = [p.error for p in predictions]
    assert errors[0] == errors[1] == "empty text"
    assert errors[2] == "not a text (NoneType)" and errors[3] == "not a text (int)"
    assert "no text left" in errors[4]
    assert all(p.ok for p in predictions[5:])
    # Truncation is explicit: the huge text scores exactly like its first max_length tokens.
    loaded = load_model(tiny_model_dir)
    assert len(loaded.text_encoder.ids([huge])[0]) == loaded.text_encoder.max_length
    alone = scorer.score([huge])[0]
    assert (alone.topic, alone.sentiment) == (predictions[8].topic, predictions[8].sentiment)


def test_scorer_can_be_shared_by_threads(tiny_model_dir):
    scorer = BatchScorer.from_pretrained(tiny_model_dir, device="cpu", batch_size=2)
    expected = scorer.score(TEXTS)
    results: list[list[Prediction]] = []
    threads = [threading.Thread(target=lambda: results.append(scorer.score(TEXTS))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected] * 4


def test_tokenizer_processes_give_the_same_scores_and_survive_losing_a_process(tiny_model_dir):
    """The GPU scorer tokenizes in worker processes; here they run for a CPU scorer, which must score exactly as
    one tokenizing in its own process, bad inputs included, and go on in-process when a worker dies."""
    import os
    import signal
    batch = ([None, "Markets rally on strong data. " * 3500] + VARIED_TEXTS) * 3
    in_process = BatchScorer.from_pretrained(tiny_model_dir, device="cpu", batch_size=8)
    assert in_process.tokenizer_processes == 0        # the CPU default: the model needs the cores
    expected = in_process.probabilities(batch)
    loaded = load_model(tiny_model_dir)
    pooled = BatchScorer(loaded.model, loaded.text_encoder, loaded.version, device="cpu", batch_size=8,
                         tokenizer_processes=2)
    try:
        got = pooled.probabilities(batch)
        assert pooled._tokenizer_pool is not None and pooled.tokenizer_processes == 2
        assert got.errors == expected.errors
        assert np.array_equal(got.topic, expected.topic) and np.array_equal(got.sentiment, expected.sentiment)
        for pid in list(pooled._tokenizer_pool._executor._processes):
            os.kill(pid, signal.SIGKILL)
        after = pooled.probabilities(batch)
        assert pooled.tokenizer_processes == 0 and pooled._tokenizer_pool is None
        assert after.errors == expected.errors and np.array_equal(after.topic, expected.topic)
    finally:
        pooled.close()


def test_tokenizer_processes_exit_when_their_parent_is_killed(tiny_model_dir, tmp_path):
    """kill -9 of a scorer's process leaves no tokenizer process waiting for work forever."""
    import subprocess
    import sys
    script = tmp_path / "parent.py"
    script.write_text(
        "import sys, time\n"
        "from models.modeling import load_model\n"
        "from models.tokenizer_pool import TokenizerPool\n"
        "if __name__ == '__main__':\n"
        f"    pool = TokenizerPool(load_model({str(tiny_model_dir)!r}).text_encoder.tokenizer, 2)\n"
        "    pool.submit(['Stocks rally'] * 64).result()\n"
        "    print(*pool._executor._processes, flush=True)\n"
        "    time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              cwd=str(Path(__file__).resolve().parent.parent))
    try:
        children = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(children) == 2
    finally:
        parent.kill()
        parent.wait()
    assert not orphans_left(children, timeout=15), "tokenizer processes outlived their killed parent"


VARIED_TEXTS = [
    *TEXTS,
    "https://t.co/onlyalink", "   ", "&nbsp;",  # nothing left after the clean-up
    "www.example.com &amp; http://x.y",
    "x&nbsp;http://t.co/y after www.example.com/a?b=c, HTTP://UPPER.case and(https://inside) end",
    "&amp;amp; &amp;lt; &lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; it&#39;s &apos;x&apos; a&nbsp;b",
    "CamelCase ALLCAPS don't U.S. 3.5% $12.50 @user_1 #tag _x_ ~`|^ {a} [b] (c)",
    "tab\tnew\nline\r\nend", "form\x0cfeed\x0bvtab", "ctrl\x00\x01\x1f\x7fchars", "[SEP] in [CLS]the [unk] [PAD]",
    "Die Aktie steigt um 5 % – Übernahme?", "原油价格下跌 $XOM", "Акции растут", "to the moon 🚀🚀 $TSLA 📈",
    "café naïve résumé", "a" * 150 + " " + "supercalifragilistic" * 8,
    ("Earnings beat " * 9000)[:1024],   # as the scorer hands it over: cut to the character budget
    "word " * 60 + "https://t.co/" + "z" * 2000,
]


@pytest.mark.parametrize("max_length", [48, 16])
def test_piece_tokenizer_gives_the_tokenizers_own_ids(tiny_model_dir, max_length):
    tokenizer = load_model(tiny_model_dir).text_encoder.tokenizer
    fast = PieceTokenizer.for_tokenizer(tokenizer)
    assert fast is not None
    tokenizer.enable_truncation(max_length)  # as the GPU benchmark does: read on every call
    expected = native_ids(tokenizer, VARIED_TEXTS)
    assert max(map(len, expected)) == max_length
    assert fast.ids(VARIED_TEXTS) == expected
    assert fast.ids(VARIED_TEXTS) == expected  # again, from the cache
    assert fast.ids(list(reversed(VARIED_TEXTS))) == expected[::-1]


def test_piece_tokenizer_is_exact_on_the_real_encoder():
    from models.modeling import default_base_model_dir
    tokenizer = TextEncoder.for_base(str(default_base_model_dir()), 64).tokenizer
    fast = PieceTokenizer.for_tokenizer(tokenizer)
    assert fast is not None
    assert fast.ids(VARIED_TEXTS) == native_ids(tokenizer, VARIED_TEXTS)


def test_piece_tokenizer_declines_a_tokenizer_it_does_not_know(tiny_model_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers
    tokenizer = load_model(tiny_model_dir).text_encoder.tokenizer
    other = Tokenizer.from_str(tokenizer.to_str())
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    assert PieceTokenizer.for_tokenizer(other) is None
    assert PieceTokenizer.for_tokenizer(Tokenizer(models.BPE())) is None


def test_int8_cpu_path_stays_close_to_float32_on_the_real_encoder():
    from models.modeling import default_base_model_dir
    base = str(default_base_model_dir())
    model = FinPulseClassifier.from_base(base).eval()
    encoder = TextEncoder.for_base(base, 64)
    quantized = BatchScorer(FinPulseClassifier.from_base(base).eval(), encoder, "int8", device="cpu",
                            cpu_precision="int8").model
    ids, mask = (torch.from_numpy(a) for a in encoder.pad(encoder.ids(TEXTS)))
    with torch.no_grad():
        exact, approx = model.pool(ids, mask), quantized.pool(ids, mask)
    cosine = torch.nn.functional.cosine_similarity(exact, approx)
    # 0.979-0.991 here with per-channel weights and float32 down-projections; every linear layer quantized with one
    # scale per matrix (FinPulse's int8 before) gave 0.927-0.948, and a broken conversion lands near 0.
    assert cosine.min() > 0.97, cosine


def test_int8_keeps_the_feed_forward_down_projections_in_float32():
    from models.modeling import default_base_model_dir
    from models.quantization import quantize_int8
    model = FinPulseClassifier.from_base(str(default_base_model_dir())).eval()
    quantized = quantize_int8(model)
    int8_linear = torch.ao.nn.quantized.dynamic.Linear
    kept = {name for name, module in quantized.named_modules() if type(module) is torch.nn.Linear}
    assert kept == {f"encoder.encoder.layer.{i}.output.dense" for i in range(6)}   # 1536 -> 384, after GELU
    per_channel = [module.weight().qscheme() for module in quantized.modules() if isinstance(module, int8_linear)]
    assert len(per_channel) == 6 * 5 + 3    # q, k, v, attention out, FFN in per layer; pooler; both heads
    assert set(per_channel) == {torch.per_channel_affine}
    assert not any(isinstance(module, int8_linear) for module in model.modules())   # the float32 model is kept


def test_an_int8_scorer_says_so_in_its_version_and_stays_on_the_cpu(tiny_model_dir):
    loaded = load_model(tiny_model_dir)
    scorer = BatchScorer(loaded.model, loaded.text_encoder, loaded.version, device="cpu", cpu_precision="int8")
    assert scorer.model_version == loaded.version + "+int8"   # on every record the worker stamps
    assert scorer.precision == "int8"
    predictions = scorer.score(TEXTS + [""])
    assert [p.ok for p in predictions] == [True] * len(TEXTS) + [False]
    with pytest.raises(ValueError, match="cpu precision 'int4': use float32, bf16 or int8"):
        BatchScorer(loaded.model, loaded.text_encoder, loaded.version, device="cpu", cpu_precision="int4")


def test_bf16_on_the_cpu_runs_as_on_a_gpu_and_stays_close_to_float32_on_the_real_encoder():
    from models.modeling import default_base_model_dir
    base = str(default_base_model_dir())
    model = FinPulseClassifier.from_base(base, seed=5).eval()
    torch.nn.init.normal_(model.topic_head.weight, std=0.5)  # confident heads: labels depend on the text
    torch.nn.init.normal_(model.sentiment_head.weight, std=0.5)
    encoder = TextEncoder.for_base(base, 64)
    exact = BatchScorer(model, encoder, "v1", device="cpu").probabilities(TEXTS)
    bf16 = BatchScorer(model, encoder, "v1", device="cpu", cpu_precision="bf16")
    assert bf16.model_version == "v1"   # not stamped: float32's labels but for a row or two, as bf16 on a GPU
    assert bf16.precision == "bf16" and bf16.runs_as == "cpu, bf16 autocast"   # the worker's log and metric
    approx = bf16.probabilities(TEXTS)
    assert approx.errors == exact.errors
    differences = np.abs(np.concatenate([approx.topic - exact.topic, approx.sentiment - exact.sentiment], 1))
    # Above 0: it really ran in bf16 (float32 twice is bit-identical); a broken cast lands far above the bound.
    assert 0 < differences.max() < 0.05, differences.max()
    assert (approx.sentiment.argmax(1) == exact.sentiment.argmax(1)).mean() >= 0.9


def test_the_worker_refuses_an_unknown_cpu_precision_before_it_touches_kafka(tiny_model_dir):
    """`finpulse worker` with [worker] cpu_precision = "int4" and no broker at all: a configuration error naming the
    setting (exit 2), not a Kafka error; int8 with device "auto" means the CPU; "auto" is bf16 only where the CPU
    has bfloat16 instructions."""
    from models.precision import native_bf16
    done = run_without_broker("worker", "--model", str(tiny_model_dir), FINPULSE_WORKER__CPU_PRECISION="int4")
    output = done.stdout + done.stderr
    assert done.returncode == 2 and "configuration error: [worker] cpu_precision = 'int4'" in output, output
    scorer = load_scorer("model", str(tiny_model_dir), device="auto", cpu_precision="int8")
    assert scorer.device.type == "cpu" and scorer.model_version.endswith("+int8")
    scorer = load_scorer("model", str(tiny_model_dir), device="cpu")
    assert scorer.cpu_precision == ("bf16" if native_bf16() else "float32")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without CUDA")
@pytest.mark.parametrize("setting, message", [
    ({"FINPULSE_WORKER__DEVICE": "cuda"}, "device 'cuda' requested but CUDA is not available"),
    ({"FINPULSE_WORKER__DEVICE": "gpu"}, "device 'gpu' is not a device: use auto, cpu, cuda or cuda:N"),
    ({"FINPULSE_WORKER__MODEL_DIR": "/nonexistent/model"}, "model directory /nonexistent/model does not exist"),
])
def test_the_worker_refuses_a_model_or_device_it_cannot_use_in_one_line_before_it_touches_kafka(tiny_model_dir,
                                                                                               setting, message):
    # A model there is: the device is what fails (where the setting names none).
    done = run_without_broker("worker", **{"FINPULSE_WORKER__SCORER": "model",
                                           "FINPULSE_WORKER__MODEL_DIR": str(tiny_model_dir), **setting})
    output = done.stdout + done.stderr
    assert done.returncode == 2 and f"configuration error: {message}" in output, output
    assert "Traceback" not in output and "Kafka" not in output


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_evaluate_in_a_cpu_precision_reports_it_beside_float32(tiny_model_dir, tmp_path, capsys, precision):
    from models.cli import main
    data = write_tiny_csv(tmp_path / "labeled.csv")
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(tiny_model_dir), "--data", str(data), "--cpu-precision", precision,
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["cpu_precision"] == precision and f"device cpu, {precision})" in printed
    assert report["model_version"].endswith("+int8") == (precision == "int8")
    for head in ("topic", "sentiment"):
        compared = report["versus_float32"][head]
        assert 0.0 <= compared["same_label"] <= 1.0
        assert compared["accuracy"] == report[head]["accuracy"]
        assert f"{head} vs float32: same label on {compared['same_label']:.1%} of texts" in printed
    assert main(["evaluate", str(tiny_model_dir), "--data", str(data), "--cpu-precision", precision,
                 "--device", "cuda"]) == 2
    assert "runs on the CPU" in capsys.readouterr().err


def test_registry_picks_the_newest_model_and_skips_other_directories(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("FINPULSE_MODEL_DIR", raising=False)
    root = tmp_path / "models"
    old = make_model_copy(tiny_model_dir, root / "b-old", "2026-01-01T00:00:00+00:00")
    new = make_model_copy(tiny_model_dir, root / "a-new", "2026-06-01T00:00:00+00:00")
    make_model_copy(tiny_model_dir, root / ".incomplete-run", "2027-01-01T00:00:00+00:00")
    (root / "notes").mkdir()
    (root / "notes" / "config.json").write_text('{"model_type": "bert"}')
    assert [p for p, _ in list_models(root)] == [new, old]
    assert find_model_dir(None, root) == new
    assert find_model_dir("b-old", root) == old  # a bare version name
    monkeypatch.setenv("FINPULSE_MODEL_DIR", str(old))
    assert find_model_dir(None, root) == old
    assert find_model_dir(None, tmp_path / "nothing-here") == old
    monkeypatch.delenv("FINPULSE_MODEL_DIR")
    assert find_model_dir(None, tmp_path / "nothing-here") is None


def test_registry_rejects_directories_that_are_not_models(tiny_model_dir, tmp_path):
    with pytest.raises(NotAModelDir, match="does not exist"):
        find_model_dir(str(tmp_path / "missing"))
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(NotAModelDir, match="no finpulse_format"):
        find_model_dir(str(plain))
    partial = make_model_copy(tiny_model_dir, tmp_path / "partial", "2026-01-01T00:00:00+00:00")
    (partial / "model.safetensors").unlink()
    with pytest.raises(NotAModelDir, match="missing model.safetensors"):
        find_model_dir(str(partial))
    # A file of the model given for the model (it said "does not exist"): the directory is named.
    with pytest.raises(NotAModelDir, match=f"config.json is a file: a model is the directory that holds it "
                                           f".{tiny_model_dir}.$"):
        find_model_dir(str(tiny_model_dir / "config.json"))


def test_load_scorer_returns_the_model_scorer_with_its_version(tiny_model_dir, tmp_path):
    scorer = load_scorer("auto", model_dir=str(tiny_model_dir), device="cpu")
    assert isinstance(scorer, BatchScorer)
    assert scorer.model_version == json.loads((tiny_model_dir / "config.json").read_text())["model_version"]
    with pytest.raises(NotAModelDir):
        load_scorer("model", model_dir=str(tmp_path))
    # Where none is found, the message names where it looked (a relative models root is the current directory's).
    missing = re.escape(f"no trained FinPulse model in {tmp_path}: run `finpulse train`")
    with pytest.raises(FileNotFoundError, match=missing):
        load_scorer("model", models_root=str(tmp_path))


def test_a_series_is_scored_by_position_and_one_string_is_refused(tiny_model_dir):
    """A sorted or filtered pandas Series is indexed by labels: scored by them, its predictions came back in another
    order (or a KeyError); one string was scored character by character."""
    import pandas as pd

    from models.baseline import KeywordBaselineScorer
    from models.explain import read_texts
    scorer = BatchScorer.from_pretrained(tiny_model_dir, device="cpu", tokenizer_processes=0)
    texts = pd.Series(TEXTS[:4], index=[30, 10, 40, 20]).sort_index()
    assert scorer.score(texts) == scorer.score(texts.tolist())
    read, alone = [r.prediction for r in read_texts(scorer, texts)], scorer.score(texts.tolist())
    assert [(p.topic, p.sentiment) for p in read] == [(p.topic, p.sentiment) for p in alone]
    # Batched with other texts, the scores can differ in their last bits.
    assert [p.sentiment_score for p in read] == pytest.approx([p.sentiment_score for p in alone], abs=1e-5)
    for one_of in (scorer, KeywordBaselineScorer()):
        with pytest.raises(TypeError, match=r"score a list of texts, not one str .*: score\(\[text\]\)"):
            one_of.score("Oil slides as OPEC+ talks stall")
    assert KeywordBaselineScorer().score(texts) == KeywordBaselineScorer().score(texts.tolist())
    with pytest.raises(TypeError, match="reading texts needs a trained model's probabilities; baseline-keywords-1"):
        read_texts(KeywordBaselineScorer(), ["Oil slides"])


def test_user_files_accept_names_and_ids_and_reject_bad_rows(tmp_path):
    csv_file = tmp_path / "mine.csv"
    csv_file.write_text("text,topic,sentiment\nOil up,Energy | Oil,\nFed holds,1,2.0\nShares fall,,Bearish\n")
    data = load_file(csv_file)
    assert list(data.topic) == [TOPICS.index("Energy | Oil"), 1, MISSING]
    assert list(data.sentiment) == [MISSING, SENTIMENTS.index("neutral"), SENTIMENTS.index("bearish")]
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text('{"text": "Stocks soar", "sentiment": "bullish"}\n{"text": "Gold rises", "sentiment": 1}\n')
    assert list(load_file(jsonl).sentiment) == [SENTIMENTS.index("bullish")] * 2
    # A JSONL error names its line (blank lines count), whether the line is not JSON or its row is bad.
    jsonl.write_text('{"text": "Stocks soar", "sentiment": 1}\n\n[1, 2]\n{"text": "Gold", "sentiment": 1\n')
    with pytest.raises(DataError, match=r"2 bad row\(s\), nothing loaded: line 3: a JSON list, not an object with "
                       r"a 'text' field; line 4: not JSON \(Expecting ',' delimiter at column 32\)"):
        load_file(jsonl)
    jsonl.write_text('{"text": "Stocks soar", "sentiment": 1}\n\n{"text": 5, "sentiment": 1}\n{"sentiment": 0}\n')
    with pytest.raises(DataError, match=r"row 3: text is not a string: '5' \(int\); row 4: empty text$"):
        load_file(jsonl)
    bad = tmp_path / "bad.csv"
    bad.write_text("text,topic\n,Macro\nGDP grows,Weather\nCPI,25\nok text,\n")
    with pytest.raises(DataError) as err:
        load_file(bad)
    message = str(err.value)
    assert "4 bad row(s)" in message and "row 2: empty text" in message and "unknown topic 'Weather'" in message
    assert "topic id 25 out of range" in message and "row 5: no topic label" in message
    assert message.count("Label ids are the public sets'") == 1
    # A typo is answered with the label it is close to; a name that is near none, with the head's labels, once.
    typos = tmp_path / "typos.csv"
    typos.write_text("text,topic,sentiment\nEPS beat,Earnigs,Bulish\nRain,Weather,\nSnow,Climate,\n")
    with pytest.raises(DataError) as err:
        load_file(typos)
    message = str(err.value)
    assert "row 2: unknown topic 'Earnigs' (did you mean 'Earnings'?); row 2: unknown sentiment 'Bulish' (did you " \
           "mean 'bullish'?); row 3: unknown topic 'Weather'; row 4: unknown topic 'Climate'." in message, message
    # Both heads' names where both have a typo (the sentiments' were left out).
    assert message.endswith(f"The topics: {', '.join(TOPICS)}. The sentiments: {', '.join(SENTIMENTS)}"), message
    # A row's line in its file, as an editor counts it: blank lines and a text quoted over two lines counted.
    spaced = tmp_path / "spaced.csv"
    spaced.write_text('text,sentiment\nOil slides,bearish\n\n\n"Two\nlines",neutral\nEPS beat,Bulish\n')
    with pytest.raises(DataError, match=r"row 7: unknown sentiment 'Bulish'"):
        load_file(spaced)
    spaced.write_text(spaced.read_text().replace("Bulish", "bullish"))
    assert list(load_file(spaced).line) == [2, 5, 7]
    # A -1/0/1 sentiment scale fails on -1 (0 alone would read as bearish): the error says to write the names, once.
    scale = tmp_path / "scale.csv"
    scale.write_text("text,sentiment\nShares sink,-1\nFed meets,0\nStocks soar,1\nBanks slide,-1\n")
    with pytest.raises(DataError, match=r"2 bad row\(s\), nothing loaded: row 2: sentiment id -1 out of range; "
                       r"row 5: sentiment id -1 out of range\. Label ids are the public sets' \(sentiment 0 bearish, "
                       r"1 bullish, 2 neutral; topic 0-19\): for another scale, such as -1/0/1, write the names"):
        load_file(scale)
    with pytest.raises(DataError, match="needs a 'topic' and/or a 'sentiment' column"):
        (tmp_path / "x.csv").write_text("text,score\nhi,1\n")
        load_file(tmp_path / "x.csv")


def test_user_files_from_spreadsheets_load_whatever_separator_they_use(tmp_path):
    """A spreadsheet in much of Europe exports CSV with semicolons (and a byte-order mark, and CRLF); a .tsv has
    tabs. Commas inside their texts stay text."""
    rows = [("Oil slides, OPEC meets", "Energy | Oil", "bearish"), ("Fed holds; markets shrug", "Macro", "neutral")]
    comma = tmp_path / "comma.csv"
    comma.write_text("text,topic,sentiment\n" + "".join(f'"{t}",{p},{s}\n' for t, p, s in rows))
    semicolon = tmp_path / "excel.csv"
    semicolon.write_bytes(("\ufefftext;topic;sentiment\r\n" + "".join(f'{t.replace(";", ",")};{p};{s}\r\n'
                                                                      for t, p, s in rows[:1])
                           + '"Fed holds; markets shrug";Macro;neutral\r\n').encode("utf-8"))
    tabs = tmp_path / "mine.tsv"
    tabs.write_text("text\ttopic\tsentiment\n" + "".join(f"{t}\t{p}\t{s}\n" for t, p, s in rows))
    reference = load_file(comma)
    assert list(reference.texts) == [t for t, _, _ in rows]
    for other in (semicolon, tabs):
        loaded = load_file(other)
        assert list(loaded.texts) == list(reference.texts), other
        assert list(loaded.topic) == list(reference.topic) and list(loaded.sentiment) == list(reference.sentiment)


def test_a_spreadsheets_files_load_by_titled_columns_and_say_what_to_change_when_they_cannot(tmp_path):
    titled = tmp_path / "titled.csv"
    titled.write_text("Text,Topic , SENTIMENT\nOil slides,Energy | Oil,bearish\nFed holds,Macro,\n")
    loaded = load_file(titled)
    assert list(loaded.texts) == ["Oil slides", "Fed holds"]
    assert [TOPICS[i] for i in loaded.topic] == ["Energy | Oil", "Macro"]
    assert list(loaded.sentiment) == [SENTIMENTS.index("bearish"), MISSING]
    (tmp_path / "sheet.xlsx").write_bytes(b"PK\x03\x04")
    with pytest.raises(DataError, match=r"use a .csv, .tsv, .json or .jsonl file \(from a spreadsheet: save it as "
                       r"CSV\)"):
        load_file(tmp_path / "sheet.xlsx")
    kaggle = tmp_path / "kaggle.csv"
    kaggle.write_text("Sentence,Sentiment\nOil slides,negative\n")
    with pytest.raises(DataError, match=r"no 'text' column \(columns: Sentence, Sentiment\): name the column that "
                       r"holds the texts 'text'"):
        load_file(kaggle)


def test_the_public_sets_files_load_as_published_and_a_bare_label_column_is_refused(tmp_path):
    """The public validation splits come as text,label files: their name says the head, as the sets name them."""
    published = tmp_path / "published"
    published.mkdir()
    (published / "sent_valid.csv").write_text("text,label\nShares sink,0\nStocks soar,1\nFed meets,2\n")
    (published / "topic_valid.csv").write_text("text,label\nFed holds rates,1\nOil jumps,7\n")
    data = load_data([str(published / "sent_valid.csv"), str(published / "topic_valid.csv")], tmp_path)
    assert [SENTIMENTS[i] for i in data.sentiment[:3]] == ["bearish", "bullish", "neutral"]
    assert list(data.topic[3:]) == [1, 7] and list(data.sentiment[3:]) == [MISSING] * 2
    assert list(data.topic[:3]) == [MISSING] * 3
    # Sentiment ids past 2 are not sentiment: the file name does not turn a bad file into topic rows.
    (tmp_path / "sent_bad.csv").write_text("text,label\nOil jumps,7\n")
    with pytest.raises(DataError, match="sentiment id 7 out of range"):
        load_file(tmp_path / "sent_bad.csv")
    (tmp_path / "mine.csv").write_text("text,label\nhi,1\n")
    with pytest.raises(DataError, match="a 'label' column, but for which head\\? Rename it to 'sentiment' or 'topic'"):
        load_file(tmp_path / "mine.csv")
    # A directory of them is not the shared layout: the error names its files and how to pass one.
    with pytest.raises(DataError, match=r"it holds sent_valid.csv, topic_valid.csv: pass each file on its own"):
        load_data([str(published)], tmp_path)


def test_shared_layout_loader_and_stratified_split(tmp_path):
    write_shared_layout(tmp_path)
    data = load_data(["shared"], tmp_path)
    assert len(data) == 170 and (data.sentiment >= 0).sum() == 90
    assert data.sentiment[0] == SENTIMENTS.index("bullish")  # public id 1 = bullish
    parts = split(data, 0.2, 0.2, seed=7)
    assert sorted(np.concatenate(list(parts.values()))) == list(range(len(data)))
    for head in ("topic", "sentiment"):
        labels = getattr(data, head)
        for label in np.unique(labels[labels >= 0]):  # every class is in every slice, in proportion
            assert (labels[parts["test"]] == label).sum() == round(0.2 * (labels == label).sum())
    assert all(np.array_equal(parts[k], split(data, 0.2, 0.2, seed=7)[k]) for k in parts)
    assert not np.array_equal(parts["test"], split(data, 0.2, 0.2, seed=8)["test"])
    with pytest.raises(DataError, match="no sentiment_train.csv or topic_train.csv"):
        load_shared(tmp_path / "empty")


def test_adding_a_source_leaves_the_other_sources_slices_as_they_were(tmp_path):
    """Held-out figures stay comparable when a file of yours joins the shared sets: each source is split alone."""
    write_shared_layout(tmp_path)
    shared_only = split(load_data(["shared"], tmp_path), 0.2, 0.2, seed=7)
    n_shared = len(load_data(["shared"], tmp_path))
    mine = tmp_path / "mine.csv"  # same topics as the shared rows: the old split mixed them into one stratum
    mine.write_text("text,topic,sentiment\n" + "".join(f"Sentence {i},{i % 4},{'bullish' if i % 2 else 'bearish'}\n"
                                                       for i in range(40)))
    both = load_data(["shared", str(mine)], tmp_path)
    assert list(both.origin[:n_shared]) == [0] * n_shared and set(both.origin[n_shared:]) == {1}
    parts = split(both, 0.2, 0.2, seed=7)
    for name in parts:
        assert np.array_equal(parts[name][parts[name] < n_shared], shared_only[name])
    mine_test = parts["test"][parts["test"] >= n_shared]
    assert len(mine_test) == 8 and set(both.topic[mine_test]) == {0, 1, 2, 3}  # mine is stratified on its own


def test_twin_key_sets_links_case_punctuation_and_entities_aside():
    from models.textprep import twin_key
    posted = "Big U.S. banks see loan growth slowing  https://t.co/3qcf9IJcYu  https://t.co/JSZVc7YNGl"
    assert twin_key(posted) == twin_key("big U.S. banks see loan-growth slowing! https://t.co/oa8MWcGngI")
    assert twin_key("S&amp;P 500 slips") == twin_key("S&P 500 slips") == "s p 500 slips"
    assert twin_key("Fed holds rates (1)") != twin_key("Fed holds rates (2)")


def twins_fixture() -> tuple[LabeledSet, list[list[int]]]:
    """120 topic rows over 4 topics; 30 headlines are posted two or three times, with other links, behind a
    cashtag, or with a source's suffix. The other 60 share a five-word phrase ("shares of the company rose"):
    too short to make them one post."""
    texts, topics, groups = [], [], []
    for i in range(90):
        copies = 1 if i >= 30 else 2 + i % 2
        groups.append(list(range(len(texts), len(texts) + copies)))
        for copy in range(copies):
            headline = f"Headline {i}: shares of the company rose on day {i}"
            texts.append([f"{headline} https://t.co/{i}x", f"$TICK - {headline}", f"{headline} -sources"][copy])
            topics.append(i % 4)
    return LabeledSet(texts, np.array(topics), np.full(len(texts), MISSING)), [g for g in groups if len(g) > 1]


def test_twin_groups_join_reposts_not_posts_that_share_a_phrase():
    from models.data import twin_groups
    data, groups = twins_fixture()
    group = twin_groups(data.texts)
    assert all(len(set(group[g])) == 1 for g in groups)
    assert len(set(group)) == 90
    assert len(set(twin_groups(["Stocks rally", "stocks rally!", "Stocks rally as oil jumps on supply fears"]))) == 2


def test_the_split_keeps_twins_in_one_slice_the_first_any_of_them_drew():
    """A headline posted twice is one text to the model: with one copy trained on, the other is no test of it."""
    data, groups = twins_fixture()
    part_of = lambda parts: {int(i): name for name, rows in parts.items() for i in rows}  # noqa: E731
    before = part_of(split(data, 0.2, 0.2, seed=7, twins_together=False))
    assert sum(len({before[i] for i in g}) > 1 for g in groups) >= 10  # the stratified draw scatters them
    after = part_of(split(data, 0.2, 0.2, seed=7))
    assert sorted(after) == list(range(len(data)))
    order = ["train", "val", "test"]
    for group in groups:
        assert {after[i] for i in group} == {min((before[i] for i in group), key=order.index)}
    assert all(after[i] == before[i] for i in range(len(data)) if not any(i in g for g in groups))


def test_a_model_split_before_twins_is_evaluated_without_the_text_it_trained_on(tmp_path):
    """Models trained before twins were kept together keep their slices, less the rows whose text they trained on."""
    from models.data import twin_groups
    from models.evaluation import heldout_test
    data, _ = twins_fixture()
    data_file = tmp_path / "headlines.csv"
    data_file.write_text("text,topic\n" + "".join(f'"{t}",{TOPICS[k]}\n' for t, k in zip(data.texts, data.topic)))
    settings = {"specs": [str(data_file)], "sha256": {}, "test_fraction": 0.2, "val_fraction": 0.2, "split_seed": 7}
    group = twin_groups(data.texts)
    slices = []
    for scheme in ("per-source-twins-together", "per-source"):
        (tmp_path / "training_config.json").write_text(json.dumps({"data": {**settings, "split": scheme}}))
        old = split(data, 0.2, 0.2, seed=7, twins_together=scheme != "per-source")
        seen = set(group[np.concatenate([old["train"], old["val"]])])
        honest = [data.texts[i] for i in old["test"] if group[i] not in seen]
        sliced = heldout_test(tmp_path, tmp_path)
        assert sliced.texts == honest
        left_out = len(old["test"]) - len(honest)
        assert (left_out > 0) == (scheme == "per-source")
        assert (f"{left_out} of its {len(old['test'])} rows left out" in sliced.sources[0]) == (left_out > 0)
        slices.append(sliced.texts)
    # Twins only ever move to an earlier slice, so both schemes leave the same test rows: figures compare.
    assert slices[0] == slices[1]


def test_a_models_test_slice_is_rebuilt_as_the_sample_its_card_reports(tmp_path):
    """A recipe with a report_limit (quick: 1,000) reports on a stratified sample of its test slice, drawn with its
    seed: `finpulse evaluate MODEL` scores those rows (it scored the whole slice, and gave other figures than the
    card it says to reproduce); --whole-slice scores all of them. A changed data file is named."""
    from models.data import stratified_sample
    from models.evaluation import heldout_test
    data, _ = twins_fixture()
    data_file = tmp_path / "headlines.csv"
    data_file.write_text("text,topic\n" + "".join(f'"{t}",{TOPICS[k]}\n' for t, k in zip(data.texts, data.topic)))
    settings = {"specs": [str(data_file)], "sha256": {}, "test_fraction": 0.4, "val_fraction": 0.2, "split_seed": 7,
                "split": "per-source-twins-together"}
    (tmp_path / "training_config.json").write_text(json.dumps({"data": settings,
                                                               "recipe": {"report_limit": 5, "fit": {"seed": 13}}}))
    whole = split(data, 0.4, 0.2, seed=7)["test"]
    assert len(whole) > 5
    reported = heldout_test(tmp_path, tmp_path)
    assert reported.texts == [data.texts[i] for i in stratified_sample(data, whole, 5, 13)]
    assert f"the stratified sample of {len(reported)} of its {len(whole)} rows its model card reports" in \
        reported.sources[0]
    assert heldout_test(tmp_path, tmp_path, whole_slice=True).texts == [data.texts[i] for i in whole]

    settings["sha256"] = {"headlines.csv": "0" * 64}
    (tmp_path / "training_config.json").write_text(json.dumps({"data": settings}))
    with pytest.raises(DataError, match="headlines.csv of the training data .* differ from what"):
        heldout_test(tmp_path, tmp_path)


def test_a_sample_keeps_every_row_of_a_small_source():
    """The quick recipe samples its training rows: 30 sentences of yours are not cut to 6 beside 1,000 tweets."""
    from models.data import stratified_sample
    tweets = LabeledSet([f"t{i}" for i in range(1000)], np.arange(1000) % 20, np.full(1000, MISSING))
    mine = LabeledSet([f"m{i}" for i in range(30)], np.arange(30) % 20, np.arange(30) % 3, origin=np.ones(30))
    both = LabeledSet.concat([tweets, mine])
    chosen = stratified_sample(both, np.arange(len(both)), 400, seed=3)
    assert 380 <= len(chosen) <= 400 and set(range(1000, 1030)) <= set(chosen)  # strata round their shares
    assert np.bincount(both.topic[chosen[chosen < 1000]], minlength=20).min() >= 18  # the rest still stratified
    # Large beside the limit, a source is sampled like the others; a single source samples as it always did.
    assert (stratified_sample(both, np.arange(len(both)), 200, seed=3) >= 1000).sum() < 30
    assert np.array_equal(stratified_sample(tweets, np.arange(1000), 400, seed=3),
                          stratified_sample(both, np.arange(1000), 400, seed=3))


def packaged_news_set(name: str, rows: int, sentiments: list[int], per_topic: tuple[int, int]) -> LabeledSet:
    """A news set shipped in the package, loaded by name, checked for size, balance and newswire style."""
    news = load_data([name], Path("no data dir needed"))
    assert len(news) == rows and len(set(news.texts)) == rows
    topics = np.bincount(news.topic, minlength=len(TOPICS))
    assert per_topic[0] <= topics.min() and topics.max() <= per_topic[1]
    assert np.bincount(news.sentiment, minlength=3).tolist() == sentiments  # bearish, neutral, bullish
    # Newswire style is the point: nothing tweet-shaped (cashtags, links, handles, hashtags) may creep in.
    assert not any(re.search(r"\$[A-Za-z]|http|@|#", text) for text in news.texts)
    return news


def test_news_probe_loads_by_name_with_every_topic_and_sentiment():
    from models.data import NEWS_PROBE, NEWS_PROBE_FILE
    assert packaged_news_set(NEWS_PROBE, 400, [131, 147, 122], (20, 20)).sources == [str(NEWS_PROBE_FILE)]


def test_news_train_loads_by_name_and_shares_no_sentence_with_the_probe():
    """The newswire sentences every recipe trains on by default, and the probe that measures them, stay apart."""
    from models.data import DEFAULT_TRAINING_SOURCES, NEWS_PROBE, NEWS_TRAIN, NEWS_TRAIN_FILE
    assert DEFAULT_TRAINING_SOURCES == ("shared", NEWS_TRAIN)
    news = packaged_news_set(NEWS_TRAIN, 788, [256, 275, 257], (37, 40))
    assert news.sources == [str(NEWS_TRAIN_FILE)]

    def words(text: str) -> set[str]:
        return set(re.findall(r"[a-z]+", text.lower()))
    probe = [words(t) for t in load_data([NEWS_PROBE], Path("no data dir needed")).texts]
    closest = max(len(a & b) / len(a | b) for a in map(words, news.texts) for b in probe)
    assert closest < 0.75  # boilerplate (dividend dates) comes closest, at about 0.7


def test_confident_mistakes_lists_wrong_rows_most_confident_first():
    from models.evaluation import confident_mistakes
    from models.scorer import Probabilities
    bear, neutral, bull = (SENTIMENTS.index(s) for s in ("bearish", "neutral", "bullish"))
    data = LabeledSet(["right", "wrong, unsure", "wrong, sure", "no sentiment label", "cannot score"],
                      np.full(5, MISSING), np.array([bear, bear, bull, MISSING, neutral]))
    sentiment = np.zeros((5, 3), dtype=np.float32)   # columns in SENTIMENTS order
    sentiment[0, bear] = 1.0
    sentiment[1, [bear, neutral, bull]] = [0.3, 0.6, 0.1]
    sentiment[2, [bear, neutral, bull]] = [0.9, 0.05, 0.05]
    sentiment[3, bull] = 1.0
    probs = Probabilities(np.zeros((5, len(TOPICS)), dtype=np.float32), sentiment, [None] * 4 + ["text too odd"])
    mistakes = confident_mistakes(probs, data, limit=10)
    assert list(mistakes) == ["sentiment"]          # no row has a topic label: no topic list
    listed = mistakes["sentiment"]
    assert [m["text"] for m in listed] == ["cannot score", "wrong, sure", "wrong, unsure"]
    assert listed[0]["predicted"] is None and listed[0]["error"] == "text too odd"
    assert (listed[1]["label"], listed[1]["predicted"], listed[1]["confidence"]) == ("bullish", "bearish", 0.9)
    assert (listed[2]["label"], listed[2]["predicted"], listed[2]["confidence"]) == ("bearish", "neutral", 0.6)
    assert [m["text"] for m in confident_mistakes(probs, data, limit=2)["sentiment"]] == ["cannot score", "wrong, sure"]


def test_head_report_matches_hand_computed_metrics():
    report = head_report(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 1]), ["a", "b", "c"])
    assert report["accuracy"] == pytest.approx(0.6)
    assert report["per_class"]["a"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(0.6667, abs=1e-4),
                                        "support": 2}
    assert report["per_class"]["b"]["f1"] == pytest.approx(2 * 0.5 * 1.0 / 1.5, abs=1e-4)
    assert report["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0.0) / 3)
    assert report["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [0, 1, 0]]
    assert "unscored_by_class" not in report


def test_a_row_without_a_prediction_is_wrong_and_no_class_is_predicted_for_it():
    """An unscorable row counted as a prediction of the next class lowered that class's precision and put a made-up
    prediction in the matrix; it lowers accuracy and its own class's recall alone."""
    from models.metrics import NO_PREDICTION, format_report
    report = head_report(np.array([0, 0, 1, 2]), np.array([0, NO_PREDICTION, 1, 2]), ["a", "b", "c"])
    assert report["accuracy"] == pytest.approx(0.75) and report["n"] == 4
    assert report["per_class"]["a"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(0.6667, abs=1e-4),
                                        "support": 2}
    assert report["per_class"]["b"]["precision"] == 1.0 and report["per_class"]["c"]["precision"] == 1.0
    assert report["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert report["unscored_by_class"] == {"a": 1}
    assert "  1 row(s) could not be scored: counted wrong, outside the matrix (a 1)" in format_report("x", report)
    # A class neither in the rows nor predicted is not shown as an F1 of 0.000 (macro-F1 leaves it out).
    absent = format_report("x", head_report(np.array([0, 1]), np.array([0, 1]), ["a", "b", "c"]))
    assert "  c  -         (neither in these rows nor predicted)" in absent and "  b  F1 1.000" in absent
    # The bootstrap scores such a row alike.
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 3, 200)
    predicted = np.where(rng.random(200) < 0.1, NO_PREDICTION, np.where(rng.random(200) < 0.8, truth, 0))
    [scores] = resampled_scores(truth, [predicted], 3, rounds=4, seed=2)
    for i, rows in enumerate(np.random.default_rng(2).integers(0, 200, size=(4, 200))):
        resampled = head_report(truth[rows], predicted[rows], SENTIMENTS)
        assert scores["accuracy"][i] == pytest.approx(resampled["accuracy"])
        assert scores["macro_f1"][i] == pytest.approx(resampled["macro_f1"])


def test_bootstrap_resamples_score_as_head_report_does_however_many_are_drawn_at_once(monkeypatch):
    rng = np.random.default_rng(7)
    truth = rng.integers(0, 3, 300)
    predicted = np.where(rng.random(300) < 0.8, truth, rng.integers(0, 3, 300))
    [scores] = resampled_scores(truth, [predicted], 3, rounds=6, seed=1)
    for i, rows in enumerate(np.random.default_rng(1).integers(0, 300, size=(6, 300))):
        report = head_report(truth[rows], predicted[rows], SENTIMENTS)
        assert scores["accuracy"][i] == pytest.approx(report["accuracy"])
        assert scores["macro_f1"][i] == pytest.approx(report["macro_f1"])
    monkeypatch.setattr(metrics, "_INDICES_AT_ONCE", 600)     # two resamples at a time: the same draws
    [chunked] = resampled_scores(truth, [predicted], 3, rounds=6, seed=1)
    assert np.array_equal(chunked["macro_f1"], scores["macro_f1"])


def test_a_paired_comparison_finds_a_gap_that_two_separate_intervals_would_call_noise():
    rng = np.random.default_rng(11)
    truth = rng.integers(0, 3, 1000)
    a = np.where(rng.random(1000) < 0.85, truth, (truth + 1) % 3)
    b = a.copy()       # B: A with 25 more rows wrong, 2.5 points of accuracy
    worse = rng.choice(np.flatnonzero(a == truth), 25, replace=False)
    b[worse] = (truth[worse] + 2) % 3
    gap = paired_difference(truth, a, b, SENTIMENTS)["accuracy"]
    assert gap["difference"] == pytest.approx(0.025) and gap["interval"][0] > 0 and gap["verdict"] == "A ahead"
    assert paired_difference(truth, b, a, SENTIMENTS)["accuracy"]["verdict"] == "B ahead"
    interval_a, interval_b = (bootstrap_intervals(truth, p, 3)["accuracy"] for p in (a, b))
    assert interval_a[0] < gap["a"] < interval_a[1] and interval_b[1] > interval_a[0]   # apart, they overlap
    # A model against itself differs by nothing; against one as good but wrong on other rows, by nothing clear.
    assert paired_difference(truth, a, a, SENTIMENTS)["macro_f1"]["interval"] == [0.0, 0.0]
    as_good = np.where(rng.random(1000) < 0.85, truth, (truth + 1) % 3)
    assert paired_difference(truth, a, as_good, SENTIMENTS)["accuracy"]["verdict"] == "no clear difference"


def test_rows_in_both_are_the_rows_of_one_slice_that_the_other_holds_with_the_same_labels():
    data = tiny_set()
    other = data.subset([7, 2, 12])
    assert other.sentiment[0] >= 0
    other.sentiment[0] = (other.sentiment[0] + 1) % 3       # row 7 labeled otherwise: not the same row
    assert rows_in_both(data, other).tolist() == [2, 12]
    assert rows_in_both(data, data).tolist() == list(range(len(data)))


def test_tiny_csv_fixture_round_trips_through_the_loader(tmp_path):
    data = load_file(write_tiny_csv(tmp_path / "t.csv"))
    reference = tiny_set()
    assert data.texts == reference.texts
    assert np.array_equal(data.topic, reference.topic) and np.array_equal(data.sentiment, reference.sentiment)


def test_sentiment_files_labeled_positive_and_negative_load_as_bullish_and_bearish(tmp_path):
    """Finance news sets such as Financial PhraseBank label sentiment positive / negative / neutral."""
    news = tmp_path / "news.csv"
    news.write_text("text,sentiment\nProfit rose.,positive\nSales fell.,Negative\nThe board met.,neutral\n"
                    "Shares jumped.,bullish\n")
    data = load_file(news)
    assert [SENTIMENTS[i] for i in data.sentiment] == ["bullish", "bearish", "neutral", "bullish"]
    news.write_text("text,sentiment\nProfit rose.,positive\nThe board met.,mixed\n")
    with pytest.raises(DataError, match="row 3: unknown sentiment 'mixed'"):
        load_file(news)


def test_the_models_dir_setting_is_where_the_worker_looks_for_the_newest_model(tiny_model_dir, tmp_path, monkeypatch):
    from models.settings import models_root
    from stream.config import load_settings

    monkeypatch.delenv("FINPULSE_MODEL_DIR", raising=False)
    root = tmp_path / "elsewhere"
    make_model_copy(tiny_model_dir, root / "only", "2026-06-01T00:00:00+00:00")
    settings = load_settings(None, environ={"FINPULSE_MODELS__MODELS_DIR": str(root)})
    scorer = load_scorer("model", None, "cpu", models_root(settings))
    assert isinstance(scorer, BatchScorer) and scorer.model_version == json.loads((root / "only" / "config.json").read_text())["model_version"]
