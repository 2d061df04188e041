"""Fine-tuning the two-head classifier, and domain-adaptive masked-language-model pretraining of its encoder.

``fit`` trains on per-row *target distributions* with per-row weights, one pair per head. A gold label is a
one-hot target weighted by its class weight (class-balanced loss) times its source's weight (``--weight``); a head
a row has no label for gets weight 0, so the two heads learn only from their own rows (the masked loss); a
teacher's soft prediction is just another target, which is how distillation and cross-task self-training use the
same loop.

The loop: AdamW (no decay on biases and norms; optionally layer-wise learning rates), linear warm-up then linear
or cosine decay, bf16 autocast on a GPU (on a CPU: ``cpu_precision``), gradient clipping, length-bucketed batches
(little padding), optionally a moving average of the weights, early stopping on validation macro-F1, an optional time
budget, and a checkpoint after every epoch (weights, average, optimizer state, progress) from which an interrupted
run resumes exactly: each epoch's shuffling and dropout are seeded from (seed, epoch).
Checkpoints are safetensors plus JSON, like the models themselves, and a run killed while writing one resumes from
the one before.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections import deque
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from .data import LabeledSet
from .evaluation import HEADS, evaluate, selection_score
from .modeling import FinPulseClassifier, TextEncoder, load_pretrained, write_json
from .precision import autocast
from .scorer import BatchScorer, Probabilities

log = logging.getLogger(__name__)


@dataclass
class OptimizerConfig:
    """What every training loop here shares: AdamW with warm-up and decay over length-bucketed batches."""
    epochs: int = 6
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_length: int = 64
    seed: int = 13
    max_seconds: float | None = None  # a time budget: the step plan shrinks to fit it (see StepPlan)
    # On a CPU: "bf16" trains under bf16 autocast as a GPU does (models.precision; `finpulse train --cpu-precision`:
    # 1.5x faster with AMX, the same held-out scores, but not always bit-reproducible), or float32.
    cpu_precision: str = "float32"


@dataclass
class FitConfig(OptimizerConfig):
    schedule: str = "linear"          # linear | cosine
    pooling: str = "mean"
    dropout: float = 0.1
    class_balance: float = 0.5        # class weight = (n_class / mean n)^-class_balance: 0 none, 1 fully inverse
    label_smoothing: float = 0.0
    patience: int = 2                 # epochs without a better validation score before stopping
    freeze_layers: int = 0            # freeze embeddings + this many lower layers (cheap CPU training)
    grad_clip: float = 1.0
    layer_decay: float = 1.0          # layer-wise rates: each layer down from the heads gets this times the one above
    ema_decay: float = 0.0            # > 0: validate and keep an exponential moving average of the weights


@dataclass
class MlmConfig(OptimizerConfig):
    epochs: int = 12
    batch_size: int = 64
    seed: int = 17
    mask_prob: float = 0.15


@dataclass
class Targets:
    """Per-row target distributions and weights for both heads (weight 0: this head ignores the row)."""
    topic: np.ndarray             # (n, 20)
    topic_weight: np.ndarray      # (n,)
    sentiment: np.ndarray         # (n, 3)
    sentiment_weight: np.ndarray  # (n,)


@dataclass
class FitResult:
    best_epoch: int
    best_score: float
    history: list[dict[str, Any]]
    seconds: float
    stopped: str
    steps: int = 0             # optimizer steps taken
    scheduled_steps: int = 0   # the schedule's steps before any time budget shrank it
    seconds_before_resume: float = 0.0  # of ``seconds``: the kept epochs of the runs this one resumed

    def summary(self) -> dict[str, Any]:
        """As the run's metrics record a stage. best_score stays below 0 when nothing was validated (a refit):
        there is no score to report then."""
        score = round(self.best_score, 5) if self.best_score >= 0 else None
        return {"best_epoch": self.best_epoch, "best_score": score, "stopped": self.stopped,
                "seconds": round(self.seconds, 1), "steps": self.steps, "scheduled_steps": self.scheduled_steps,
                **({"seconds_before_resume": round(self.seconds_before_resume, 1)}
                   if self.seconds_before_resume else {}),
                "history": self.history}


def class_weights(labels: np.ndarray, n_classes: int, power: float) -> np.ndarray:
    counts = np.bincount(labels[labels >= 0], minlength=n_classes).astype(float)
    present = counts > 0
    weights = np.ones(n_classes)
    if power and present.any():
        weights[present] = (counts[present] / counts[present].mean()) ** -power
    return weights


def gold_targets(data: LabeledSet, class_balance: float, label_smoothing: float = 0.0) -> Targets:
    heads = {}
    for head, names in HEADS.items():
        n_classes, labels = len(names), getattr(data, head)
        has = labels >= 0
        target = np.zeros((len(data), n_classes), dtype=np.float32)
        target[has] = label_smoothing / n_classes
        target[np.flatnonzero(has), labels[has]] += 1.0 - label_smoothing
        weight = np.where(has, class_weights(labels, n_classes, class_balance)[np.maximum(labels, 0)], 0.0)
        heads[head] = (target, (weight * data.weight).astype(np.float32))
    return Targets(heads["topic"][0], heads["topic"][1], heads["sentiment"][0], heads["sentiment"][1])


def distillation_targets(data: LabeledSet, teacher: Probabilities, class_balance: float, gold_share: float,
                         pseudo_weight: float) -> Targets:
    """Gold rows: a mix of the one-hot label (``gold_share``) and the teacher; rows without a label for a head:
    the teacher's prediction, weighted ``pseudo_weight`` times the class weight of its most likely class."""
    gold = gold_targets(data, class_balance)
    heads = {}
    for head, names in HEADS.items():
        n_classes, labels = len(names), getattr(data, head)
        has = labels >= 0
        soft = getattr(teacher, head).astype(np.float32)
        target = np.where(has[:, None], gold_share * getattr(gold, head) + (1 - gold_share) * soft, soft)
        weights = class_weights(labels, n_classes, class_balance)
        weight = np.where(has, getattr(gold, f"{head}_weight"), pseudo_weight * weights[soft.argmax(1)] * data.weight)
        heads[head] = (target.astype(np.float32), weight.astype(np.float32))
    return Targets(heads["topic"][0], heads["topic"][1], heads["sentiment"][0], heads["sentiment"][1])


