"""Training recipes, end to end: data -> splits -> training -> held-out report -> saved model directory.

- ``quick``: for a first run on a laptop CPU (under 10 minutes on 2 cores, loading included): a stratified
  sample of 16,000 rows (a small source such as ``news-train`` kept whole, its rows weighted up), short sequences,
  the lower half of the encoder frozen, two epochs under a time budget.
- ``plain``: one two-head model fine-tuned on all the training rows (the reference the full recipe must beat).
- ``full``: for a GPU (5-6 minutes on an H100 or H200):
  1. domain-adaptive pretraining: masked-language-model training of the encoder on the training texts of both
     sets (tweets are far from the encoder's pretraining text);
  2. teachers: one plain model and ``teachers`` models from the adapted encoder, each with its own seed; on a GPU
     they train side by side, each in its own process (``models.teachers``);
  3. an ensemble of the teachers (the candidate set with the best validation score) labels every training text
     for *both* heads: cross-task self-training, since each set carries only one head's labels;
  4. one student, trained on the gold labels mixed with the ensemble's soft labels (distillation), is shipped.

Every recipe splits the data the same way: a stratified test slice that nothing sees until the final report, a
validation slice for early stopping and model selection, and the rest for training; a text posted twice lands in
one slice (``models.data.split``). Runs keep their state under ``var/runs/`` and resume with ``--resume``; once
the model is saved only a note naming it stays (``end_run``).

A **refit** (``finpulse train --refit MODEL``) trains MODEL's recipe again on every labeled row, its validation and
test slices included: a quarter more rows for the model that ships. Nothing is left to choose with, so it takes
MODEL's choices (each stage's best epoch, the ensemble's members, the student's encoder, the temperatures), and
nothing is left to measure on, so its held-out figures are MODEL's, said so wherever they are shown.
"""
from __future__ import annotations

import dataclasses
import json
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .calibration import calibrated, calibration_report, fit_temperatures
from .card import comparison_table, model_card
from .data import (NEWS_PROBE, SPLIT_SCHEME, DataError, LabeledSet, fingerprint, kept_whole, load_data, split,
                   stratified_sample)
from .evaluation import add_intervals, compare_models, reports_by_source, reports_from, selection_score
from .metrics import headline
from .modeling import FinPulseClassifier, TextEncoder, check_max_length, quiet_transformers, save_model, write_json
from .precision import describe
from .scorer import BatchScorer, Probabilities
from .teachers import TeacherJob, run_teachers, teachers_at_once
from .training import (MLM_STAGE_FILE, FitConfig, MlmConfig, config_hash, distillation_targets, fit, gold_targets,
                       pretrain_mlm)


@dataclass
class Recipe:
    name: str
    fit: FitConfig
    train_limit: int = 0         # cap on training rows (stratified); 0: all
    # Sampled (train_limit), a source small beside the sample is kept whole (models.data.kept_whole): its rows count
    # this many times as much, since a short schedule sees each of them only once or twice.
    kept_whole_weight: float = 1.0
    val_limit: int = 0           # cap on validation rows scored after each epoch; 0: all
    report_limit: int = 0        # cap on test rows scored for the final report; 0: all
    mlm: MlmConfig | None = None
    teachers: int = 0            # > 0: the distillation pipeline with this many adapted-encoder teachers
    student_epochs: int = 0      # distillation: the student's epochs (0: as many as the teachers')
    gold_share: float = 0.5      # student target on labeled rows: this much gold, the rest ensemble
    pseudo_weight: float = 1.0   # weight of ensemble-labeled rows (the head a row has no label for)
    test_fraction: float = 0.1
    val_fraction: float = 0.1
    split_seed: int = 2024
    parallel: int = 0            # teachers trained at once, each in its own process (0: teachers_at_once)
    stage_shares: dict[str, float] = field(default_factory=lambda: {"mlm": 0.15, "teacher": 0.13, "student": 0.33})


