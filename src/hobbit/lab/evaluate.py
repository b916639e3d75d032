"""Perplexity and top-1 agreement over sliding windows of real text (`hobbit eval`).

Strided evaluation as in Hugging Face's perplexity guide: windows of `window` tokens start every
`stride` tokens; each window scores only the targets the previous window did not, so no token is
scored twice and each has at least `window - stride` tokens of context (when that many precede it).
A window's first token has no context in it and is never scored: with stride < window every token
after the first is scored once; with disjoint windows (stride = window) each window's first is not.

    eng = hobbit.load(store, budget="25%", policy="hobbit")
    ids = text_token_ids(eng.tokenizer, "austen:emma", max_tokens=4096)
    res = evaluate_ppl(eng, ids, window=512, stride=256)   # res["ppl"], res["tokens"], res["hit_rate"]
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from hobbit.models.assets import SPLITS, text_file
from hobbit.runtime.config import RunConfig, add_json_arg, add_run_args, emit_json
from hobbit.runtime.engine import Engine, load
from hobbit.runtime.tokenizer import Tokenizer

_COUNTERS = ("hits", "misses", "bytes_read", "skipped", "selections", "loader_wait_s", "little_steps", "fallbacks")


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) per window over n tokens. Targets first..end-1 are scored
    (token p predicted from the logits at p-1): those the previous window left, minus the window's own
    first token."""
    if window < 2 or not 1 <= stride <= window:
        raise ValueError(f"need window >= 2 and 1 <= stride <= window, got window {window}, stride {stride}")
    out, prev_end, begin = [], 1, 0
    while prev_end < n:
        end = min(begin + window, n)
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end, begin = end, begin + stride
    return out


def text_token_ids(tokenizer: Tokenizer | None, text: str | Path, max_tokens: int | None = None,
                   split: str = "test") -> list[int]:
    """Token ids of a text asset ('austen', 'austen:<novel>', 'wiki') or file, cut to max_tokens.
    Only as much text as needed is encoded."""
    if tokenizer is None:
        raise ValueError("the store has no tokenizer.json, so text can't be encoded; convert a model folder "
                         "that has tokenizer files")
    body = text_file(text, split=split).read_text(encoding="utf-8")
    if max_tokens is None:
        return tokenizer.encode(body)
    chars = 8 * max_tokens
    while True:  # grow the prefix until it holds max_tokens (or is the whole text)
        ids = tokenizer.encode(body[:chars])
        if len(ids) > max_tokens or chars >= len(body):
            return ids[:max_tokens]
        chars *= 4


def _counters(engine: Engine) -> dict:
    s = engine.stats()
    return {k: s[k] for k in _COUNTERS}


def evaluate_ppl(engine: Engine, token_ids: list[int], window: int = 512, stride: int | None = None,
                 max_tokens: int | None = None, progress: bool = False, keep_predictions: bool = False,
                 stepwise: bool = False) -> dict:
    """Perplexity of `engine` on token_ids (cut to max_tokens) over strided windows (stride defaults
    to window, i.e. disjoint windows). Returns ppl, nll (sum over scored tokens), tokens (scored),
    windows, expert counters of the pass (hits, misses, hit_rate, bytes_read, ...), seconds; with
    keep_predictions also `predictions`: the argmax next-token id at every scored position. stepwise
    scores token by token as decoding runs (see Engine.logits): slower, but what HOBBIT's per-token
    precision choice does to quality."""
    ids = list(token_ids[:max_tokens] if max_tokens is not None else token_ids)
    stride = stride or window
    if window > engine.max_context:
        raise ValueError(f"window {window} exceeds the engine's context of {engine.max_context} tokens")
    if len(ids) < 2:
        raise ValueError(f"need at least 2 tokens to score, got {len(ids)}")
    spans = windows(len(ids), window, stride)
    before = _counters(engine)
    nll, preds = 0.0, []
    t0 = time.perf_counter()
    for begin, end, first in tqdm(spans, desc=f"ppl {engine.policy}", unit="window", disable=not progress):
        logits = engine.logits(ids[begin:end], stepwise)[first - 1 - begin:end - 1 - begin]  # predicts ids[first:end]
        target = torch.tensor(ids[first:end])
        nll += float(F.cross_entropy(logits.double(), target, reduction="sum"))
        if keep_predictions:
            preds.extend(logits.argmax(-1).tolist())
    seconds = time.perf_counter() - t0
    delta = {k: v - before[k] for k, v in _counters(engine).items()}
    scored = sum(end - first for _, end, first in spans)
    out = dict(ppl=math.exp(nll / scored), nll=nll, tokens=scored, windows=len(spans), window=window, stride=stride,
               policy=engine.policy, budget_bytes=engine.budget_bytes, stepwise=stepwise, seconds=seconds, tokens_per_s=scored / seconds,
               hit_rate=delta["hits"] / max(1, delta["hits"] + delta["misses"]), **delta)
    if keep_predictions:
        out["predictions"] = preds
    return out