def masked_soft_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted cross-entropy against target distributions; rows with weight 0 contribute nothing, and a batch
    with no weighted row gives exactly 0 (and no gradient)."""
    per_row = -(target * logits.float().log_softmax(-1)).sum(-1)
    return (per_row * weight).sum() / weight.sum().clamp(min=1e-12)


def bucketed_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Random batches of similar lengths: shuffle, sort within pools of 50 batches, shuffle the batches."""
    order = rng.permutation(len(lengths))
    pool = batch_size * 50
    batches = []
    for start in range(0, len(order), pool):
        block = order[start:start + pool]
        block = block[np.argsort(lengths[block], kind="stable")]
        batches += [block[i:i + batch_size] for i in range(0, len(block), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1.0 - progress)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, device: torch.device,
                   layer_decay: float = 1.0) -> torch.optim.AdamW:
    """AdamW without weight decay on biases and norms. Each group carries an ``lr_scale`` that the training loops
    multiply the scheduled rate by: ``layer_decay`` ** depth (``FinPulseClassifier.parameter_depths``), 1 for
    every group by default."""
    # Off, every group sits at depth 0 (and the MLM model, a plain transformers model, is never asked for depths).
    depths = model.parameter_depths() if layer_decay != 1.0 else {}
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            depth = depths.get(name, 0)
            decays = param.ndim >= 2
            group = groups.setdefault((depth, decays), {"params": [], "weight_decay": weight_decay if decays else 0.0,
                                                        "lr_scale": layer_decay ** depth})
            group["params"].append(param)
    return torch.optim.AdamW(list(groups.values()), lr=lr, fused=device.type == "cuda")


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


class WeightAverage:
    """An exponential moving average of the trainable weights (Polyak averaging), the weights validated and kept
    when ``ema_decay`` is set: fine-tuning on noisy labels ends in a wide basin that single steps jump around in.
    The decay ramps up from 0 ((1 + step) / (10 + step)) so the first steps' weights are not kept for long."""

    FILE = "average.safetensors"

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.shadow = {n: p.detach().clone() for n, p in self.params.items()}

    def update(self, step: int) -> None:
        weight = 1.0 - min(self.decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(list(self.shadow.values()), [p.detach() for p in self.params.values()], weight)

    @contextmanager
    def applied(self):
        """The model holds the averaged weights inside the block, its own again after it."""
        live = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(live[n])

    def save(self, directory: Path) -> None:
        save_file({n: t.cpu().contiguous() for n, t in self.shadow.items()}, str(directory / self.FILE))

    def restore(self, directory: Path) -> None:
        for n, t in load_file(str(directory / self.FILE)).items():
            self.shadow[n].copy_(t)


def progress(total: int, desc: str) -> tqdm:
    interactive = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="batch", dynamic_ncols=True, leave=interactive,
                mininterval=0.5 if interactive else 15.0)


