"""What `hobbit tune` measures with the live engine: a calibration routing trace and a time model.

The trace: the engine (policy lru, full precision, at the budget) reads calibration text,
teacher-forced: per sequence one prefill step of `prompt_len` tokens, then one decode step per
following token. The default text is the train split of Austen's *Emma* (`hobbit.models.assets`),
kept apart from evaluation text; `--text FILE` uses a file.

The time model (`hobbit.lab.timeline.TimeModel`), measured on the same engine and machine: per
stored precision, one blob read into a slot ready to compute (the expansion a non-zero-copy format
needs included) and one expert's compute for one token, as `hobbit study` times them
(`study_measure.kernel_times`); the LM head for one token; and per MoE layer call what is left of
the calibration run's own decode compute (wall time less the waits for reads) once the LM head and
the experts are taken out: attention, router, norms and the scheduler's Python, as the engine runs
them under load. `fit_reads` then scales the reads to the run itself.

The quality probe (`quality_probe`): tune's perplexity limit, measured on the calibration text's tokens
after the trace's with both tiers resident (`study_measure.RuleQuality`), where they fit in RAM.
"""
from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

from hobbit.lab.simulate import simulate
from hobbit.lab.timeline import TimeModel
from hobbit.runtime.options import Options
from hobbit.runtime.trace import LayerCall
from hobbit.store.dense import meminfo_bytes
from hobbit.store.format import ExpertStore

DEFAULT_TEXT = "austen:emma"


def calibration_ids(tokenizer, text: str | Path | None, tokens: int) -> tuple[list[int], str]:
    """The first `tokens` tokens of the calibration text, and a label naming it."""
    from hobbit.models import assets
    spec = str(text) if text is not None else DEFAULT_TEXT
    is_file = Path(spec).is_file()
    try:
        path = assets.text_file(spec, split="all" if is_file else "train")
    except assets.AssetError as e:
        raise RuntimeError(f"could not get the calibration text {spec!r} ({e}); pass --text FILE with a "
                           f"plain-text file instead") from e
    chars = max(4096, tokens * 8)
    with open(path, encoding="utf-8", errors="replace") as f:
        body = f.read(chars)
        ids = tokenizer.encode(body, add_special_tokens=False)
        while len(ids) < tokens:  # rarely: a text that tokenizes into few tokens per character
            more = f.read(chars)
            if not more:
                break
            body += more
            ids = tokenizer.encode(body, add_special_tokens=False)
    label = f"{spec} (train split)" if not is_file else spec
    return ids[:tokens], label


def record_calibration(store: str | Path, budget, trace_path: str | Path, text=None, tokens: int = 256,
                       seq_len: int = 128, prompt_len: int = 16, high: str | None = None,
                       progress=None, **engine_knobs) -> dict:
    """Run the engine (policy lru, full precision) over the calibration text, teacher-forced, recording
    the routing trace to `trace_path`, then measure the time model. Returns what was recorded, the
    time model as a dict under "time_model". `engine_knobs`: RunConfig's engine group (dtype, threads, ...)."""
    import torch

    from hobbit.runtime.engine import load
    engine = load(store, budget=budget, policy="lru", high=high, trace=trace_path, **engine_knobs)
    try:
        if not engine.config.num_experts:
            raise ValueError(f"{store} holds a dense model: there are no experts to tune for")
        if engine.tokenizer is None:
            raise ValueError(f"{store} has no tokenizer.json, so `hobbit tune` cannot encode calibration text; "
                             f"convert a model folder that has tokenizer files")
        ids, label = calibration_ids(engine.tokenizer, text, tokens)
        seq_len = min(seq_len, engine.max_context)
        prompt_len = max(1, min(prompt_len, seq_len - 1))
        if len(ids) < prompt_len + 1:
            raise ValueError(f"the calibration text gives only {len(ids)} tokens; need at least {prompt_len + 1}")
        t0 = time.perf_counter()
        chunks = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]
        chunks = [c for c in chunks if len(c) > prompt_len] or [ids[:seq_len]]
        stats = engine.provider.stats
        decode_s = decode_wait_s = 0.0
        with torch.inference_mode():
            for n, chunk in enumerate(chunks):
                if progress:
                    progress(f"calibration sequence {n + 1}/{len(chunks)} ({len(chunk)} tokens)")
                seq = engine.sequence()
                seq.step(torch.tensor(chunk[:prompt_len]), last_only=True)
                for pos in range(prompt_len, len(chunk)):
                    t1, w1 = time.perf_counter(), stats.loader_wait_s
                    seq.step(torch.tensor(chunk[pos:pos + 1]))
                    decode_s += time.perf_counter() - t1
                    decode_wait_s += stats.loader_wait_s - w1
        decode_tokens = sum(len(c) - prompt_len for c in chunks)
        record_s = time.perf_counter() - t0
        if progress:
            progress("measuring reads, expert and LM-head compute for the time model")
        model = measure_time_model(engine, (decode_s - decode_wait_s) * 1e3 / max(1, decode_tokens))
        return dict(text=label, tokens=sum(len(c) for c in chunks), sequences=len(chunks), seq_len=seq_len,
                    prompt_len=prompt_len, trace_policy="lru", high=engine.provider.opt.high,
                    budget_bytes=engine.budget_bytes, record_s=round(record_s, 3),
                    decode_ms_per_token=decode_s * 1e3 / max(1, decode_tokens),
                    decode_wait_ms_per_token=decode_wait_s * 1e3 / max(1, decode_tokens),
                    time_model=model.as_dict())
    finally:
        engine.close()


