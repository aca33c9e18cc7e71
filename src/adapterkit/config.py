"""One dataclass per method: what an adapter is, independent of where it is attached.

Configs are written into `adapter.json` and read back by newer or older versions of adapterkit,
so readers ignore keys they do not know (with a warning) instead of failing.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import AdapterConfigError

FORMAT_VERSION = 1
#: the largest size of any number in a config (a scale, a rank, a factor): larger ones overflow
MAX_CONFIG_NUMBER = 1e6

Targets = list[str] | str | None


@dataclass
class MethodConfig:
    """Fields every method shares. `targets` picks the sites (see `targets.py`)."""

    method: ClassVar[str] = ""
    targets: Targets = None
    #: regexes of module names to leave out even when `targets` matches them
    exclude: list[str] = field(default_factory=list)
    #: base modules (exact names, e.g. "bert.pooler") of which the adapter trains its own copy
    modules_to_save: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = {"method": self.method, **dataclasses.asdict(self)}
        for key in ("targets", "input_targets"):  # module classes are written by name, which matches too
            value = data.get(key)
            if isinstance(value, list | tuple):
                data[key] = [t.__name__ if isinstance(t, type) else t for t in value]
            elif isinstance(value, type):
                data[key] = value.__name__
        return data

    def validate(self) -> None:
        """Raise AdapterConfigError for values that cannot work."""


@dataclass
class Bottleneck(MethodConfig):
    """Bottleneck adapter: h + s·up(act(down(h))) (serial) or f(x) + s·up(act(down(x))) (parallel).

    `placement`: "pfeiffer" (after the FFN output), "houlsby" (after attention output and FFN
    output), "parallel" (beside the FFN output module, reading its input) or "custom" (use `targets`).
    Give either `reduction` (features / bottleneck) or `bottleneck_size`.

    `renorm` (serial, LayerNorm sites only): the delta joins the sum the norm reads and the frozen
    norm runs again, h' = LN(x + s·up(act(down(h)))) with h = LN(x). On a post-norm block
    (x = sublayer output + residual) this is AdapterHub's `original_ln_before` placement
    (Pfeiffer et al. 2020): the adapter reads the normalised output, its residual is the sum.
    In a Stack, a later renorm adapter at the same site reads the earlier one's output as h.

    `input_arg` (None: act on the output, as above): the adapter acts on the module's positional
    argument number k before the module runs, u' = u + s·up(act(down(u))). Argument 0 has the
    module's input width; a later one is taken to be a residual input of its output width. On a
    BERT-style block LN(dropout(dense(x)) + r), `input_arg=1` gives LN(d + r + s·up(act(down(r)))):
    AdapterHub's parallel adapter (par_bn), whose residual r is the input of no inner module.
    """

    method: ClassVar[str] = "bottleneck"
    placement: str = "pfeiffer"
    reduction: float | None = 16
    bottleneck_size: int | None = None
    activation: str = "relu"
    dropout: float = 0.0
    scaling: float = 1.0
    parallel: bool | None = None  # derived from placement when None
    renorm: bool = False
    input_arg: int | None = None

    @property
    def is_parallel(self) -> bool:
        return self.parallel if self.parallel is not None else self.placement == "parallel"

    def validate(self) -> None:
        if self.placement not in ("pfeiffer", "houlsby", "parallel", "custom"):
            raise AdapterConfigError(
                f"Bottleneck placement {self.placement!r} is unknown; use pfeiffer, houlsby, parallel or custom"
            )
        if self.bottleneck_size is None and (self.reduction is None or self.reduction <= 0):
            raise AdapterConfigError("Bottleneck needs reduction > 0 or bottleneck_size >= 1")
        if self.bottleneck_size is not None and self.bottleneck_size < 1:
            raise AdapterConfigError("Bottleneck bottleneck_size must be >= 1")
        if not 0 <= self.dropout < 1:
            raise AdapterConfigError("Bottleneck dropout must be in [0, 1)")
        if not isinstance(self.renorm, bool):
            raise AdapterConfigError(f"Bottleneck renorm must be true or false, not {self.renorm!r}")
        if self.renorm and self.is_parallel:
            raise AdapterConfigError("Bottleneck renorm is a serial placement; it cannot be combined with parallel")
        if self.input_arg is not None:
            if isinstance(self.input_arg, bool) or not isinstance(self.input_arg, int) or self.input_arg < 0:
                raise AdapterConfigError(f"Bottleneck input_arg must be null or an argument index >= 0, "
                                         f"not {self.input_arg!r}")
            if self.renorm or self.is_parallel:
                raise AdapterConfigError("Bottleneck input_arg (acting on an input) cannot be combined with "
                                         "renorm or parallel, which act on the output")

    def size_for(self, features: int) -> int:
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        if self.reduction is None:  # validate() refuses this config
            raise AdapterConfigError("Bottleneck needs reduction > 0 or bottleneck_size >= 1")
        return max(1, int(features // self.reduction))


@dataclass
class LoRA(MethodConfig):
    """LoRA: f(x) + s·B(A(x)) with s = alpha / r (or alpha / sqrt(r) with `rslora`)."""

    method: ClassVar[str] = "lora"
    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (self.r**0.5 if self.rslora else self.r)

    def validate(self) -> None:
        if self.r < 1:
            raise AdapterConfigError("LoRA r must be >= 1")
        if not 0 <= self.dropout < 1:
            raise AdapterConfigError("LoRA dropout must be in [0, 1)")


@dataclass
class DoRA(LoRA):
    """DoRA: LoRA's direction with a learned magnitude per output feature,
    W' = m ⊙ (W + s·BA) / ‖W + s·BA‖_c (Liu et al. 2024); Linear and GPT-2 Conv1D sites."""

    method: ClassVar[str] = "dora"