def agreement(predictions: list[int], reference: list[int]) -> float:
    """Share of positions where two argmax prediction lists agree."""
    if len(predictions) != len(reference) or not reference:
        raise ValueError(f"prediction lists must be non-empty and equally long ({len(predictions)} vs {len(reference)})")
    return sum(a == b for a, b in zip(predictions, reference)) / len(reference)


def top1_agreement(engine: Engine, reference: Engine, token_ids: list[int], window: int = 512,
                   stride: int | None = None, max_tokens: int | None = None, stepwise: bool = False) -> float:
    """Share of scored positions where `engine`'s argmax next token equals `reference`'s (usually the
    resident engine at the highest stored precision), teacher-forced on the same windows."""
    runs = [evaluate_ppl(e, token_ids, window, stride, max_tokens, keep_predictions=True, stepwise=stepwise)
            for e in (engine, reference)]
    return agreement(runs[0]["predictions"], runs[1]["predictions"])


# -- `hobbit eval` -------------------------------------------------------------------------------
def add_text_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    """--text/--split/--window/--stride/--max-tokens, shared with `hobbit bench`."""
    p.add_argument("--text", default="austen:emma", help="austen, austen:<novel>, wiki, or a UTF-8 file "
                   "(default austen:emma)")
    p.add_argument("--split", default="test", choices=tuple(SPLITS), help="part of the text: test = last 10%% "
                   "of its lines, held out from MoEfication calibration (default test); all for a whole file")
    p.add_argument("--window", type=int, default=512, help="tokens per window (default 512, capped at the context)")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: the window)")
    p.add_argument("--max-tokens", type=int, default=max_tokens, help=f"tokens of text to score (default {max_tokens})")
    p.add_argument("--stepwise", action="store_true", help="score token by token as decoding does, so each token "
                   "picks its own expert precisions (slower; the honest quality of hobbit/--little)")


def add_eval_args(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="perplexity over sliding windows of a text, with expert-cache stats")
    add_run_args(p)
    add_text_args(p, max_tokens=4096)
    add_json_arg(p)
    p.set_defaults(func=cmd_eval)
    return p


def cmd_eval(args: argparse.Namespace) -> int:
    with load(args.store, config=RunConfig.from_args(args)) as engine:
        ids = text_token_ids(engine.tokenizer, args.text, args.max_tokens, args.split)
        window = min(args.window, engine.max_context)
        res = evaluate_ppl(engine, ids, window, min(args.stride or window, window), progress=args.json != "-",
                           stepwise=args.stepwise)
    res.update(text=str(args.text), split=args.split, store=str(args.store))
    if not emit_json(args, res):
        budget = f"{res['budget_bytes'] / 2**20:.1f} MiB" if res["budget_bytes"] is not None else "-"
        print(f"ppl {res['ppl']:.4f} over {res['tokens']} tokens of {args.text} ({args.split}), {res['windows']} "
              f"windows of {res['window']} (stride {res['stride']})\npolicy {res['policy']}, budget {budget}, "
              f"hit rate {res['hit_rate']:.1%}, read {res['bytes_read'] / 2**20:.1f} MiB, "
              f"{res['seconds']:.1f} s ({res['tokens_per_s']:.1f} tok/s)")
    return 0