RECIPES: dict[str, Recipe] = {
    # 2 idle CPU cores: about 95 rows/s, so its two epochs of 16,000 rows end inside the 400 s budget; on busy or
    # slower cores the budget cuts the schedule short and training says so (at 32 rows/s: 397 of 1,000 steps).
    # Measured (README): 8,000 rows scored 1-4 points lower on the tweets; every row (the budget cut it to 1.5
    # epochs) or unfreezing the lower layers no better than 16,000; without the news sentences' double weight, 3-5
    # points lower on the news probe.
    "quick": Recipe("quick", FitConfig(epochs=2, batch_size=32, lr=3e-4, max_length=48, freeze_layers=3,
                                       warmup_ratio=0.06, patience=1, max_seconds=400),
                    train_limit=16000, kept_whole_weight=2.0, val_limit=500, report_limit=1000),
    "plain": Recipe("plain", FitConfig(epochs=6)),
    # The README's figures: H100, 338 s; H200 with news-train, 297 s (every stage runs to the end of its schedule;
    # --time-budget 500 leaves room). Batch 128 / lr 2e-4 / 16 student epochs was also tried: a lower validation
    # score, so not the default.
    "full": Recipe("full", FitConfig(epochs=8, batch_size=64, lr=1.5e-4, patience=3),
                   mlm=MlmConfig(epochs=15, batch_size=128, lr=2e-4), teachers=5, student_epochs=12,
                   stage_shares={"mlm": 0.2, "teacher": 0.1, "student": 0.3}),
}


class TimeBudget:
    """Splits an optional total number of seconds over stages; time a stage leaves unused goes to later ones."""

    def __init__(self, total: float | None, shares: dict[str, float], plan: list[str]):
        self.total = total
        self.started = time.monotonic()
        self.shares = shares
        self.remaining_plan = list(plan)

    def allowance(self, *stages: str) -> float | None:
        """Seconds for ``stages``, run side by side: the time they would have had one after another."""
        weights = sum(self._share(s) for s in self.remaining_plan)
        share = sum(self._share(s) for s in stages)
        for stage in stages:
            self.remaining_plan.remove(stage)
        if self.total is None:
            return None
        left = self.total - (time.monotonic() - self.started)
        return max(5.0, left * share / weights)

    def _share(self, stage: str) -> float:
        return self.shares[stage.split("-")[0]]


@dataclass
class TrainOutcome:
    model_dir: Path
    version: str
    metrics: dict[str, Any]
    table: str


@dataclass
class Refit:
    """A reference model's recipe and the choices its held-out slices made, for a refit on every labeled row."""
    reference: str                 # the reference model's version
    recipe: Recipe
    base_model: str
    data_specs: list[str]
    data_weights: dict[str, float]  # --weight: source -> the weight of its rows
    data_sha256: dict[str, str]
    epochs: dict[str, int]         # stage ("fit", "teacher-N", "student") -> its best epoch in the reference run
    members: list[int]             # distillation: the teachers of the chosen ensemble
    adapted_student: bool          # distillation: the student starts from the domain-adapted encoder
    temperature: dict[str, float]
    metrics: dict[str, Any]        # the reference's metrics.json: its held-out figures become the refit's


class RefitError(ValueError):
    """A model that cannot be refitted, and why."""


def load_refit(model_dir: Path) -> Refit:
    from .modeling import read_config
    config = read_config(model_dir)
    try:
        training = json.loads((model_dir / "training_config.json").read_text())
        metrics = json.loads((model_dir / "metrics.json").read_text())
    except (OSError, ValueError) as exc:
        raise RefitError(f"{model_dir} has no readable training_config.json and metrics.json ({exc}): only a model "
                         "trained by `finpulse train` can be refitted") from None
    version = config["model_version"]
    if training.get("refit_of"):
        raise RefitError(f"{version} is itself a refit on every labeled row: refit its reference, "
                         f"{training['refit_of']}, which held its validation and test slices out")
    if "calibration" not in metrics or "stages" not in metrics:
        raise RefitError(f"{version} was trained before refits existed (no calibration or stage record in its "
                         "metrics.json): train its recipe again, then refit that model")
    recipe = _recipe_from(training["recipe"])
    stages = metrics["stages"]
    if recipe.teachers:
        epochs = {name: stage["best_epoch"] for name, stage in stages.items() if name.startswith("teacher-")}
        epochs["student"] = stages["student"]["best_epoch"]
        members = list(stages["ensemble"]["members"])
        adapted = stages["ensemble"]["student_init"] == "adapted encoder"
    else:
        epochs, members, adapted = {"fit": stages["fit"]["best_epoch"]}, [], False
    data = training["data"]
    return Refit(version, recipe, training["base_model"], data["specs"], data.get("weights", {}), data["sha256"],
                 epochs, members, adapted, dict(config["temperature"]), metrics)


