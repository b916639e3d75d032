"""hobbit serve / hobbit chat: the official openai client against a live server on 127.0.0.1,
serving the tiny converted MoE store."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import httpx
import jinja2
import openai
import pytest
import uvicorn

import hobbit
from hobbit.runtime.tokenizer import TextDeltas
from hobbit.serve.chat import ChatSession, run_chat
from hobbit.cli import main as hobbit_main
from hobbit.serve.server import create_app

HOST = "127.0.0.1"
TIMEOUT = 20.0
USER = [{"role": "user", "content": "hi there"}]


# ---------------------------------------------------------------- fixtures

@contextmanager
def live_server(engine: Any) -> Iterator[str]:
    """uvicorn in a background thread on a free 127.0.0.1 port."""
    sock = socket.socket()
    sock.bind((HOST, 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine), log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + TIMEOUT
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://{HOST}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)
        sock.close()


@pytest.fixture(scope="module")
def engine(tiny_store: Any) -> Iterator[Any]:
    with hobbit.load(tiny_store, budget="50%", policy="lru") as e:
        yield e


@pytest.fixture(scope="module")
def base_url(engine: Any) -> Iterator[str]:
    with live_server(engine) as url:
        yield url


def make_client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="none", timeout=TIMEOUT, max_retries=0)


@pytest.fixture()
def client(base_url: str) -> openai.OpenAI:
    return make_client(base_url)


def expected(engine: Any, prompt_ids: list[int], **options: Any) -> str:
    """The server's answer must be engine.generate on the same ids, decoded (what `hobbit run` prints)."""
    return engine.tokenizer.decode(engine.generate(prompt_ids, **options).token_ids)


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def metric(base_url: str, line_start: str | tuple[str, ...]) -> float:
    text = httpx.get(base_url + "/metrics", timeout=TIMEOUT).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))


# ---------------------------------------------------------------- TextDeltas

def test_text_deltas_hold_back_partial_utf8_and_stop_prefixes(engine: Any) -> None:
    tok = engine.tokenizer   # byte-level: a multi-byte character spans several tokens
    stream = TextDeltas(tok, stop=["STOP"])
    pieces = [stream.push(t) for t in tok.encode("aé🙂 b STOP c")]
    assert "\ufffd" not in "".join(pieces) and "" in pieces
    assert "".join(pieces) == "aé🙂 b " and stream.stopped and stream.text == "aé🙂 b "
    assert stream.flush() == ""

    stream = TextDeltas(tok, stop=["STOP"])
    assert "".join(stream.push(t) for t in tok.encode("x ST")) == "x " and not stream.stopped
    assert stream.flush() == "ST" and stream.text == "x ST"


# ---------------------------------------------------------------- endpoints

def test_models_health_metrics(client: openai.OpenAI, base_url: str, engine: Any) -> None:
    assert [m.id for m in client.models.list().data] == [engine.model_name]
    assert httpx.get(base_url + "/health", timeout=TIMEOUT).json()["status"] == "ok"
    client.completions.create(model=engine.model_name, prompt="metrics", max_tokens=3)
    text = httpx.get(base_url + "/metrics", timeout=TIMEOUT).text
    for name in ("hobbit_tokens_per_second ", "hobbit_queue_depth 0", "hobbit_completion_tokens_total ",
                 'hobbit_expert_hit_rate{precision="bf16"} ', "hobbit_engine_bytes_read "):
        assert name in text


