"""llama.cpp as a contender for bench/serve_generate.py (bench-only; nothing in adapterkit imports it).

Set up as a user would, from llama-cpp-python's source distribution, which carries llama.cpp with its
own converters and vocabularies:

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" pip install ./llama_cpp_python-0.3.36
    pip install gguf sentencepiece      # what the converters and transformers' GGUF tokenizer reader need
    python bench/serve_generate.py --vs-llamacpp llama_cpp_python-0.3.36/vendor/llama.cpp

The model goes through `convert_hf_to_gguf.py`, each PEFT LoRA folder through `convert_lora_to_gguf.py`,
both in f32 (the weights' own precision on our side). llama.cpp keeps an f32 key/value cache.
Both sides are fed the same token ids (no tokenizer on the way), decode greedily, and never stop early.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def converter_folder(model: Path, out: Path) -> Path:
    """`model` as the converter can read it. A Llama BPE tokenizer (byte fallback) converts as it is; a
    word-level one (the tiny test vocabulary) has no GGUF tokenizer type, so the converter is given the
    same words, with the same ids, as a Llama BPE vocabulary without merges: llama.cpp gets token ids
    here, never text, and only needs the vocabulary's size and special ids."""
    spec = json.loads((model / "tokenizer.json").read_text())
    if spec["model"]["type"] == "BPE" and spec["model"].get("byte_fallback"):
        return model
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        if (model / name).exists():
            shutil.copy(model / name, out / name)
    core = Tokenizer(models.BPE(vocab=spec["model"]["vocab"], merges=[], byte_fallback=True, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)])
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]",
                            bos_token="[EOS]").save_pretrained(out)
    return out


