"""ExecuTorch's experimental training export on an adapter: does forward+backward run on its runtime,
do a few SGD steps there lower the loss, and do the gradients match PyTorch's?

    python bench/edge_training_export.py

Prints the answers (the README says what was found); a DS-CNN with a lite residual at each block.
"""

from __future__ import annotations

import json

import torch
from executorch.exir import EdgeCompileConfig, to_edge
from executorch.extension.training import _load_for_executorch_for_training_from_buffer, get_sgd_optimizer
from torch import nn
from torch.export import export
from torch.export.experimental import _export_forward_backward

import adapterkit as ak
from adapterkit.edge.backbones import ds_cnn


class WithLoss(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self.model(x), y)


def main() -> None:
    torch.manual_seed(0)
    base = ds_cnn(12, channels=16, blocks=2).eval()
    for m in base.modules():  # statistics that are not the identity, so a wrong BatchNorm backward shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    am = ak.adapt(base)
    am.add("a", ak.LiteResidual(targets=r"re:blocks\.\d+$"), num_labels=13)
    for p in am.adapter("a").parameters():
        nn.init.normal_(p, std=0.1)
    am.train_adapter("a")
    am.eval()
    x, y = torch.randn(4, 1, 49, 10), torch.randint(0, 13, (4,))
    wrapped = WithLoss(am).eval()
    loss = wrapped(x, y)
    loss.backward()
    reference = {f"model.{n}": p.grad.clone() for n, p in am.named_parameters() if p.requires_grad}
    program = to_edge(_export_forward_backward(export(wrapped, (x, y), strict=True)),
                      compile_config=EdgeCompileConfig(_check_ir_validity=False)).to_executorch()
    module = _load_for_executorch_for_training_from_buffer(program.buffer)
    out = module.forward_backward("forward", (x, y))
    grads = {k: g.clone() for k, g in module.named_gradients().items()}
    diffs = {k: float((g - reference[k]).abs().max()) for k, g in grads.items()}
    optimizer = get_sgd_optimizer(module.named_parameters(), 0.1, 0, 0, 0, False)
    losses = []
    for _ in range(5):
        losses.append(float(module.forward_backward("forward", (x, y))[0]))
        optimizer.step(module.named_gradients())
    print(json.dumps({"loss_executorch": float(out[0]), "loss_pytorch": float(loss),
                      "gradients": len(grads), "of": len(reference), "max_grad_diff_per_parameter": diffs,
                      "largest_gradient": max(float(g.abs().max()) for g in reference.values()),
                      "sgd_losses_on_runtime": losses}, indent=1))


if __name__ == "__main__":
    main()