def test_chat_greedy_matches_engine_streaming_or_not(client: openai.OpenAI, engine: Any) -> None:
    ids = engine.tokenizer.encode_chat(USER)
    gen = engine.generate(ids, max_new_tokens=24)  # what the server must answer, EOS or not (kernels decide)
    want, n, finish = engine.tokenizer.decode(gen.token_ids), len(gen.token_ids), gen.finish_reason
    r = client.chat.completions.create(model=engine.model_name, messages=USER, max_tokens=24, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == finish and (n == 24) == (finish == "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), n, len(ids) + n)
    if n > 1:  # cut before the end: a "length" finish whatever the kernels make of this prompt
        short = client.chat.completions.create(model=engine.model_name, messages=USER, max_tokens=n - 1, temperature=0)
        assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == n - 1

    chunks = list(client.chat.completions.create(model=engine.model_name, messages=USER, max_tokens=24,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish
    assert chunks[-1].usage.completion_tokens == n


def test_completion_matches_hobbit_run(client: openai.OpenAI, engine: Any, tiny_store: Any,
                                       capsys: pytest.CaptureFixture) -> None:
    assert hobbit_main(["run", str(tiny_store), "--prompt", "long story", "--max-new-tokens", "20", "--json"]) == 0
    run = json.loads(capsys.readouterr().out)
    assert run["finish_reason"] == "stop"   # this prompt ends with EOS
    r = client.completions.create(model=engine.model_name, prompt="long story", max_tokens=20, temperature=0)
    assert r.choices[0].text == run["text"] and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == len(run["token_ids"])
    stream = client.completions.create(model=engine.model_name, prompt="long story", max_tokens=20, stream=True,
                                       temperature=0)
    assert "".join(c.choices[0].text for c in stream) == run["text"]

    assert hobbit_main(["run", str(tiny_store), "--prompt", "hi there", "--chat", "--max-new-tokens", "12",
                        "--json"]) == 0
    run = json.loads(capsys.readouterr().out)
    r = client.chat.completions.create(model=engine.model_name, messages=USER, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == run["text"]


def test_stop_strings_cut_the_output(client: openai.OpenAI, engine: Any) -> None:
    full = expected(engine, engine.tokenizer.encode("tell me"), max_new_tokens=30)
    stop = full[12:15]
    want = full[: full.index(stop)]
    r = client.completions.create(model=engine.model_name, prompt="tell me", max_tokens=30, stop=[stop, "zzz"],
                                  temperature=0)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 30
    stream = client.completions.create(model=engine.model_name, prompt="tell me", max_tokens=30, stop=stop,
                                       temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == want and chunks[-1].choices[0].finish_reason == "stop"


def test_seed_is_the_engine_seed(client: openai.OpenAI, engine: Any) -> None:
    want = expected(engine, engine.tokenizer.encode("roll"), max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    for _ in range(2):
        r = client.completions.create(model=engine.model_name, prompt="roll", max_tokens=12, temperature=1.0,
                                      top_p=0.9, seed=7)
        assert r.choices[0].text == want


def test_eight_concurrent_streams_and_a_killed_client(base_url: str, engine: Any) -> None:
    prompts = [f"client {i} says {'x' * i}" for i in range(8)]
    wants = [expected(engine, engine.tokenizer.encode_chat([{"role": "user", "content": p}]), max_new_tokens=12)
             for p in prompts]
    cancelled = metric(base_url, 'hobbit_requests_total{finish_reason="cancelled"}')
    tokens = metric(base_url, "hobbit_completion_tokens_total")
    killed = threading.Event()

    def doomed() -> None:   # asks for the whole context, reads one chunk and hangs up
        body = {"model": engine.model_name, "prompt": "hi there", "max_tokens": 200, "stream": True}
        with httpx.stream("POST", base_url + "/v1/completions", json=body, timeout=TIMEOUT) as r:
            next(r.iter_lines())
        killed.set()

    def one(prompt: str) -> str:
        stream = make_client(base_url).chat.completions.create(
            model=engine.model_name, max_tokens=12, stream=True, temperature=0,
            messages=[{"role": "user", "content": prompt}])
        return "".join(ch.choices[0].delta.content or "" for ch in stream)

    with ThreadPoolExecutor(9) as pool:
        kill = pool.submit(doomed)
        got = pool.map(one, prompts)
        assert list(got) == wants
        kill.result(TIMEOUT)
    assert killed.is_set()
    wait_until(lambda: metric(base_url, 'hobbit_requests_total{finish_reason="cancelled"}') == cancelled + 1)
    assert metric(base_url, "hobbit_completion_tokens_total") - tokens < 8 * 12 + 100   # not 200 for the killed one


def test_non_streaming_client_that_gives_up_frees_the_engine(base_url: str, engine: Any,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    generate = engine.generate

    def slow(prompt_ids: list[int], callback: Any = None, **options: Any) -> Any:
        # never stops on its own within the client's patience: no EOS, 50 ms per token
        options["stop_token_ids"] = []
        return generate(prompt_ids, callback=lambda t: time.sleep(0.05) or callback(t), **options)

    monkeypatch.setattr(engine, "generate", slow)
    cancelled = metric(base_url, 'hobbit_requests_total{finish_reason="cancelled"}')
    body = {"model": engine.model_name, "prompt": "hi there", "max_tokens": 200}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base_url + "/v1/completions", json=body, timeout=httpx.Timeout(TIMEOUT, read=0.3))
    wait_until(lambda: metric(base_url, 'hobbit_requests_total{finish_reason="cancelled"}') == cancelled + 1)
    assert metric(base_url, "hobbit_queue_depth ") == 0


def test_requests_are_served_in_arrival_order(base_url: str, engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    served: list[str] = []
    generate = engine.generate

    def spy(prompt_ids: list[int], **options: Any) -> Any:
        served.append(engine.tokenizer.decode(prompt_ids))
        return generate(prompt_ids, **options)

    monkeypatch.setattr(engine, "generate", spy)

    def one(i: int) -> str:
        body = {"model": engine.model_name, "prompt": f"request {i}", "max_tokens": 10}
        return httpx.post(base_url + "/v1/completions", json=body, timeout=TIMEOUT).json()["choices"][0]["text"]

    with ThreadPoolExecutor(4) as pool:
        futures = []
        for i in range(4):   # each request arrives once the ones before it are queued or running
            futures.append(pool.submit(one, i))
            wait_until(lambda: metric(base_url, ("hobbit_queue_depth ", "hobbit_requests_running "))
                       >= i + 1 - sum(f.done() for f in futures))
        assert all(f.result() for f in futures)
    assert served == [f"request {i}" for i in range(4)]


BAD_REQUESTS = [  # (path, raw body, status, param); model "M" stands for the served model
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", b"[1, 2]", 400, None),
    ("/v1/chat/completions", {"messages": USER}, 400, "model"),
    ("/v1/chat/completions", {"model": "gpt-nope", "messages": USER}, 404, "model"),
    ("/v1/chat/completions", {"model": "M", "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "M", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0]"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content"),
    ("/v1/chat/completions", {"model": "M", "messages": USER, "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": "M", "messages": USER, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": "M", "messages": USER, "max_tokens": 10**9}, 400, "messages"),
    ("/v1/chat/completions", {"model": "M", "messages": USER, "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": "M", "messages": USER, "max_tokens": True}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": "M", "messages": USER, "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {"model": "M", "messages": USER, "temperature": 9}, 400, "temperature"),
    ("/v1/chat/completions", {"model": "M", "messages": USER, "top_p": 0}, 400, "top_p"),
    ("/v1/chat/completions", {"model": "M", "messages": USER, "stream": "yes"}, 400, "stream"),
    ("/v1/chat/completions", {"model": "M", "messages": USER, "stop": [1]}, 400, "stop"),
    ("/v1/chat/completions", {"model": "M", "messages": USER, "seed": 1.5}, 400, "seed"),
    ("/v1/chat/completions", {"model": "M", "messages": USER, "n": 3}, 400, "n"),
    ("/v1/completions", {"model": "M", "prompt": "x" * 300}, 400, "prompt"),
    ("/v1/completions", {"model": "M", "prompt": "x" * 200, "max_tokens": 100, "stream": True}, 400, "prompt"),
    ("/v1/completions", {"model": "M", "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": "M", "prompt": {"a": 1}}, 400, "prompt"),
    ("/v1/completions", {"model": "M", "prompt": [1, "a"]}, 400, "prompt"),
    ("/v1/completions", {"model": "M", "prompt": [1, 10**6]}, 400, "prompt"),
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


def test_openai_client_raises_on_bad_requests(client: openai.OpenAI, engine: Any) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=USER)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=engine.model_name, prompt="hi", max_tokens=-5)


def test_engine_and_template_failures_leave_the_server_up(base_url: str, engine: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    def strict_template(messages: list[dict]) -> list[int]:
        raise jinja2.exceptions.TemplateError("roles must alternate")

    body = {"model": engine.model_name, "prompt": "x", "max_tokens": 3}
    with monkeypatch.context() as m:
        m.setattr(engine, "generate", boom)
        m.setattr(engine.tokenizer, "encode_chat", strict_template)
        r = httpx.post(base_url + "/v1/completions", json=body, timeout=TIMEOUT)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        with httpx.stream("POST", base_url + "/v1/completions", json=dict(body, stream=True), timeout=TIMEOUT) as r:
            assert "server_error" in r.read().decode()
        r = httpx.post(base_url + "/v1/chat/completions", json={"model": engine.model_name, "messages": USER},
                       timeout=TIMEOUT)
        assert r.status_code == 400 and "alternate" in r.json()["error"]["message"]
    assert httpx.post(base_url + "/v1/completions", json=body, timeout=TIMEOUT).status_code == 200
    assert metric(base_url, 'hobbit_request_errors_total{status="500"}') >= 1


# ---------------------------------------------------------------- hobbit chat

def test_terminal_chat_streams_keeps_history_and_prints_stats(engine: Any) -> None:
    session = ChatSession(engine, system="be brief", max_tokens=8)
    out = io.StringIO()
    run_chat(session, stdin=io.StringIO("hello\nand again\n"), stdout=out)
    text = out.getvalue()
    assert text.count("tok/s") == 2 and text.count("expert hit rate") == 2
    first = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    answer = expected(engine, engine.tokenizer.encode_chat(first), max_new_tokens=8)
    assert answer in text
    assert session.history[:3] == first + [{"role": "assistant", "content": answer}]
    assert [m["role"] for m in session.history] == ["system", "user", "assistant", "user", "assistant"]
    run_chat(session, stdin=io.StringIO("/reset\n/exit\n"), stdout=out)
    assert session.history == [{"role": "system", "content": "be brief"}]


def test_chat_answer_stops_when_interrupted(engine: Any) -> None:
    session = ChatSession(engine, max_tokens=50)
    seen: list[str] = []
    answer, stats = session.ask("hello", seen.append, cancelled=lambda: True)   # Ctrl-C at the first token
    assert stats.startswith("[1 tokens") and answer == "".join(seen)
    assert session.history[-1] == {"role": "assistant", "content": answer}