def _recipe_from(recorded: dict[str, Any]) -> Recipe:
    """The Recipe a training_config.json recorded (fields added since are left at their defaults)."""
    def known(cls, values: dict[str, Any]) -> dict[str, Any]:
        names = {f.name for f in dataclasses.fields(cls)}
        return {k: v for k, v in values.items() if k in names}
    values = known(Recipe, recorded)
    values["fit"] = FitConfig(**known(FitConfig, recorded["fit"]))
    values["mlm"] = MlmConfig(**known(MlmConfig, recorded["mlm"])) if recorded.get("mlm") else None
    return Recipe(**values)


def with_cpu_precision(recipe: Recipe, cpu_precision: str) -> Recipe:
    """``recipe`` training in ``cpu_precision`` on a CPU: every stage (domain pretraining, teachers, student)."""
    fit = dataclasses.replace(recipe.fit, cpu_precision=cpu_precision)
    mlm = recipe.mlm and dataclasses.replace(recipe.mlm, cpu_precision=cpu_precision)
    return dataclasses.replace(recipe, fit=fit, mlm=mlm)


def refuse_an_untrained_head(train: LabeledSet, data_specs: list[str]) -> None:
    """A head with no training row keeps its random weights, and the model would still be saved where the worker
    loads the newest one: every scored message would get a random topic (or sentiment), silently."""
    counts = train.summary()
    for head, other in (("topic", "sentiment"), ("sentiment", "topic")):
        if not counts[f"{head}_rows"]:
            raise DataError(
                f"no {head} label in the training rows of {', '.join(data_specs)}: the {head} head would stay "
                f"untrained and the model would give every message a random {head}. To teach the model your "
                f"{other} labels, train them beside the labeled tweets, which carry both heads: --data shared "
                f"--data news-train --data FILE, and --weight FILE=W to make your rows count W times")


