"""A sentence-transformers base is read through its own pooling, the same way everywhere."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from adapterkit.errors import AdapterConfigError
from adapterkit.pooling import Pooling, pooling_of, sentence_pooling, use_pooling


def _plain(hidden, mask, mode):
    """One row at a time, real tokens only: what each pooling means."""
    rows = []
    for h, m in zip(hidden, mask, strict=True):
        real = h[m.bool()]
        rows.append({"mean": real.mean(0), "cls": h[0], "max": real.max(0).values, "lasttoken": real[-1]}[mode])
    return torch.stack(rows)


@pytest.mark.parametrize("mode", ["mean", "cls", "max", "lasttoken"])
@pytest.mark.parametrize("normalize", [False, True])
def test_each_pooling_reads_real_tokens_only(mode, normalize):
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    expected = _plain(hidden, mask, mode)
    if normalize:
        expected = F.normalize(expected, dim=-1)
    torch.testing.assert_close(Pooling(mode, normalize)(hidden, mask), expected)
    if mode == "lasttoken":  # left padding too (a decoder's batches)
        left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
        torch.testing.assert_close(Pooling(mode, normalize)(hidden, left)[:, :],
                                   (F.normalize if normalize else (lambda x, dim: x))(hidden[:, -1], dim=-1))


def test_the_folder_says_how_to_pool(minilm_path, tmp_path):
    assert sentence_pooling(minilm_path) == Pooling("mean", normalize=True)
    assert sentence_pooling(tmp_path) is None  # a plain encoder folder
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert sentence_pooling(tmp_path) == Pooling("cls", normalize=False)
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_sqrt_len_tokens": True}))
    with pytest.raises(AdapterConfigError, match="not one of mean, cls, max, lasttoken"):
        sentence_pooling(tmp_path)
    with pytest.raises(AdapterConfigError, match="unknown pooling 'median'"):
        Pooling("median")


def test_minilm_classifier_reads_the_normalised_mean_of_real_tokens(minilm_path):
    from adapterkit.train.job import load_base

    model, tokenizer = load_base(minilm_path, "classify", 3)
    model.eval()
    assert pooling_of(model) == Pooling("mean", normalize=True)
    assert not any("pooler" in name for name, _ in model.named_parameters())  # no untrained layer read
    seen = []
    model.classifier.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    texts = ["I love this", "this is by far the worst day of my whole life, honestly"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        padded = model(**batch).logits
        hidden = model.bert(**batch).last_hidden_state
        alone = model(**tokenizer(texts[:1], return_tensors="pt")).logits
    mask = batch["attention_mask"].unsqueeze(-1).float()
    torch.testing.assert_close(seen[0], F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    torch.testing.assert_close(padded[0], alone[0], atol=1e-5, rtol=1e-4)  # padding changes nothing


def test_a_head_that_reads_the_first_token_gets_the_pooled_vector():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=40, num_labels=3)
    model = use_pooling(RobertaForSequenceClassification(config).eval(), Pooling("max"))
    seen = []
    model.classifier.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    ids = torch.tensor([[0, 5, 6, 7, 2], [0, 8, 2, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        hidden = model.roberta(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(seen[0][:, 0], _plain(hidden, mask, "max"))
    with pytest.raises(AdapterConfigError, match="already reads"):
        use_pooling(model, Pooling("mean"))


def test_a_decoder_classifier_keeps_its_last_token_and_gets_a_pad_id(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    from adapterkit.train.job import load_base

    from .serving import tiny_gpt2

    tiny_gpt2(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    tokenizer.pad_token = None  # like GPT-2's own tokenizer: no pad token
    tokenizer.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    config.pad_token_id = None
    config.save_pretrained(tmp_path)
    model, tokenizer = load_base(str(tmp_path), "classify", 2)
    model.eval()
    assert pooling_of(model) is None
    assert model.config.pad_token_id == tokenizer.pad_token_id == tokenizer.eos_token_id
    batch = tokenizer(["the cat sat", "the cat sat on the mat"], padding=True, return_tensors="pt")
    with torch.no_grad():
        both = model(**batch).logits
        alone = model(**tokenizer(["the cat sat"], return_tensors="pt")).logits
    torch.testing.assert_close(both[0], alone[0], atol=1e-5, rtol=1e-4)
    with pytest.raises(AdapterConfigError, match="for encoders"):
        use_pooling(model, Pooling("mean"))


def test_an_adapter_trained_through_berts_pooler_is_read_that_way_again(make_minilm, minilm_path,
                                                                         minilm_tokenizer, tmp_path):
    import adapterkit as ak
    from adapterkit.train.saved import open_adapter

    from .serving import make_adapter

    am = ak.adapt(make_minilm())  # transformers' own reading: the CLS pooler
    make_adapter(am, "old", tmp_path / "old", labels=("neg", "neu", "pos"), scale=0.2)
    am.load(tmp_path / "old", name="old")
    am.activate("old")
    opened, _, _, _ = open_adapter(tmp_path / "old", base=minilm_path)
    assert pooling_of(opened.base) is None
    batch = minilm_tokenizer(["so happy today", "meh"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(opened(**batch).logits, am(**batch).logits, atol=1e-5, rtol=1e-4)
