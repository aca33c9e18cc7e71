"""train/step.py: the one step every loop shares, against a plain PyTorch loop written out."""

import copy

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

import adapterkit as ak
from adapterkit.train.step import TrainStep, kept_modes, modes


def _data(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=gen) * 5, torch.randint(0, 3, (8,), generator=gen)) for _ in range(6)]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def test_step_equals_a_plain_loop_with_clip_extra_term_and_after_hook():
    data = _data()
    mu, shift = 0.3, 1e-3
    reference, ours = _model(), _model()
    anchor = [p.detach().clone() for p in reference.parameters()]

    opt = torch.optim.AdamW(reference.parameters(), lr=0.05)
    for x, y in data:  # FedProx term, clip at 0.5, SCAFFOLD-like shift of the parameters after the step
        loss = F.cross_entropy(reference(x), y)
        loss = loss + mu / 2 * sum((p - a).pow(2).sum() for p, a in zip(reference.parameters(), anchor, strict=True))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(reference.parameters()), 0.5)
        opt.step()
        with torch.no_grad():
            for p in reference.parameters():
                p.add_(shift)

    params = list(ours.parameters())
    seen_norms: list[float] = []

    def proximal() -> torch.Tensor:
        return mu / 2 * sum(((p - a).pow(2).sum() for p, a in zip(params, anchor, strict=True)), torch.zeros(()))

    @torch.no_grad()
    def shifted() -> None:
        for p in params:
            p.add_(shift)

    step = TrainStep(params, torch.optim.AdamW(params, lr=0.05), max_grad_norm=0.5, extra=[proximal],
                     after=[shifted],
                     before_step=[lambda: seen_norms.append(float(torch.cat([p.grad.flatten() for p in params]).norm()))])
    for x, y in data:
        step(lambda x=x, y=y: F.cross_entropy(ours(x), y))
    for a, b in zip(reference.parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert len(seen_norms) == len(data) and max(seen_norms) <= 0.5 + 1e-5  # hooks see clipped gradients
    assert all(p.grad is None for p in params)  # gradients are released after each step


def test_step_with_accelerate_accumulation_equals_one_big_batch():
    data = _data(1)
    big, accumulated = _model(), _model()
    opt = torch.optim.SGD(big.parameters(), lr=0.1)
    for i in range(0, len(data), 2):
        x = torch.cat([data[i][0], data[i + 1][0]])
        y = torch.cat([data[i][1], data[i + 1][1]])
        opt.zero_grad()
        F.cross_entropy(big(x), y).backward()
        torch.nn.utils.clip_grad_norm_(list(big.parameters()), 1.0)
        opt.step()

    accelerator = Accelerator(gradient_accumulation_steps=2, cpu=True)
    model, optimizer = accelerator.prepare(accumulated, torch.optim.SGD(accumulated.parameters(), lr=0.1))
    applied: list[int] = []
    step = TrainStep(list(model.parameters()), optimizer, accelerator=accelerator, after=[lambda: applied.append(1)])
    for x, y in data:
        with accelerator.accumulate(model):
            step(lambda x=x, y=y: F.cross_entropy(model(x), y))
    assert len(applied) == len(data) // 2  # hooks run once per applied step, not per micro-batch
    for a, b in zip(big.parameters(), accumulated.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bad_clip_norm_is_refused():
    params = list(_model().parameters())
    with pytest.raises(ValueError, match="max_grad_norm"):
        TrainStep(params, torch.optim.SGD(params, lr=0.1), max_grad_norm=0.0)


def test_kept_modes_restores_a_mixed_mode_model():
    base = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.BatchNorm1d(4), nn.Linear(4, 2))
    am = ak.adapt(copy.deepcopy(base))
    am.add("a", ak.Bottleneck(reduction=2, dropout=0.5, targets=["0"]))
    am.train_adapter("a")
    before = {m: m.training for m in am.modules()}
    assert any(before.values()) and not all(before.values())
    with kept_modes(am):
        am.train()
    assert modes(am) == before


def _saved_tensors(checkpointing: bool) -> int:
    """How many tensors one training forward keeps for backward."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from adapterkit.hf_names import checkpointed_layers, enable_activation_checkpointing

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    if checkpointing:
        assert enable_activation_checkpointing(model)
    am = ak.adapt(model)
    am.add("l", ak.LoRA(r=2, targets=["c_attn"]))
    am.train_adapter("l")
    assert not any(m.training for m in model.modules() if isinstance(m, nn.Dropout))  # dropout off
    assert all(m.training for m in checkpointed_layers(model))
    count = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        count[0] += 1
        return t

    ids = torch.randint(0, 64, (2, 8))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return count[0]


def test_activation_checkpointing_stays_on_with_the_base_in_eval_mode():
    # the blocks' activations are recomputed in backward, not kept (57 -> 12 on transformers 5)
    assert _saved_tensors(True) < _saved_tensors(False) / 2
