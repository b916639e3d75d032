"""OpenAI-compatible HTTP server over one engine (`hobbit serve`).

The engine is synchronous and serves one sequence at a time, so a single worker thread takes
jobs from a FIFO queue and runs `engine.generate`; its callback detokenizes (TextStream), checks
stop strings and cancellation, and hands text to the request's asyncio queue through
`loop.call_soon_threadsafe`. A client that goes away sets the job's cancel flag, and the
callback returns False at the next token, which frees the engine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hobbit.chat import TextDeltas

log = logging.getLogger("hobbit.serve")

MAX_STOP = 4
ROLES = {"system", "developer", "user", "assistant", "tool"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---------------------------------------------------------------- request parsing

def _get(body: dict, name: str, kinds: tuple[type, ...], what: str, default: Any = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise APIError(400, f"Invalid type for '{name}': expected {what}, but got "
                       f"{type(value).__name__}.", name, "invalid_type")
    return value


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    value = float(_get(body, name, (int, float), "a number", default))
    if not (lo < value <= hi if lo_open else lo <= value <= hi):
        bracket = "(" if lo_open else "["
        raise APIError(400, f"Invalid '{name}': {value} is not in {bracket}{lo}, {hi}].", name, "invalid_value")
    return value


@dataclass
class Params:
    """The sampling part of a request, validated."""
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool


def parse_params(body: dict, max_tokens_keys: tuple[str, ...]) -> Params:
    max_tokens = None
    for key in max_tokens_keys:
        value = _get(body, key, (int,), "an integer")
        if value is not None:
            if value < 1:
                raise APIError(400, f"Invalid '{key}': integer below minimum value. Expected a value "
                               f">= 1, but got {value} instead.", key, "integer_below_min_value")
            max_tokens = value
    stop = _get(body, "stop", (str, list), "a string or an array of strings", [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > MAX_STOP or not all(isinstance(s, str) for s in stop):
        raise APIError(400, f"Invalid 'stop': expected at most {MAX_STOP} strings.", "stop", "invalid_value")
    if _get(body, "n", (int,), "an integer", 1) != 1:
        raise APIError(400, "Only n=1 is supported.", "n", "invalid_value")
    options = _get(body, "stream_options", (dict,), "an object", {})
    return Params(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        seed=_get(body, "seed", (int,), "an integer"),
        stop=stop,
        stream=_get(body, "stream", (bool,), "a boolean", False),
        include_usage=_get(options, "include_usage", (bool,), "a boolean", False),
    )


def parse_messages(body: dict) -> list[dict[str, str]]:
    messages = _get(body, "messages", (list,), "an array")
    if not messages:
        raise APIError(400, "Missing required parameter: 'messages'.", "messages", "missing_required_parameter")
    out = []
    for i, m in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise APIError(400, f"Invalid '{param}': expected an object with a role in {sorted(ROLES)}.",
                           param, "invalid_value")
        content = m.get("content") or ""
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"Invalid '{param}.content': only text parts are supported.",
                               f"{param}.content", "invalid_value")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"Invalid type for '{param}.content': expected a string or an array "
                           "of text parts.", f"{param}.content", "invalid_type")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


def parse_prompt(body: dict, tokenizer: Any, vocab_size: int) -> list[int]:
    prompt = _get(body, "prompt", (str, list), "a string or an array of token ids")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size
                                          for t in prompt):
        ids = prompt
    else:
        raise APIError(400, "Invalid 'prompt': expected a string, one string in an array, or an "
                       f"array of token ids in [0, {vocab_size}).", "prompt", "invalid_type")
    if not ids:
        raise APIError(400, "Invalid 'prompt': it encodes to no tokens.", "prompt", "invalid_value")
    return list(ids)


# ---------------------------------------------------------------- the worker thread

@dataclass
class Outcome:
    finish_reason: str     # 'stop' | 'length' | 'cancelled'
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Job:
    prompt_ids: list[int]
    params: Params
    emit: Callable[[str, Any], None]   # ('text', str) | ('done', Outcome) | ('error', APIError); thread-safe
    cancel: threading.Event = field(default_factory=threading.Event)


class Metrics:
    """Counters the worker updates (under `lock`) and /metrics renders."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.finished: dict[str, int] = {}
        self.errors: dict[int, int] = {}
        self.prompt_tokens = self.completion_tokens = 0
        self.generation_seconds = 0.0
        self.last_tokens_per_second = 0.0
        self.waiting = self.running = 0
        self.engine_stats: dict[str, Any] = {}

    def count_error(self, status: int) -> None:
        with self.lock:
            self.errors[status] = self.errors.get(status, 0) + 1


