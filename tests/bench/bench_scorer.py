"""Benchmark of the batched scorer (models.scorer.BatchScorer).

Measured in one run, on the same model:
- CPU: end-to-end throughput (texts in, Predictions out) at the worker's batch size in each CPU precision
  (float32, bf16 autocast, int8; ``models.precision``), p50/p99 latency of one batch, and how often bf16 and int8
  give float32's labels. bf16 is fast only on a CPU with bfloat16 instructions (the table says if this one has).
- GPU (when there is one): the scorer's end-to-end throughput (cleaning, tokenization, transfers, forward, results
  back on the CPU as Predictions) as a ratio to a raw forward pass of the same model on ids already on the GPU, at
  the same batch size and sequence length (goal >= 0.5); a naive tokenize-then-forward loop for reference;
  p50/p99 batch latency; and a real out-of-memory split (the allocator is capped so a huge batch cannot fit).

The model is the newest trained one (or --model DIR); without one, an untrained model with the same
architecture as the default (all-MiniLM-L6-v2 + two heads): speed does not depend on the weights.
Prints a table and returns the figures; ``--json FILE`` also writes them.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

WORDS = ("shares rise after earnings beat estimates as analysts raise price target on strong guidance while the "
         "fed holds rates steady and oil prices slip amid supply concerns; bank stocks rally, treasury yields "
         "climb, dividend raised, ceo steps down, merger talks, ipo priced above range, guidance cut").split()
TICKERS = ("$AAPL", "$TSLA", "$AMZN", "$JPM", "$XOM", "$NVDA", "$MSFT", "$GS")


def synthetic_texts(count: int, min_words: int, max_words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(TICKERS)} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words)))
            + f" https://t.co/{rng.getrandbits(40):x}" for _ in range(count)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def model_dir(explicit: str | None, workdir: Path) -> Path:
    from models.registry import find_model_dir
    found = find_model_dir(explicit)
    if found:
        return found
    from models.modeling import FinPulseClassifier, resolve_base_model, save_model
    base = resolve_base_model(None)
    out = workdir / "untrained"
    save_model(FinPulseClassifier.from_base(base), base, out, base_model=base, recipe="untrained", max_length=64)
    return out


def timed_calls(fn, batches: list, repeats: int) -> list[float]:
    latencies = []
    for i in range(repeats):
        began = time.perf_counter()
        fn(batches[i % len(batches)])
        latencies.append(time.perf_counter() - began)
    return latencies


def bench_cpu(path: Path, batch: int, results: dict) -> None:
    import numpy as np
    import torch
    from models.precision import BF16, FLOAT32, INT8, native_bf16
    from models.scorer import BatchScorer
    texts = synthetic_texts(batch * 8, 4, 30, seed=1)
    batches = [texts[i:i + batch] for i in range(0, len(texts), batch)]
    labels = {}
    for name in (FLOAT32, BF16, INT8):
        scorer = BatchScorer.from_pretrained(path, device="cpu", batch_size=batch, cpu_precision=name)
        scorer.score(batches[0])  # warm-up
        began = time.perf_counter()
        predictions = scorer.score(texts)
        seconds = time.perf_counter() - began
        latencies = timed_calls(scorer.score, batches, 8)
        labels[name] = [(p.topic, p.sentiment) for p in predictions]
        results[f"cpu_{name}"] = {"batch": batch, "texts": len(texts), "seq_per_s": round(len(texts) / seconds, 1),
                                  "p50_ms": round(1000 * percentile(latencies, 50), 1),
                                  "p99_ms": round(1000 * percentile(latencies, 99), 1),
                                  "threads": torch.get_num_threads()}
    for name in (BF16, INT8):
        agree = np.mean([a == b for a, b in zip(labels[FLOAT32], labels[name])])
        results[f"cpu_{name}_label_agreement"] = round(float(agree), 4)
    results["cpu_native_bf16"] = native_bf16()


def read_texts(path: str) -> list[str]:
    """The ``text`` column of a CSV file: real text, whose lengths and vocabulary the synthetic texts only imitate."""
    import csv
    with open(path, newline="", encoding="utf-8") as handle:
        return [row["text"] for row in csv.DictReader(handle) if row.get("text")]


def bench_gpu(path: Path, batch: int, length: int, results: dict, oom_check: bool = True,
              real_texts: list[str] | None = None) -> None:
    import torch
    from models.scorer import BatchScorer
    scorer = BatchScorer.from_pretrained(path, device="cuda", batch_size=batch)
    model, encoder = scorer.model, scorer.text_encoder
    length = min(length, encoder.max_length)
    # Texts long enough to be truncated at ``length`` tokens: every batch is exactly (batch, length), as is the raw pass.
    encoder.tokenizer.enable_truncation(length)
    texts = synthetic_texts(batch * 48, length - 4, length + 4, seed=2)
    ids = torch.randint(1000, 30000, (batch, length), device="cuda")
    mask = torch.ones_like(ids)

    def raw():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            topic, sentiment = model(ids, mask)
            return torch.cat([topic.float().softmax(-1), sentiment.float().softmax(-1)], 1)

    for _ in range(5):
        raw()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    repeats = 30
    for _ in range(repeats):
        raw()
    end.record()
    end.synchronize()
    raw_rate = batch * repeats / (start.elapsed_time(end) / 1000)

    # The scorer as configured by default, and with other numbers of tokenizer processes (0: in-process).
    by_processes = {}
    for processes in sorted({0, 2, 4, 5, 6, 8, scorer.tokenizer_processes}):
        candidate = scorer if processes == scorer.tokenizer_processes else BatchScorer(
            model, encoder, scorer.model_version, device="cuda", batch_size=batch, tokenizer_processes=processes)
        candidate.score(texts[: batch * 4])  # warm-up: allocator, kernels, pinned pool, tokenizer processes
        rates = []
        for _ in range(5):
            began = time.perf_counter()
            predictions = candidate.score(texts)
            rates.append(len(texts) / (time.perf_counter() - began))
        assert all(p.ok for p in predictions)
        by_processes[processes] = round(statistics.median(rates))
        if candidate is not scorer:
            candidate.close()
    scorer_rate = by_processes[scorer.tokenizer_processes]

    def naive(chunk):  # tokenize, copy, forward, copy back: one step after the other
        tok_ids, tok_mask = encoder.pad(encoder.ids(chunk))
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            topic, sentiment = model(torch.from_numpy(tok_ids).cuda(), torch.from_numpy(tok_mask).cuda())
            return topic.float().softmax(-1).cpu(), sentiment.float().softmax(-1).cpu()

    chunks = [texts[i:i + batch] for i in range(0, len(texts), batch)]
    naive(chunks[0])
    began = time.perf_counter()
    for chunk in chunks[:16]:
        naive(chunk)
    naive_rate = 16 * batch / (time.perf_counter() - began)

    began = time.perf_counter()
    encoder.ids(chunks[0])
    tokenize_ms = 1000 * (time.perf_counter() - began)
    pool_rate = None
    if scorer.tokenizer_processes:  # the tokenizer processes alone: the most the scorer could reach
        pool = scorer._pool()
        began = time.perf_counter()
        for pending in [pool.submit(chunk) for chunk in chunks]:
            pending.result()
        pool_rate = round(len(texts) / (time.perf_counter() - began))
    latencies = timed_calls(scorer.score, chunks, 40)
    results["gpu"] = {
        "device": torch.cuda.get_device_name(), "batch": batch, "length": length,
        "raw_forward_seq_per_s": round(raw_rate), "scorer_seq_per_s": round(scorer_rate),
        "ratio_scorer_to_raw": round(scorer_rate / raw_rate, 3),
        "naive_loop_seq_per_s": round(naive_rate), "ratio_naive_to_raw": round(naive_rate / raw_rate, 3),
        "tokenize_one_batch_ms": round(tokenize_ms, 1), "tokenizer_processes": scorer.tokenizer_processes,
        "scorer_seq_per_s_by_tokenizer_processes": by_processes, "tokenizer_processes_alone_seq_per_s": pool_rate,
        "p50_batch_ms": round(1000 * percentile(latencies, 50), 2),
        "p99_batch_ms": round(1000 * percentile(latencies, 99), 2),
    }
    mixed = synthetic_texts(batch * 48, 4, 30, seed=3)
    encoder.tokenizer.enable_truncation(encoder.max_length)
    scorer.score(mixed)  # warm-up: a pinned buffer and kernels for each batch width
    began = time.perf_counter()
    scorer.score(mixed)
    results["gpu"]["tweet_like_seq_per_s"] = round(len(mixed) / (time.perf_counter() - began))
    if real_texts:
        rates = []
        for _ in range(2):  # the first pass meets every word for the first time; a stream repeats its words
            began = time.perf_counter()
            scorer.score(real_texts)
            rates.append(round(len(real_texts) / (time.perf_counter() - began)))
        results["gpu"]["real_texts"] = {"count": len(real_texts), "seq_per_s": rates[0], "seq_per_s_again": rates[1]}
    print_table(results)  # now: the out-of-memory check below may take a while
    if oom_check:
        results["gpu"]["oom_split"] = oom_split_check(scorer)
        print(f"    out-of-memory split  {results['gpu']['oom_split']}", flush=True)


def oom_split_check(scorer) -> str:
    """Cap the allocator so one huge batch cannot fit: the scorer must split it and still score every text."""
    import torch
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(1.5e9 / total)
    try:
        scorer.batch_size = 1 << 14
        texts = synthetic_texts(1 << 14, 60, 80, seed=4)
        predictions = scorer.score(texts)
        ok = all(p.ok for p in predictions)
        return f"{'ok' if ok else 'FAILED'}: a batch of {len(texts)} under a 1.5 GB cap ran as batches of {scorer.batch_size}"
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="bench_scorer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model directory (default: newest trained, else an untrained one)")
    parser.add_argument("--cpu-batch", type=int, default=64)
    parser.add_argument("--gpu-batch", type=int, default=1024)
    parser.add_argument("--length", type=int, default=64, help="GPU ratio: tokens per text (model max at most)")
    parser.add_argument("--no-cpu", action="store_true")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--texts", help="GPU: also score the 'text' column of this CSV (real text)")
    args, _others = parser.parse_known_args(argv)  # the bench runner hands every module the same arguments
    import torch
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = model_dir(args.model, Path(tmp))
        results["model"] = path.name
        if torch.cuda.is_available():
            bench_gpu(path, args.gpu_batch, args.length, results,
                      real_texts=read_texts(args.texts) if args.texts else None)
        if not args.no_cpu:
            bench_cpu(path, args.cpu_batch, results)
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


def print_table(results: dict) -> None:
    print(f"\nscorer benchmark (model {results['model']})", flush=True)
    for name in ("cpu_float32", "cpu_bf16", "cpu_int8"):
        if name in results:
            r = results[name]
            print(f"  {name:<12} batch {r['batch']:>4}: {r['seq_per_s']:>9.1f} seq/s   p50 {r['p50_ms']:>7.1f} ms"
                  f"   p99 {r['p99_ms']:>7.1f} ms   ({r['threads']} threads)")
    for name in ("bf16", "int8"):
        if f"cpu_{name}_label_agreement" in results:
            ratio = results[f"cpu_{name}"]["seq_per_s"] / results["cpu_float32"]["seq_per_s"]
            print(f"  {name} vs float32: {ratio:.2f}x the rate, same labels on "
                  f"{results[f'cpu_{name}_label_agreement']:.1%} of texts (held-out accuracy of each: `finpulse "
                  f"evaluate --cpu-precision {name}`)")
    if "cpu_native_bf16" in results:
        print(f"  this CPU {'has' if results['cpu_native_bf16'] else 'lacks'} bfloat16 instructions: [worker] "
              f"cpu_precision = auto scores in {'bf16' if results['cpu_native_bf16'] else 'float32'}")
    if "gpu" in results:
        g = results["gpu"]
        print(f"  GPU {g['device']}, batch {g['batch']} x {g['length']} tokens:")
        print(f"    raw forward          {g['raw_forward_seq_per_s']:>9} seq/s")
        print(f"    scorer end-to-end    {g['scorer_seq_per_s']:>9} seq/s   ratio {g['ratio_scorer_to_raw']:.3f} (goal >= 0.5)"
              f"   [{g['tokenizer_processes']} tokenizer processes; seq/s by processes:"
              f" {g['scorer_seq_per_s_by_tokenizer_processes']}]")
        if g.get("tokenizer_processes_alone_seq_per_s"):
            print(f"    tokenizer processes  {g['tokenizer_processes_alone_seq_per_s']:>9} texts/s (tokenizing alone)")
        print(f"    naive loop           {g['naive_loop_seq_per_s']:>9} seq/s   ratio {g['ratio_naive_to_raw']:.3f}")
        print(f"    tweet-length texts   {g['tweet_like_seq_per_s']:>9} seq/s (scorer, mixed lengths)")
        if "real_texts" in g:
            r = g["real_texts"]
            print(f"    real texts           {r['seq_per_s']:>9} seq/s (scorer, {r['count']} texts of --texts;"
                  f" {r['seq_per_s_again']} seq/s scored again)")
        print(f"    batch latency        p50 {g['p50_batch_ms']} ms   p99 {g['p99_batch_ms']} ms"
              f"   (tokenizing one batch in-process: {g['tokenize_one_batch_ms']} ms)")


if __name__ == "__main__":
    main()
