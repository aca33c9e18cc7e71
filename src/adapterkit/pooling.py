"""Read a sentence-transformers base the way it was trained: through its own pooling.

    e  = Σ_t m_t·h_t / Σ_t m_t        mean (cls: h_0;  max: max_t over m_t = 1;  lasttoken: h at the last m_t = 1)
    e' = e / ‖e‖₂                      when the checkpoint ends in a Normalize module

A sentence-transformers folder says how in `modules.json` and its Pooling module's `config.json`.
A classifier built from such a folder by transformers reads BERT's CLS pooler instead, a layer the
checkpoint never trained; `use_pooling` puts the checkpoint's pooling where the head reads from:
  - a base with a pooler slot (BERT): the slot becomes `SentencePooler`, so the head sees e';
  - a base whose head reads the first token itself (RoBERTa, MPNet): e' is written over h_0.
The attention mask is taken from the encoder's own call, so every caller (training, eval, the
server, a merged folder loaded by `load_pooled_classifier`) reads the same vector.
A plain encoder keeps its pooler; a decoder's classifier already reads the last real token.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import AdapterConfigError

MODES = ("mean", "cls", "max", "lasttoken")
POOLING_FILE = "pooling.json"  # ours, beside a merged or exported model
_ST_MODE_KEYS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                 "pooling_mode_max_tokens": "max", "pooling_mode_lasttoken": "lasttoken"}


@dataclass(frozen=True)
class Pooling:
    mode: str = "mean"
    normalize: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise AdapterConfigError(f"unknown pooling {self.mode!r}; use one of {', '.join(MODES)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Pooling:
        return cls(mode=str(data.get("mode", "mean")), normalize=bool(data.get("normalize", False)))

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """[batch, tokens, hidden] and a [batch, tokens] mask (None: every token is real) -> [batch, hidden]."""
        if mask is None:
            mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        real = mask.to(hidden.dtype).unsqueeze(-1)
        if self.mode == "mean":
            pooled = (hidden * real).sum(1) / real.sum(1).clamp(min=1)
        elif self.mode == "cls":
            pooled = hidden[:, 0]
        elif self.mode == "max":
            pooled = hidden.masked_fill(real == 0, torch.finfo(hidden.dtype).min).amax(1)
        else:  # the last real token, wherever the padding sits
            positions = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
            last = torch.where(mask.bool(), positions, -1).amax(1).clamp(min=0)
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled


def sentence_pooling(folder: str | Path) -> Pooling | None:
    """The pooling a local sentence-transformers folder declares (None for any other folder)."""
    root = Path(folder)
    ours = root / POOLING_FILE
    if ours.is_file():
        return Pooling.from_dict(json.loads(ours.read_text()))
    modules_file = root / "modules.json"
    if not modules_file.is_file():
        return None
    modules = json.loads(modules_file.read_text())
    pooling_dirs = [m.get("path", "") for m in modules if str(m.get("type", "")).endswith(".Pooling")]
    if not pooling_dirs:
        return None
    config_file = root / pooling_dirs[0] / "config.json"
    if not config_file.is_file():
        raise AdapterConfigError(f"{modules_file} names a Pooling module but {config_file} is missing")
    config = json.loads(config_file.read_text())
    modes = [mode for key, mode in _ST_MODE_KEYS.items() if config.get(key)]
    if config.get("pooling_mode") in MODES:  # newer sentence-transformers write the mode by name
        modes = [config["pooling_mode"]]
    if len(modes) != 1:
        raise AdapterConfigError(f"{config_file}: pooling {modes or 'none'} is not one of {', '.join(MODES)}")
    normalize = any(str(m.get("type", "")).endswith(".Normalize") for m in modules)
    return Pooling(mode=modes[0], normalize=normalize)


class SentencePooler(nn.Module):
    """Stands in a BERT-like pooler slot: the pooled sentence embedding instead of tanh(W·h_0)."""

    def __init__(self, pooling: Pooling) -> None:
        super().__init__()
        self.pooling = pooling
        self.mask: torch.Tensor | None = None  # set for one call by the encoder's pre-hook

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.pooling(hidden, self.mask)

    def extra_repr(self) -> str:
        return f"mode={self.pooling.mode!r}, normalize={self.pooling.normalize}"


class _FirstTokenPooling(nn.Module):
    """Writes the pooled embedding over the first token of an encoder's output, for heads that read h_0."""

    def __init__(self, pooling: Pooling) -> None:
        super().__init__()
        self.pooling = pooling
        self.mask: torch.Tensor | None = None

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        hidden = output[0]
        pooled = self.pooling(hidden, self.mask)
        hidden = torch.cat([pooled.unsqueeze(1), hidden[:, 1:]], dim=1)
        if isinstance(output, tuple):
            return (hidden, *output[1:])
        output["last_hidden_state"] = hidden
        return output


