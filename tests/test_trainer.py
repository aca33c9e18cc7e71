"""The training loop: determinism, resume after a kill, interruption, causal LM, the default job."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapterkit.train.job import JobSpec, MethodOptions, run_job
from adapterkit.train.trainer import TrainingInterrupted, TrainSettings

from .test_cli import invoke, tweets_slice
from .tiny import word_tokenizer


def small_spec(data: Path, out: Path, **train) -> JobSpec:
    settings = {"epochs": 2, "batch_size": 8, "checkpoint_every": 2, "progress": False, "seed": 3, **train}
    return JobSpec(data=str(data), text_col="tweet", label_col="mood", out=str(out), name="tiny",
                   method=MethodOptions(method="bottleneck", dropout=0.1), max_length=16,
                   max_train_examples=None, max_eval_examples=None, train=TrainSettings(**settings))


def adapter_tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter.safetensors"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tweets_slice(tmp_path_factory.mktemp("data") / "tweets.csv", rows=60)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "full"
    run_job(small_spec(data, out))
    return out


def test_same_seed_same_adapter(data, uninterrupted, tmp_path):
    run_job(small_spec(data, tmp_path / "again"))
    first, second = adapter_tensors(uninterrupted), adapter_tensors(tmp_path / "again")
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], atol=0, rtol=0)


def assert_same_training(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Equal to float32 rounding: another process may sum in another order (e.g. another thread count)."""
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def killed(data, tmp_path_factory) -> Path:
    """A run killed with SIGKILL in another process at step 5, after its step-4 checkpoint."""
    out = tmp_path_factory.mktemp("runs") / "killed"
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        import torch
        torch.set_num_threads({torch.get_num_threads()})  # this process's count: the same sums, bit for bit
        from tests.test_trainer import small_spec
        from adapterkit.train.job import run_job

        def kill_at(step):
            if step == 5:  # after the checkpoint of step 4, in the middle of an epoch
                os.kill(os.getpid(), signal.SIGKILL)

        run_job(small_spec(Path({str(data)!r}), Path({str(out)!r})), on_step=kill_at)
    """)
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root)}, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4 and not (out / "adapter").exists()
    return out


def resume_and_compare(data: Path, out: Path, uninterrupted: Path) -> None:
    """Resume a run killed after step 4: it must run steps 5.. once each and end where the
    uninterrupted run ended."""
    steps: list[int] = []
    run_job(small_spec(data, out), on_step=steps.append)
    total = json.loads((uninterrupted / "checkpoint" / "state.json").read_text())["step"]
    assert steps == list(range(5, total + 1)), steps
    assert_same_training(adapter_tensors(out), adapter_tensors(uninterrupted))


def test_killed_run_resumes_to_the_same_adapter(data, uninterrupted, killed, tmp_path):
    out = tmp_path / "killed"
    shutil.copytree(killed, out)
    resume_and_compare(data, out, uninterrupted)


def _restore_then(change):
    from adapterkit.train.trainer import Trainer

    restore = Trainer._restore

    def mutated(self):
        restore(self)
        change(self)

    return mutated


def _fresh_scheduler(trainer) -> None:
    from transformers import get_linear_schedule_with_warmup

    warmup = int(trainer.s.warmup_ratio * trainer.total_steps)
    trainer.scheduler = get_linear_schedule_with_warmup(trainer.optimizer, warmup, trainer.total_steps)


def _shift(trainer, steps: int) -> None:
    trainer.step += steps
    trainer.batch_in_epoch += steps


MUTATIONS = {
    "restarts from scratch": lambda trainer: None,
    "skips a step": _restore_then(lambda t: _shift(t, 1)),
    "repeats a step": _restore_then(lambda t: _shift(t, -1)),
    "drops the optimizer state": _restore_then(lambda t: t.optimizer.optimizer.state.clear()),
    "drops the scheduler state": _restore_then(_fresh_scheduler),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_resume_comparison_catches_a_broken_resume(data, uninterrupted, killed, tmp_path, monkeypatch, mutation):
    """The tolerance above is tight enough: each way a resume can go wrong fails it."""
    from adapterkit.train.trainer import Trainer

    out = tmp_path / "mutated"
    shutil.copytree(killed, out)
    monkeypatch.setattr(Trainer, "_restore", MUTATIONS[mutation])
    with pytest.raises(AssertionError):
        resume_and_compare(data, out, uninterrupted)


def test_ctrl_c_checkpoints_then_resumes(data, uninterrupted, tmp_path):
    out = tmp_path / "interrupted"

    def interrupt_at(step: int) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        run_job(small_spec(data, out), on_step=interrupt_at)
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 3
    run_job(small_spec(data, out))
    assert_same_training(adapter_tensors(out), adapter_tensors(uninterrupted))


def test_optimizer_holds_only_adapter_parameters(data, tmp_path):
    from adapterkit.train.trainer import Trainer

    spec = small_spec(data, tmp_path / "opt", epochs=1)
    metrics = run_job(spec)
    assert metrics["optimizer_state_bytes"] == 2 * 4 * metrics["trainable_params"]
    assert metrics["optimizer_state_bytes_saved"] == 2 * 4 * (metrics["base_params"] - metrics["trainable_params"])
    with pytest.raises(ValueError, match="nothing to train"):
        Trainer(torch.nn.Linear(2, 2).requires_grad_(False), [1], None, None, TrainSettings())


def tiny_causal_lm(folder: Path) -> Path:
    """A random GPT-2 and a word-level tokenizer, saved like a hub model (nothing is downloaded)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    fast = word_tokenizer("the cat dog sat ran on mat log a is what answer question : . yes no".split())
    vocab = fast.get_vocab()
    torch.manual_seed(0)
    # A wide initialiser lets the frozen, tied output layer express confident predictions.
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=len(vocab), n_positions=64,
                                       initializer_range=0.3,
                                       eos_token_id=1, bos_token_id=1))
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("method, lr", [("lora", "0.01"), ("prompt", "0.3")])
def test_causal_lm_training_lowers_loss(tmp_path, method, lr):
    base = tiny_causal_lm(tmp_path / "gpt2")
    rows = [{"prompt": "question : what sat on the mat ? answer :", "completion": "the cat sat on the mat ."},
            {"prompt": "question : what ran on the log ? answer :", "completion": "the dog ran on the log ."}] * 16
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    extra = ["--targets", "all-linear"] if method == "lora" else ["--virtual-tokens", "4"]
    result = invoke("train", "--base", str(base), "--data", str(data), "--task", "causal-lm", "--method", method,
                    "--epochs", "8", "--lr", lr, "--batch-size", "8", "--max-length", "32",
                    "--out", str(tmp_path / "run"), "--no-progress", *extra)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    losses = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["history"]["train_loss"]
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4
    assert metrics["test_perplexity"] is not None


