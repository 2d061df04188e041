"""``finpulse train``, ``evaluate``, ``calibrate``, ``score`` and ``models``: the classifier's command line.

Registered into the ``finpulse`` dispatcher by ``register``; ``python -m models.cli`` runs the same commands
without the rest of FinPulse installed (as on a bare GPU machine). torch is imported only when a command runs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
from pathlib import Path

from . import score_files
from .interface import SCORERS_WITHOUT_A_MODEL
from .precision import CPU_PRECISIONS
from .settings import ModelSettings

RECIPE_NAMES = ("quick", "plain", "full")  # models.recipes.RECIPES, named here so `--help` needs no torch


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune the topic + sentiment classifier (writes var/models/<version>/)",
                       description="Recipes: quick (CPU, <10 min, for a first run), plain (one fine-tuned model), "
                                   "full (GPU: domain pretraining, teacher ensemble, cross-task distillation). "
                                   "--refit MODEL trains MODEL's recipe again on every labeled row, for the model "
                                   "to ship.")
    p.add_argument("--recipe", choices=RECIPE_NAMES, help="default quick")
    p.add_argument("--refit", metavar="MODEL",
                   help="train this model's recipe again on every labeled row, its validation and test slices "
                        "included, with the epochs, ensemble and temperatures it chose; its held-out figures become "
                        "the new model's (the same data, recipe and base model; none of the options that change "
                        "them may be given)")
    p.add_argument("--data", action="append", metavar="SOURCE",
                   help="'shared' (the tweets), 'news-train' (788 newswire sentences written for FinPulse), a "
                        "directory like the shared one, a CSV (any separator), TSV or JSONL file with text + "
                        "topic and/or sentiment, or hub:twitter-financial-news-{sentiment,topic}[:split] (online); "
                        "repeatable; default: shared and news-train")
    p.add_argument("--weight", action="append", metavar="SOURCE=W",
                   help="each row of this --data source counts W times in training (e.g. a few hundred labeled "
                        "sentences of the text your streams carry: --weight my_news.csv=10); repeatable")
    p.add_argument("--data-dir", help="the shared data directory (default [models] data_dir, $FINPULSE_DATA_DIR, "
                                      "../shared/data/finance)")
    p.add_argument("--base-model", help="local directory or hub id of a BERT-family encoder (default all-MiniLM-L6-v2)")
    p.add_argument("--out", help="models directory (default [models] models_dir, var/models)")
    p.add_argument("--runs-dir", help="training state directory (default [models] runs_dir, var/runs)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default [models] device)")
    p.add_argument("--cpu-precision", choices=["auto", "float32", "bf16"],
                   help="on a CPU, train under bf16 autocast as on a GPU (1.5x faster with AMX, the same held-out "
                        "scores, but not always bit-reproducible), or in float32; auto: bf16 "
                        "where the CPU has bfloat16 instructions (default [models] cpu_precision: float32)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run of the same recipe and data")
    p.add_argument("--fresh", action="store_true",
                   help="start over, deleting what an interrupted run of the same command kept for --resume")
    p.add_argument("--keep-run-state", action="store_true", default=None,
                   help="keep the run's checkpoints once the model is saved (default [models] keep_run_state: they "
                        "are removed, as they only serve --resume)")
    p.add_argument("--time-budget", type=_positive_seconds, metavar="SECONDS",
                   help="spread this many seconds of training over the stages, shrinking their schedules to fit "
                        "(replaces the recipe's own budget: the quick recipe's is 400 s, so on a slow CPU a longer "
                        "one lets it finish)")
    p.add_argument("--epochs", type=_at_least_one, help="fine-tuning epochs (default: the recipe's; full: the teachers' and the student's)")
    p.add_argument("--batch-size", type=_at_least_one, help="texts per training step (default: the recipe's)")
    p.add_argument("--lr", type=_positive_rate, help="peak AdamW learning rate (default: the recipe's)")
    p.add_argument("--max-length", type=_at_least_one, help="tokens per text")
    p.add_argument("--seed", type=int, help="training seed (default: the recipe's)")
    p.add_argument("--train-limit", type=_at_least_one, metavar="ROWS", help="train on a stratified sample of this many rows")
    p.add_argument("--teachers", type=_at_least_one, help="full recipe: adapted-encoder teachers in the ensemble")
    p.add_argument("--mlm-epochs", type=_at_least_one, help="full recipe: domain pretraining epochs")
    p.add_argument("--parallel", type=_at_least_one, metavar="N",
                   help="full recipe: teachers trained at once, each in its own process (default: on a GPU as many "
                        "as its free memory and the host's cores allow; one at a time on a CPU)")
    p.add_argument("--save-dtype", choices=["float32", "float16"], default="float32",
                   help="weights as saved (float16: half the size; loaded as float32 either way)")
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="accuracy, macro-F1, per-class F1 and confusion matrices of a trained model")
    p.add_argument("model", nargs="?", help="model directory (default: the newest under var/models)")
    p.add_argument("--data", action="append", metavar="SOURCE",
                   help="evaluate on these sources instead (as for train); default: the model's held-out test slice")
    p.add_argument("--split", choices=["test", "val"], default="test",
                   help="without --data: which held-out slice of the model's training data (default test)")
    p.add_argument("--whole-slice", action="store_true",
                   help="without --data: score the whole test slice, not the stratified sample of it the model card "
                        "reports on (the quick recipe reports on 1,000 rows)")
    p.add_argument("--data-dir", help="the shared data directory (as for train)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default [models] device)")
    p.add_argument("--cpu-precision", choices=["bf16", "int8"],
                   help="evaluate the model as the worker runs it in this precision on the CPU, beside float32: how "
                        "often the labels agree and what it costs in accuracy (default: float32 alone)")
    p.add_argument("--out", help="JSON report path (default var/eval/<version>-<data>.json)")
    p.add_argument("--errors", type=_at_least_one, default=0, metavar="N",
                   help="also list each head's N most confident mistakes, each with the words that pushed it there "
                        "(printed and in the JSON report)")
    p.add_argument("--against", metavar="MODEL",
                   help="compare with this model (a directory or version) on the same rows: each head's difference "
                        "in accuracy and macro-F1 with a 95%% paired bootstrap interval, and which model is ahead, if "
                        "either (of these two models: another seed of the same recipe can differ as much); without "
                        "--data, on the rows both models held out")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("calibrate", help="fit a trained model's confidence temperatures; saves a calibrated copy",
                       description="Fits one softmax temperature per head by minimising the negative log-likelihood "
                                   "of labeled rows, then saves a copy of the model with them under a new version "
                                   "(the worker picks the newest). No label changes; confidences and sentiment "
                                   "scores come to mean what they say. Models trained now are calibrated already.")
    p.add_argument("model", nargs="?", help="model directory or version (default: the newest under var/models)")
    p.add_argument("--data", action="append", metavar="SOURCE",
                   help="fit on these labeled rows instead (as for train: e.g. a CSV of the text your streams "
                        "carry); default: the model's validation slice, checked on its held-out test slice")
    p.add_argument("--data-dir", help="the shared data directory (as for train)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default [models] device)")
    p.add_argument("--out", help="models directory for the copy (default: beside the model)")
    p.set_defaults(func=_calibrate)

    p = sub.add_parser("score", help="what the classifier says of texts: given here, or a file of them (lines, CSV "
                                     "or JSONL)",
                       description="Scores texts with a trained model as the worker does: topic, its confidence, "
                                   "sentiment and a score in [-1, 1] (P(bullish) - P(bearish)), stamped with the "
                                   "model version. Texts given as arguments print as a table; a file is read and "
                                   "scored in chunks, each row written out with its own fields and the prediction's "
                                   "(JSONL by default, or CSV). A row that cannot be scored gets an error and the "
                                   "rest go on.")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to score (else --input, or standard input)")
    p.add_argument("--input", "-i", metavar="FILE",
                   help="a file of texts: one a line (.txt), CSV (comma, semicolon, tab or bar), TSV or JSONL with a "
                        "text field; - for standard input")
    p.add_argument("--input-format", choices=score_files.INPUT_FORMATS,
                   help="lines, csv or jsonl (default: from the file's suffix, else lines)")
    p.add_argument("--text-field", default="text", help="the CSV column or JSON field to score (default text)")
    p.add_argument("--encoding", default="utf-8",
                   help="the input's text encoding (default utf-8; cp1252 for a spreadsheet saved on Windows); "
                        "output is UTF-8")
    p.add_argument("--out", "-o", metavar="FILE", help="write here instead of standard output (whole or not at all)")
    p.add_argument("--format", choices=score_files.OUTPUT_FORMATS,
                   help="table, jsonl or csv (default: table for texts given as arguments, else from --out's "
                        "suffix, else jsonl)")
    p.add_argument("--model", help="model directory or version (default: the one the worker loads: [worker] "
                                   "model_dir, else the newest under [models] models_dir)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default [worker] device)")
    p.add_argument("--cpu-precision", choices=CPU_PRECISIONS,
                   help="how the model computes on a CPU (default [worker] cpu_precision, auto: bf16 where the CPU "
                        "has bfloat16 instructions, else float32); int8 stamps <version>+int8")
    p.add_argument("--explain", action="store_true",
                   help="also say which words pushed each score, by scoring the text again without each word in turn "
                        "(a table and CSV show the strongest, JSONL every word as [word, push]); costs about one "
                        "more text scored per word")
    p.set_defaults(func=_score)

    p = sub.add_parser("models", help="the trained models, newest first: held-out and news-probe figures, size, and "
                                      "the one the worker loads")
    p.add_argument("--json", action="store_true", help="one JSON list, for scripts")
    p.set_defaults(func=_models)


def _at_least_one(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {number}")
    return number


def _positive_rate(value: str) -> float:
    rate = float(value)
    if not 0 < rate < 1:
        raise argparse.ArgumentTypeError(f"must be a learning rate above 0 and below 1 (e.g. 5e-5), not {value}")
    return rate


def _positive_seconds(value: str) -> float:
    seconds = float(value)
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, not {value}")
    return seconds


# What a refit takes from its reference: options that would train something else are refused, not ignored.
REFIT_FIXED = ("recipe", "data", "weight", "base_model", "epochs", "batch_size", "lr", "max_length", "seed",
               "train_limit", "teachers", "mlm_epochs")


def _train(args, settings) -> int:
    import dataclasses
    import torch
    from .data import DEFAULT_TRAINING_SOURCES, DataError, default_data_dir, parse_weights
    from .modeling import ModelError, resolve_base_model
    from .card import print_outcome
    from .precision import resolve_cpu_precision
    from .recipes import RefitError, TrainingInterrupted, load_refit, run_recipe, with_cpu_precision
    from .registry import find_model_dir
    from .scorer import pick_device
    from .teachers import TeacherProcessDied

    ms = settings.section("models", ModelSettings)
    given = ["--" + name.replace("_", "-") for name in REFIT_FIXED if getattr(args, name) is not None]
    if args.refit and given:
        print(f"finpulse train: --refit trains the reference's recipe on its data: leave out {', '.join(given)}",
              file=sys.stderr)
        return 2
    try:
        refit = None
        if args.refit:
            refit = load_refit(find_model_dir(args.refit, args.out or ms.models_dir))  # a version: under --out
            recipe, data_specs, base_model = refit.recipe, refit.data_specs, refit.base_model
            data_weights = refit.data_weights
            print(f"refitting {refit.reference} (recipe {recipe.name}) on every labeled row; epochs per stage "
                  f"{refit.epochs}", flush=True)
        else:
            recipe, data_specs = _recipe_from_flags(args), args.data or list(DEFAULT_TRAINING_SOURCES)
            data_weights = parse_weights(args.weight or [])
            base_model = resolve_base_model(args.base_model or ms.base_model or None)
        if args.parallel is not None:
            recipe = dataclasses.replace(recipe, parallel=args.parallel)
        recipe = with_cpu_precision(recipe, resolve_cpu_precision(args.cpu_precision or ms.cpu_precision))
        outcome = run_recipe(
            recipe, data_specs=data_specs, data_dir=default_data_dir(args.data_dir or ms.data_dir or None),
            base_model=base_model, models_root=Path(args.out or ms.models_dir),
            runs_root=Path(args.runs_dir or ms.runs_dir), device=pick_device(args.device or ms.device),
            resume=args.resume, fresh=args.fresh, keep_run_state=bool(args.keep_run_state or ms.keep_run_state),
            time_budget=args.time_budget, save_dtype=getattr(torch, args.save_dtype),
            command=shlex.join(["finpulse", *sys.argv[1:]]), refit=refit, data_weights=data_weights)
    except (DataError, ModelError, RefitError, TeacherProcessDied) as exc:
        print(f"finpulse train: {exc}", file=sys.stderr)
        return 2
    except TrainingInterrupted as exc:
        print(f"\nfinpulse train: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\nfinpulse train: interrupted", file=sys.stderr)
        return 130
    print_outcome(outcome, recipe)
    return 0


def _recipe_from_flags(args):
    """The named recipe (default quick) with the flags that change what it trains."""
    import dataclasses
    from .recipes import RECIPES

    recipe = RECIPES[args.recipe or "quick"]
    fit_overrides = {k: v for k, v in {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                                        "max_length": args.max_length, "seed": args.seed}.items() if v is not None}
    recipe = dataclasses.replace(recipe, fit=dataclasses.replace(recipe.fit, **fit_overrides))
    if args.epochs is not None:
        recipe = dataclasses.replace(recipe, student_epochs=args.epochs)
    if args.train_limit is not None:
        recipe = dataclasses.replace(recipe, train_limit=args.train_limit)
    if args.teachers is not None:
        recipe = dataclasses.replace(recipe, teachers=args.teachers)
    if recipe.mlm and (args.mlm_epochs is not None or args.max_length):
        recipe = dataclasses.replace(recipe, mlm=dataclasses.replace(
            recipe.mlm, **{k: v for k, v in {"epochs": args.mlm_epochs, "max_length": args.max_length}.items() if v}))
    return recipe


def _report_data(report: Path):
    """The data an evaluation report says it measured (None when unreadable)."""
    try:
        return json.loads(report.read_text()).get("data")
    except (OSError, ValueError, AttributeError):
        return None


def _model_sets_scorer(command: str, args, settings, slices: tuple[str, ...], device: str | None = None):
    """The model ``args.model`` names (else the newest), the labeled sets the command reads (``--data``, or these
    held-out slices of the model's own training data) and a scorer over the model; None after printing why not."""
    from .data import DataError, default_data_dir, load_data
    from .evaluation import heldout_test
    from .modeling import ModelError
    from .registry import find_model_dir, no_model_found
    from .scorer import BatchScorer

    ms = settings.section("models", ModelSettings)
    try:
        model_dir = find_model_dir(args.model, ms.models_dir)
        if model_dir is None:
            raise ModelError(no_model_found(ms.models_dir))
        data_dir = default_data_dir(args.data_dir or ms.data_dir or None)
        if args.data:
            sets = [load_data(args.data, data_dir)] * len(slices)
        else:
            sets = [heldout_test(model_dir, data_dir, which, getattr(args, "whole_slice", False)) for which in slices]
        empty = next((labeled for labeled in sets if not len(labeled)), None)
        if empty is not None:
            raise DataError(f"{'; '.join(empty.sources)} holds no labeled row: nothing to measure")
        scorer = BatchScorer.from_pretrained(model_dir, device=device or args.device or ms.device)
    except (DataError, ModelError) as exc:
        print(f"finpulse {command}: {exc}", file=sys.stderr)
        return None
    return model_dir, sets, scorer


def _evaluate(args, settings) -> int:
    import re
    from .evaluation import (add_intervals, add_pushes, confident_mistakes, float32_comparison, format_mistakes,
                             format_source_reports, reports_by_source, reports_from)
    from .metrics import format_report
    from .modeling import write_json
    from .scorer import BatchScorer

    if args.cpu_precision and (args.device or "cpu") != "cpu":
        print(f"finpulse evaluate: --cpu-precision {args.cpu_precision} runs on the CPU: leave out --device "
              f"{args.device}", file=sys.stderr)
        return 2
    found = _model_sets_scorer("evaluate", args, settings, (args.split,), device="cpu" if args.cpu_precision else None)
    if found is None:
        return 2
    model_dir, [data], scorer = found
    specs = args.data or json.loads((model_dir / "training_config.json").read_text())["data"]["specs"]
    probs = scorer.probabilities(data.texts)
    reports = reports_from(probs, data)
    versus_float32 = {}
    if args.cpu_precision:
        exact, exact_reports = probs, reports
        scorer = BatchScorer(scorer.model, scorer.text_encoder, scorer.model_version, device="cpu",
                             cpu_precision=args.cpu_precision)
        probs = scorer.probabilities(data.texts)
        reports = reports_from(probs, data)
        versus_float32 = float32_comparison(probs, exact, reports, exact_reports)
    add_intervals(reports, probs, data)
    precision = f", {args.cpu_precision}" if args.cpu_precision else ""
    print(f"model {scorer.model_version} on {'; '.join(data.sources)} ({len(data)} rows, device {scorer.device}"
          f"{precision})")
    for head, report in reports.items():
        print(format_report(head, report))
    by_source = reports_by_source(probs, data, specs) if len(specs) > 1 else {}
    for spec, source_reports in by_source.items():
        print(format_source_reports(spec, source_reports))
    for head, compared in versus_float32.items():
        print(f"{head} vs float32: same label on {compared['same_label']:.1%} of texts; accuracy "
              f"{compared['accuracy']:.3f} vs {compared['float32_accuracy']:.3f}, macro-F1 {compared['macro_f1']:.3f} "
              f"vs {compared['float32_macro_f1']:.3f}")
    against = _against(args, settings, scorer, data, probs) if args.against else {}
    if against is None:
        return 2
    mistakes = confident_mistakes(probs, data, args.errors) if args.errors > 0 else {}
    add_pushes(scorer, mistakes)
    for head, listed in mistakes.items():
        print(format_mistakes(head, listed))
    name = "-".join(re.sub(r"[^A-Za-z0-9]+", "_", Path(s.split(" ")[0]).stem)[:40] for s in args.data) if args.data else args.split
    # int8 is in the version already; bf16 is not (its labels are float32's but for a row or two).
    stamp = "+bf16" if args.cpu_precision == "bf16" else ""
    out = Path(args.out or f"var/eval/{scorer.model_version}{stamp}-{name}.json")
    if not args.out and out.exists() and _report_data(out) != data.sources:
        # Another file of the same name (two folders' valid.csv): its report is kept beside this one.
        digest = hashlib.sha256("\n".join(data.sources).encode()).hexdigest()[:6]
        out = out.with_name(f"{out.stem}-{digest}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, {"model_version": scorer.model_version, "cpu_precision": args.cpu_precision or "float32",
                     "data": data.sources, "rows": len(data), **reports,
                     **({"by_source": by_source} if by_source else {}),
                     **({"mistakes": mistakes} if mistakes else {}),
                     **({"versus_float32": versus_float32} if versus_float32 else {}),
                     **({"against": against} if against else {})})
    print(f"report written to {out}")
    return 0