def measure_time_model(engine, compute_ms: float) -> TimeModel:
    """The time model of `engine`'s store on this machine (module docstring); `compute_ms`: the
    engine's own decode compute per token (wall less read waits)."""
    import torch

    from hobbit.lab.study_measure import kernel_times
    kern = kernel_times(engine.store.path, list(engine.store.precisions), dtype=engine.dtype)
    cfg, model = engine.config, engine.model
    x = torch.randn(1, cfg.hidden_size, dtype=engine.dtype)  # one token's last hidden state
    with torch.inference_mode():
        model.lm_head(model.norm(x))  # warm
        t0 = time.perf_counter()
        for _ in range(5):
            model.lm_head(model.norm(x))
        step_ms = (time.perf_counter() - t0) * 1e3 / 5
    read_ms = {p: k["load_ms"] for p, k in kern.items()}
    expert_ms = {p: k["expert_ms"] for p, k in kern.items()}
    per_token = len(cfg.sparse_layers)
    high = engine.provider.opt.high
    layer_ms = max(0.0, compute_ms - step_ms - per_token * cfg.top_k * expert_ms[high]) / per_token
    return TimeModel(read_ms, layer_ms, expert_ms, step_ms)


def fit_reads(model: TimeModel, header: dict, calls: list[LayerCall], budget_bytes: int, high: str,
              observed_ms: float, tries: int = 6) -> tuple[TimeModel, dict]:
    """Scale every read time by one factor so that the calibration run, replayed under the model (policy lru
    at `high`), decodes in the `observed_ms` per token it took live. Reads timed one by one say little of
    what the engine's own reads cost (its loader threads, its overlap, a disk shared with other work); the
    run itself does. The measured reads keep their ratios (int2 against int4, ...). Returns the fitted
    model and {scale, observed_ms, modeled_ms} (modeled: the fitted model's replay)."""
    def modeled(scale: float) -> float:
        m = replace(model, read_ms={p: t * scale for p, t in model.read_ms.items()})
        r = simulate(header, calls, Options(policy="lru", high=high), budget_bytes, time_model=m)
        return r["modeled"]["decode_ms_per_token"] or 0.0
    lo, hi = 0.0, 1.0
    t_lo, t_hi = modeled(lo), modeled(hi)  # compute alone; the reads as measured
    scale, t = hi, t_hi
    for _ in range(tries):  # secant steps: the time is close to linear in the scale
        if abs(t - observed_ms) <= 0.005 * observed_ms or t_hi == t_lo:
            break
        scale = max(0.0, lo + (observed_ms - t_lo) * (hi - lo) / (t_hi - t_lo))
        t = modeled(scale)
        lo, t_lo, hi, t_hi = hi, t_hi, scale, t
    fitted = replace(model, read_ms={p: v * scale for p, v in model.read_ms.items()})
    return fitted, dict(scale=scale, observed_ms=observed_ms, modeled_ms=t)


def quality_probe(store: Path, text, tokens: int, quality_tokens: int, window: int, high: str, low: str,
                  max_dppl: float, progress, engine_knobs: dict):
    """(RuleQuality or None, what to record of it). Its windows are the calibration text's tokens after the
    first `tokens` (the trace's), so the limit is not judged on what the trace was recorded on."""
    if math.isinf(max_dppl):
        return None, dict(note="no perplexity limit (max_dppl inf)")
    from hobbit.lab.study_measure import RuleQuality
    from hobbit.runtime.tokenizer import Tokenizer
    with ExpertStore(store) as es:
        need = es.total_nbytes(high) + es.total_nbytes(low) + 2 * es.manifest.get("dense_bytes", 0)
    avail = meminfo_bytes("MemAvailable")
    if avail is not None and need > 0.9 * avail:
        note = (f"perplexity limit not checked: both tiers resident need {need / 2**30:.1f} GiB, "
                f"{avail / 2**30:.1f} GiB available; the share limits alone apply (lower --max-low to be safe)")
        if progress:
            progress(note)
        return None, dict(note=note)
    ids, label = calibration_ids(Tokenizer.from_dir(store), text, tokens + quality_tokens)
    ids = ids[tokens:]
    if len(ids) < 2:
        raise ValueError(f"the calibration text has no tokens after the first {tokens} to check quality on; "
                         f"pass a longer --text, or --max-dppl inf")
    if progress:
        progress(f"quality limit: perplexity +{max_dppl:g}% on {len(ids)} held-aside tokens of {label}")
    return RuleQuality(store, ids, window, high, low, **engine_knobs), dict(
        text=label, tokens=len(ids), window=window, max_dppl=max_dppl)
