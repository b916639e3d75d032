"""hobbit serve / hobbit chat: the official openai client against a live server on 127.0.0.1."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Iterator

import httpx
import openai
import pytest
import uvicorn

from hobbit.chat import ChatSession, TextDeltas, run_chat
from hobbit.serve import create_app

HOST = "127.0.0.1"
TIMEOUT = 20.0


# ---------------------------------------------------------------- a fake engine (same API)

class FakeTokenizer:
    """Byte-level: token = byte + 1, token 0 is EOS."""
    eos_token_ids = (0,)

    def encode(self, text: str) -> list[int]:
        return [b + 1 for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 1 for i in ids if i > 0).decode("utf-8", errors="replace")

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if any(m["role"] not in ("system", "user", "assistant") for m in messages):
            raise ValueError("roles must be system/user/assistant")
        return self.encode("".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>")


@dataclass
class FakeGeneration:
    token_ids: list[int]
    finish_reason: str
    stats: dict = field(default_factory=dict)


class FakeEngine:
    """Answers with a text derived from the prompt (multi-byte characters included), then EOS.
    `delay` slows each token; `endless` never emits EOS; `fail` raises inside generate."""
    model_name = "fake-moe"
    max_context = 256
    config = SimpleNamespace(vocab_size=257)

    def __init__(self, delay: float = 0.0, endless: bool = False):
        self.tokenizer = FakeTokenizer()
        self.delay, self.endless, self.fail = delay, endless, False
        self.generated = 0
        self.served: list[list[int]] = []
        self._busy = threading.Lock()

    def answer(self, prompt_ids: list[int], temperature: float, seed: int | None) -> list[int]:
        salt = sum(prompt_ids) + ((seed or 0) if temperature > 0 else 0)
        text = f"héllo {salt % 97} wörld 🙂 stop here, the end {salt}."
        return self.tokenizer.encode(text * (50 if self.endless else 1))

    def generate(self, prompt_ids, max_new_tokens=128, temperature=0.0, top_p=1.0, top_k=0, seed=None,
                 stop_token_ids=None, callback=None) -> FakeGeneration:
        assert self._busy.acquire(blocking=False), "engine used from two threads at once"
        try:
            self.served.append(list(prompt_ids))
            if self.fail:
                raise RuntimeError("boom")
            out: list[int] = []
            for tok in self.answer(prompt_ids, temperature, seed) + [0]:
                if len(out) == max_new_tokens:
                    return FakeGeneration(out, "length")
                time.sleep(self.delay)
                out.append(tok)
                self.generated += 1
                if callback is not None and callback(tok) is False:
                    return FakeGeneration(out, "cancelled")
                if tok in (self.tokenizer.eos_token_ids if stop_token_ids is None else stop_token_ids):
                    return FakeGeneration(out, "stop")
            return FakeGeneration(out, "length")
        finally:
            self._busy.release()

    def stats(self) -> dict:
        return {"hits": 4, "misses": 2, "hits_by_precision": {"int4": 3, "bf16": 1},
                "misses_by_precision": {"int4": 1, "bf16": 1}, "bytes_read": 1234, "policy": "lru"}


def expected_text(engine: Any, prompt_ids: list[int], **options: Any) -> str:
    """What `hobbit run` prints: greedy engine.generate on the same ids, decoded without EOS."""
    return engine.tokenizer.decode(engine.generate(prompt_ids, **options).token_ids)


# ---------------------------------------------------------------- a live server

@contextmanager
def live_server(engine: Any) -> Iterator[str]:
    sock = socket.socket()
    sock.bind((HOST, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine), log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + TIMEOUT
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://{HOST}:{port}"
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)
        sock.close()


@pytest.fixture(scope="module")
def engine() -> Any:
    return FakeEngine()


@pytest.fixture(scope="module")
def base_url(engine: Any) -> Iterator[str]:
    with live_server(engine) as url:
        yield url


@pytest.fixture()
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="none", timeout=TIMEOUT, max_retries=0)


def chat_ids(engine: Any, messages: list[dict[str, str]]) -> list[int]:
    return engine.tokenizer.encode_chat(messages)


# ---------------------------------------------------------------- TextDeltas

def test_text_stream_holds_back_partial_utf8_and_stop_prefixes() -> None:
    tok = FakeTokenizer()
    ids = tok.encode("aé🙂 b STOP c")
    stream = TextDeltas(tok, stop=["STOP"])
    pieces = [stream.push(t) for t in ids]
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) == "aé🙂 b " and stream.stopped and stream.text == "aé🙂 b "
    assert stream.flush() == ""


def test_text_stream_flushes_a_stop_prefix_that_never_completed() -> None:
    tok = FakeTokenizer()
    stream = TextDeltas(tok, stop=["STOP"])
    out = "".join(stream.push(t) for t in tok.encode("x ST") + [0])
    assert out == "x " and not stream.stopped
    assert stream.flush() == "ST" and stream.text == "x ST"


# ---------------------------------------------------------------- endpoints

def test_models_health_metrics(client: openai.OpenAI, base_url: str, engine: Any) -> None:
    assert [m.id for m in client.models.list().data] == [engine.model_name]
    assert httpx.get(base_url + "/health", timeout=TIMEOUT).json()["status"] == "ok"
    client.completions.create(model=engine.model_name, prompt="metrics", max_tokens=3)
    text = httpx.get(base_url + "/metrics", timeout=TIMEOUT).text
    for name in ("hobbit_tokens_per_second", "hobbit_queue_depth", "hobbit_completion_tokens_total",
                 'hobbit_expert_hit_rate{precision="int4"} 0.75', "hobbit_engine_bytes_read"):
        assert name in text


def test_chat_greedy_matches_engine(client: openai.OpenAI, engine: Any) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    want = expected_text(engine, chat_ids(engine, messages), max_new_tokens=40)
    r = client.chat.completions.create(model=engine.model_name, messages=messages, max_tokens=40, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(chat_ids(engine, messages))
    assert r.usage.completion_tokens <= 40
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    chunks = list(client.chat.completions.create(model=engine.model_name, messages=messages, max_tokens=40,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_completion_streaming_and_not(client: openai.OpenAI, engine: Any) -> None:
    prompt = "Once upon a time"
    want = expected_text(engine, engine.tokenizer.encode(prompt), max_new_tokens=200)
    r = client.completions.create(model=engine.model_name, prompt=prompt, max_tokens=200, temperature=0)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    stream = client.completions.create(model=engine.model_name, prompt=prompt, max_tokens=200,
                                       temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == want
    short = client.completions.create(model=engine.model_name, prompt=prompt, max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3


def test_stop_strings_cut_the_output(client: openai.OpenAI, engine: Any) -> None:
    prompt = "tell me"
    full = expected_text(engine, engine.tokenizer.encode(prompt), max_new_tokens=200)
    stop = full[10:14]
    r = client.completions.create(model=engine.model_name, prompt=prompt, max_tokens=200, stop=[stop, "zzz"])
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < len(engine.tokenizer.encode(full))
    stream = client.completions.create(model=engine.model_name, prompt=prompt, max_tokens=200, stop=stop,
                                       stream=True)
    assert "".join(c.choices[0].text for c in stream) == full[: full.index(stop)]


def test_seed_makes_sampling_repeatable(client: openai.OpenAI, engine: Any) -> None:
    ask = lambda seed: client.completions.create(  # noqa: E731
        model=engine.model_name, prompt="roll", max_tokens=20, temperature=1.0, top_p=0.9, seed=seed
    ).choices[0].text
    assert ask(7) == ask(7)


def test_eight_concurrent_streams_are_complete(base_url: str, engine: Any) -> None:
    prompts = [f"client {i} says {'x' * i}" for i in range(8)]
    wants = [expected_text(engine, chat_ids(engine, [{"role": "user", "content": p}]), max_new_tokens=60)
             for p in prompts]

    def one(prompt: str) -> str:
        c = openai.OpenAI(base_url=base_url + "/v1", api_key="none", timeout=TIMEOUT, max_retries=0)
        stream = c.chat.completions.create(model=engine.model_name, max_tokens=60, stream=True,
                                           messages=[{"role": "user", "content": prompt}], temperature=0)
        return "".join(ch.choices[0].delta.content or "" for ch in stream)

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(one, prompts)) == wants


BAD_REQUESTS = [  # (path, raw body, status, param)
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", b"[1, 2]", 400, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ("/v1/chat/completions", {"model": "gpt-nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ("/v1/chat/completions", {"model": "M", "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "M", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0]"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "tool", "content": "x"}]}, 400, "messages"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1},
     400, "max_tokens"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9},
     400, "messages"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"},
     400, "max_tokens"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "user", "content": "hi"}], "max_tokens": True},
     400, "max_tokens"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
     400, "temperature"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "user", "content": "hi"}], "temperature": 9},
     400, "temperature"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "user", "content": "hi"}], "top_p": 0},
     400, "top_p"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"},
     400, "stream"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "user", "content": "hi"}], "stop": [1]},
     400, "stop"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "user", "content": "hi"}], "seed": 1.5},
     400, "seed"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "user", "content": "hi"}], "n": 3}, 400, "n"),
    ("/v1/completions", {"model": "M", "prompt": "x" * 300}, 400, "prompt"),
    ("/v1/completions", {"model": "M", "prompt": "x" * 200, "max_tokens": 100}, 400, "prompt"),
    ("/v1/completions", {"model": "M", "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": "M", "prompt": {"a": 1}}, 400, "prompt"),
    ("/v1/completions", {"model": "M", "prompt": [1, "a"]}, 400, "prompt"),
    ("/v1/completions", {"model": "M"}, 400, "prompt"),
    ("/v1/nope", {}, 404, None),
]


@pytest.mark.parametrize("path,body,status,param", BAD_REQUESTS)
def test_bad_requests_get_openai_errors(base_url: str, engine: Any, path: str, body: Any, status: int,
                                        param: str | None) -> None:
    if isinstance(body, dict) and body.get("model") == "M":
        body = dict(body, model=engine.model_name)
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(base_url + path, content=raw, headers={"Content-Type": "application/json"}, timeout=TIMEOUT)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert httpx.get(base_url + "/health", timeout=TIMEOUT).status_code == 200


def test_openai_client_raises_on_unknown_model(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=client.models.list().data[0].id, prompt="hi", max_tokens=-5)


# ---------------------------------------------------------------- conditions a real engine can't produce

def test_killed_client_frees_the_engine_and_others_are_served() -> None:
    engine = FakeEngine(delay=0.005, endless=True)
    engine.max_context = 4096
    with live_server(engine) as url:
        body = {"model": engine.model_name, "prompt": "long", "max_tokens": 3000, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=TIMEOUT) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")   # generation is under way; now drop the connection
        t0 = time.monotonic()
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=TIMEOUT, max_retries=0)
        other = c.completions.create(model=engine.model_name, prompt="short", max_tokens=5)
        assert other.usage.completion_tokens == 5
        assert time.monotonic() - t0 < 5.0      # 3000 tokens x 5 ms would be 15 s
        assert engine.generated < 1000
        metrics = httpx.get(url + "/metrics", timeout=TIMEOUT).text
        assert 'hobbit_requests_total{finish_reason="cancelled"} 1' in metrics


def test_requests_are_served_in_arrival_order() -> None:
    engine = FakeEngine(delay=0.01)
    with live_server(engine) as url:
        def one(i: int) -> str:
            body = {"model": engine.model_name, "prompt": f"request {i}", "max_tokens": 20}
            return httpx.post(url + "/v1/completions", json=body, timeout=TIMEOUT).json()["choices"][0]["text"]

        def in_server() -> int:
            text = httpx.get(url + "/metrics", timeout=TIMEOUT).text
            return sum(int(line.split()[1]) for line in text.splitlines()
                       if line.startswith(("hobbit_queue_depth ", "hobbit_requests_running ")))

        with ThreadPoolExecutor(4) as pool:
            futures = []
            for i in range(4):   # each request arrives once the ones before it are queued or running
                futures.append(pool.submit(one, i))
                deadline = time.monotonic() + TIMEOUT
                while in_server() < i + 1 - sum(f.done() for f in futures):
                    assert time.monotonic() < deadline
                    time.sleep(0.005)
            assert all(f.result() for f in futures)
        assert [engine.tokenizer.decode(p) for p in engine.served] == [f"request {i}" for i in range(4)]


def test_engine_failure_is_a_500_and_the_server_lives_on() -> None:
    engine = FakeEngine()
    with live_server(engine) as url:
        engine.fail = True
        body = {"model": engine.model_name, "prompt": "x", "max_tokens": 3}
        r = httpx.post(url + "/v1/completions", json=body, timeout=TIMEOUT)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        with httpx.stream("POST", url + "/v1/completions", json=dict(body, stream=True), timeout=TIMEOUT) as r:
            assert "server_error" in r.read().decode()
        engine.fail = False
        assert httpx.post(url + "/v1/completions", json=body, timeout=TIMEOUT).status_code == 200
        assert httpx.get(url + "/health", timeout=TIMEOUT).json()["status"] == "ok"


# ---------------------------------------------------------------- hobbit chat

def test_terminal_chat_streams_keeps_history_and_prints_stats(engine: Any) -> None:
    session = ChatSession(engine, system="be brief", max_tokens=40)
    out = io.StringIO()
    run_chat(session, stdin=io.StringIO("hello\nand again\n/reset\n/exit\n"), stdout=out)
    text = out.getvalue()
    assert text.count("tok/s") == 2 and "(history cleared)" in text
    first = expected_text(engine, chat_ids(engine, [{"role": "system", "content": "be brief"},
                                                    {"role": "user", "content": "hello"}]), max_new_tokens=40)
    assert first in text
    assert session.history == [{"role": "system", "content": "be brief"}]