def _against(args, settings, scorer, data, probs) -> dict | None:
    """``evaluate --against B``: B scored on the same rows as the model (A), in the same precision, and the
    difference per head; on the held-out slice, only the rows that B held out too. None after printing why not."""
    import numpy as np

    from .data import DataError, default_data_dir
    from .evaluation import compare_models, format_comparison, heldout_test, rows_in_both
    from .modeling import ModelError
    from .registry import find_model_dir
    from .scorer import BatchScorer

    ms = settings.section("models", ModelSettings)
    try:
        other_dir = find_model_dir(args.against, ms.models_dir)
        rows = np.arange(len(data))
        if not args.data:
            theirs = heldout_test(other_dir, default_data_dir(args.data_dir or ms.data_dir or None), args.split,
                                  args.whole_slice)
            rows = rows_in_both(data, theirs)
            if not len(rows):
                raise DataError(f"{other_dir.name} held out none of these rows (other data, another split): compare "
                                "the two on data neither trained on, with --data")
        other = BatchScorer.from_pretrained(other_dir, device=str(scorer.device), cpu_precision=scorer.cpu_precision)
    except (DataError, ModelError) as exc:
        print(f"finpulse evaluate --against: {exc}", file=sys.stderr)
        return None
    shared = data.subset(rows)
    compared = compare_models(probs.subset(rows), other.probabilities(shared.texts), shared)
    where = f"the same {len(rows)} rows" if args.data else f"the {len(rows)} of these rows that both held out"
    print(f"{scorer.model_version} (A) against {other.model_version} (B) on {where}: A - B, with its 95% paired "
          "bootstrap interval")
    print(format_comparison(compared))
    return {"model_version": other.model_version, "rows": len(rows), "heads": compared}


