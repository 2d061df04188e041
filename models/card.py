"""What a trained model says about itself: its model card (``README.md`` in the model directory) and the summary
``finpulse train`` prints when it saves one. Both read only what the run recorded (``metrics.json``,
``training_config.json``), so a refit's card can show its reference's held-out figures under the reference's name.
"""
from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING, Any

from .calibration import SCORE_LIMIT, calibration_section, format_calibration
from .data import DEFAULT_TRAINING_SOURCES, NEWS_TRAIN
from .evaluation import HEADS, format_source_reports
from .modeling import describe_base

if TYPE_CHECKING:
    from .recipes import Recipe, TrainOutcome


def comparison_table(comparison: dict[str, dict[str, float]], test_reports: dict[str, Any],
                     refit_of: str | None = None, shipped_against: dict[str, Any] | None = None) -> str:
    """The models a run compared on its held-out test slice; for a refit, its reference's run (``refit_of``). Then
    the shipped model's difference from each, with its paired interval (``evaluation.compare_models``)."""
    n = {head: test_reports[head]["n"] if head in test_reports else 0 for head in HEADS}
    counts = f"{n['sentiment']} sentiment rows, {n['topic']} topic rows"
    lines = [f"{refit_of}'s held-out test slice ({counts}; never used by {refit_of} for training or selection; "
             "the refit trained on it)" if refit_of else
             f"held-out test slice ({counts}; never used for training or selection)",
             f"{'model':<44} {'sent acc':>8} {'sent F1':>8} {'topic acc':>9} {'topic F1':>8}"]
    for name, row in comparison.items():
        cells = [row.get(k) for k in ("sentiment_accuracy", "sentiment_macro_f1", "topic_accuracy", "topic_macro_f1")]
        lines.append(f"{name:<44} " + " ".join(f"{c:>8.4f}" if c is not None else f"{'-':>8}" for c in cells))
    if shipped_against:
        lines.append("the shipped model minus each, on the same rows (95% paired bootstrap interval):")
    for name, heads in (shipped_against or {}).items():
        lines.append(f"  {name}")
        for head, metrics in heads.items():
            lines.append(f"    {head:<10} " + "  ".join(
                f"{label} {m['difference']:+.4f} ({m['interval'][0]:+.4f} to {m['interval'][1]:+.4f})"
                for label, m in (("acc", metrics["accuracy"]), ("F1", metrics["macro_f1"]))))
    return "\n".join(lines)


def _head_rows(reports: dict[str, Any], of: str = "") -> str:
    """Markdown table rows: head (``of`` after it), rows, accuracy, macro-F1, each figure with its 95% interval
    where the report has one."""
    def figure(report: dict[str, Any], metric: str) -> str:
        low, high = report.get("interval_95", {}).get(metric, (None, None))
        return f"{report[metric]:.4f}" + (f" ({low:.3f}-{high:.3f})" if low is not None else "")
    return "\n".join(f"| {head}{of} | {r['n']} | {figure(r, 'accuracy')} | {figure(r, 'macro_f1')} |"
                     for head, r in reports.items())


def _sources(data: dict[str, Any]) -> str:
    """The data sources a training_config records, each weighted one with its weight."""
    weights, kept_whole_weights = data.get("weights") or {}, data.get("kept_whole_weights") or {}

    def weight(spec: str) -> float:
        return weights.get(spec, 1.0) * kept_whole_weights.get(spec, 1.0)
    return ", ".join(f"{spec} (each row weighs {weight(spec):g}"
                     f"{'; kept whole by the sample' if spec in kept_whole_weights else ''})"
                     if weight(spec) != 1 else spec for spec in data["specs"])