def run_recipe(recipe: Recipe, *, data_specs: list[str], data_dir: Path, base_model: str, models_root: Path,
               runs_root: Path, device: torch.device, resume: bool = False, fresh: bool = False,
               keep_run_state: bool = False, time_budget: float | None = None,
               save_dtype: torch.dtype = torch.float32, command: str = "", refit: Refit | None = None,
               data_weights: dict[str, float] | None = None) -> TrainOutcome:
    """``refit``: train on every labeled row with the reference's choices (``recipe``, ``data_specs``,
    ``data_weights`` and ``base_model`` then are the reference's, as ``finpulse train --refit`` passes them)."""
    started = time.monotonic()
    quiet_transformers()
    check_max_length(base_model, max(recipe.fit.max_length, recipe.mlm.max_length if recipe.mlm else 0))
    data_weights = dict(data_weights or {})
    data = load_data(data_specs, data_dir, data_weights)
    sha = fingerprint(data_specs, data_dir)
    if refit:
        if refit.data_sha256 != sha:
            raise DataError(f"the training data in {data_dir} differs from what {refit.reference} was trained on "
                            "(sha256 mismatch): its choices and held-out figures would not hold for a refit")
        parts = {"train": np.arange(len(data))}
    else:
        parts = split(data, recipe.test_fraction, recipe.val_fraction, recipe.split_seed)
    data, train_rows, kept_whole_weights = training_sample(recipe, data, parts["train"], data_specs)
    if refit:
        val_rows = test_rows = np.array([], dtype=np.int64)
    else:
        val_rows = stratified_sample(data, parts["val"], recipe.val_limit, recipe.fit.seed)
        test_rows = stratified_sample(data, parts["test"], recipe.report_limit, recipe.fit.seed)
        for name, rows in (("validation", val_rows), ("test", test_rows)):
            if not len(rows):
                raise DataError(f"too few distinct texts to hold out a {name} slice ({len(data)} rows; twins, the same "
                                "post but for links, case, punctuation or a prefix, share one slice): add labeled rows")
    train, val, test = data.subset(train_rows), data.subset(val_rows), data.subset(test_rows)
    refuse_an_untrained_head(train, data_specs)
    # How many teachers train at once does not change what is trained: a resumed run may pick another number.
    what = config_hash(dataclasses.replace(recipe, parallel=0), base_model, sha,
                       *([data_weights] if data_weights else []), *([refit.reference] if refit else []))
    run_dir = runs_root / f"{recipe.name}-{'refit-' if refit else ''}{what}"
    finished = finished_run(run_dir) if resume else None
    if finished:
        print(f"this run finished already (see {run_dir / FINISHED}): nothing to resume", flush=True)
        return finished
    kept = [] if (run_dir / FINISHED).is_file() else kept_progress(run_dir)
    if kept and not (resume or fresh):
        # Hours of a full recipe on a CPU: never thrown away because --resume was forgotten.
        raise DataError(f"{run_dir} holds an interrupted run of this command ({', '.join(kept)}): --resume goes on "
                        f"from there, --fresh starts over and deletes it")
    if resume and not kept:
        print(f"no interrupted run of these arguments to resume in {runs_root}: training from the start (a run is "
              f"named by its recipe, data, base model and options: changing one starts another)", flush=True)
    if run_dir.exists() and not resume:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    held_out = (f"nothing held out (a refit of {refit.reference})" if refit
                else f"{len(val)} validation, {len(test)} held-out test")
    weighted = "".join(f", rows of {spec} weigh {weight:g}" for spec, weight in data_weights.items())
    weighted += "".join(f", rows of {spec} weigh {weight:g} times more (kept whole by the {recipe.train_limit}-row "
                        "sample)" for spec, weight in kept_whole_weights.items())
    print(f"data: {len(train)} training rows {train.summary()}{weighted}, {held_out} (device "
          f"{describe(device, recipe.fit.cpu_precision)}, run state in {run_dir})", flush=True)
    if recipe.teachers and device.type == "cpu" and time_budget is None:
        print(f"note: the {recipe.name} recipe is made for a GPU (5-6 minutes on an H100). On a CPU it trains "
              f"{recipe.teachers + 3} models (domain pretraining, {recipe.teachers + 1} teachers, the student), each "
              "about as long as a plain fine-tune (35 min on 2 cores): hours. Each stage's bar shows its own time left;"
              " --time-budget SECONDS fits the whole run into the time you give it", flush=True)

    try:
        text_encoder = TextEncoder.for_base(base_model, recipe.fit.max_length)
        if recipe.teachers:
            rows = {"train": train_rows, "val": val_rows, "test": test_rows}
            model, stages, baselines, earlier = _distill(recipe, base_model, text_encoder, data, rows, device,
                                                         run_dir, time_budget, refit)
        else:
            model, stages, baselines, earlier = _fit_one(recipe, base_model, text_encoder, train,
                                                         None if refit else val, device, run_dir, time_budget, refit)
    except KeyboardInterrupt:
        raise TrainingInterrupted(run_dir) from None
    scorer = BatchScorer(model, text_encoder, "candidate", device=device)
    probe = load_data([NEWS_PROBE], data_dir)
    if refit:
        model.temperature = dict(refit.temperature)
        metrics = _refit_metrics(refit)
    else:
        metrics = _held_out_metrics(recipe, model, scorer, val, test, baselines, data_specs)
    # Reported, never used for selection: the only measure here of text unlike the training tweets.
    probe_probs = scorer.probabilities(probe.texts)
    probe_reports = reports_from(probe_probs, probe)
    add_intervals(probe_reports, probe_probs, probe)
    metrics["out_of_domain"] = {"source": probe.sources[0], "rows": len(probe), **probe_reports}
    metrics["stages"] = stages
    training_config = {
        "recipe": dataclasses.asdict(recipe),
        "base_model": base_model,
        "data": {"specs": data_specs, "weights": data_weights, "kept_whole_weights": kept_whole_weights, "sha256": sha,
                 "test_fraction": recipe.test_fraction, "val_fraction": recipe.val_fraction,
                 "split_seed": recipe.split_seed, "split": SPLIT_SCHEME,
                 "rows": {"train": len(train), "val": len(val), "test": len(test)}},
        **({"refit_of": refit.reference} if refit else {}),
        "device": str(device), "time_budget_s": time_budget, "seconds": round(earlier + time.monotonic() - started, 1),
        **({"seconds_before_resume": round(earlier, 1)} if earlier else {}),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": _version("transformers")},
        "command": command,
    }
    tmp_dir = models_root / f".incomplete-{run_dir.name}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    version = save_model(model, base_model, tmp_dir, base_model=base_model,
                         recipe=f"{recipe.name}-refit" if refit else recipe.name,
                         max_length=recipe.fit.max_length, dtype=save_dtype)
    metrics["model_version"] = version
    table = comparison_table(metrics["comparison_test"], metrics["test"], refit.reference if refit else None,
                             metrics.get("shipped_against"))
    write_json(tmp_dir / "training_config.json", training_config)
    write_json(tmp_dir / "metrics.json", metrics)
    (tmp_dir / "README.md").write_text(model_card(version, recipe, base_model, training_config, metrics, table))
    final_dir = models_root / version
    shutil.rmtree(final_dir, ignore_errors=True)
    tmp_dir.rename(final_dir)
    outcome = TrainOutcome(final_dir, version, metrics, table)
    end_run(run_dir, outcome, keep_run_state)
    return outcome