def _calibrate(args, settings) -> int:
    from .calibration import (HEADS, MIN_ROWS, calibrated, calibration_report, fit_temperatures, format_calibration,
                              save_calibrated, scored_rows)
    from .evaluation import reports_from
    from .modeling import NEUTRAL_TEMPERATURE

    # Without --data: fit on the model's validation slice, check on its test slice.
    found = _model_sets_scorer("calibrate", args, settings, ("val", "test"))
    if found is None:
        return 2
    model_dir, [fit_on, check_on], scorer = found
    had = dict(scorer.model.temperature)
    scorer.model.temperature = dict(NEUTRAL_TEMPERATURE)  # fit from the raw logits, whatever it had
    print(f"calibrating {scorer.model_version} on {'; '.join(fit_on.sources)} ({len(fit_on)} rows)", flush=True)
    fit_raw = scorer.probabilities(fit_on.texts)
    temperature = fit_temperatures(fit_raw, fit_on, keep=had)
    for head in HEADS:
        labeled = len(scored_rows(fit_raw, fit_on, head)[1])
        if labeled < MIN_ROWS:
            print(f"{head}: {labeled} labeled row(s) here, fewer than the {MIN_ROWS} a fit needs: its temperature "
                  f"stays {temperature[head]:g}", flush=True)
    check_raw = fit_raw if check_on is fit_on else scorer.probabilities(check_on.texts)
    calibration = {"fitted_on": "; ".join(fit_on.sources),
                   "measured_on": ("same rows (one parameter per head)" if check_on is fit_on
                                   else "; ".join(check_on.sources)),
                   "measured": calibration_report(check_raw, check_on, temperature)}
    print(f"fitted on those rows; before and after, measured on "
          f"{'them' if check_on is fit_on else '; '.join(check_on.sources) + f' ({len(check_on)} rows)'}:")
    print(format_calibration(calibration["measured"]))
    test_reports = None if args.data else reports_from(calibrated(check_raw, temperature), check_on)
    try:
        path, version = save_calibrated(model_dir, temperature, calibration, test_reports,
                                        Path(args.out) if args.out else model_dir.parent)
    except FileExistsError as exc:
        print(f"finpulse calibrate: {exc}", file=sys.stderr)
        return 2
    print(f"calibrated copy saved: {path} (version {version}; the worker loads the newest model)")
    return 0


