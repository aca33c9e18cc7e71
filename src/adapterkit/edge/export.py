"""Edge export: one base program, one blob per adapter.

The program takes the input and an adapter's tensors as inputs (its weights are not baked in), so
one exported base serves every adapter of that layout: a device keeps the program and loads the
blob of the task it is in. Formats:

- `onnx`: `torch.onnx.export`, run with onnxruntime;
- `pte`: ExecuTorch (`torch.export` → `to_edge_transform_and_lower` → `.pte`), run with its runtime.

Tasks with different class counts share the program too: each head's output layer is padded with
zero rows to the largest count among the exported adapters, and `EdgeProgram.run` returns the
task's own columns (so a camera's defect task and its digit task load into one MobileNetV2 program).

`merged=True` (LoRA, IA³, BitFit) writes instead one self-contained program per adapter with the
adapter folded into the weights. Each blob is a safetensors file whose metadata carries the base
fingerprint and the layout, and `EdgeProgram.run` refuses a blob made for another base, and an
input whose shape is not the one exported.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.func import functional_call

from ..errors import AdapterError
from ..model import AdaptedModel
from .lean import unlean

FORMATS = ("onnx", "pte")
MANIFEST = "edge.json"


class ExportError(AdapterError):
    """A model or layer that cannot be exported, or a blob or input that does not fit the program."""


def head_output(am: AdaptedModel, name: str) -> tuple[str, int] | None:
    """(record prefix, classes) of the adapter head's output layer, or None when it has no head."""
    head = am.adapter(name).head
    linears = [] if head is None else [(n, m) for n, m in head.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        return None
    path, last = linears[-1]
    return ("head." + path + "." if path else "head."), last.out_features


def _rows(am: AdaptedModel, name: str, classes: int | None = None) -> list[tuple[str, torch.Tensor]]:
    """The adapter's tensors in record order; with `classes`, its output layer padded to that many rows."""
    record = am.adapter(name)
    rows = [(k, t.detach()) for k, t in [*record.named_parameters(), *record.named_buffers()]]
    output = head_output(am, name)
    if classes is None or output is None or output[1] == classes:
        return rows
    prefix, own = output
    pad = {prefix + "weight", prefix + "bias"}
    return [(k, torch.cat([t, t.new_zeros((classes - own, *t.shape[1:]))]) if k in pad else t) for k, t in rows]


def layout_of(am: AdaptedModel, name: str, classes: int | None = None) -> list[list]:
    """The adapter's tensors as the program reads them: (name, shape, dtype), in order."""
    return [[k, list(t.shape), str(t.dtype).removeprefix("torch.")] for k, t in _rows(am, name, classes)]


def layout_key(layout: list[list]) -> str:
    return hashlib.sha256(json.dumps(layout).encode()).hexdigest()[:12]


class WithAdapterInputs(nn.Module):
    """am's forward with adapter `slot` active and its tensors replaced by the program's inputs."""

    def __init__(self, am: AdaptedModel, slot: str, keys: list[str]) -> None:
        super().__init__()
        self.am, self.slot, self.keys = am, slot, keys

    def forward(self, x: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        swapped = {f"loaded.{self.slot}.{k}": t for k, t in zip(self.keys, tensors, strict=True)}
        out = functional_call(self.am, swapped, (x,), strict=False)
        return out if isinstance(out, torch.Tensor) else out.logits


def _write_program(module: nn.Module, args: tuple, path: Path, fmt: str, input_names: list[str]) -> None:
    module.eval()
    if fmt == "onnx":
        torch.onnx.export(module, args, str(path), input_names=input_names, output_names=["logits"], dynamo=True,
                          external_data=False, verbose=False)
    else:
        try:
            from executorch.exir import to_edge_transform_and_lower
        except ImportError as exc:
            raise ExportError("format 'pte' needs ExecuTorch (pip install adapterkit[edge])") from exc
        program = to_edge_transform_and_lower(torch.export.export(module, args)).to_executorch()
        path.write_bytes(program.buffer)


def _culprit(am: AdaptedModel, x: torch.Tensor, fmt: str, error: Exception) -> ExportError:
    """Find the first leaf module that fails to export on its own, so the error can name it."""
    inputs: dict[str, tuple] = {}

    def keep(name: str) -> Callable[[nn.Module, tuple, object], None]:
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            inputs.setdefault(name, args)
        return hook

    hooks = [m.register_forward_hook(keep(n)) for n, m in am.named_modules() if not list(m.children())]
    with torch.no_grad():
        am(x)
    for h in hooks:
        h.remove()
    for name, args in inputs.items():
        module = am.get_submodule(name)
        try:
            torch.export.export(module, tuple(a for a in args if isinstance(a, torch.Tensor)))
        except Exception as exc:  # the exporter's own message says why
            reason = str(exc).strip().splitlines()[0][:300]
            return ExportError(f"cannot export module {name!r} ({type(module).__name__}) to {fmt}: {reason}")
    return ExportError(f"cannot export the model to {fmt}: {str(error).strip().splitlines()[0][:300]}")


def export(am: AdaptedModel, names: Sequence[str], out: str | Path, *, example: torch.Tensor,
           format: str = "onnx", merged: bool = False) -> dict[str, Any]:
    """Write programs and blobs for adapters `names` to folder `out`; returns the manifest."""
    if format not in FORMATS:
        raise ExportError(f"format {format!r}: use one of {list(FORMATS)}")
    if not names:
        raise ExportError("export needs at least one adapter name")
    for n in names:
        am.adapter(n)  # unknown names fail here, before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    example = example.contiguous()  # ExecuTorch keeps the example's memory order for the program's input
    unlean(am)
    suffix = ".onnx" if format == "onnx" else ".pte"
    manifest: dict[str, Any] = {"format": format, "base": am.base_name, "fingerprint": am.fingerprint(),
                                "input_shape": list(example.shape), "merged": merged, "programs": {}, "adapters": {}}
    previous = am.active
    am.eval()
    outputs = {n: head_output(am, n) for n in names}
    heads = [o for o in outputs.values() if o is not None]
    classes = None if merged or len(heads) < len(outputs) else max(o[1] for o in heads)
    try:
        for name in names:
            output = outputs[name]
            layout = layout_of(am, name, classes)
            key = f"merged-{name}" if merged else f"base-{layout_key(layout)}"
            program_path = out / f"{key}{suffix}"
            if key not in manifest["programs"]:
                am.activate(name)
                try:
                    if merged:
                        am.merge(name)
                        try:
                            _write_program(_PlainLogits(am), (example,), program_path, format, ["x"])
                        finally:
                            am.unmerge(name)
                    else:
                        keys = [k for k, *_ in layout]
                        tensors = tuple(t for _, t in _rows(am, name, classes))
                        _write_program(WithAdapterInputs(am, name, keys), (example, *tensors), program_path, format,
                                       ["x", *keys])
                except ExportError:
                    raise
                except Exception as exc:
                    raise _culprit(am, example, format, exc) from exc
                manifest["programs"][key] = {"file": program_path.name, "layout": None if merged else layout,
                                             "bytes": program_path.stat().st_size}
            blob = out / f"{name}.safetensors"
            if not merged:
                save_file({k: t.contiguous() for k, t in _rows(am, name, classes)}, str(blob),
                          metadata={"fingerprint": am.fingerprint(), "layout": json.dumps(layout), "adapter": name})
            manifest["adapters"][name] = {"program": key, "blob": None if merged else blob.name,
                                          "blob_bytes": None if merged else blob.stat().st_size,
                                          "classes": None if output is None else output[1]}
    finally:
        am.activate(previous)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


class _PlainLogits(nn.Module):
    def __init__(self, am: AdaptedModel) -> None:
        super().__init__()
        self.am = am

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.am(x)
        return out if isinstance(out, torch.Tensor) else out.logits


class EdgeProgram:
    """An exported folder, run as a device would: one program loaded, a blob per task switched in."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise ExportError(f"{self.folder}: no {MANIFEST}; export a model there first")
        self.manifest = json.loads(path.read_text())
        self._sessions: dict[str, Any] = {}

    def blob(self, path: str | Path) -> tuple[str, dict[str, np.ndarray]]:
        """A blob's tensors in its program's order, after checking it was made for this base."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        if meta.get("fingerprint") != self.manifest["fingerprint"]:
            raise ExportError(f"{path}: made for another base model (fingerprint {meta.get('fingerprint')!r}, "
                              f"this program's is {self.manifest['fingerprint']!r})")
        layout = json.loads(meta["layout"])
        key = f"base-{layout_key(layout)}"
        if key not in self.manifest["programs"]:
            raise ExportError(f"{path}: no program here reads this adapter's layout")
        tensors = load_file(str(path))
        return key, {k: tensors[k].numpy() for k, _, _ in layout}

    def run(self, x: torch.Tensor | np.ndarray, adapter: str) -> np.ndarray:
        """Logits of `x` with `adapter` (its blob, or its merged program)."""
        x = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
        expected = self.manifest["input_shape"]
        if list(x.shape) != expected:
            raise ExportError(f"input of shape {list(x.shape)}: this program was exported for shape {expected}")
        entry = self.manifest["adapters"].get(adapter)
        if entry is None:
            raise ExportError(f"adapter {adapter!r} was not exported here; exported: {sorted(self.manifest['adapters'])}")
        tensors: dict[str, np.ndarray]
        if entry["blob"] is None:
            key, tensors = entry["program"], {}
        else:
            key, tensors = self.blob(self.folder / entry["blob"])
        logits = self._execute(key, {"x": x.astype(np.float32), **tensors})
        return logits if entry.get("classes") is None else logits[..., : entry["classes"]]

    def _execute(self, key: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        program = self.folder / self.manifest["programs"][key]["file"]
        if self.manifest["format"] == "onnx":
            import onnxruntime as ort

            session = self._sessions.get(key) or ort.InferenceSession(str(program), providers=["CPUExecutionProvider"])
            self._sessions[key] = session
            return session.run(None, {i.name: inputs[i.name] for i in session.get_inputs()})[0]
        from executorch.runtime import Runtime

        method = self._sessions.get(key)
        if method is None:
            method = Runtime.get().load_program(str(program)).load_method("forward")
            self._sessions[key] = method
        return method.execute([torch.from_numpy(np.ascontiguousarray(a)) for a in inputs.values()])[0].numpy()