def _held_out_metrics(recipe: Recipe, model: FinPulseClassifier, scorer: BatchScorer, val: LabeledSet,
                      test: LabeledSet, baselines: dict[str, Probabilities], data_specs: list[str]) -> dict[str, Any]:
    """``metrics.json``'s figures of the held-out test slice (and of validation): each head's reports with their
    intervals, the recipe's model against its own baselines on the same rows, and its calibration. Fits the model's
    confidence temperatures on validation first (sets ``model.temperature``)."""
    val_raw, test_raw = scorer.probabilities(val.texts), scorer.probabilities(test.texts)
    # Calibrating changes no label, so the reports below hold for the model as saved; only the probabilities move.
    model.temperature = fit_temperatures(val_raw, val)
    test_probs = calibrated(test_raw, model.temperature)
    test_reports = reports_from(test_probs, test)
    add_intervals(test_reports, test_probs, test)
    comparison = {name: headline(reports_from(probs, test)) for name, probs in baselines.items()}
    comparison[f"{recipe.name} model (shipped)"] = headline(test_reports)
    sampled = f"; a stratified sample of {len(test)} rows of it" if recipe.report_limit else ""
    return {
        "measured_on": (f"held-out test slice: {recipe.test_fraction:.0%} of each training file, stratified by "
                        f"label, split seed {recipe.split_seed}, less the rows whose twin (the same post but for "
                        "links, case, punctuation or a prefix) fell in training or validation; never used for "
                        f"training, early stopping or model selection{sampled}"),
        "test": test_reports,
        **({"test_by_source": reports_by_source(test_probs, test, data_specs)} if len(data_specs) > 1 else {}),
        "validation": reports_from(calibrated(val_raw, model.temperature), val),
        "comparison_test": comparison,
        # Did the recipe's technique beat its own plain fine-tune? Per head, on the same rows: see compare_models.
        **({"shipped_against": {name: compare_models(test_probs, probs, test) for name, probs in baselines.items()}}
           if baselines else {}),
        "calibration": {"fitted_on": "validation slice", "measured_on": "held-out test slice",
                        "measured": calibration_report(test_raw, test, model.temperature)},
    }


