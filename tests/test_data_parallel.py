"""Data-parallel training on two CPU processes (torchrun, with Accelerate told to use the CPU: gloo):
both processes end with the same adapter, and only the adapter's gradients travel between them.

(`accelerate launch --cpu --num_processes 2` starts one process unless an MPI hostfile is given, on
accelerate 1.16: its CPU launcher is mpirun; torchrun is what starts gloo processes here.)"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

SCRIPT = '''
import json, sys
import torch
from datasets import Dataset
from safetensors.torch import save_file
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from transformers import LlamaConfig, LlamaForCausalLM

import adapterkit as ak
from adapterkit.train.trainer import Trainer, TrainSettings

out = sys.argv[1]
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
if len(sys.argv) > 2:
    ak.quantize_base(model, sys.argv[2])
am = ak.adapt(model)
am.add("a", ak.LoRA(r=4, targets="all-linear"))
am.activate("a")
am.train_adapter("a")
generator = torch.Generator().manual_seed(1)
rows = [torch.randint(0, 64, (12,), generator=generator).tolist() for _ in range(32)]
data = Dataset.from_dict({"input_ids": rows})
collate = lambda batch: {"input_ids": torch.tensor([r["input_ids"] for r in batch]),
                         "labels": torch.tensor([r["input_ids"] for r in batch])}
trainer = Trainer(am, data, None, collate, TrainSettings(epochs=2, batch_size=4, lr=1e-2, progress=False),
                  task="causal-lm")
sent = {"bytes": 0, "calls": 0}

def counting(state, bucket):
    sent["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
    sent["calls"] += 1
    return allreduce_hook(None, bucket)

trainer.model.register_comm_hook(None, counting)
before = {k: v.clone() for k, v in am.adapter_state_dict("a").items()}
trainer.fit(resume=False)
rank = trainer.accelerator.process_index
tensors = {k: v.contiguous() for k, v in am.adapter_state_dict("a").items()}
save_file(tensors, f"{out}/rank{rank}.safetensors")
trainable = sum(p.numel() * p.element_size() for p in am.adapter_parameters("a"))
moved = any(not torch.equal(before[k], tensors[k]) for k in tensors)
json.dump({"bytes": sent["bytes"], "calls": sent["calls"], "steps": trainer.step, "trainable_bytes": trainable,
           "processes": trainer.accelerator.num_processes, "moved": moved}, open(f"{out}/rank{rank}.json", "w"))
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), *args]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_two_processes_end_with_one_adapter_and_send_only_its_gradients(tmp_path, quantize):
    script = tmp_path / "train_two.py"
    script.write_text(SCRIPT)
    result = launch([str(script), str(tmp_path), *([quantize] if quantize else [])], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    facts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    tensors = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    assert all(f["processes"] == 2 and f["moved"] for f in facts)
    assert tensors[0].keys() == tensors[1].keys()
    for key in tensors[0]:
        assert (tensors[0][key] == tensors[1][key]).all(), key
    for f in facts:
        # 32 rows, batch 4, two processes: 4 steps an epoch each; every step all-reduces the adapter's
        # gradients once, and nothing else (the frozen base is never sent, not even at the start)
        assert f["steps"] == 8
        assert f["bytes"] == f["steps"] * f["trainable_bytes"]


@pytest.mark.slow
def test_the_command_line_trains_data_parallel_and_writes_one_run(tmp_path):
    from tests.test_precision_cli import tiny_llama

    base = tiny_llama(tmp_path / "llama")
    rows = [{"prompt": "question : what sat on the mat ? answer :", "completion": "the cat sat on the mat ."},
            {"prompt": "question : what ran on the log ? answer :", "completion": "the dog ran on the log ."}] * 12
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    result = launch(["--module", "adapterkit.cli", "train", "--base", str(base), "--data", str(data), "--task",
                     "causal-lm", "--method", "lora", "--targets", "all-linear", "--epochs", "2", "--batch-size", "4",
                     "--out", str(tmp_path / "run"), "--no-progress"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["processes"] == 2
    assert (tmp_path / "run" / "adapter" / "adapter.safetensors").exists()
    assert result.stdout.count("run folder:") == 1  # the main process reports, once
