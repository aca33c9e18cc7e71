"""adapterkit: adapter layers on any PyTorch model, many named adapters on one frozen base."""

from . import openmp  # noqa: F401 - first: sets OpenMP's wait policy before torch loads (openmp.py)

# isort: split
from .config import (
    IA3,
    BitFit,
    Bottleneck,
    DoRA,
    LiteResidual,
    LoRA,
    MethodConfig,
    PrefixTuning,
    PromptTuning,
)
from .errors import (
    AdapterConfigError,
    AdapterError,
    AdapterExistsError,
    AdapterFileError,
    AdapterNotFoundError,
    CompositionError,
    PrecisionError,
    TargetError,
)
from .model import AdaptedModel, adapt
from .pooling import Pooling, pool_as_trained
from .quantize import Precision, quantize_base
from .setups import Average, Fuse, Stack

__version__ = "0.1.0"

__all__ = [
    "IA3", "AdaptedModel", "AdapterConfigError", "AdapterError", "AdapterExistsError", "AdapterFileError",
    "AdapterNotFoundError", "Average", "BitFit", "Bottleneck", "CompositionError", "DoRA", "Fuse", "LiteResidual",
    "LoRA",
    "MethodConfig", "Pooling", "Precision", "PrecisionError", "PrefixTuning", "PromptTuning", "Stack", "TargetError",
    "adapt", "pool_as_trained", "quantize_base",
]
