"""Precision of the frozen base: its dtype, its device, and quantized Linear layers.

Quantization is applied to the frozen base before adapters attach (`model.quantize_base`): a
quantized Linear still returns a float output from a float input, so the site hooks and every
method work on it unchanged. What quantization changes elsewhere is said here once: what a
quantized module is (`scheme_of`), its weight in full precision (`dequantized_weight`), turning it
back into a float Linear and quantizing it again in place for a merge (`dequantize_`,
`requantize_`), the bytes the base holds (`weight_bytes`), and the full-precision shapes that the
base fingerprint hashes (`full_precision_shapes`).

    nf4:  bitsandbytes Linear4bit (4-bit NormalFloat, blocks of 64, double-quantized scales)
    int8: torchao Int8WeightOnlyConfig (one scale per output channel)
    int4: torchao IntxWeightOnlyConfig(int4, groups of 32) (on this torchao, CPU keeps one int4
          value per byte: its packed int4 layouts need CUDA kernels)
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .errors import PrecisionError

#: the names a command line and a file use for a dtype
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: quantization scheme -> the library that does it (its PyPI name, for the install hint)
SCHEMES: dict[str, str] = {"nf4": "bitsandbytes", "int8": "torchao", "int4": "torchao"}
#: set on a module this file quantized: its scheme (a module quantized by transformers is read from its type)
SCHEME_ATTR = "adapterkit_scheme"
INT4_GROUP = 32
NF4_BLOCK = 64


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """fp32 | bf16 | fp16 (or a torch dtype among them)."""
    if isinstance(value, torch.dtype):
        if value in DTYPES.values():
            return value
    elif value in DTYPES:
        return DTYPES[value]
    raise PrecisionError(f"dtype {value!r}: use one of {', '.join(DTYPES)}")


def dtype_name(dtype: torch.dtype) -> str:
    return next((name for name, d in DTYPES.items() if d == dtype), str(dtype).removeprefix("torch."))


def resolve_device(value: str | torch.device) -> torch.device:
    """cpu | cuda | cuda:N | auto (CUDA when there is one, else the CPU); a missing device is an error."""
    if str(value) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise PrecisionError(f"device {value!r}: use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PrecisionError(f"device {value!r}: this machine has no CUDA device (torch {torch.__version__}); "
                             "use --device cpu or auto")
    if device.type not in ("cpu", "cuda"):
        raise PrecisionError(f"device {value!r}: adapterkit runs on cpu or cuda")
    return device


def check_dtype(dtype: torch.dtype, device: torch.device) -> None:
    """Raise PrecisionError when `device` cannot compute in `dtype`."""
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(device)
        raise PrecisionError(f"{name} cannot compute in bf16 (it needs compute capability 8.0); use --dtype fp16 or fp32")


def check_scheme(scheme: str) -> None:
    """Raise PrecisionError for an unknown scheme or a missing library (with the install command)."""
    library = SCHEMES.get(scheme)
    if library is None:
        raise PrecisionError(f"quantization {scheme!r}: use one of {', '.join(SCHEMES)}")
    try:
        importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        raise PrecisionError(f"quantization {scheme!r} needs {library}, which is not installed: "
                             f"pip install 'adapterkit[quant]' (or pip install {library})") from None


def library_version(scheme: str) -> str:
    library = SCHEMES[scheme]
    return f"{library} {importlib.metadata.version(library)}"


def quantize_linears(model: nn.Module, scheme: str, skip: Callable[[str], bool]) -> list[str]:
    """Quantize every nn.Linear of `model` whose name `skip` does not exclude, in place; their names.

    The library and the scheme are checked before any module changes. Linear layers are quantized
    as they are (their dtype is the compute dtype of the quantized layer). nf4 leaves a Linear whose
    input width is not a multiple of its block (64) as it is: bitsandbytes' CPU kernel cannot take it.
    """
    check_scheme(scheme)
    names = [n for n, m in model.named_modules()
             if type(m) is nn.Linear and not skip(n) and not any(p.requires_grad for p in m.parameters())
             and (scheme != "nf4" or m.in_features % NF4_BLOCK == 0)]
    if not names:
        return names
    if scheme == "nf4":
        _nf4(model, names)
    else:
        _torchao(model, scheme, set(names))
    for name in names:
        setattr(model.get_submodule(name), SCHEME_ATTR, scheme)
    return names


def _nf4(model: nn.Module, names: list[str]) -> None:
    import bitsandbytes as bnb

    for name in names:
        linear: Any = model.get_submodule(name)  # an nn.Linear (quantize_linears picked it)
        weight = linear.weight
        quantized: Any = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      compute_dtype=weight.dtype, quant_type="nf4", device="meta")
        quantized.weight = bnb.nn.Params4bit(weight.data.detach().clone(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True, module=quantized)
        if linear.bias is not None:
            quantized.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        quantized = quantized.to(weight.device)  # moving a Params4bit is what quantizes it
        _no_cpu_repack(quantized)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, quantized)


def _no_cpu_repack(module: Any) -> None:
    # On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight for its inference kernel the first
    # time the layer runs without gradients, and keeps it so; that kernel has no backward, so an adapter
    # trained after any no-grad forward (an evaluation, a probe) would fail. Its generic path does both.
    module.support_avx512bf16_for_cpu = False


def _config(scheme: str) -> Any:
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    if scheme == "int8":
        return Int8WeightOnlyConfig()
    int4: torch.dtype = torch.int4  # type: ignore[attr-defined]  # (in torch, missing from its stubs)
    return IntxWeightOnlyConfig(weight_dtype=int4, granularity=PerGroup(INT4_GROUP))


def _torchao(model: nn.Module, scheme: str, names: set[str]) -> None:
    from torchao.quantization import quantize_

    quantize_(model, _config(scheme), filter_fn=lambda module, fqn: fqn in names)


def scheme_of(module: nn.Module) -> str | None:
    """nf4 | int8 | int4 | another library's name for it, when `module` is a quantized Linear; else None."""
    if not isinstance(module, nn.Linear):
        return None
    own = getattr(module, SCHEME_ATTR, None)
    if isinstance(own, str):
        return own
    quant_state = getattr(module.weight, "quant_state", None)
    if quant_state is not None:  # bitsandbytes 4-bit, e.g. loaded by transformers' BitsAndBytesConfig
        return str(getattr(quant_state, "quant_type", "4bit"))
    if module.weight.dtype in (torch.int8, torch.uint8) or _is_subclass(module.weight):
        return "quantized"
    return None


