"""The OpenAI-compatible API, driven by the official `openai` client against a running server."""

from __future__ import annotations

import json
import time

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

import httpx  # noqa: E402

import adapterkit as ak  # noqa: E402
from adapterkit.serve import Engine, create_app  # noqa: E402
from adapterkit.serve.generate import GenerationRow, generate_batch  # noqa: E402

from .serving import gpt2_builder, make_adapter, running_server, tiny_llama  # noqa: E402

KEYS = {"key-alice-0001": {"tenant": "alice"}, "key-bob-000001": {"tenant": "bob"},
        "key-admin-0001": {"admin": True}}
LORA = ak.LoRA(r=4, targets=["q_proj", "v_proj", "up_proj"])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("openai")
    base = tiny_llama(root / "tiny-llama", positions=96)
    builder = gpt2_builder(base)
    folders = {name: make_adapter(builder, name, root / name, config=LORA, labels=None, seed=i, scale=1.0)
               for i, name in enumerate(["g0", "g1", "b0"])}
    engine = Engine(base, root / "store", max_new_tokens=48, max_wait_ms=5)
    engine.store.add("alice", "g0", folders["g0"])
    engine.store.add("alice", "g1", folders["g1"])
    engine.store.add("bob", "b0", folders["b0"])
    reference = gpt2_builder(base)
    for name, folder in folders.items():
        reference.load(folder, name=name)
    reference.eval()
    with running_server(create_app(engine, KEYS)) as (host, port):
        yield {"engine": engine, "reference": reference, "url": f"http://{host}:{port}"}
    engine.close()


def client(server, key: str = "key-alice-0001"):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=key, max_retries=0, timeout=60)


def alone(server, ids: list[int], name: str | None, n: int) -> str:
    """Greedy tokens of the prompt run alone through a plain AdaptedModel, decoded."""
    engine = server["engine"]
    out = generate_batch(server["reference"], [GenerationRow(ids, n)], [name], engine.pad_id, engine.eos_id)[0]
    return engine.decode(out.tokens), out


def chat_ids(server, messages: list[dict]) -> list[int]:
    tokenizer = server["engine"].tokenizer
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_models_lists_the_base_and_the_keys_own_adapters(server):
    ids = [m.id for m in client(server).models.list().data]
    assert ids == ["tiny-llama", "g0", "g1"]
    assert {m.id for m in client(server, "key-admin-0001").models.list().data} >= {"alice/g0", "bob/b0"}


@pytest.mark.parametrize("model", ["g0", "g1", "tiny-llama"])
def test_completion_equals_the_prompt_alone(server, model):
    ids = server["engine"].tokenize(["the cat sat on the"])[0]
    out = client(server).completions.create(model=model, prompt="the cat sat on the", max_tokens=10, temperature=0)
    want, generated = alone(server, ids, None if model == "tiny-llama" else model, 10)
    assert out.choices[0].text == want and out.model == model and out.object == "text_completion"
    assert out.choices[0].finish_reason == ("stop" if generated.finish_reason == "stop" else "length")
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == len(generated.tokens)
    assert out.usage.total_tokens == len(ids) + len(generated.tokens)


def test_adapters_change_the_answer(server):
    answers = {client(server).completions.create(model=m, prompt="hello world we", max_tokens=12, temperature=0,
                                                 extra_body={"ignore_eos": True}).choices[0].text
               for m in ("g0", "g1", "tiny-llama")}
    assert len(answers) > 1


def test_chat_uses_the_chat_template(server):
    messages = [{"role": "system", "content": "we like tea"}, {"role": "user", "content": "hello world"}]
    out = client(server).chat.completions.create(model="g1", messages=messages, max_tokens=8, temperature=0)
    want, generated = alone(server, chat_ids(server, messages), "g1", 8)
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == want
    assert out.object == "chat.completion" and out.usage.prompt_tokens == len(chat_ids(server, messages))
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}]}]
    again = client(server).chat.completions.create(model="g1", messages=parts, max_tokens=8, temperature=0)
    assert again.choices[0].message.content == alone(server, chat_ids(server, messages[1:]), "g1", 8)[0]


