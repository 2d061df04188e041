"""Finding the trained model to use, and listing them all (``model_summaries``, for ``finpulse models``).

``find_model_dir``: an explicit directory (or a model version under the models root) if given, else
``$FINPULSE_MODEL_DIR``, else the newest valid FinPulse model under the models root (``[models] models_dir``) (by the ``created_at`` in its
config.json). An explicit directory that is not a FinPulse model is an error that says why; while scanning,
directories that are not models (or are still being written: training writes to a hidden ``.incomplete-*``
directory and renames it when done) are skipped.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .metrics import headline
from .modeling import ModelError, read_config
from .settings import ModelSettings

log = logging.getLogger(__name__)
MODEL_DIR_ENV = "FINPULSE_MODEL_DIR"
DEFAULT_MODELS_ROOT = Path(ModelSettings.models_dir)


class NotAModelDir(ModelError):
    """A directory given as a FinPulse model that is not one."""


def validate_model_dir(path: str | Path) -> dict:
    """The model's config when ``path`` is a complete FinPulse model directory; else NotAModelDir saying why."""
    path = Path(path).expanduser()
    if path.is_file():
        raise NotAModelDir(f"{path} is a file: a model is the directory that holds it"
                           + (f" ({path.parent})" if (path.parent / "config.json").is_file() else ""))
    if not path.is_dir():
        raise NotAModelDir(f"model directory {path} does not exist")
    try:
        return read_config(path)
    except ModelError as exc:
        raise NotAModelDir(str(exc)) from None


def list_models(root: str | Path = DEFAULT_MODELS_ROOT, broken: list[tuple[Path, str]] | None = None
                ) -> list[tuple[Path, dict]]:
    """Valid model directories under ``root``, newest first. A directory that says it is a FinPulse model but
    cannot be loaded (a damaged weights file, an edited config) is skipped with a warning, and added to ``broken``
    with the reason: the newest whole model is used instead, never the damaged one."""
    root = Path(root)
    found = []
    for child in sorted(root.iterdir()) if root.is_dir() else []:
        if child.name.startswith(".") or not child.is_dir():
            continue
        try:
            found.append((child, validate_model_dir(child)))
        except NotAModelDir as exc:
            if not _says_it_is_a_model(child):
                log.debug("skipping %s: %s", child, exc)
            elif broken is not None:
                broken.append((child, str(exc)))     # the caller says so
            else:
                log.warning("skipping model directory %s: %s", child, exc)
    found.sort(key=lambda item: (item[1].get("created_at", ""), item[0].stat().st_mtime), reverse=True)
    return found


def _says_it_is_a_model(path: Path) -> bool:
    try:
        return '"finpulse_format"' in (path / "config.json").read_text(errors="replace")
    except OSError:
        return False


def find_model_dir(explicit: str | None = None, root: str | Path = DEFAULT_MODELS_ROOT) -> Path | None:
    chosen = explicit or os.environ.get(MODEL_DIR_ENV)
    if chosen:
        path = Path(chosen).expanduser()
        if not path.exists() and (Path(root) / chosen).is_dir():
            path = Path(root) / chosen  # a bare model version, as printed by training
        validate_model_dir(path)
        return path
    models = list_models(root)
    return models[0][0] if models else None


def no_model_found(root: str | Path = DEFAULT_MODELS_ROOT) -> str:
    """Why no model was found, naming where it was looked for: a relative models root is relative to the directory
    FinPulse runs in, so the same command finds nothing when run elsewhere."""
    root = Path(root).expanduser()
    relative = "" if root.is_absolute() else f", [models] models_dir {str(root)!r} from the directory you run in"
    return (f"no trained FinPulse model in {root.resolve()}{relative}: run `finpulse train`, run from the directory "
            f"that holds one, or name one (a directory, ${MODEL_DIR_ENV}, or [models] models_dir)")


def model_summaries(root: str | Path = DEFAULT_MODELS_ROOT, broken: list[tuple[Path, str]] | None = None
                    ) -> list[dict]:
    """What ``finpulse models`` lists: each model under ``root``, newest first, with its held-out figures (a
    refit's are its reference's: ``refit_of`` says so), its news probe figures and its size on disk. Damaged model
    directories go to ``broken`` (``list_models``)."""
    summaries = []
    for path, config in list_models(root, broken):
        try:
            metrics = json.loads((path / "metrics.json").read_text())
        except (OSError, ValueError):
            metrics = {}
        summaries.append({
            "version": config.get("model_version", path.name), "path": str(path), "recipe": config.get("recipe", ""),
            "created_at": config.get("created_at", ""), "refit_of": metrics.get("refit_of"),
            "held_out": headline(metrics.get("test")), "news_probe": headline(metrics.get("out_of_domain")),
            "megabytes": round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6, 1)})
    return summaries