class EngineWorker:
    """One thread, one engine, jobs served strictly in arrival order."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.metrics = Metrics()
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="hobbit-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._closing.set()
        self._jobs.put(None)
        self._thread.join(timeout)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, job: Job) -> None:
        with self.metrics.lock:
            self.metrics.waiting += 1
        self._jobs.put(job)

    def _loop(self) -> None:
        self._snapshot()
        while (job := self._jobs.get()) is not None:
            with self.metrics.lock:
                self.metrics.waiting -= 1
                self.metrics.running = 1
            try:
                if job.cancel.is_set() or self._closing.is_set():
                    job.emit("done", Outcome("cancelled", len(job.prompt_ids), 0))
                else:
                    job.emit("done", self._generate(job))
            except ValueError as e:  # the engine refused this request
                job.emit("error", APIError(400, str(e)))
            except Exception as e:  # a failed request must not take the worker down
                log.exception("generation failed")
                job.emit("error", APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error"))
            finally:
                with self.metrics.lock:
                    self.metrics.running = 0
                self._snapshot()

    def _generate(self, job: Job) -> Outcome:
        p = job.params
        stream = TextDeltas(self.engine.tokenizer, p.stop)

        def callback(token_id: int) -> bool:
            if job.cancel.is_set() or self._closing.is_set():
                return False
            text = stream.push(token_id)
            if text:
                job.emit("text", text)
            return not stream.stopped

        t0 = time.perf_counter()
        gen = self.engine.generate(job.prompt_ids, max_new_tokens=p.max_tokens, temperature=p.temperature,
                                   top_p=p.top_p, seed=p.seed, callback=callback)
        seconds = time.perf_counter() - t0
        finish = "stop" if stream.stopped else gen.finish_reason
        if finish != "cancelled" and (tail := stream.flush()):
            job.emit("text", tail)
        n = len(gen.token_ids)
        m = self.metrics
        with m.lock:
            m.finished[finish] = m.finished.get(finish, 0) + 1
            m.prompt_tokens += len(job.prompt_ids)
            m.completion_tokens += n
            m.generation_seconds += seconds
            m.last_tokens_per_second = n / seconds if seconds > 0 else 0.0
        return Outcome(finish, len(job.prompt_ids), n)

    def _snapshot(self) -> None:
        stats = self.engine.stats()
        with self.metrics.lock:
            self.metrics.engine_stats = stats


def render_metrics(m: Metrics) -> str:
    """Prometheus text exposition format."""
    with m.lock:
        lines = [
            "# TYPE hobbit_queue_depth gauge", f"hobbit_queue_depth {m.waiting}",
            "# TYPE hobbit_requests_running gauge", f"hobbit_requests_running {m.running}",
            "# TYPE hobbit_tokens_per_second gauge", f"hobbit_tokens_per_second {m.last_tokens_per_second:.6g}",
            "# TYPE hobbit_prompt_tokens_total counter", f"hobbit_prompt_tokens_total {m.prompt_tokens}",
            "# TYPE hobbit_completion_tokens_total counter", f"hobbit_completion_tokens_total {m.completion_tokens}",
            "# TYPE hobbit_generation_seconds_total counter",
            f"hobbit_generation_seconds_total {m.generation_seconds:.6g}",
            "# TYPE hobbit_requests_total counter",
        ]
        lines += [f'hobbit_requests_total{{finish_reason="{k}"}} {v}' for k, v in sorted(m.finished.items())]
        lines.append("# TYPE hobbit_request_errors_total counter")
        lines += [f'hobbit_request_errors_total{{status="{k}"}} {v}' for k, v in sorted(m.errors.items())]
        lines += engine_metric_lines(m.engine_stats)
    return "\n".join(lines) + "\n"


def engine_metric_lines(stats: dict[str, Any]) -> list[str]:
    """engine.stats() as gauges (dicts become a label), plus the expert hit rate per precision."""
    labels = {"hits_by_precision": "precision", "misses_by_precision": "precision", "loads": "kind"}
    lines = []
    for key, value in sorted(stats.items()):
        name = "hobbit_engine_" + "".join(c if c.isalnum() else "_" for c in key)
        if isinstance(value, dict):
            label = labels.get(key, "key")
            lines.append(f"# TYPE {name} gauge")
            lines += [f'{name}{{{label}="{k}"}} {v:.6g}' for k, v in sorted(value.items()) if _is_number(v)]
        elif _is_number(value):
            lines += [f"# TYPE {name} gauge", f"{name} {value:.6g}"]
    hits, misses = stats.get("hits_by_precision", {}), stats.get("misses_by_precision", {})
    lines.append("# TYPE hobbit_expert_hit_rate gauge")
    for prec in sorted(set(hits) | set(misses)):
        total = hits.get(prec, 0) + misses.get(prec, 0)
        lines.append(f'hobbit_expert_hit_rate{{precision="{prec}"}} {hits.get(prec, 0) / total if total else 0:.6g}')
    return lines


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ---------------------------------------------------------------- the app

def create_app(engine: Any) -> FastAPI:
    if engine.tokenizer is None:
        raise ValueError("this store has no tokenizer; the server needs one")
    worker = EngineWorker(engine)
    model, created = engine.model_name, int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        worker.start()
        yield
        await asyncio.to_thread(worker.stop)

    app = FastAPI(title="hobbit", lifespan=lifespan)
    app.state.worker = worker

    def fail(status: int, body: dict) -> JSONResponse:
        worker.metrics.count_error(status)
        return JSONResponse(body, status_code=status)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return fail(e.status, error_body(e.message, e.type, e.param, e.code))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        message = (f"Unknown request URL: {request.method} {request.url.path}." if e.status_code == 404
                   else str(e.detail))
        code = {404: "unknown_url", 405: "method_not_allowed"}.get(e.status_code)
        return fail(e.status_code, error_body(message, "invalid_request_error", None, code))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception) -> JSONResponse:
        log.exception("request failed")
        return fail(500, error_body(f"Internal error: {type(e).__name__}", "server_error"))

    async def read_body(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"We could not parse the JSON body of your request ({e}).") from None
        if not isinstance(body, dict):
            raise APIError(400, "The request body must be a JSON object.")
        name = _get(body, "model", (str,), "a string")
        if name is None:
            raise APIError(400, "Missing required parameter: 'model'.", "model", "missing_required_parameter")
        if name != model:
            raise APIError(404, f"The model '{name}' does not exist.", "model", "model_not_found")
        return body

    def fit_context(prompt: list[int], params: Params, param: str) -> None:
        limit = engine.max_context
        if params.max_tokens is None:
            params.max_tokens = limit - len(prompt)
        if len(prompt) + params.max_tokens > limit or params.max_tokens < 1:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you "
                           f"requested {len(prompt) + max(params.max_tokens, 1)} tokens ({len(prompt)} in "
                           f"the {param}, {max(params.max_tokens, 1)} in the completion).",
                           param, "context_length_exceeded")

    def submit(prompt: list[int], params: Params) -> tuple[Job, asyncio.Queue]:
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(kind: str, value: Any) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, (kind, value))
            except RuntimeError:  # the event loop is gone (server shutting down)
                pass

        job = Job(prompt, params, emit)
        worker.submit(job)
        return job, events

    async def run(request: Request, prompt: list[int], params: Params, kind: str) -> Response:
        job, events = submit(prompt, params)
        rid, chat = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", kind == "chat"
        head = {"id": rid, "created": int(time.time()), "model": model}

        def usage(o: Outcome) -> dict:
            return {"prompt_tokens": o.prompt_tokens, "completion_tokens": o.completion_tokens,
                    "total_tokens": o.prompt_tokens + o.completion_tokens}

        def chunk(text: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                delta = ({"role": "assistant", "content": ""} if first else {}) | (
                    {"content": text} if text is not None else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                body = head | {"object": "chat.completion.chunk", "choices": [choice]}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
                body = head | {"object": "text_completion", "choices": [choice]}
            return f"data: {json.dumps(body)}\n\n"

        if params.stream:
            async def sse() -> AsyncIterator[str]:
                try:
                    if chat:
                        yield chunk(None, None, first=True)
                    while True:
                        what, value = await events.get()
                        if what == "text":
                            yield chunk(value, None)
                        elif what == "error":
                            yield f"data: {json.dumps(error_body(value.message, value.type))}\n\n"
                            return
                        else:
                            yield chunk(None if chat else "", value.finish_reason)
                            if params.include_usage:
                                body = head | {"object": "chat.completion.chunk" if chat else "text_completion",
                                               "choices": [], "usage": usage(value)}
                                yield f"data: {json.dumps(body)}\n\n"
                            yield "data: [DONE]\n\n"
                            return
                finally:
                    job.cancel.set()  # no-op when finished; frees the engine when the client left

            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        parts: list[str] = []
        try:
            while (event := await events.get())[0] == "text":
                parts.append(event[1])
        finally:
            job.cancel.set()
            watcher.cancel()
        if event[0] == "error":
            raise event[1]
        outcome, text = event[1], "".join(parts)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": outcome.finish_reason}
            body = head | {"object": "chat.completion", "choices": [choice]}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": outcome.finish_reason}
            body = head | {"object": "text_completion", "choices": [choice]}
        return JSONResponse(body | {"usage": usage(outcome)})

    @app.get("/health")
    async def health() -> Response:
        ok = worker.alive()
        return JSONResponse({"status": "ok" if ok else "worker stopped", "model": model},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(render_metrics(worker.metrics), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model, "object": "model", "created": created,
                                            "owned_by": "hobbit"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await read_body(request)
        params = parse_params(body, ("max_tokens", "max_completion_tokens"))
        messages = parse_messages(body)
        try:
            prompt = engine.tokenizer.encode_chat(messages)
        except Exception as e:  # the template rejects this conversation (roles, order, ...)
            raise APIError(400, f"Invalid 'messages': {e}", "messages", "invalid_value") from None
        fit_context(prompt, params, "messages")
        return await run(request, prompt, params, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await read_body(request)
        params = parse_params(body, ("max_tokens",))
        prompt = parse_prompt(body, engine.tokenizer, engine.config.vocab_size)
        fit_context(prompt, params, "prompt")
        return await run(request, prompt, params, "completion")

    return app


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    """Non-streaming requests: notice a client that went away while its job waits or runs."""
    while not job.cancel.is_set():
        if await request.is_disconnected():
            job.cancel.set()
            return
        await asyncio.sleep(0.25)


def run_server(engine: Any, host: str = "127.0.0.1", port: int = 8000) -> None:
    """`hobbit serve`: blocks until Ctrl-C."""
    import uvicorn

    uvicorn.run(create_app(engine), host=host, port=port)
