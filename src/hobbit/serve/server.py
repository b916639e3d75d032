"""OpenAI-compatible HTTP server over one engine (`hobbit serve`).

The engine is synchronous and serves one sequence at a time, so a single worker thread takes
jobs from a FIFO queue and runs `engine.generate`; its callback detokenizes (TextDeltas), checks
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

from hobbit.runtime.tokenizer import TextDeltas
from hobbit.serve.openai_api import (APIError, Params, error_body, get_param, invalid_param, parse_messages, parse_params,
                               parse_prompt)

log = logging.getLogger("hobbit.serve.server")

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
    """Counters the worker and the error handlers update under `lock`; /metrics renders them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.finished: dict[str, int] = {}   # finish_reason -> requests
        self.errors: dict[int, int] = {}     # HTTP status -> error responses
        self.prompt_tokens = self.completion_tokens = self.waiting = self.running = 0
        self.generation_seconds = self.last_tokens_per_second = 0.0
        self.engine_stats: dict[str, Any] = {}

    def count(self, table: dict, key: Any) -> None:
        with self.lock:
            table[key] = table.get(key, 0) + 1

    def render(self) -> str:
        """Prometheus text format; engine.stats() entries become hobbit_engine_* gauges."""
        with self.lock:
            stats = self.engine_stats
            hits, misses = stats.get("hits_by_precision", {}), stats.get("misses_by_precision", {})
            rate = {p: hits.get(p, 0) / max(1, hits.get(p, 0) + misses.get(p, 0)) for p in set(hits) | set(misses)}
            out = [_family("queue_depth", "gauge", self.waiting),
                   _family("requests_running", "gauge", self.running),
                   _family("tokens_per_second", "gauge", self.last_tokens_per_second),
                   _family("prompt_tokens_total", "counter", self.prompt_tokens),
                   _family("completion_tokens_total", "counter", self.completion_tokens),
                   _family("generation_seconds_total", "counter", self.generation_seconds),
                   _family("requests_total", "counter", self.finished, "finish_reason"),
                   _family("request_errors_total", "counter", self.errors, "status"),
                   _family("expert_hit_rate", "gauge", rate, "precision")]
        labels = {"hits_by_precision": "precision", "misses_by_precision": "precision", "loads": "kind"}
        for key, value in sorted(stats.items()):
            if isinstance(value, dict) or _is_number(value):
                name = "engine_" + "".join(c if c.isalnum() else "_" for c in key)
                out.append(_family(name, "gauge", value, labels.get(key, "key")))
        return "".join(out)


