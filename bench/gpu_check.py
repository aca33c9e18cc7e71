"""The GPU path, checked on a CUDA device: QLoRA training, routing, serving.

    python bench/gpu_check.py            # on a machine with a CUDA device (about 2 minutes)

1. 50 LoRA steps on a Llama-like decoder held in nf4 with bf16 compute (adapters fp32), on a generated
   question/answer task: the loss falls, nothing is non-finite; step time and CUDA peak memory.
2. A routed forward of 16 LoRA adapters (one per row) on that nf4 base against each row run alone.
3. Serving on the GPU (`Engine(device="cuda", dtype="bf16", quantize="nf4")`): MiniLM classification
   with two trained-from-the-probe adapters, labels against the same adapters served on the CPU in
   fp32; and generation with the trained QLoRA adapter, greedy tokens against the same on the CPU.
Writes bench/results/gpu_check.json. Without a CUDA device it says so and writes nothing.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

RESULTS = Path(__file__).parent / "results" / "gpu_check.json"


def qlora(work: Path, device, report: dict):
    import torch
    from precision import qa_rows, tiny_llama

    import adapterkit as ak
    from adapterkit.train.data import causal_lm_collator, load_causal_lm, make_loader
    from adapterkit.train.job import load_base

    tiny_llama(work / "llama")
    (work / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa_rows(800)))
    model, tokenizer = load_base(str(work / "llama"), "causal-lm",
                                 precision=ak.Precision(dtype="bf16", quantize="nf4", device=str(device)))
    am = ak.adapt(model)
    am.add("qa", ak.LoRA(r=16, targets="all-linear"))
    am.activate("qa")
    params = am.train_adapter("qa")
    data = load_causal_lm(str(work / "qa.jsonl"), tokenizer, 32)
    loader = make_loader(data, causal_lm_collator(tokenizer), 16, shuffle=True, seed=0)
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    losses, seconds = [], []
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    while len(losses) < 50:
        for batch in loader:
            started = time.perf_counter()
            loss = am(**{k: v.to(device) for k, v in batch.items()}).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if cuda:
                torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - started)
            losses.append(float(loss))
            if len(losses) == 50:
                break
    am.eval()
    am.adapter("qa").meta.update({"task": "causal-lm", "base_path": str(work / "llama"),
                                  "precision": {"dtype": "bf16", "quantization": {"scheme": "nf4"}}})
    am.save("qa", str(work / "qa"))
    tokenizer.save_pretrained(work / "tokenizer")
    report["qlora"] = {"steps": 50, "first_loss": losses[0], "last_loss": sum(losses[-5:]) / 5,
                       "finite": all(x == x and abs(x) < 1e9 for x in losses),
                       "median_step_seconds": sorted(seconds)[25], "cuda_peak_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
                       "param_dtypes": sorted({str(p.dtype) for p in params})}
    return am, tokenizer


def routed(am, tokenizer, device, report: dict) -> None:
    import torch

    import adapterkit as ak

    torch.manual_seed(0)
    names = [f"r{i}" for i in range(16)]
    for name in names:
        am.add(name, ak.LoRA(r=8, targets="all-linear"))
        for p in am.adapter_parameters(name):
            torch.nn.init.normal_(p, std=0.02)
    ids = torch.randint(2, tokenizer.vocab_size, (16, 12), device=device)
    with torch.no_grad():
        with am.route(names):
            together = am(ids).logits.float()
        worst = 0.0
        for i, name in enumerate(names):
            am.activate(name)
            alone = am(ids[i : i + 1]).logits.float()
            worst = max(worst, float((together[i : i + 1] - alone).abs().max()))
    report["routing"] = {"adapters": 16, "max_abs_difference_routed_vs_alone": worst,
                         "logit_scale": float(together.abs().max())}


def serving(work: Path, device, report: dict) -> None:
    import torch

    import adapterkit as ak
    from adapterkit.serve.engine import Engine
    from adapterkit.train.data import (
        classification_collator,
        load_text_classification,
    )
    from adapterkit.train.job import default_base, load_base
    from adapterkit.train.probe import probe_head

    model, tokenizer = load_base(default_base(), "classify", 3)
    data = load_text_classification(None, seed=0).subsample(600, 200, 0, 100)
    tokenized = data.tokenize(tokenizer, 48)
    builder = ak.adapt(model)
    for i in range(2):
        torch.manual_seed(i)
        builder.add(f"c{i}", ak.LoRA(r=4), labels=data.labels)
        probe_head(builder, f"c{i}", tokenized.train, tokenized.validation, classification_collator(tokenizer))
        builder.save(f"c{i}", str(work / f"c{i}"))
    texts = list(data.test["text"])[:64]
    answers = {}
    for where, options in (("cpu", {}), ("gpu", {"device": str(device), "dtype": "bf16", "quantize": "nf4"})):
        with Engine(default_base(), work / f"store-{where}", **options) as engine:
            for i in range(2):
                engine.store.add("default", f"c{i}", work / f"c{i}")
            answers[where] = [a["label"] for i in range(2)
                              for a in engine.classify(texts, adapter=f"c{i}")["results"]]
    agree = sum(a == b for a, b in zip(answers["cpu"], answers["gpu"], strict=True)) / len(answers["cpu"])
    tokens = {}
    for where, options in (("cpu", {"dtype": "bf16", "quantize": "nf4"}), ("gpu", {"device": str(device), "dtype": "bf16",
                                                                                     "quantize": "nf4"})):
        with Engine(str(work / "llama"), work / f"gstore-{where}", **options) as engine:
            engine.store.add("default", "qa", work / "qa")
            tokens[where] = engine.generate("question : what sat on the mat ? answer :", adapter="qa",
                                            max_new_tokens=8, ignore_eos=True)["token_ids"]
    report["serving"] = {"classify_label_agreement_gpu_nf4_vs_cpu_fp32": agree, "classify_rows": len(answers["cpu"]),
                         "generation_tokens_gpu": tokens["gpu"], "generation_tokens_cpu": tokens["cpu"],
                         "generation_same": tokens["gpu"] == tokens["cpu"]}


def main() -> None:
    import argparse

    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (the check); cpu runs the same steps as a dry run of "
                                                         "this script and writes nothing")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: bench/gpu_check.py checks the GPU path and needs one; nothing written")
        return
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
    report: dict = {"device": name, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        am, tokenizer = qlora(work, device, report)
        routed(am, tokenizer, device, report)
        serving(work, device, report)
    if device.type != "cuda":
        print(json.dumps(report, indent=2))
        return
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