def test_streams_are_the_same_text_in_openai_chunks(server):
    c = client(server)
    plain = c.completions.create(model="g0", prompt="red blue", max_tokens=12, temperature=0,
                                 extra_body={"ignore_eos": True})
    chunks = list(c.completions.create(model="g0", prompt="red blue", max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == plain.choices[0].text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices
    messages = [{"role": "user", "content": "the dog ran"}]
    chat = c.chat.completions.create(model="g1", messages=messages, max_tokens=8, temperature=0)
    pieces = list(c.chat.completions.create(model="g1", messages=messages, max_tokens=8, temperature=0, stream=True))
    assert pieces[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in pieces) == chat.choices[0].message.content
    assert pieces[-1].choices[0].finish_reason == chat.choices[0].finish_reason


def test_stop_strings_cut_the_text_and_end_the_row(server):
    c = client(server)
    full = c.completions.create(model="g0", prompt="the cat", max_tokens=12, temperature=0,
                                extra_body={"ignore_eos": True}).choices[0].text
    words = full.split()
    if len(words) < 3:
        pytest.skip("the random model said too little")
    stop = " " + words[2]
    cut = full[: full.find(stop)]
    out = c.completions.create(model="g0", prompt="the cat", max_tokens=12, temperature=0, stop=[stop],
                               extra_body={"ignore_eos": True})
    assert out.choices[0].text == cut and out.choices[0].finish_reason == "stop"
    streamed = c.completions.create(model="g0", prompt="the cat", max_tokens=12, temperature=0, stop=stop,
                                    stream=True, extra_body={"ignore_eos": True})
    assert "".join(ch.choices[0].text for ch in streamed) == cut


def test_n_choices_are_seeded_samples(server):
    c = client(server)
    a = c.completions.create(model="g1", prompt="we like", max_tokens=10, temperature=1.5, n=3, seed=11)
    b = c.completions.create(model="g1", prompt="we like", max_tokens=10, temperature=1.5, n=3, seed=11)
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]
    assert len({ch.text for ch in a.choices}) > 1


def test_bad_requests_get_openai_errors_and_the_server_stays_up(server):
    c = client(server)
    with pytest.raises(openai.NotFoundError) as err:
        c.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert err.value.code == "model_not_found" and err.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):  # another tenant's adapter reads as unknown
        c.completions.create(model="b0", prompt="hi", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="bob/b0", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model="g0", prompt="the " * 200, max_tokens=2)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model="g0", prompt="hi", max_tokens=10**9)
    assert err.value.body["param"] == "max_tokens" and err.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model="g0", messages=[{"role": "robot", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="g0", messages=[])
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model="g0", prompt="hi", max_tokens=2, n=2, stream=True)
    assert err.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="g0", prompt="hi", max_tokens=2, frequency_penalty=1.0)
    with pytest.raises(openai.AuthenticationError):
        client(server, "wrong-key-123").models.list()
    raw = httpx.post(server["url"] + "/v1/completions", content=b"{not json",
                     headers={"Authorization": "Bearer key-alice-0001", "content-type": "application/json"})
    assert raw.status_code == 400 and set(raw.json()["error"]) == {"message", "type", "param", "code"}
    assert c.completions.create(model="g0", prompt="hi", max_tokens=2, temperature=0).usage.completion_tokens <= 2


def test_a_client_that_goes_away_frees_its_row(server):
    engine = server["engine"]
    body = {"model": "g0", "prompt": "the cat", "max_tokens": 48, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", server["url"] + "/v1/completions", json=body, timeout=60,
                      headers={"Authorization": "Bearer key-alice-0001"}) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["object"] == "text_completion"
    # the connection is closed after one chunk: the row leaves the decode well before 48 tokens
    deadline = time.monotonic() + 30
    while (engine.batcher.decoder.running or engine.batcher._pins) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.batcher.decoder.running == 0 and not engine.batcher._pins
