"""Soak `hobbit serve` over loopback: N requests from C concurrent clients; requests/s, latency, errors.

    python benchmarks/soak_server.py STORE [--requests 200] [--concurrency 8] [--max-tokens 16]
        [--budget 25%] [--policy lru] [--json runs/soak_server.json]
    python benchmarks/soak_server.py --url http://127.0.0.1:8000 ...     # a server already running

With STORE the server runs in this process (uvicorn thread, free 127.0.0.1 port). The mix cycles
chat / completion x streaming / not, greedy and seeded sampling; a share of clients hang up
mid-stream (--abandon) and a share send invalid requests (--bad), which must get a 400 and are
not errors. An error is anything else: a transport failure, an unexpected status, a stream
without [DONE] or finish_reason, usage that disagrees with max_tokens. Target: 0 errors.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import platform
import socket
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import httpx

HOST = "127.0.0.1"


@contextmanager
def serve_in_thread(store: str, budget: str, policy: str) -> Iterator[str]:
    import uvicorn

    import hobbit
    from hobbit.serve.server import create_app

    engine = hobbit.load(store, budget=None if policy in ("resident", "ondemand") else budget, policy=policy)
    sock = socket.socket()
    sock.bind((HOST, 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    try:
        yield f"http://{HOST}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(60)
        engine.close()


def plan(i: int, model: str, max_tokens: int, abandon: float, bad: float) -> tuple[str, str, dict]:
    """Request i of the mix: (kind, path, body); kind is 'ok', 'abandon' or 'bad'."""
    chat, stream = i % 2 == 0, (i // 2) % 2 == 0
    text = f"soak request {i}: tell me something about number {i * 7919 % 1000}"
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "stream": stream,
                            "temperature": 0.0 if i % 3 else 0.8, "seed": i}
    body |= {"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text}
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if _every(i, bad, 0):
        return "bad", path, body | {"max_tokens": -1 if i % 4 else "many"}
    if _every(i, abandon, 1):
        return "abandon", "/v1/completions", {"model": model, "prompt": text, "max_tokens": max_tokens, "stream": True}
    return "ok", path, body


def _every(i: int, share: float, offset: int) -> bool:
    return share > 0 and (i + offset) % max(1, round(1 / share)) == 0


async def one(client: httpx.AsyncClient, kind: str, path: str, body: dict) -> dict:
    """Run one request; returns latency, first-token latency, tokens and an error string or None."""
    t0 = time.perf_counter()
    out: dict[str, Any] = {"kind": kind, "error": None, "ttft_s": None, "completion_tokens": 0}
    try:
        if kind == "bad" or not body["stream"]:
            r = await client.post(path, json=body)
            want = 400 if kind == "bad" else 200
            if r.status_code != want:
                out["error"] = f"status {r.status_code} (wanted {want}): {r.text[:200]}"
            elif kind == "bad":
                if set(r.json().get("error", {})) != {"message", "type", "param", "code"}:
                    out["error"] = f"error body {r.text[:200]}"
            else:
                out["completion_tokens"] = usage = r.json()["usage"]["completion_tokens"]
                if not 0 <= usage <= body["max_tokens"] or r.json()["choices"][0]["finish_reason"] is None:
                    out["error"] = f"bad usage/finish_reason: {r.text[:200]}"
        else:
            async with client.stream("POST", path, json=body | {"stream_options": {"include_usage": True}}) as r:
                if r.status_code != 200:
                    out["error"] = f"status {r.status_code}: {(await r.aread())[:200]!r}"
                    return out
                done, finish = False, None
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        out["error"] = f"stream error {chunk['error']}"
                        break
                    if out["ttft_s"] is None:
                        out["ttft_s"] = time.perf_counter() - t0
                    if kind == "abandon":
                        break   # hang up after the first chunk: the server must free the engine
                    if chunk["choices"]:
                        finish = chunk["choices"][0]["finish_reason"] or finish
                    if chunk.get("usage"):
                        out["completion_tokens"] = chunk["usage"]["completion_tokens"]
                if kind == "ok" and out["error"] is None and not (done and finish):
                    out["error"] = f"stream ended without [DONE]/finish_reason (done={done}, finish={finish})"
    except (httpx.HTTPError, ValueError, KeyError) as e:
        out["error"] = f"{type(e).__name__}: {e}"
    out["latency_s"] = time.perf_counter() - t0
    return out


async def soak(url: str, requests: int, concurrency: int, max_tokens: int, abandon: float, bad: float,
               timeout: float) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        todo = iter(range(requests))
        results: list[dict] = []

        async def worker() -> None:
            for i in todo:
                results.append(await one(client, *plan(i, model, max_tokens, abandon, bad)))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        await asyncio.sleep(0.5)   # let the last abandoned stream's cancellation land
        health = (await client.get("/health")).status_code
        metrics = (await client.get("/metrics")).text

    def pct(xs: list[float], q: float) -> float | None:
        return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else (xs or [None])[0]

    ok = [r for r in results if r["kind"] == "ok" and r["error"] is None]
    lat = [r["latency_s"] for r in ok]
    ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    errors = [r for r in results if r["error"]]
    gauge = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
             if line.startswith(("hobbit_queue_depth ", "hobbit_requests_running ", "hobbit_requests_total{"))}
    return dict(
        model=model, requests=requests, concurrency=concurrency, max_tokens=max_tokens, wall_s=wall,
        requests_per_s=requests / wall, completion_tokens_per_s=sum(r["completion_tokens"] for r in ok) / wall,
        latency_p50_s=pct(lat, 50), latency_p99_s=pct(lat, 99), ttft_p50_s=pct(ttft, 50), ttft_p99_s=pct(ttft, 99),
        counts={k: sum(r["kind"] == k for r in results) for k in ("ok", "abandon", "bad")},
        errors=len(errors), error_samples=[r["error"] for r in errors[:5]],
        health_after=health, queue_depth_after=gauge.get("hobbit_queue_depth"),
        running_after=gauge.get("hobbit_requests_running"),
        server_cancelled=gauge.get('hobbit_requests_total{finish_reason="cancelled"}', 0.0))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store", nargs="?", help="expert store to serve in this process")
    ap.add_argument("--url", help="soak a running server instead (127.0.0.1 only)")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--abandon", type=float, default=0.05, help="share of clients that hang up mid-stream")
    ap.add_argument("--bad", type=float, default=0.05, help="share of invalid requests (expected 400)")
    ap.add_argument("--timeout", type=float, default=120.0, help="per-request timeout, seconds")
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--policy", default="lru")
    ap.add_argument("--json", default="runs/soak_server.json")
    a = ap.parse_args()
    if (a.store is None) == (a.url is None):
        ap.error("give either STORE or --url")
    if a.url and urlparse(a.url).hostname != HOST:
        ap.error(f"--url must point at {HOST}")
    args = (a.requests, a.concurrency, a.max_tokens, a.abandon, a.bad, a.timeout)
    if a.url:
        result = asyncio.run(soak(a.url.rstrip("/"), *args))
    else:
        import torch
        torch.set_num_threads(1)
        with serve_in_thread(a.store, a.budget, a.policy) as url:
            result = asyncio.run(soak(url, *args))
    result |= dict(store=a.store, url=a.url, budget=a.budget if a.store else None,
                   policy=a.policy if a.store else None,
                   machine=dict(platform=platform.platform(), python=platform.python_version()))
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(result, indent=1))
    print(f"{a.requests} requests x{a.concurrency}: {result['requests_per_s']:.2f} req/s, "
          f"latency p50 {result['latency_p50_s']:.3f} s p99 {result['latency_p99_s']:.3f} s, "
          f"errors {result['errors']} -> {a.json}")
    for sample in result["error_samples"]:
        print("  error:", sample)
    return 1 if result["errors"] or result["health_after"] != 200 else 0


if __name__ == "__main__":
    sys.exit(main())