def _is_subclass(t: torch.Tensor) -> bool:
    """A tensor subclass that holds its data in inner tensors (torchao's quantized weights)."""
    return type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__")


def is_quantized(module: nn.Module) -> bool:
    return scheme_of(module) is not None


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The weight a quantized Linear computes with, as a float tensor [out, in]."""
    weight: Any = module.weight  # a library's tensor subclass: its own attributes, untyped here
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        import bitsandbytes.functional as bnbf

        data = weight.data
        if getattr(quant_state, "packing_format_for_cpu", False):
            # bitsandbytes repacks a CPU weight for its inference kernel on first use; undo that first
            data, quant_state = bnbf._convert_weight_packed_for_cpu_inverse(data, quant_state)
        return bnbf.dequantize_4bit(data, quant_state)
    if _is_subclass(weight):
        return weight.dequantize()
    return weight.detach()


@torch.no_grad()
def dequantize_(module: nn.Module, dtype: torch.dtype | None = None) -> None:
    """Turn a quantized Linear into a plain float nn.Linear in place.

    The module object stays the same (its forward hooks, and the adapter sites that hold it, stay
    valid): its weight becomes a float Parameter and a bitsandbytes layer's class goes back to
    nn.Linear, whose forward is then the plain one.
    """
    weight = dequantized_weight(module)
    dtype = dtype or _compute_dtype(module, weight)
    module.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if type(module) is not nn.Linear:
        module.__class__ = nn.Linear
    bias = module.bias
    if isinstance(bias, torch.Tensor) and bias.dtype != dtype:
        module.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
    if hasattr(module, SCHEME_ATTR):
        delattr(module, SCHEME_ATTR)


def _compute_dtype(module: nn.Module, weight: torch.Tensor) -> torch.dtype:
    compute = getattr(module, "compute_dtype", None)
    if isinstance(compute, torch.dtype):
        return compute
    bias = module.bias
    return bias.dtype if isinstance(bias, torch.Tensor) else weight.dtype


@torch.no_grad()
def requantize_(module: nn.Module, scheme: str) -> None:
    """Quantize a float nn.Linear in place with `scheme` (the module object stays the same)."""
    check_scheme(scheme)
    if type(module) is not nn.Linear:
        raise PrecisionError(f"requantize needs a float nn.Linear, not a {type(module).__name__}")
    if scheme == "nf4":
        import bitsandbytes as bnb

        layer: Any = module  # becomes a Linear4bit below, whose attributes are set by hand
        dtype, device = layer.weight.dtype, layer.weight.device
        weight: Any = bnb.nn.Params4bit(layer.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                        compress_statistics=True, module=layer)
        layer.__class__ = bnb.nn.Linear4bit
        # what Linear4bit.__init__ sets, given here because the module is not built anew
        layer.compute_dtype, layer.compute_type_is_set = dtype, True
        layer.quant_state, layer.quant_storage = None, torch.uint8
        _no_cpu_repack(layer)
        layer.weight = weight.to(device)  # moving a Params4bit is what quantizes it
    else:
        from torchao.quantization import quantize_

        holder = nn.Sequential(module)  # quantize_ walks a model; the Linear itself is changed in place
        quantize_(holder, _config(scheme))
    setattr(module, SCHEME_ATTR, scheme)


def quantized_modules(model: nn.Module) -> dict[str, str]:
    """Module name -> scheme of every quantized Linear."""
    return {name: s for name, m in model.named_modules() if (s := scheme_of(m)) is not None}


def quantization_of(model: nn.Module) -> dict[str, Any] | None:
    """What an adapter's metadata records about a quantized base: scheme, modules, library; None if
    no Linear is quantized."""
    found = quantized_modules(model)
    if not found:
        return None
    schemes = sorted(set(found.values()))
    scheme = schemes[0] if len(schemes) == 1 else "+".join(schemes)
    library = library_version(scheme) if scheme in SCHEMES else None
    return {"scheme": scheme, "modules": len(found), "library": library}


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's state holds: quantized data, scales and everything else, as stored."""
    total = 0
    for tensor in model.state_dict().values():
        total += _tensor_bytes(tensor)
    return total