FINISHED = "finished.json"  # in a run directory: the run saved its model, which this names


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C while training: says what the run directory keeps for ``--resume``, which may be nothing."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.kept = kept_progress(run_dir)
        super().__init__(str(self))

    def __str__(self) -> str:
        if not self.kept:
            return (f"interrupted before any stage finished an epoch, so {self.run_dir} keeps nothing to resume from: "
                    "the same command starts over")
        return (f"interrupted. {self.run_dir} keeps {', '.join(self.kept)}: run the same command again with --resume "
                "to go on from there")


def kept_progress(run_dir: Path) -> list[str]:
    """Each stage's progress a resume goes on from, in the order the stages run: done, or its last complete epoch."""
    if not run_dir.is_dir():
        return []
    pretrained = (run_dir / "dapt" / "config.json").is_file()  # as _distill tells that domain pretraining is done
    kept = ["domain pretraining finished"] if pretrained else []
    for stage_dir in sorted((p for p in run_dir.iterdir() if p.is_dir()), key=lambda p: (p.name == "student", p.name)):
        if stage_dir.name == "dapt" or stage_dir.name == "mlm" and pretrained:
            continue
        name = {"mlm": "domain pretraining", "fit": "training"}.get(stage_dir.name, stage_dir.name.replace("-", " "))
        state_file = next((f for f in (stage_dir / "state.json", stage_dir / "checkpoint" / "state.json")
                           if f.is_file()), None)
        if (stage_dir / "result.json").is_file():
            kept.append(f"{name} finished")
        elif state_file:
            kept.append(f"{name} after epoch {json.loads(state_file.read_text())['epoch']}")
    return kept


def end_run(run_dir: Path, outcome: TrainOutcome, keep_state: bool) -> None:
    """Mark the run finished (a --resume then reports its model), then remove its checkpoints unless asked to keep
    them: they only serve a resume, and weigh 215 MB for a quick run of MiniLM, 1.2 GB for a full one with two
    teachers."""
    write_json(run_dir / FINISHED, {"model_dir": str(outcome.model_dir.resolve()), "version": outcome.version,
                                    "table": outcome.table})
    if keep_state:
        return
    for entry in run_dir.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry)
        elif entry.name != FINISHED:
            entry.unlink()


def finished_run(run_dir: Path) -> TrainOutcome | None:
    """The outcome of the run in ``run_dir`` if it finished and its model is still there."""
    marker = run_dir / FINISHED
    if not marker.is_file():
        return None
    done = json.loads(marker.read_text())
    model_dir = Path(done["model_dir"])
    if not (model_dir / "metrics.json").is_file():
        print(f"this run finished before, but its model {model_dir} is gone: training it again", flush=True)
        marker.unlink()
        return None
    return TrainOutcome(model_dir, done["version"], json.loads((model_dir / "metrics.json").read_text()),
                        done["table"])


def training_sample(recipe: Recipe, data: LabeledSet, pool: np.ndarray,
                    specs: list[str]) -> tuple[LabeledSet, np.ndarray, dict[str, float]]:
    """The rows of ``pool`` to train on (a stratified sample where the recipe caps them), and ``data`` with the rows
    of the sources that sample keeps whole weighted up by the recipe's ``kept_whole_weight`` ({spec: weight})."""
    whole = kept_whole(data, pool, recipe.train_limit) if recipe.kept_whole_weight != 1 else []
    weighted = data.weighed(whole, recipe.kept_whole_weight)
    return (weighted, stratified_sample(weighted, pool, recipe.train_limit, recipe.fit.seed),
            {specs[origin]: recipe.kept_whole_weight for origin in whole})