def _family(name: str, kind: str, value: Any, label: str = "") -> str:
    """One metric family: a number, or a dict of label value -> number."""
    samples = {f'{{{label}="{k}"}}': v for k, v in sorted(value.items(), key=str)} if isinstance(value, dict) \
        else {"": value}
    lines = [f"# TYPE hobbit_{name} {kind}"]
    lines += [f"hobbit_{name}{k} {v if isinstance(v, int) else f'{v:.9g}'}"
              for k, v in samples.items() if _is_number(v)]
    return "\n".join(lines) + "\n"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


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
                if job.cancel.is_set() or self._closing.is_set():  # the client left while it waited
                    self.metrics.count(self.metrics.finished, "cancelled")
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
            if text := stream.push(token_id):
                job.emit("text", text)
            return not stream.stopped

        t0 = time.perf_counter()
        gen = self.engine.generate(job.prompt_ids, max_new_tokens=p.max_tokens, temperature=p.temperature,
                                   top_p=p.top_p, seed=p.seed, callback=callback)
        seconds = time.perf_counter() - t0
        finish = "stop" if stream.stopped else gen.finish_reason
        if finish != "cancelled" and (tail := stream.flush()):
            job.emit("text", tail)
        n, m = len(gen.token_ids), self.metrics
        m.count(m.finished, finish)
        with m.lock:
            m.prompt_tokens += len(job.prompt_ids)
            m.completion_tokens += n
            m.generation_seconds += seconds
            m.last_tokens_per_second = n / seconds if seconds > 0 else 0.0
        return Outcome(finish, len(job.prompt_ids), n)

    def _snapshot(self) -> None:
        stats = self.engine.stats()
        with self.metrics.lock:
            self.metrics.engine_stats = stats


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

    def fail(status: int, body: dict) -> JSONResponse:
        worker.metrics.count(worker.metrics.errors, status)
        return JSONResponse(body, status_code=status)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return fail(e.status, error_body(e.message, e.type, e.param, e.code))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        message = f"Unknown request URL: {request.method} {request.url.path}." if e.status_code == 404 else e.detail
        code = {404: "unknown_url", 405: "method_not_allowed"}.get(e.status_code)
        return fail(e.status_code, error_body(str(message), "invalid_request_error", None, code))

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
        if (name := get_param(body, "model", (str,), "a string")) is None:
            raise APIError(400, "Missing required parameter: 'model'.", "model", "missing_required_parameter")
        if name != model:
            raise APIError(404, f"The model '{name}' does not exist.", "model", "model_not_found")
        return body

    def fit_context(prompt: list[int], params: Params, param: str) -> None:
        limit = engine.max_context
        if params.max_tokens is None:
            params.max_tokens = limit - len(prompt)
        if len(prompt) + params.max_tokens > limit or params.max_tokens < 1:
            want = max(params.max_tokens, 1)
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                           f"{len(prompt) + want} tokens ({len(prompt)} in the {param}, {want} in the completion).",
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

    async def run(request: Request, prompt: list[int], params: Params, chat: bool) -> Response:
        job, events = submit(prompt, params)
        obj = ("chat.completion.chunk" if params.stream else "chat.completion") if chat else "text_completion"
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "object": obj,
                "created": int(time.time()), "model": model}

        def body(text: str | None, finish: str | None, outcome: Outcome | None = None) -> dict:
            if not chat:
                part = {"text": text or ""}
            elif params.stream:   # the first chunk carries the role, the last one only finish_reason
                role = {"role": "assistant"} if text == "" else {}
                part = {"delta": role | ({} if text is None else {"content": text})}
            else:
                part = {"message": {"role": "assistant", "content": text}}
            out = head | {"choices": [{"index": 0, **part, "logprobs": None, "finish_reason": finish}]}
            if outcome is not None:
                out["usage"] = {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens,
                                "total_tokens": outcome.prompt_tokens + outcome.completion_tokens}
            return out

        if params.stream:
            async def sse() -> AsyncIterator[str]:
                try:
                    if chat:
                        yield _sse(body("", None))
                    while (event := await events.get())[0] == "text":
                        yield _sse(body(event[1], None))
                    if event[0] == "error":
                        yield _sse(error_body(event[1].message, event[1].type))
                        return
                    yield _sse(body(None, event[1].finish_reason))
                    if params.include_usage:
                        yield _sse(body(None, None, event[1]) | {"choices": []})
                    yield "data: [DONE]\n\n"
                finally:
                    job.cancel.set()  # no-op when finished; frees the engine when the client left

            return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

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
        return JSONResponse(body("".join(parts), event[1].finish_reason, event[1]))

    @app.get("/health")
    async def health() -> Response:
        ok = worker.alive()
        return JSONResponse({"status": "ok" if ok else "worker stopped", "model": model},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(worker.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "hobbit"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await read_body(request)
        params = parse_params(body, ("max_tokens", "max_completion_tokens"))
        messages = parse_messages(body)
        try:
            prompt = engine.tokenizer.encode_chat(messages)
        except Exception as e:  # the template rejects this conversation (roles, order, ...)
            raise invalid_param("messages", str(e)) from None
        fit_context(prompt, params, "messages")
        return await run(request, prompt, params, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await read_body(request)
        params = parse_params(body, ("max_tokens",))
        prompt = parse_prompt(body, engine.tokenizer, engine.config.vocab_size)
        fit_context(prompt, params, "prompt")
        return await run(request, prompt, params, chat=False)

    return app


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


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