def _tensor_bytes(t: Any) -> int:
    if _is_subclass(t):
        inner, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, name)) for name in inner)
    return t.numel() * t.element_size()


def full_precision_shapes(model: nn.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    """State-dict name -> (shape, dtype) as the base held it in full precision: quantized weights by
    their logical [out, in] shape, every floating tensor as float32, bitsandbytes' scale tensors left
    out. This is what the base fingerprint hashes, so that an fp32, bf16 or 4-bit copy of one base
    shares one identity (and an fp32 base keeps the fingerprint it always had)."""
    entries: dict[str, tuple[tuple[int, ...], str]] = {}
    packed: dict[str, tuple[int, ...]] = {}
    for name, module in model.named_modules():
        quant_state = getattr(getattr(module, "weight", None), "quant_state", None)
        if isinstance(module, nn.Linear) and quant_state is not None:
            packed[f"{name}.weight" if name else "weight"] = (module.out_features, module.in_features)
    for key, tensor in model.state_dict().items():
        owner = next((w for w in packed if key.startswith(w + ".")), None)
        if owner is not None:
            continue  # absmax, quant_map, ...: the 4-bit weight's own scales
        if key in packed:
            entries[key] = (packed[key], str(torch.float32))
            continue
        floating = tensor.dtype.is_floating_point
        entries[key] = (tuple(tensor.shape), str(torch.float32 if floating else tensor.dtype))
    return entries