def _score(args, settings) -> int:
    import time
    from .interface import load_scorer

    if args.texts and args.input:
        print("finpulse score: give texts or --input, not both", file=sys.stderr)
        return 2
    if not args.texts and not args.input and sys.stdin.isatty():
        print("finpulse score: nothing to score: give texts, --input FILE, or pipe texts in", file=sys.stderr)
        return 2
    ms, worker = settings.section("models", ModelSettings), settings.worker
    try:
        scorer = load_scorer("model", args.model or worker.model_dir or None, device=args.device or worker.device,
                             models_root=ms.models_dir, cpu_precision=args.cpu_precision or worker.cpu_precision)
    except (FileNotFoundError, RuntimeError) as exc:  # no model, not a model (ModelError), no such device
        print(f"finpulse score: {exc}", file=sys.stderr)
        return 2
    input_format = score_files.format_of(args.input, args.input_format, score_files.INPUT_FORMATS, "lines")
    output_format = args.format or ("table" if args.texts else
                                    score_files.format_of(args.out, None, ("jsonl", "csv"), "jsonl"))
    started = time.monotonic()
    try:
        written, failed = score_files.score_into(scorer, args.texts, args.input, input_format, args.text_field,
                                                 args.out, output_format, args.encoding, args.explain,
                                                 format_given=args.format is not None)
    except score_files.ScoreInputError as exc:
        print(f"finpulse score: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader has had enough (`| head`): stop quietly, as a shell tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exit's flush does not fail again
        return 141
    finally:
        scorer.close()
    seconds = time.monotonic() - started
    if not args.texts:
        print(f"scored {written - failed:,}{f' of {written:,}' if failed else ''} texts in {seconds:.1f} s "
              f"({written / max(seconds, 1e-9):,.0f}/s)"
              f"{f', written to {args.out}' if args.out else ''}", file=sys.stderr)
    if failed and output_format != "table":  # a table says so on the row
        print(f"{failed:,} of {written:,} texts could not be scored: their error field says why", file=sys.stderr)
    return 0


def _models(args, settings) -> int:
    from .modeling import ModelError
    from .registry import find_model_dir, model_summaries

    root, worker = settings.section("models", ModelSettings).models_dir, settings.worker
    broken: list = []
    summaries = model_summaries(root, broken)
    for path, reason in broken:
        print(f"finpulse models: not listed, and never loaded: {reason}", file=sys.stderr)
    loaded = None
    if worker.scorer in SCORERS_WITHOUT_A_MODEL:
        print(f"the worker is set to the {worker.scorer} scorer ([worker] scorer): it loads none of these",
              file=sys.stderr)
    else:
        try:
            loaded = find_model_dir(worker.model_dir or None, root)
        except ModelError as exc:  # [worker] model_dir names something that is not a model
            print(f"finpulse models: the worker's model: {exc}", file=sys.stderr)
    for summary in summaries:
        summary["worker_loads"] = loaded is not None and Path(summary["path"]).resolve() == loaded.resolve()
    if args.json:
        print(json.dumps(summaries, indent=2))
        return 0
    if not summaries:
        print(f"no trained model in {root}: run `finpulse train`")
        return 0

    def pair(figures: dict, head: str) -> str:
        accuracy, f1 = figures.get(f"{head}_accuracy"), figures.get(f"{head}_macro_f1")
        return f"{accuracy:.3f} / {f1:.3f}" if accuracy is not None and f1 is not None else "-"
    width = max(len(s["version"]) for s in summaries)
    print(f"  {'version':<{width}}  {'recipe':<12} {'created (UTC)':<16}  {'held out: sentiment':<19}  "
          f"{'topic':<13}  {'news probe: sentiment':<21}  {'topic':<13}  {'MB':>6}")
    for s in summaries:
        recipe = s["recipe"] + (", refit" if s["refit_of"] else "")
        print(f"{'*' if s['worker_loads'] else ' '} {s['version']:<{width}}  {recipe:<12} "
              f"{s['created_at'][:16].replace('T', ' '):<16}  {pair(s['held_out'], 'sentiment'):<19}  "
              f"{pair(s['held_out'], 'topic'):<13}  {pair(s['news_probe'], 'sentiment'):<21}  "
              f"{pair(s['news_probe'], 'topic'):<13}  {s['megabytes']:>6.1f}")
    print(f"in {root}; accuracy / macro-F1 on its held-out slice (each source's rows as trained: tweets, news-train) "
          f"and on the news probe; * the model the worker loads")
    if any(s["refit_of"] for s in summaries):
        print("a refit trained on every labeled row: its held-out figures are its reference's (--json: refit_of)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m models.cli train|evaluate|calibrate ...`` with settings from the environment and ./finpulse.toml."""
    import logging
    from stream.config import load_settings
    parser = argparse.ArgumentParser(prog="python -m models.cli")
    register(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    return int(args.func(args, load_settings()) or 0)


if __name__ == "__main__":
    sys.exit(main())