@pytest.mark.slow
def test_default_train_end_to_end(tmp_path, monkeypatch):
    """`adapterkit train` with its defaults, on a smaller slice so CI stays fast."""
    monkeypatch.chdir(tmp_path)
    result = invoke("train", "--max-train", "1024", "--max-eval", "300", "--max-test", "300", "--epochs", "2",
                    "--no-progress")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "runs" / "tweets-sentiment" / "metrics.json").read_text())
    # The majority class is 42% of the tweets (macro-F1 0.20 when always predicted).
    assert metrics["test_accuracy"] > 0.50 and metrics["test_macro_f1"] > 0.40
    assert (tmp_path / "runs" / "tweets-sentiment" / "curves.png").stat().st_size > 1000


def test_ctrl_c_without_a_checkpoint_folder_stops_cleanly():
    from datasets import Dataset

    from adapterkit.train.trainer import Trainer

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    rows = Dataset.from_dict({"x": torch.randn(16, 4).tolist(), "labels": [0, 1] * 8})

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x):  # the Trainer reads .logits
            return type("Out", (), {"logits": self.inner(x)})()

    def collate(batch):
        return {"x": torch.tensor([r["x"] for r in batch]), "labels": torch.tensor([r["labels"] for r in batch])}

    trainer = Trainer(Logits(), rows, None, collate, TrainSettings(epochs=2, batch_size=4, progress=False),
                      on_step=lambda step: os.kill(os.getpid(), signal.SIGINT) if step == 2 else None)
    with pytest.raises(TrainingInterrupted, match="stopped at step 2; no checkpoint folder"):
        trainer.fit()
    # the loader left mid-epoch is no longer accelerate's active one (older releases kept it, and the
    # next Accelerator in the process then applied every micro-batch instead of accumulating)
    from accelerate.state import GradientState

    assert GradientState().active_dataloader is None