def llama_vocabulary(source: Path) -> Any:
    """The Llama SentencePiece vocabulary (32,000 tokens) shipped with llama.cpp, as a transformers
    tokenizer (read by transformers' own GGUF reader)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source / "models", gguf_file="ggml-vocab-llama-spm.gguf")


def _convert(source: Path, script: str, *args: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(source / script), *args], cwd=source, env=env,
                          capture_output=True, text=True, timeout=1800)
    if done.returncode:
        raise RuntimeError(f"{script} failed:\n{done.stderr[-4000:]}")


def convert_model(source: Path, model: Path, out: Path, outtype: str = "f32") -> Path:
    _convert(source, "convert_hf_to_gguf.py", str(converter_folder(model, out.with_suffix(".hf"))),
             "--outfile", str(out), "--outtype", outtype)
    return out


def convert_lora(source: Path, peft_folder: Path, model: Path, out: Path) -> Path:
    _convert(source, "convert_lora_to_gguf.py", str(peft_folder), "--base", str(model),
             "--outfile", str(out), "--outtype", "f32")
    return out


class LlamaCpp:
    """One llama.cpp context (n_threads threads, f32 key/value cache) and LoRA adapters loaded once;
    `generate` runs one request with one adapter (or none) set on the context, as llama.cpp's server
    does when consecutive requests name different adapters: it cannot batch them."""

    def __init__(self, gguf: Path, threads: int, context: int = 512) -> None:
        import llama_cpp

        self._api = llama_cpp
        self.llm = llama_cpp.Llama(str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=context,
                                   n_batch=context, type_k=llama_cpp.GGML_TYPE_F32,
                                   type_v=llama_cpp.GGML_TYPE_F32, verbose=False)
        self._adapters: dict[str, Any] = {}
        self._active: str | None = None

    def add_lora(self, name: str, gguf: Path) -> None:
        adapter = self._api.llama_adapter_lora_init(self.llm.model, str(gguf).encode())
        if not adapter:
            raise RuntimeError(f"llama.cpp could not load the LoRA {gguf}")
        self._adapters[name] = adapter

    def _use(self, name: str | None) -> None:
        if name == self._active:
            return
        api = self._api
        if name is None:
            status = api.llama_set_adapters_lora(self.llm.ctx, None, 0, None)
        else:
            adapters = (api.llama_adapter_lora_p_ctypes * 1)(self._adapters[name])
            status = api.llama_set_adapters_lora(self.llm.ctx, adapters, 1, (ctypes.c_float * 1)(1.0))
        if status:
            raise RuntimeError(f"llama.cpp could not set the adapter {name!r} (status {status})")
        self._active = name

    def generate(self, prompt: list[int], new_tokens: int, adapter: str | None = None,
                 on_first: Callable[[], None] | None = None) -> list[int]:
        self._use(adapter)
        self.llm.reset()  # no prefix reuse: a cached prefix was computed under another adapter
        out: list[int] = []
        for token in self.llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            if not out and on_first is not None:
                on_first()
            out.append(int(token))
            if len(out) == new_tokens:
                break
        return out

    def close(self) -> None:
        for adapter in self._adapters.values():
            self._api.llama_adapter_lora_free(adapter)
        self._adapters.clear()
        self.llm.close()


class Contender:
    """A LlamaCpp in a process of its own. In ours, llama.cpp's and PyTorch's thread pools (both
    OpenMP) slow each other down: our tiny-model stream ran at half its speed once llama.cpp had run
    beside it, and llama.cpp's at a fifth. `generate` returns the tokens and when the first one came
    (time.perf_counter: one monotonic clock for both processes)."""

    def __init__(self, gguf: Path, threads: int) -> None:
        import multiprocessing

        from adapterkit import openmp

        context = multiprocessing.get_context("spawn")
        self._conn, theirs = context.Pipe()
        # llama.cpp runs with the OpenMP settings its user has: not those `import adapterkit` set here
        unset = list(openmp.SETTINGS) if openmp.applied else []
        self._process = context.Process(target=_contend, args=(theirs, str(gguf), threads, unset), daemon=True)
        self._process.start()
        self._ask("ready")

    @property
    def pid(self) -> int:
        return int(self._process.pid or 0)

    def _ask(self, *message: Any) -> Any:
        self._conn.send(message)
        if not self._conn.poll(1800):
            raise RuntimeError("llama.cpp's process did not answer within 30 minutes")
        status, value = self._conn.recv()
        if status != "ok":
            raise RuntimeError(f"llama.cpp's process failed: {value}")
        return value

    def add_lora(self, name: str, gguf: Path) -> None:
        self._ask("add_lora", name, str(gguf))

    def generate(self, prompt: list[int], new_tokens: int, adapter: str | None = None) -> tuple[list[int], float]:
        return self._ask("generate", prompt, new_tokens, adapter)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._ask("close")
        self._process.join(30)
        if self._process.is_alive():
            self._process.kill()


def _contend(conn: Any, gguf: str, threads: int, unset: list[str]) -> None:
    for name in unset:  # before llama_cpp loads its OpenMP runtime, which reads them then
        os.environ.pop(name, None)
    contender = LlamaCpp(Path(gguf), threads)
    while True:
        kind, *args = conn.recv()
        try:
            if kind == "ready":
                value: Any = None
            elif kind == "add_lora":
                value = contender.add_lora(args[0], Path(args[1]))
            elif kind == "generate":
                first: list[float] = []
                tokens = contender.generate(*args, on_first=lambda first=first: first.append(time.perf_counter()))
                value = (tokens, first[0])
            else:
                contender.close()
                conn.send(("ok", None))
                return
        except Exception as err:  # noqa: BLE001 - reported to the bench, which stops
            conn.send(("error", repr(err)))
            continue
        conn.send(("ok", value))


class OtherLoad:
    """How many cores other processes kept busy while a case ran: the machine's busy time (/proc/stat)
    minus the CPU time of this process and of `pids` (the contender's), over the wall time."""

    def __init__(self, pids: tuple[int, ...] = ()) -> None:
        self.pids = pids

    def __enter__(self) -> OtherLoad:
        self._start = (_busy_seconds(), self._own(), time.perf_counter())
        self.cores = 0.0
        return self

    def _own(self) -> float:
        return _own_seconds() + sum(_process_seconds(pid) for pid in self.pids)

    def __exit__(self, *exc: object) -> None:
        busy, own, wall = _busy_seconds(), self._own(), time.perf_counter()
        elapsed = max(wall - self._start[2], 1e-9)
        self.cores = max(0.0, ((busy - self._start[0]) - (own - self._start[1])) / elapsed)


def _busy_seconds() -> float:
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal (guest counted in user)
    return busy / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _process_seconds(pid: int) -> float:
    """utime + stime of another process (all its threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