def cut_by_time(stages: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The stages a time budget stopped before the end of their schedule (a CPU slower than the recipe assumes)."""
    return {name: stage for name, stage in stages.items() if stage.get("stopped", "").startswith("time budget")
            and stage.get("steps", 0) < stage.get("scheduled_steps", 0)}


def _resumed_note(training_config: dict) -> str:
    earlier = training_config.get("seconds_before_resume")
    return f" ({earlier:.0f} s of them before it was interrupted and resumed)" if earlier else ""


def _time_cut_note(stages: dict[str, Any]) -> str:
    cut = cut_by_time(stages)
    return "".join(f" A time budget stopped {name} after {stage['steps']} of its {stage['scheduled_steps']} steps."
                   for name, stage in cut.items())


def model_card(version: str, recipe: Recipe, base: str, training_config: dict, metrics: dict, table: str) -> str:
    per_head = "\n".join([_head_rows(metrics["test"])] + [
        _head_rows(reports, f", {spec} rows") for spec, reports in metrics.get("test_by_source", {}).items()])
    probe_rows = _head_rows({head: metrics["out_of_domain"][head] for head in HEADS})
    probe_n = metrics["out_of_domain"]["rows"]
    data = training_config["data"]
    interval_note = (" In brackets: each figure's 95% interval, from resampling its rows (how far it could move on "
                     "another sample of such text); `finpulse evaluate --against` tells whether two models differ on "
                     "the same rows." if any("interval_95" in r for r in metrics["test"].values()) else "")
    # The distilled soft labels belong to the tweets' heads: each set's texts get the head it lacks.
    soft_labels = (" plus the teacher ensemble's soft labels on the other set's texts (cross-task distillation)"
                   if recipe.teachers else "")
    tweets = ("Topic labels and sentiment labels come from two different sets of finance-news tweets; each head "
              f"learned from its own rows{soft_labels}")
    provenance = {("shared",): tweets,
                  DEFAULT_TRAINING_SOURCES: f"{tweets}. The `{NEWS_TRAIN}` sentences (`models/datasets/`) carry both "
                                            "labels",
                  }.get(tuple(data["specs"]), f"Each head learned from the rows that carry its label{soft_labels}")
    probe_caveat = (f" This model also trained on `{NEWS_TRAIN}`, newswire sentences written for FinPulse like the "
                    "probe: expect less on news written and labeled elsewhere." if NEWS_TRAIN in data["specs"] else "")
    # bf16 autocast on a GPU moves a borderline row now and then: say so before a CPU rerun disagrees by one.
    precision_note = (" Scored on the GPU in bfloat16; `finpulse evaluate` on a CPU (float32) can differ "
                      "by a row or two." if str(training_config["device"]).startswith("cuda") else "")
    reference = training_config.get("refit_of")
    if reference:
        where = (f"`metrics.json` (`test`, copied from {reference}). `finpulse evaluate {reference}` reproduces them; "
                 f"this model trained on that slice, so `finpulse evaluate {version}` needs `--data` (text it never "
                 "saw, e.g. `news-probe`).")
        rows = (f"{data['rows']['train']}: every labeled row (a refit of {reference}, with its epochs, ensemble and "
                "temperatures; nothing held out)")
    else:
        where = (f"`metrics.json` (`test`; `validation` holds the slice used for early stopping and model "
                 f"selection). Reproduce with `finpulse evaluate {version}` (it rebuilds the same test slice from "
                 "`training_config.json` and checks the data files' sha256).")
        rows = f"{data['rows']['train']} train, {data['rows']['val']} validation, {data['rows']['test']} test"
    return f"""# {version}

FinPulse's topic-and-sentiment classifier: one encoder, two heads (20 finance topics; bearish / neutral /
bullish). Recipe `{recipe.name}`, base encoder {describe_base(base)}, trained on
{training_config['device']} in {training_config['seconds']:.0f} s{_resumed_note(training_config)}.{_time_cut_note(metrics['stages'])}

## What was measured, on what

{metrics['measured_on']}.{precision_note}{interval_note}

| head | rows | accuracy | macro-F1 |
|---|---|---|---|
{per_head}

Per-class F1 and confusion matrices: {where}

```
{table}
```

## Beyond tweets

The shared training data are tweets. `news-probe` (`models/probes/`) is {probe_n} newswire-style finance sentences
written for FinPulse (every topic, every sentiment), never trained or selected on.{probe_caveat}

| head | rows | accuracy | macro-F1 |
|---|---|---|---|
{probe_rows}

Reproduce with `finpulse evaluate {version} --data news-probe`.

{calibration_section(metrics["calibration"])}
## Data

Sources: {_sources(data)} (sha256 in `training_config.json`). Rows: {rows}. {provenance}.

## Limits

- The held-out figures are on text from the same sources as the training data (each source's rows alone where
  the table lists them); the public validation splits of the tweet data sets were not used here. On other text
  expect lower scores (see "Beyond tweets"). Links are removed and HTML entities decoded before reading
  (`text_normalization` in `config.json`).
- Texts longer than {recipe.fit.max_length} tokens are truncated. Non-English text is scored but was not in the
  training data.
{SCORE_LIMIT}
"""



def print_outcome(outcome: TrainOutcome, recipe: Recipe) -> None:
    print(f"\nmodel saved: {outcome.model_dir}  (version {outcome.version})", flush=True)
    reference = outcome.metrics.get("refit_of")
    if reference:
        print(f"a refit of {reference} on every labeled row: nothing was held out, so the held-out figures below "
              f"are {reference}'s", flush=True)
    if recipe.name == "quick":
        print("this is the QUICK model (CPU recipe): train the real one on a GPU with `finpulse train --recipe full`",
              flush=True)
    cut = cut_by_time(outcome.metrics.get("stages", {}))
    for name, stage in cut.items():
        print(f"the time budget stopped {name} after {stage['steps']} of its {stage['scheduled_steps']} steps: this "
              "machine trains slower than the recipe assumes, and the model is the weaker for it", flush=True)
    if len(cut) == 1 and len(outcome.metrics["stages"]) == 1:
        [stage] = cut.values()
        # In whole hundreds of seconds, and at least one: a stage shorter than 0.05 s is recorded as 0.0 s.
        needed = max(1, math.ceil(stage["seconds"] * stage["scheduled_steps"] / max(1, stage["steps"]) / 100)) * 100
        print(f"  to train the whole schedule here: finpulse train --recipe {recipe.name} --time-budget {needed}",
              flush=True)
    print(outcome.table, flush=True)
    for spec, reports in outcome.metrics.get("test_by_source", {}).items():
        print(format_source_reports(spec, reports), flush=True)
    calibration = outcome.metrics.get("calibration")
    if calibration:
        print(f"calibrated on the {calibration['fitted_on']}; on the {calibration['measured_on']}:\n"
              + format_calibration(calibration["measured"]), flush=True)
    sys.stdout.flush()