def config_hash(*parts: Any) -> str:
    blob = json.dumps([dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p for p in parts],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


class Checkpoint:
    """Per-epoch state of one training run in ``run_dir``: safetensors for tensors, JSON for the rest.

    Each epoch's files go to a directory of their own (``epoch-N``) and ``state.json``, replaced atomically once
    they are all written, names the one to resume from. A run killed while writing a checkpoint resumes from the
    epoch before, never from one epoch's weights with another's optimizer and progress (measured before this was
    so: killed between the two files, the resumed run trained an extra epoch and ended a different model)."""

    def __init__(self, run_dir: Path, fingerprint: str):
        self.dir = run_dir
        self.fingerprint = fingerprint
        self.current: Path | None = None  # the complete epoch directory state.json names

    def load_state(self) -> dict[str, Any] | None:
        path = self.dir / "state.json"
        state = json.loads(path.read_text()) if path.is_file() else None
        if state and state.get("fingerprint") != self.fingerprint:
            log.warning("checkpoint in %s is from another configuration: starting over", self.dir)
            state = None
        elif state and not (self.dir / state.get("checkpoint", "-")).is_dir():
            log.warning("checkpoint in %s is from an older FinPulse: starting over", self.dir)
            state = None
        self.current = self.dir / state["checkpoint"] if state else None
        self._remove_others()  # what a killed run left half written
        return state

    def save_best(self, model: nn.Module, epoch: int) -> None:
        """The weights just validated (the average's, where one is kept), before the epoch's ``save``."""
        save_file(_weights(model), str(self._epoch_dir(epoch) / "best.safetensors"))

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
             average: WeightAverage | None) -> None:
        epoch_dir = self._epoch_dir(state["epoch"])
        save_file(_weights(model), str(epoch_dir / "last.safetensors"))
        if average:
            average.save(epoch_dir)
        tensors, meta = _flatten_optimizer(optimizer.state_dict())
        save_file(tensors, str(epoch_dir / "optimizer.safetensors"))
        write_json(epoch_dir / "optimizer.json", meta)
        if self.current and (self.current / "best.safetensors").exists() and \
                not (epoch_dir / "best.safetensors").exists():
            _link_or_copy(self.current / "best.safetensors", epoch_dir / "best.safetensors")
        write_json(self.dir / "state.json", {**state, "checkpoint": epoch_dir.name, "fingerprint": self.fingerprint})
        self.current = epoch_dir
        self._remove_others()

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer, average: WeightAverage | None) -> None:
        model.load_state_dict(load_file(str(self.current / "last.safetensors")))
        if average:
            average.restore(self.current)
        meta = json.loads((self.current / "optimizer.json").read_text())
        optimizer.load_state_dict(_unflatten_optimizer(load_file(str(self.current / "optimizer.safetensors")), meta))

    def load_best(self, model: nn.Module) -> None:
        model.load_state_dict(load_file(str(self.current / "best.safetensors")))

    def _epoch_dir(self, epoch: int) -> Path:
        path = self.dir / f"epoch-{epoch}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _remove_others(self) -> None:
        for path in self.dir.glob("epoch-*"):
            if path != self.current:
                shutil.rmtree(path)


def _link_or_copy(source: Path, target: Path) -> None:
    """An unchanged best model costs no copy where the file system has hard links."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as safetensors takes it: tied weights (a masked-LM head's decoder and the embeddings) are
    one tensor under two names, which it refuses, so the second name gets a copy."""
    weights, seen = {}, set()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        weights[name] = tensor.clone() if tensor.data_ptr() in seen else tensor
        seen.add(tensor.data_ptr())
    return weights


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for param_id, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"{param_id}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{param_id}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        param_id, key = flat.split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