def reads_last_token(model: nn.Module) -> bool:
    """A decoder's classifier: transformers' own reads the last real token (found by the pad id)."""
    config = getattr(model, "config", None)
    architectures = getattr(config, "architectures", None) or []
    return (bool(getattr(config, "is_decoder", False)) or isinstance(getattr(model, "score", None), nn.Module)
            or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
            or type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")))


def _encoder(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


def pooling_of(model: nn.Module) -> Pooling | None:
    """The sentence pooling `use_pooling` gave this model, or None."""
    reader = getattr(model, "_adapterkit_pooling", None)
    return reader.pooling if isinstance(reader, (SentencePooler, _FirstTokenPooling)) else None


def use_pooling(model: nn.Module, pooling: Pooling) -> nn.Module:
    """Make a transformers encoder classifier read `pooling` of its last hidden state (in place)."""
    if pooling_of(model) is not None:
        raise AdapterConfigError("this model already reads a sentence pooling")
    if reads_last_token(model):
        raise AdapterConfigError("sentence pooling is for encoders; a decoder's classifier reads its last real token")
    encoder = _encoder(model)
    reader: SentencePooler | _FirstTokenPooling
    if isinstance(getattr(encoder, "pooler", None), nn.Module):
        reader = SentencePooler(pooling)
        encoder.pooler = reader
    else:
        reader = _FirstTokenPooling(pooling)
        encoder.register_forward_hook(reader.after, with_kwargs=True)

    def take_mask(module: nn.Module, args: tuple, kwargs: dict) -> None:
        # positional order in every transformers encoder: input_ids, attention_mask, ...
        reader.mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

    encoder.register_forward_pre_hook(take_mask, with_kwargs=True)
    object.__setattr__(model, "_adapterkit_pooling", reader)  # not a submodule: no state_dict entry
    return model


def pool_as_trained(model: nn.Module, folder: str | Path) -> Pooling | None:
    """Give an encoder classifier loaded from `folder` the pooling the folder declares, if any."""
    if not Path(folder).is_dir():
        return None  # a hub id: transformers' own reading (the hub is out of reach here)
    pooling = sentence_pooling(folder)
    if pooling is None or reads_last_token(model):
        return None
    use_pooling(model, pooling)
    return pooling


def read_as_trained(model: nn.Module, tokenizer: Any, folder: str | Path, pooled: bool = True) -> Pooling | None:
    """A sequence classifier loaded from `folder`, read the way its checkpoint was trained: the
    folder's sentence pooling, and a pad id for a decoder (which classifies from its last real token,
    found by that id). Training, eval and the server all load their base through this."""
    pooling = pool_as_trained(model, folder) if pooled else None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id
    return pooling


def write_pooling(model: nn.Module, folder: str | Path) -> Pooling | None:
    """Record the model's sentence pooling beside a saved copy (`pooling.json`)."""
    pooling = pooling_of(model)
    if pooling is not None:
        (Path(folder) / POOLING_FILE).write_text(json.dumps(pooling.to_dict(), indent=2))
    return pooling


def load_pooled_classifier(folder: str | Path, **kwargs: Any) -> nn.Module:
    """`AutoModelForSequenceClassification.from_pretrained(folder)` read with the pooling it records."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the pooler slot's weights are absent on purpose
    try:
        model = AutoModelForSequenceClassification.from_pretrained(folder, **kwargs)
    finally:
        logging.set_verbosity(verbosity)
    pool_as_trained(model, folder)
    return model.eval()