def _refit_metrics(refit: Refit) -> dict[str, Any]:
    """The reference's held-out figures, labeled as the reference's: this model has no held-out rows of its own."""
    reference, calibration = refit.metrics, refit.metrics["calibration"]
    return {
        "measured_on": (f"{refit.reference}, the same recipe with its validation and test slices held out; this "
                        f"model is its refit on every labeled row, so no row is left to measure it on. "
                        f"{refit.reference}'s figures were measured on its {reference['measured_on']}"),
        "refit_of": refit.reference,
        "test": reference["test"],
        **({"test_by_source": reference["test_by_source"]} if "test_by_source" in reference else {}),
        "comparison_test": {name.replace("(shipped)", "(the reference)"): row
                            for name, row in reference.get("comparison_test", {}).items()},
        "calibration": {**calibration,
                        "fitted_on": f"{calibration['fitted_on']} of {refit.reference} (taken over by this refit, "
                                     "which trained on those rows)",
                        "measured_on": f"{calibration['measured_on']} of {refit.reference}"},
    }


def fit_config(recipe: Recipe, time_budget: float | None, refit: Refit | None = None) -> FitConfig:
    """The one-model recipes' FitConfig for this run. ``--time-budget`` replaces the recipe's own budget (the quick
    recipe's 400 s) either way: on a slow CPU, a longer one lets it finish its schedule."""
    cfg = recipe.fit
    if refit:
        cfg = dataclasses.replace(cfg, epochs=refit.epochs["fit"])
    if time_budget is not None:
        cfg = dataclasses.replace(cfg, max_seconds=time_budget)
    return cfg


def _fit_one(recipe: Recipe, base: str, text_encoder: TextEncoder, train: LabeledSet, val: LabeledSet | None,
             device, run_dir: Path, time_budget: float | None, refit: Refit | None = None):
    cfg = fit_config(recipe, time_budget, refit)
    model = FinPulseClassifier.from_base(base, pooling=cfg.pooling, dropout=cfg.dropout, seed=cfg.seed)
    result = fit(model, text_encoder, train, gold_targets(train, cfg.class_balance,
                 cfg.label_smoothing), val, cfg, device, run_dir / "fit", name=recipe.name)
    return model, {"fit": result.summary()}, {}, result.seconds_before_resume