class StepPlan:
    """How many optimizer steps a run makes. With a time budget, the speed of the last ``WINDOW`` steps
    (re-measured every ``EVERY`` steps: a shared machine speeds up and slows down) caps the plan so that the
    learning-rate schedule still decays to zero inside the budget (15% is left for validation passes), rather than
    the run being cut off at a high learning rate."""

    FIRST_TIMED_STEP = 5  # the first steps are slower (allocations, warm-up)
    EVERY = 20
    # Recent steps only: the MLM stage's first epoch on an H200 ran at a third of its later speed (warm-up, new
    # batch shapes), and an average since the start kept the plan cut for epochs after the speed-up.
    WINDOW = 100

    def __init__(self, total: int, max_seconds: float | None, started: float):
        self.total = self.most = total
        self.max_seconds = max_seconds
        self.started = started
        self._marks: deque[tuple[int, float]] = deque(maxlen=self.WINDOW // self.EVERY + 1)  # (step, time)

    def update(self, step: int) -> None:
        """Call after each step (``step`` = steps done so far)."""
        if not self.max_seconds or step < self.FIRST_TIMED_STEP or (step - self.FIRST_TIMED_STEP) % self.EVERY:
            return
        now = time.monotonic()
        if self._marks:
            first_step, first_time = self._marks[0]
            per_step = (now - first_time) / (step - first_step)
            affordable = step + int(0.85 * (self.max_seconds - (now - self.started)) / per_step)
            # At least one more step while any is planned, never more than planned: a re-measure on the last
            # step must not add one (it ran a phantom one-step epoch past the schedule's end).
            self.total = min(self.most, max(step + 1, affordable))
        self._marks.append((step, now))

    def out_of_time(self) -> bool:
        return bool(self.max_seconds) and time.monotonic() - self.started > self.max_seconds

    def epoch_ends(self, state: dict, epoch: int) -> bool:
        """Call after each step: counts it (the plan goes into ``state``, for a resumed run) and says whether the
        epoch ends here, the schedule done or the budget spent (``state["stopped"]`` then says so)."""
        self.update(state["step"])
        state["planned_steps"] = self.total
        if state["step"] >= self.total:
            return True
        if self.out_of_time():
            state["stopped"] = f"time budget of {self.max_seconds:.0f}s reached in epoch {epoch}"
            return True
        return False


def to_device(device: torch.device, *arrays) -> list[torch.Tensor]:
    """int64 arrays/tensors of one batch to ``device`` in one pinned, non-blocking copy: no copy from pageable
    memory that would make the CPU wait for the GPU every step (this loop is bound by launch overhead)."""
    host = [torch.as_tensor(a, dtype=torch.int64).reshape(-1) for a in arrays]
    flat = torch.cat(host)
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    parts = flat.split([h.numel() for h in host])
    return [part.view(torch.as_tensor(a).shape) for part, a in zip(parts, arrays)]


def fit(model: FinPulseClassifier, text_encoder: TextEncoder, train: LabeledSet, targets: Targets,
        val: LabeledSet | None, cfg: FitConfig, device: torch.device, run_dir: Path | None = None,
        name: str = "train") -> FitResult:
    """Train ``model`` in place and leave it holding its best validation epoch's weights; without ``val`` (a refit
    on every labeled row, whose epochs were chosen by a run that held a validation slice out) its last epoch's."""
    started = time.monotonic()
    model.to(device)
    model.freeze_lower(cfg.freeze_layers)
    token_ids = text_encoder.ids(train.texts)
    lengths = np.array([len(x) for x in token_ids])
    # Targets are small (rows x 23 floats): they live on the device, and each batch only gathers its rows.
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in dataclasses.asdict(targets).items()}
    steps_per_epoch = -(-len(train) // cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = max(1, int(cfg.warmup_ratio * total_steps))
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, device, cfg.layer_decay)
    average = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay else None

    # The time budget is not part of what is trained: a run resumed with another allowance (a --time-budget run
    # always gets one) continues its checkpoint, on the step plan it saved, instead of starting over.
    fingerprint = config_hash(dataclasses.replace(cfg, max_seconds=None), len(train), lengths.sum())
    checkpoint = Checkpoint(run_dir, fingerprint) if run_dir else None
    state = checkpoint.load_state() if checkpoint else None
    if state:
        checkpoint.restore(model, optimizer, average)
        log.info("%s: resuming after epoch %d (best %.4f at epoch %d)", name, state["epoch"], state["best_score"],
                 state["best_epoch"])
    state = state or {"epoch": 0, "step": 0, "best_score": -1.0, "best_epoch": 0, "bad_epochs": 0,
                      "history": [], "stopped": "", "planned_steps": total_steps}
    # The kept epochs' time, so that a resumed stage reports what it took, and its steps' rate holds.
    earlier = state.get("seconds", sum(epoch["seconds"] for epoch in state["history"]))
    best_weights = None
    plan = StepPlan(state["planned_steps"], cfg.max_seconds, started)
    while not state["stopped"] and state["step"] < state["planned_steps"]:
        epoch = state["epoch"] + 1
        rng = np.random.default_rng([cfg.seed, epoch])
        torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout: the same after a resume
        model.train()
        epochs = -(-state["planned_steps"] // steps_per_epoch)
        bar = progress(min(steps_per_epoch, state["planned_steps"] - state["step"]), f"{name} epoch {epoch}/{epochs}")
        epoch_start, loss_sum, seen = time.monotonic(), 0.0, 0
        for batch in bucketed_batches(lengths, cfg.batch_size, rng):
            ids_t, mask_t, rows = to_device(device, *text_encoder.pad([token_ids[i] for i in batch]), batch)
            batch_targets = {k: v[rows] for k, v in tensors.items()}
            set_learning_rate(optimizer, cfg.lr * lr_factor(state["step"], state["planned_steps"], warmup,
                                                            cfg.schedule))
            with autocast(device, cfg.cpu_precision):
                topic_logits, sentiment_logits = model(ids_t, mask_t)
            loss = (masked_soft_loss(topic_logits, batch_targets["topic"], batch_targets["topic_weight"])
                    + masked_soft_loss(sentiment_logits, batch_targets["sentiment"], batch_targets["sentiment_weight"]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
            optimizer.step()
            if average:
                average.update(state["step"])
            state["step"] += 1
            seen += len(batch)
            if state["step"] % 20 == 0 or seen == len(train):
                loss_sum = loss.item() if not loss_sum else 0.9 * loss_sum + 0.1 * loss.item()
                bar.set_postfix(loss=f"{loss_sum:.4f}", seq_s=f"{seen / (time.monotonic() - epoch_start):.0f}")
            bar.update(1)
            if plan.epoch_ends(state, epoch):
                break
        bar.close()
        loss_sum = loss_sum or loss.item()  # an epoch shorter than the display interval
        with average.applied() if average else nullcontext():
            if val is None:
                score, improved, measured = -1.0, True, {}
                summary = f"{name} epoch {epoch}: loss {loss_sum:.4f}"
            else:
                # A few thousand rows: tokenizer processes started every epoch would cost more than they save.
                scorer = BatchScorer(model, text_encoder, "in-training", device=device, tokenizer_processes=0)
                reports = evaluate(scorer, val)
                score = selection_score(reports)
                improved = score > state["best_score"]
                measured = {"val_score": round(score, 5),
                            **{f"val_{h}_{m}": round(r[m], 5) for h, r in reports.items()
                               for m in ("accuracy", "macro_f1")}}
                summary = f"{name} epoch {epoch}: loss {loss_sum:.4f}  val " + "  ".join(
                    f"{h} acc {r['accuracy']:.4f} F1 {r['macro_f1']:.4f}" for h, r in reports.items())
            if improved and checkpoint:
                checkpoint.save_best(model, epoch)
            elif improved:
                best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        state["history"].append({"epoch": epoch, "loss": round(loss_sum, 5), **measured,
                                 "seconds": round(time.monotonic() - epoch_start, 1)})
        if improved:
            state.update(best_score=score, best_epoch=epoch, bad_epochs=0)
        else:
            state["bad_epochs"] += 1
            if state["bad_epochs"] >= cfg.patience:
                state["stopped"] = f"early stop: no better validation score for {cfg.patience} epochs"
        state["epoch"] = epoch
        state["seconds"] = round(earlier + time.monotonic() - started, 1)
        if checkpoint:
            checkpoint.save(model, optimizer, state, average)
        # Once the epoch is saved: a Ctrl-C after this line finds it kept for --resume.
        print(summary, flush=True)
    if checkpoint:
        checkpoint.load_best(model)
    elif best_weights is not None:
        model.load_state_dict(best_weights)
    model.eval()
    planned = ("all epochs" if state["planned_steps"] == total_steps else
               f"time budget: {state['planned_steps']} of {total_steps} steps")
    return FitResult(state["best_epoch"], state["best_score"], state["history"], earlier + time.monotonic() - started,
                     state["stopped"] or planned, state["step"], total_steps, earlier)


MLM_STAGE_FILE = "finpulse_stage.json"  # in the adapted encoder's directory: the stage's figures, as a fit's


def pretrain_mlm(base: str, texts: list[str], out_dir: Path, cfg: MlmConfig, device: torch.device,
                 run_dir: Path | None = None) -> dict[str, Any]:
    """Domain-adaptive pretraining: masked-language-model training of ``base`` on ``texts``; writes the adapted
    encoder (and its tokenizer) to ``out_dir``, with the stage's figures (``MLM_STAGE_FILE``), and returns them.
    With ``run_dir``, a checkpoint after every epoch from which an interrupted run resumes exactly, as ``fit``'s
    does."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer
    started = time.monotonic()
    tokenizer = load_pretrained(AutoTokenizer, base)
    # An encoder saved without its masked-LM head (all-MiniLM-L6-v2 is) gets a new one, drawn from the seeded RNG.
    torch.manual_seed(cfg.seed)
    model = load_pretrained(AutoModelForMaskedLM, base, dtype=torch.float32).to(device)
    text_encoder = TextEncoder(tokenizer.backend_tokenizer, cfg.max_length)
    token_ids = text_encoder.ids(texts)
    lengths = np.array([len(x) for x in token_ids])
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
    steps_per_epoch = -(-len(texts) // cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = max(1, int(cfg.warmup_ratio * total_steps))
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, device)
    fingerprint = config_hash(dataclasses.replace(cfg, max_seconds=None), len(texts), lengths.sum())
    checkpoint = Checkpoint(run_dir, fingerprint) if run_dir else None
    state = checkpoint.load_state() if checkpoint else None
    if state:
        checkpoint.restore(model, optimizer, None)
        log.info("domain pretraining: resuming after epoch %d", state["epoch"])
    state = state or {"epoch": 0, "step": 0, "stopped": "", "planned_steps": total_steps}
    earlier = state.get("seconds", 0.0)
    plan = StepPlan(state["planned_steps"], cfg.max_seconds, started)
    model.train()
    while not state["stopped"] and state["step"] < state["planned_steps"]:
        epoch = state["epoch"] + 1
        rng = np.random.default_rng([cfg.seed, epoch])
        torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout: the same after a resume
        generator = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)  # which tokens are masked: likewise
        bar = progress(min(steps_per_epoch, state["planned_steps"] - state["step"]),
                       f"domain pretraining epoch {epoch}/{-(-state['planned_steps'] // steps_per_epoch)}")
        for batch in bucketed_batches(lengths, cfg.batch_size, rng):
            ids, mask = (torch.from_numpy(a) for a in text_encoder.pad([token_ids[i] for i in batch]))
            inputs, labels = mask_tokens(ids, mask, special, tokenizer.mask_token_id, len(tokenizer), cfg.mask_prob,
                                         generator)
            inputs, mask, labels = to_device(device, inputs, mask, labels)
            set_learning_rate(optimizer, cfg.lr * lr_factor(state["step"], state["planned_steps"], warmup, "linear"))
            with autocast(device, cfg.cpu_precision):
                loss = model(input_ids=inputs, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            state["step"] += 1
            if state["step"] % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update(1)
            if plan.epoch_ends(state, epoch):
                break
        bar.close()
        print(f"domain pretraining epoch {epoch}: MLM loss {loss.item():.3f}", flush=True)
        if state["stopped"]:
            print(f"domain pretraining: {state['stopped']}", flush=True)
        state["epoch"] = epoch
        state["seconds"] = round(earlier + time.monotonic() - started, 1)
        if checkpoint:
            checkpoint.save(model, optimizer, state, None)
    stage = {"seconds": round(earlier + time.monotonic() - started, 1), "texts": len(texts),
             **({"seconds_before_resume": round(earlier, 1)} if earlier else {})}
    # Whole or not at all: a resumed recipe takes an existing out_dir as this stage done.
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.base_model.save_pretrained(str(partial))
    tokenizer.save_pretrained(str(partial))
    write_json(partial / MLM_STAGE_FILE, stage)
    shutil.rmtree(out_dir, ignore_errors=True)
    partial.replace(out_dir)
    return stage


def mask_tokens(ids: torch.Tensor, mask: torch.Tensor, special: torch.Tensor, mask_id: int, vocab_size: int,
                prob: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: ``prob`` of the real tokens are predicted; of those 80% become [MASK], 10% a random token."""
    candidates = mask.bool() & ~torch.isin(ids, special)
    chosen = candidates & (torch.rand(ids.shape, generator=generator) < prob)
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    draw = torch.rand(ids.shape, generator=generator)
    inputs = torch.where(chosen & (draw < 0.8), torch.full_like(ids, mask_id), ids)
    random_tokens = torch.randint(vocab_size, ids.shape, generator=generator)
    inputs = torch.where(chosen & (draw >= 0.8) & (draw < 0.9), random_tokens, inputs)
    return inputs, labels
