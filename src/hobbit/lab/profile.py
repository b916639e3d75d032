"""`hobbit profile`: where a decode token's time goes, in ms per token.

Wraps the engine's parts with wall-clock timers for one greedy run (nothing is changed for
normal runs) and splits each decode token into: attention (input norm, qkv, RoPE, KV write,
SDPA, o_proj), router (gate matmul, softmax, top-k), dense MLP (dense layers, shared experts and
post-attention norm), experts compute (the expert FFNs), load wait (the compute thread blocked on
a read), predict (stacked-gate prediction), scheduler (the rest of the expert call: plan, admit,
cache and policy bookkeeping, Python), lm_head (final norm + LM head), sampling, and other (what
is left: embedding, residual adds, the model's Python). Prefill is timed apart and excluded.
"""
from __future__ import annotations

import time
from collections import Counter
from functools import wraps
from typing import Callable

import torch

from hobbit.runtime import offload
from hobbit.runtime.engine import Engine, sample

PARTS = ("attention", "router", "dense_mlp", "experts_compute", "load_wait", "predict", "scheduler",
         "lm_head", "sampling", "other")


def _timed(fn: Callable, acc: Counter, name: str) -> Callable:
    @wraps(fn)
    def run(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            acc[name] += time.perf_counter() - t0
    return run


def profile_decode(engine: Engine, prompt_ids: list[int], tokens: int) -> dict:
    """Greedy decode `tokens` tokens after `prompt_ids` with timers on every part; returns ms per
    decode token per part (keys PARTS) plus totals."""
    model, provider, acc = engine.model, engine.provider, Counter()
    patched: list[tuple[object, str, object]] = []

    def patch(obj, attr: str, name: str) -> None:
        patched.append((obj, attr, obj.__dict__.get(attr)))
        setattr(obj, attr, _timed(getattr(obj, attr), acc, name))

    for block in model.layers:
        patch(block.input_layernorm, "forward", "attention")
        patch(block.self_attn, "forward", "attention")
        patch(block.post_attention_layernorm, "forward", "dense_mlp")
        mlp = block.mlp
        if block.sparse:
            patch(mlp, "route", "router")
            for name in ("shared_expert", "shared_expert_gate"):
                if hasattr(mlp, name):
                    patch(getattr(mlp, name), "forward", "dense_mlp")
        else:
            patch(mlp, "forward", "dense_mlp")
    patch(model.norm, "forward", "lm_head")
    patch(model.lm_head, "forward", "lm_head")
    patch(provider, "experts", "experts")
    if provider.predictor is not None:
        patch(provider, "predictor", "predict")
    weighted = offload._weighted
    offload._weighted = _timed(weighted, acc, "experts_compute")
    try:
        seq = engine.sequence()
        with torch.inference_mode():
            t0 = time.perf_counter()
            logits = seq.step(torch.tensor(prompt_ids), last_only=True)[-1]
            prefill_s = time.perf_counter() - t0
            acc.clear()
            wait0 = provider.stats.loader_wait_s
            t0 = time.perf_counter()
            for _ in range(tokens):
                t1 = time.perf_counter()
                tok = sample(logits, 0.0, 1.0, 0, None)
                acc["sampling"] += time.perf_counter() - t1
                logits = seq.step(torch.tensor([tok]))[-1]
            total = time.perf_counter() - t0
        acc["load_wait"] = provider.stats.loader_wait_s - wait0
    finally:
        offload._weighted = weighted
        for obj, attr, old in reversed(patched):
            if old is None:
                delattr(obj, attr)
            else:
                setattr(obj, attr, old)
    acc["scheduler"] = acc["experts"] - acc["experts_compute"] - acc["load_wait"] - acc["predict"]
    acc["other"] = total - sum(acc[p] for p in PARTS if p != "other")
    ms = {p: acc[p] * 1e3 / tokens for p in PARTS}
    return dict(ms_per_token=ms, total_ms_per_token=total * 1e3 / tokens, decode_tok_s=tokens / total,
                prefill_s=prefill_s, tokens=tokens, prompt_tokens=len(prompt_ids))


def format_profile(r: dict) -> str:
    ms, total = r["ms_per_token"], r["total_ms_per_token"]
    rows = [f"  {p:<16} {ms[p]:8.3f} ms  {ms[p] / total:6.1%}" for p in PARTS]
    return "\n".join([f"  {'decode token':<16} {total:8.3f} ms  ({r['decode_tok_s']:.2f} tok/s)", *rows])