@dataclass
class IA3(MethodConfig):
    """IA³: l ⊙ f(x) (on="output") or f(l ⊙ x) (on="input"); l starts at ones.

    With the default targets, keys and values are scaled on their output and the FFN's
    down-projection on its input, as in Liu et al. 2022.
    """

    method: ClassVar[str] = "ia3"
    #: module-name patterns whose *input* is scaled (the rest of `targets` scale their output)
    input_targets: Targets = None


@dataclass
class BitFit(MethodConfig):
    """BitFit as a per-adapter bias delta: f(x) + Δb, Δb starts at zero."""

    method: ClassVar[str] = "bitfit"


@dataclass
class LiteResidual(MethodConfig):
    """TinyTL's lite residual (Cai et al. 2020): a branch beside a conv block that reads its input
    downsampled, f(x) + up(W₂·relu(G(pool(x)))), so training keeps a small copy of x, not x.

    `targets` are conv blocks (or convolutions); the branch's last 1×1 conv starts at zero.
    """

    method: ClassVar[str] = "lite_residual"
    downsample: int = 2  # average-pool factor on every spatial dim
    group_width: int = 8  # channels per group of the 3×3 (or 3-tap) group convolution
    expansion: float = 0.5  # hidden channels = expansion × input channels (at least one group)

    def validate(self) -> None:
        if not isinstance(self.downsample, int) or self.downsample < 1:
            raise AdapterConfigError("LiteResidual downsample must be an integer >= 1")
        if self.group_width < 1 or self.expansion <= 0:
            raise AdapterConfigError("LiteResidual needs group_width >= 1 and expansion > 0")


@dataclass
class PromptTuning(MethodConfig):
    """Prompt tuning: k learned vectors prepended to the input embeddings (transformers models)."""

    method: ClassVar[str] = "prompt"
    num_virtual_tokens: int = 20
    #: initialise the prompt from the embeddings of this text (repeated), else random vocab rows
    init_text: str | None = None

    def validate(self) -> None:
        if self.num_virtual_tokens < 1:
            raise AdapterConfigError("PromptTuning num_virtual_tokens must be >= 1")


@dataclass
class PrefixTuning(MethodConfig):
    """Prefix tuning: k learned key/value vectors per attention layer (through the model's cache).

    The prefix is produced by a small MLP during training (`projection`), as in Li & Liang 2021.
    """

    method: ClassVar[str] = "prefix"
    num_virtual_tokens: int = 20
    projection: bool = True
    projection_hidden: int = 128

    def validate(self) -> None:
        if self.num_virtual_tokens < 1:
            raise AdapterConfigError("PrefixTuning num_virtual_tokens must be >= 1")


def parse_config(cls: type[MethodConfig], data: dict[str, Any]) -> MethodConfig:
    """A `cls` config from the fields of `adapter.json` (without "method"), each type- and range-checked;
    unknown keys from newer versions are dropped with a warning. `methods.config_from_dict` finds `cls`."""
    data = dict(data)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        warnings.warn(
            f"{cls.__name__} config: ignoring unknown keys {unknown} (written by a newer adapterkit?)",
            stacklevel=2,
        )
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key in fields and not _has_type(value, str(fields[key])):
            raise AdapterConfigError(f"{cls.__name__} field {key!r} must be {fields[key]}, not {value!r}")
        if isinstance(value, float) and not math.isfinite(value):  # JSON readers take NaN and Infinity
            raise AdapterConfigError(f"{cls.__name__} field {key!r} must be a finite number, not {value!r}")
        if isinstance(value, int | float) and not isinstance(value, bool) and abs(value) > MAX_CONFIG_NUMBER:
            raise AdapterConfigError(f"{cls.__name__} field {key!r} is {value!r}; numbers in a config are "
                                     f"at most {MAX_CONFIG_NUMBER:g} in size")
    return cls(**{k: v for k, v in data.items() if k in known})


_JSON_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,),
                                            "None": (type(None),)}


def _has_type(value: Any, annotation: str) -> bool:
    """Whether a value read from JSON fits a field's annotation (as this module writes them)."""
    annotation = {"Targets": "list[str] | str | None"}.get(annotation, annotation)
    for part in (p.strip() for p in annotation.split("|")):
        if part.startswith("list[") and part.endswith("]"):
            if isinstance(value, list) and all(_has_type(v, part[5:-1]) for v in value):
                return True
        elif part in _JSON_TYPES:
            if isinstance(value, bool) and part in ("int", "float"):
                continue  # JSON true is not a number
            if isinstance(value, _JSON_TYPES[part]):
                return True
        else:
            return True  # a type this check does not know: validate() has the last word
    return False
