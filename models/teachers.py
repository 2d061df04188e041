"""The full recipe's teachers: each fits one model and labels every row with it, and several train side by side,
each in its own process.

One small encoder's training loop is bound by Python and kernel launches, not by the GPU, so several loops share
one GPU for about the wall time of one. A teacher leaves its summary (``result.json``), then its labels
(``probs.npz``, written whole) in its directory: the labels mark it done, so a resumed run trains only the others.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data import LabeledSet
from .modeling import FinPulseClassifier, TextEncoder, quiet_transformers, write_json
from .parent_watch import exit_with_parent
from .scorer import BatchScorer
from .training import FitConfig, fit, gold_targets


class TeacherProcessDied(RuntimeError):
    """Teachers trained side by side that ended without a result, and how to go on."""


@dataclass
class TeacherJob:
    """One teacher of the distillation pipeline: everything its (possibly separate) process needs."""
    index: int
    kind: str                # plain | adapted
    init: str                # the encoder it starts from
    base: str                # the base model (its tokenizer)
    cfg: FitConfig
    data: LabeledSet         # every row: the teacher labels all of them
    train_rows: np.ndarray
    val_rows: np.ndarray
    out_dir: Path
    device: str
    threads: int = 0         # CPU threads for this process (0: torch's default)

    @property
    def name(self) -> str:
        return f"teacher {self.index} ({self.kind})"


def train_teacher(job: TeacherJob) -> None:
    """Fit one teacher, label every row with it, and leave ``probs.npz`` and ``result.json`` in its directory
    (their presence marks the teacher done, so a resumed run skips it)."""
    quiet_transformers()
    if job.threads:
        torch.set_num_threads(job.threads)
    device = torch.device(job.device)
    text_encoder = TextEncoder.for_base(job.base, job.cfg.max_length)
    train = job.data.subset(job.train_rows)
    val = job.data.subset(job.val_rows) if len(job.val_rows) else None  # a refit: its epochs are given
    model = FinPulseClassifier.from_base(job.init, pooling=job.cfg.pooling, dropout=job.cfg.dropout,
                                         seed=job.cfg.seed)
    result = fit(model, text_encoder, train, gold_targets(train, job.cfg.class_balance, job.cfg.label_smoothing),
                 val, job.cfg, device, job.out_dir / "checkpoint", name=job.name)
    labeller = BatchScorer(model, text_encoder, "teacher", device=device, tokenizer_processes=0)
    everything = labeller.probabilities(job.data.texts)
    write_json(job.out_dir / "result.json", {"kind": job.kind, "seed": job.cfg.seed, **result.summary()})
    partial = job.out_dir / "probs.npz.partial"
    with partial.open("wb") as handle:
        np.savez(handle, topic=everything.topic, sentiment=everything.sentiment)
    partial.replace(job.out_dir / "probs.npz")  # last and whole: it marks the teacher done


# GPU memory per teacher process, with room to spare for a longer --max-length or a larger --batch-size: six
# MiniLM teachers (batch 64, 64 tokens) took about 2.3 GiB each on the H100, CUDA context included.
TEACHER_GPU_BYTES = 5 * 2**30


def teachers_at_once(teachers: int, device: torch.device) -> int:
    """All teachers at once on a GPU with the memory and host cores for them; one at a time on a CPU (where one
    training loop already uses every core)."""
    if device.type != "cuda":
        return 1
    free_bytes, _ = torch.cuda.mem_get_info(device)
    return fitting_processes(teachers, free_bytes, os.cpu_count() or 1)


def fitting_processes(jobs: int, free_gpu_bytes: int, cpu_cores: int) -> int:
    """Each process needs TEACHER_GPU_BYTES of GPU memory and about one core to drive its GPU."""
    return max(1, min(jobs, free_gpu_bytes // TEACHER_GPU_BYTES, cpu_cores))


TEACHER_EXIT_S = 5.0  # an interrupted run waits this long for its teachers to end before it kills them


def run_teachers(jobs: list[TeacherJob]) -> None:
    """Train ``jobs`` at once: one in this process, several each in its own spawned process (CUDA needs spawn),
    CPU threads split between them. Every process runs to its end, whatever befalls the others; then a process that
    died (most often killed by the kernel, for memory) is reported, or else the first failure is raised.

    Each process gets its job and reports back on its own pipe; they share no queue or lock that a process killed at
    the wrong moment could leave held. (``ProcessPoolExecutor``, used before, shares its call queue, and once kept a
    run going past two minutes after one of its teachers was killed.)"""
    if len(jobs) <= 1:
        for job in jobs:
            train_teacher(job)
        return
    import multiprocessing
    from multiprocessing.connection import wait
    context = multiprocessing.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // len(jobs))
    print(f"training {len(jobs)} teachers side by side ({threads} CPU threads each)", flush=True)
    running, outcomes = {}, {}
    try:
        for job in jobs:
            receive, send = context.Pipe(duplex=False)
            process = context.Process(target=_teacher_process, name=job.name,
                                      args=(dataclasses.replace(job, threads=threads), send, os.getpid()))
            process.start()
            send.close()  # the child holds the only writing end: its exit, however abrupt, ends the pipe
            running[receive] = (job, process)
        while running:
            for receive in wait(list(running)):
                job, process = running.pop(receive)
                try:
                    outcomes[job.index] = receive.recv()
                except EOFError:  # it ended without a word: killed
                    outcomes[job.index] = None
                process.join()
    finally:
        # Interrupted here (Ctrl-C): no teacher is left training unseen. The same Ctrl-C reached the teachers (one
        # process group), so each gets a moment to end on its own and release what it holds; then it is killed.
        deadline = time.monotonic() + TEACHER_EXIT_S
        for _, process in running.values():
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
    died = [job.index for job in jobs if outcomes[job.index] is None]
    if died:
        which = f"teacher{'s' if len(died) > 1 else ''} {', '.join(map(str, died))}"
        raise TeacherProcessDied(
            f"a teacher process ended abruptly (killed; most often for want of memory): {which} did not finish. "
            f"Finished teachers and every teacher's last complete epoch are kept: run the same command again with "
            f"--resume to go on from there, with --parallel {max(1, len(jobs) // 2)} to train fewer at once")
    for job in jobs:
        if outcomes[job.index] != "done":
            error, remote_traceback = outcomes[job.index]
            raise error from RuntimeError(f"in {job.name}'s process:\n{remote_traceback}")


def _teacher_process(job: TeacherJob, report, parent_pid: int) -> None:
    """A teacher process's body: train, then report "done" or the exception and its traceback (raised by the
    parent, as a future's would be). It ends with its parent: a resumed run must not find it still writing."""
    exit_with_parent(parent_pid)
    try:
        train_teacher(job)
    except BaseException as error:  # noqa: BLE001 - it travels to the parent, which raises it
        text = traceback.format_exc()
        try:
            pickle.dumps(error)
        except Exception:  # noqa: BLE001 - an exception that does not pickle travels as its text
            error = RuntimeError(f"{type(error).__name__}: {error}")
        report.send((error, text))
    else:
        report.send("done")