def _distill(recipe: Recipe, base: str, text_encoder: TextEncoder, data: LabeledSet, rows: dict[str, np.ndarray],
             device, run_dir: Path, time_budget: float | None, refit: Refit | None = None):
    cfg = recipe.fit
    train, val, test = (data.subset(rows[part]) for part in ("train", "val", "test"))
    teachers = [("plain", base)] + [("adapted", "dapt")] * recipe.teachers
    plan = ["mlm"] + [f"teacher-{i}" for i in range(len(teachers))] + ["student"]
    budget = TimeBudget(time_budget, recipe.stage_shares, plan)
    stages: dict[str, Any] = {}

    # What this run's stages took in the runs it resumed: the whole of those done then, the kept part of the others.
    earlier = 0.0
    dapt_dir = run_dir / "dapt"
    allowance = budget.allowance("mlm")
    if (dapt_dir / "config.json").is_file():
        if (dapt_dir / MLM_STAGE_FILE).is_file():   # not in one adapted by a FinPulse before 2026-12-07
            stages["mlm"] = json.loads((dapt_dir / MLM_STAGE_FILE).read_text())
            earlier += stages["mlm"]["seconds"]
    else:
        mlm = dataclasses.replace(recipe.mlm, max_seconds=allowance)
        stages["mlm"] = pretrain_mlm(base, train.texts, dapt_dir, mlm, device, run_dir / "mlm")
        earlier += stages["mlm"].get("seconds_before_resume", 0.0)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the MLM model's memory, for the teachers' processes

    # Teachers label every row once (train, validation and test), so later steps only slice these arrays.
    parallel = recipe.parallel or teachers_at_once(len(teachers), device)
    jobs = [TeacherJob(i, kind, str(dapt_dir) if init == "dapt" else base, base,
                       dataclasses.replace(cfg, seed=cfg.seed + i,
                                           epochs=refit.epochs[f"teacher-{i}"] if refit else cfg.epochs),
                       data, rows["train"], rows["val"], run_dir / f"teacher-{i}", str(device))
            for i, (kind, init) in enumerate(teachers)]
    waves = [jobs[i:i + parallel] for i in range(0, len(jobs), parallel)]
    done_before = {job.index for job in jobs if (job.out_dir / "probs.npz").is_file()}
    for wave in waves:
        allowance = budget.allowance(*(f"teacher-{job.index}" for job in wave))
        todo = [dataclasses.replace(job, cfg=dataclasses.replace(job.cfg, max_seconds=allowance))
                for job in wave if job.index not in done_before]
        run_teachers(todo)
    probs = [dict(np.load(job.out_dir / "probs.npz")) for job in jobs]
    results = [json.loads((job.out_dir / "result.json").read_text()) for job in jobs]
    # Teachers side by side share their time: a wave took about as long as its slowest one.
    earlier += sum(max(results[job.index]["seconds"] if job.index in done_before
                       else results[job.index].get("seconds_before_resume", 0.0) for job in wave) for wave in waves)
    stages.update({f"teacher-{job.index}": result for job, result in zip(jobs, results)})

    def sliced(members: list[int], part: str) -> Probabilities:
        picked = rows[part]
        return Probabilities(np.mean([probs[m]["topic"][picked] for m in members], axis=0),
                             np.mean([probs[m]["sentiment"][picked] for m in members], axis=0), [None] * len(picked))

    adapted = [i for i, (kind, _) in enumerate(teachers) if kind == "adapted"]
    if refit:
        members, use_adapted, chosen = refit.members, refit.adapted_student, f"{refit.reference}'s choice"
        stages["ensemble"] = {"chosen": chosen, "members": members}
    else:
        candidates = {"all teachers": list(range(len(teachers))), "adapted-encoder teachers": adapted}
        val_scores = {name: selection_score(reports_from(sliced(m, "val"), val)) for name, m in candidates.items()}
        chosen = max(val_scores, key=val_scores.get)
        members = candidates[chosen]
        best_adapted = max(adapted, key=lambda i: results[i]["best_score"])
        use_adapted = results[best_adapted]["best_score"] >= results[0]["best_score"]
        stages["ensemble"] = {"candidates_val_score": val_scores, "chosen": chosen, "members": members}
    stages["ensemble"]["student_init"] = "adapted encoder" if use_adapted else "base encoder"
    scored = f" (validation score {val_scores[chosen]:.4f})" if not refit else ""
    print(f"ensemble: {chosen}{scored}, teachers {members}; student starts from the "
          f"{'adapted' if use_adapted else 'base'} encoder", flush=True)

    targets = distillation_targets(train, sliced(members, "train"), cfg.class_balance, recipe.gold_share,
                                   recipe.pseudo_weight)
    # Distillation keeps improving to the end of its schedule, so the student is not stopped early: a noisy
    # validation dip would cut it off at a high learning rate (measured: stopped at epoch 8 of 12, 0.852 on
    # validation; run to the end, 0.860-0.869).
    seed, epochs = cfg.seed + 100, refit.epochs["student"] if refit else recipe.student_epochs or cfg.epochs
    student = FinPulseClassifier.from_base(str(dapt_dir) if use_adapted else base, pooling=cfg.pooling,
                                           dropout=cfg.dropout, seed=seed)
    result = fit(student, text_encoder, train, targets, None if refit else val,
                 dataclasses.replace(cfg, seed=seed, epochs=epochs, patience=epochs,
                                     max_seconds=budget.allowance("student")), device,
                 run_dir / "student", name="student")
    stages["student"] = result.summary()
    earlier += result.seconds_before_resume
    if refit:
        return student, stages, {}, earlier

    baselines = {
        "plain fine-tune (teacher 0)": sliced([0], "test"),
        "adapted-encoder teacher (best val)": sliced([best_adapted], "test"),
        f"ensemble of {len(members)} ({chosen})": sliced(members, "test"),
    }
    return student, stages, baselines, earlier


def _version(package: str) -> str:
    try:
        from importlib.metadata import version
        return version(package)
    except Exception:  # noqa: BLE001 - a version string is informative only
        return "unknown"
