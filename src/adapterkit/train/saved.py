"""Working with saved adapters: open on their base, evaluate, predict, describe, merge, export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterFileError, PrecisionError
from ..io.files import MANIFEST, read_adapter
from ..model import AdaptedModel, adapt
from ..pooling import pooling_of, write_pooling
from ..precision import dequantize_, dtype_name, is_quantized, quantization_of
from ..quantize import Precision
from .data import (
    DataError,
    check_text_cells,
    classification_collator,
    load_table,
    load_text_classification,
    pick_columns,
    pick_text_column,
    tokenize_classification,
)
from .job import load_base
from .metrics import accuracy, macro_f1


def resolve(path: str | Path) -> Path:
    """An adapter folder or file; a run folder stands for its adapter/ subfolder."""
    path = Path(path)
    if path.is_dir() and not (path / MANIFEST).exists() and (path / "adapter").is_dir():
        return path / "adapter"
    if not path.exists():
        raise AdapterFileError(f"{path}: no such adapter folder or file")
    return path


def as_trained(path: str | Path, dtype: str | None = None, quantize: str | None = None,
               device: str = "cpu") -> Precision:
    """The precision to open an adapter in: what is given, else what it was trained in (its metadata),
    else fp32. `quantize="none"` opens it unquantized whatever it was trained on."""
    manifest, _ = read_adapter(resolve(path))
    trained = (manifest.get("meta") or {}).get("precision") or {}
    scheme = quantize if quantize is not None else (trained.get("quantization") or {}).get("scheme")
    return Precision(dtype=dtype or trained.get("dtype") or "fp32",
                     quantize=None if scheme in (None, "none") else scheme, device=device)


def open_adapter(path: str | Path, base: str | None = None,
                 precision: Precision | None = None) -> tuple[AdaptedModel, Any, str, dict]:
    """(model with the adapter active, tokenizer, adapter name, manifest); the base in `precision`
    (default: as the adapter was trained, `as_trained`)."""
    path = resolve(path)
    manifest, _ = read_adapter(path)
    meta = manifest.get("meta") or {}
    base = base or meta.get("base_path") or manifest["base"]["name"]
    task = meta.get("task", "classify")
    labels = manifest.get("labels")
    precision = precision or as_trained(path)
    model, tokenizer = load_base(base, task, len(labels) if labels else None, precision=precision)
    am = adapt(model)
    if pooling_of(model) is not None and manifest["base"].get("fingerprint") != am.fingerprint():
        # trained when adapterkit read this base through BERT's pooler: read it that way again
        model, tokenizer = load_base(base, task, len(labels) if labels else None, pooled=False, precision=precision)
        am = adapt(model)
    run_tokenizer = path.parent / "tokenizer"
    if run_tokenizer.is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(run_tokenizer)
    name = am.load(str(path))
    if not isinstance(name, str):
        raise AdapterFileError(f"{path}: a fusion file, not one adapter")
    am.activate(name)
    am.eval()
    return am, tokenizer, name, manifest


@torch.no_grad()
def predict_texts(path: str | Path, texts: list[str], base: str | None = None,
                  batch_size: int = 64, precision: Precision | None = None) -> list[tuple[str, str, dict]]:
    """(text, label, {label: probability}) for each text, in order."""
    am, tokenizer, name, manifest = open_adapter(path, base, precision)
    labels = manifest.get("labels")
    if not labels:
        raise AdapterFileError(f"adapter {name!r} has no label names; predict needs a classification adapter")
    max_length = (manifest.get("meta") or {}).get("max_length", 128)
    answers: list[tuple[str, str, dict]] = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start: start + batch_size]
        batch = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        probs = am(**batch.to(am.device)).logits.float().softmax(-1).cpu()
        answers += [(t, labels[int(p.argmax())], {lab: float(v) for lab, v in zip(labels, p, strict=True)})
                    for t, p in zip(chunk, probs, strict=True)]
    return answers


def texts_from_file(path: str | Path, data: str, text_col: str | None = None) -> list[str]:
    """The texts of a CSV/JSONL/Parquet file, from `text_col`, else the column the adapter was trained
    on, else the first of a few common names; a cell that is not text is an error naming its row."""
    manifest, _ = read_adapter(resolve(path))
    meta = manifest.get("meta") or {}
    table = load_table(data, text_col)
    column = pick_text_column(table, text_col, data, meta.get("text_col"))
    texts = table[column]
    check_text_cells(texts, column, data, table)
    for row, text in enumerate(texts):
        if text is None or not text.strip():  # a prediction per row: a blank row is not skipped silently
            raise DataError(f"{data}: column {column!r}, row {row + 1} is empty; remove it or give it a text")
    return list(texts)


@torch.no_grad()
def evaluate_adapter(path: str | Path, data: str | None, text_col: str | None, label_col: str | None,
                     base: str | None, max_length: int, batch_size: int, max_eval: int | None,
                     seed: int, precision: Precision | None = None) -> dict[str, Any]:
    am, tokenizer, name, manifest = open_adapter(path, base, precision)
    labels = manifest.get("labels")
    if not labels:
        raise AdapterFileError(f"adapter {name!r} has no label names; eval needs a classification adapter")
    if data is None:
        ds = load_text_classification(None, seed=seed, max_test_examples=max_eval).test
        names = load_text_classification(None, seed=seed).labels
    else:
        table = load_table(data, text_col, label_col)
        meta = manifest.get("meta") or {}
        text, label = pick_columns(table, text_col, label_col, str(data), (meta.get("text_col"), meta.get("label_col")))
        check_text_cells(table[text], text, str(data), table)
        # rows without a text or a label are skipped, as training skipped them
        table = table.filter(lambda row: isinstance(row[text], str) and bool(row[text].strip())
                             and row[label] is not None)
        if len(table) == 0:
            raise DataError(f"{data}: no rows with both a non-empty {text!r} and a {label!r}")
        names = [str(v) for v in table[label]]
        unknown = sorted(set(names) - set(labels))
        if unknown:
            raise AdapterFileError(f"{data}: labels {unknown[:5]} in column {label!r} are not among the adapter's "
                                   f"labels {labels}")
        ds = table.map(lambda row: {"text": row[text], "label": labels.index(str(row[label]))},
                       remove_columns=table.column_names)
        if max_eval:
            ds = ds.select(range(min(max_eval, len(ds))))
        names = labels
    if names != labels:
        raise AdapterFileError(f"the data's labels {names} differ from the adapter's {labels}")
    ds = tokenize_classification(ds, tokenizer, max_length)
    collate = classification_collator(tokenizer)
    truths, preds = [], []
    for start in range(0, len(ds), batch_size):
        batch = collate([ds[i] for i in range(start, min(start + batch_size, len(ds)))])
        truths += batch.pop("labels").tolist()
        preds += am(**{k: v.to(am.device) for k, v in batch.items()}).logits.argmax(-1).tolist()
    return {"adapter": name, "examples": len(truths), "accuracy": accuracy(truths, preds),
            "macro_f1": macro_f1(truths, preds, labels=range(len(labels)))}


def adapter_facts(path: str | Path) -> dict[str, Any]:
    path = resolve(path)
    manifest, tensors = read_adapter(path)
    files = [path] if path.is_file() else list(path.iterdir())
    return {
        "name": manifest.get("name"), "method": manifest["config"].get("method"),
        "config": {k: v for k, v in manifest["config"].items() if k != "method"},
        "params": sum(t.numel() for t in tensors.values()),
        "base": manifest["base"].get("name"), "fingerprint": manifest["base"].get("fingerprint"),
        "labels": manifest.get("labels"), "sites": len(manifest.get("sites") or {}),
        "trained_on": _precision_text((manifest.get("meta") or {}).get("precision")),
        "bytes": sum(f.stat().st_size for f in files), "format_version": manifest.get("format_version"),
    }


#: what a merge's check runs the adapter on, before and after
MERGE_PROBE = ["The service was quick and the staff were friendly.", "I would not buy this again.",
               "Stocks fell sharply after the central bank raised rates.", "ok"]


def _precision_text(precision: dict | None) -> str:
    """How the base was held when the adapter trained, e.g. 'bf16 base, nf4 Linear layers (14)'."""
    if not precision:
        return "fp32 base (not recorded)"
    quantization = precision.get("quantization")
    text = f"{precision.get('dtype', 'fp32')} base"
    if quantization:
        text += f", {quantization['scheme']} Linear layers ({quantization['modules']})"
    return text


def merge_to_folder(path: str | Path, out: str | Path, base: str | None = None, precision: Precision | None = None,
                    quantized: str = "dequantize") -> tuple[Path, dict[str, Any]]:
    """Fold the adapter into the base weights; the adapter's head replaces the base head. The folder
    and a report of how far the merged model's outputs are from the unmerged adapter's.

    The base opens as the adapter was trained (`as_trained`), quantized too. On a quantized base
    `quantized` says how: "dequantize" merges into the weights the quantized layers computed with
    and writes them in `precision.dtype` (the outputs stay the adapter's); "requantize" writes the
    same folder for a server that quantizes again (quantization.json) and reports the rounding
    that quantizing the merged weights adds."""
    if quantized not in ("dequantize", "requantize"):
        raise PrecisionError(f"quantized={quantized!r}: 'dequantize' or 'requantize'")
    am, tokenizer, name, manifest = open_adapter(path, base, precision)
    from transformers import PreTrainedModel

    probe = {k: v.to(am.device) for k, v in tokenizer(MERGE_PROBE, padding=True, return_tensors="pt").items()}
    quantization = quantization_of(am.base)
    with torch.no_grad():
        unmerged = _scores(am(**probe))
        am.merge(name, quantized=quantized if quantization else None)
        merged = _scores(am(**probe))
    model = am.base
    requantized = quantized == "requantize" and quantization is not None
    for module in model.modules():  # written in full precision: what the quantized layers compute with
        if is_quantized(module):
            dequantize_(module)
    report = {"adapter": name, "base_quantization": quantization, "how": quantized if quantization else "plain",
              "written_dtype": dtype_name(next(p for p in model.parameters() if p.is_floating_point()).dtype),
              "max_abs_score_difference": float((merged - unmerged).abs().max()),
              "argmax_agreement": float((merged.argmax(-1) == unmerged.argmax(-1)).float().mean()),
              "probe_texts": len(MERGE_PROBE)}
    if not isinstance(model, PreTrainedModel):  # load_base always makes one
        raise AdapterFileError(f"{path}: its base is a {type(model).__name__}, not a transformers model to save")
    # the adapter's own copies and head replace the base modules
    record = am.adapter(name)
    replacements = {m: record.copy_of(m) for m in record.copied_paths}
    if record.head is not None and am.head_path:
        replacements[am.head_path] = record.head
    for module_path, module in replacements.items():
        parent, _, attr = module_path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, module)
    if record.head is not None and am.head_path:
        labels = manifest.get("labels")
        if labels:
            model.config.num_labels = len(labels)
            model.config.id2label = dict(enumerate(labels))
            model.config.label2id = {lab: i for i, lab in enumerate(labels)}
    pooling = pooling_of(model)
    for module in model.modules():  # adapterkit's hooks must not travel with a standalone model
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_pooling(model, out)
    if requantized and quantization is not None:
        (out / "quantization.json").write_text(json.dumps({"scheme": quantization["scheme"]}))
    (out / "merge_report.json").write_text(json.dumps(report, indent=2))
    (out / "README.md").write_text(_merged_readme(name, manifest, pooling is not None))
    return out, report


def _scores(output: Any) -> torch.Tensor:
    """The logits of a classifier, or a causal LM's logits of its last position, in float32."""
    logits = output.logits.float()
    return logits[:, -1] if logits.dim() == 3 else logits


def _merged_readme(name: str, manifest: dict, pooled: bool) -> str:
    loader = ("from adapterkit.pooling import load_pooled_classifier\n"
              "model = load_pooled_classifier(folder)  # reads the sentence pooling in pooling.json\n"
              if pooled else
              "from transformers import AutoModelForSequenceClassification\n"
              "model = AutoModelForSequenceClassification.from_pretrained(folder)\n")
    why = ("\nThe base is a sentence-transformers model: its head reads the pooled sentence embedding "
           "(pooling.json), which a plain `AutoModelForSequenceClassification` would not do (it would "
           "read an untrained CLS pooler and warn that its weights are newly initialised).\n" if pooled else "")
    return (f"# {name}, merged\n\nThe adapter `{name}` folded into `{manifest['base']['name']}`.\n{why}\n"
            f"```python\nfrom transformers import AutoTokenizer\n{loader}"
            "tokenizer = AutoTokenizer.from_pretrained(folder)\n```\n")


def export_adapter(path: str | Path, out: str | Path, fmt: str, base: str | None = None) -> Path:
    if fmt != "peft":
        raise AdapterFileError(f"unknown export format {fmt!r}; supported: peft")
    from ..io.peft import export_peft_lora

    am, _, name, manifest = open_adapter(path, base)
    export_peft_lora(am, name, out)
    # PEFT loads the adapter onto transformers' classifier; pooling.json tells how training read it
    # (`adapterkit.pooling.pool_as_trained(model, folder)` after PeftModel.from_pretrained)
    if write_pooling(am.base, out) is not None:
        (Path(out) / "README.md").write_text(
            f"# {name}, as a PEFT adapter\n\nTrained on `{manifest['base']['name']}` read through its sentence "
            "pooling (pooling.json), not BERT's CLS pooler. Load it so:\n\n```python\n"
            "from peft import PeftModel\nfrom transformers import AutoModelForSequenceClassification\n"
            "from adapterkit.pooling import pool_as_trained\n\n"
            f"base = AutoModelForSequenceClassification.from_pretrained(base_folder, num_labels={len(manifest.get('labels') or [])})\n"
            "model = PeftModel.from_pretrained(base, folder)\n"
            "pool_as_trained(model.base_model.model, folder)\n```\n")
    return Path(out)
