"""`hobbit bench`: speed and quality of expert-cache policies across budgets, in one process.

    hobbit bench STORE --budget 10%,25%,50% --policies resident,ondemand,lru,lru+prefetch,belady,hobbit \
        --text austen:emma --json bench.json --plot bench.png

Every configuration (policy, budget) runs the same prompts, cut from real text with the store's
tokenizer, at every (prompt length, output length) pair (the HOBBIT paper's 16/128 prompt and 32/128
output tokens by default). A run loads a fresh engine, warms it up on a short prompt, drops the
store's page cache and times one greedy generation; configurations take turns (round-robin, the
order rotated every round) so drift hits all alike. resident and ondemand keep no cache, so they run
once rather than per budget. belady (offline optimal eviction) replays a routing trace that an
untimed lru run records on the same calls first. Quality is measured once per configuration on the
same text: strided-window perplexity and teacher-forced top-1 agreement against the resident engine
at the highest stored precision.
"""
from __future__ import annotations

import argparse
import gc
import itertools
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from hobbit import kernels
from hobbit.runtime.engine import load
from hobbit.lab.bench_report import format_profiles, format_table, plot
from hobbit.lab.profile import profile_decode
from hobbit.lab.evaluate import add_text_args, agreement, evaluate_ppl, text_token_ids
from hobbit.runtime.config import RunConfig, add_json_arg, add_run_args, emit_json
from hobbit.runtime.options import MOBILE_POLICIES, NO_CACHE_POLICIES, POLICIES
from hobbit.store.dense import meminfo_bytes
from hobbit.store.format import ExpertStore, checksum
from hobbit.runtime.trace import belady_accesses, read_trace

_SUMS = ("prompt_tokens", "generated_tokens", "decode_tokens", "prefill_s", "decode_s", "hits", "misses",
         "bytes_read", "loader_wait_s", "skipped", "selections", "little_steps", "fallbacks", "fallback_redone",
         "fallback_prefetch_issued", "fallback_prefetch_used", "fallback_prefetch_withheld",
         "fallback_prefetch_cancelled", "fallback_bytes_saved",
         "fallback_reused")
WARMUP_TOKENS = 8  # warm-up prompt length; it generates 4 tokens
MOBILE_KNOBS = ("gamma", "fallback_prefetch", "little_weights")  # comma lists: one configuration per combination
# the full-precision reference of ppl delta and top-1: experts at the highest stored precision with the dense
# weights as stored, or with the stored dense weights and LM head dequantized to bf16 (plain bf16 matmuls)
REFERENCES = ("stored", "bf16")


@dataclass(frozen=True)
class Config:
    policy: str
    budget: str | None  # as given ("25%", "512MiB"); None: the policy keeps no cache
    variant: tuple[tuple[str, object], ...] = ()  # MoBiLE policies: ((knob, value), ...) of MOBILE_KNOBS

    @property
    def name(self) -> str:
        """The policy, and its variant as the table and plot label it: 'hobbit+mobile gamma=0.5'."""
        return " ".join([self.policy, *(f"{k}={v}" for k, v in self.variant)])


@dataclass
class Settings:
    """What every run shares: the store, engine options, prompts and the quality text."""
    store: str
    engine: dict  # load() keywords besides policy and budget
    warmup: list[int]
    items: list[tuple[list[int], int]]  # (prompt ids, max new tokens)
    eval_ids: list[int]
    window: int
    stride: int
    stepwise: bool = False
    profile: int = 0  # decode tokens to profile per configuration (hobbit profile's split), 0 = none
    reference: str = "stored"  # the quality reference: REFERENCES


def configs(policies: list[str], budgets: list[str], variants: list[dict] | None = None) -> list[Config]:
    """Each policy at each budget (policies without a cache once); MoBiLE policies once per variant (a dict
    of MOBILE_KNOBS values; the engine's defaults when none)."""
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown policies {', '.join(unknown)}; choose from {', '.join(POLICIES)}")
    mobile = [tuple(v.items()) for v in variants or [{}]]
    return [Config(p, b, v) for p in dict.fromkeys(policies)
            for b in ([None] if p in NO_CACHE_POLICIES else budgets)
            for v in (mobile if p in MOBILE_POLICIES else [()])]


def cut_prompts(ids: list[int], prompt_lens: list[int], output_lens: list[int],
                per_pair: int) -> list[tuple[list[int], int]]:
    """per_pair prompts for each (prompt length, output length), cut at evenly spaced offsets of ids."""
    pairs = [(p, o) for p in prompt_lens for o in output_lens]
    count = len(pairs) * per_pair
    longest = max(prompt_lens)
    if len(ids) < longest:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than the longest prompt ({longest})")
    step = (len(ids) - longest) // max(1, count - 1)
    return [(ids[i * step:i * step + p], o) for i, (p, o) in enumerate(pairs * per_pair)]


def machine_info(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return dict(cpu=cpu, cores=os.cpu_count(), ram_bytes=meminfo_bytes("MemTotal"), torch=torch.__version__, threads=threads,
                native_kernels=kernels.variant(), platform=platform.platform(), python=platform.python_version())


def model_info(store: ExpertStore) -> dict:
    c = store.manifest["config"]
    return dict(name=store.path.resolve().name, store=str(store.path), arch=c["arch"], num_layers=c["num_layers"],
                sparse_layers=len(c["sparse_layers"]), num_experts=c["num_experts"], top_k=c["top_k"],
                precisions=store.precisions, expert_bytes={p: store.total_nbytes(p) for p in store.precisions},
                dense_bytes=(store.path / store.manifest["dense_file"]).stat().st_size)


def session(s: Settings, cfg: Config, item: tuple[list[int], int], quality: bool,
            trace: Path | None = None, belady: list | None = None) -> tuple[dict, dict | None, dict]:
    """One engine's life: warm-up, page cache dropped, one timed generation, then (quality) the eval
    windows and (s.profile) the time split of s.profile decode tokens after the same prompt. Returns
    (generation stats, quality result or None, engine facts: budget_bytes, tuned, profile)."""
    policy, opts = cfg.policy, dict(s.engine, **dict(cfg.variant))
    if trace is not None:
        policy, opts["trace"] = "lru", trace
    if belady is not None:
        opts["eviction_options"] = {"trace": belady}
    with load(s.store, budget=cfg.budget, policy=policy, **opts) as eng:
        eng.generate(s.warmup, max_new_tokens=4, stop_token_ids=[])
        eng.store.drop_page_cache()
        prompt, new = item
        stats = eng.generate(prompt, max_new_tokens=new, stop_token_ids=[]).stats
        q = evaluate_ppl(eng, s.eval_ids, s.window, s.stride, keep_predictions=True, stepwise=s.stepwise) \
            if quality else None
        split = profile_decode(eng, prompt, s.profile)["ms_per_token"] if quality and s.profile else None
        return stats, q, dict(budget_bytes=eng.budget_bytes, tuned=eng.tuned, profile=split)


def run_config(s: Settings, cfg: Config, item: tuple[list[int], int], quality: bool,
               tmp: Path) -> tuple[dict, dict | None, dict]:
    if cfg.policy != "belady":
        return session(s, cfg, item, quality)
    path = tmp / "trace.jsonl.gz"
    session(s, cfg, item, quality, trace=path)  # untimed lru run on the same calls, recording the routing
    return session(s, cfg, item, quality, belady=belady_accesses(read_trace(path)[1]))


def sample(stats: dict) -> dict:
    keep = [k for k in _SUMS if k != "decode_tokens"] + ["hits_by_precision", "misses_by_precision"]
    return dict({k: stats[k] for k in keep}, decode_tokens=max(0, stats["generated_tokens"] - 1))


def summarize(cfg: Config, info: dict, total: int, samples: list[dict], q: dict, ref: dict) -> dict:
    """One run record: sums over the samples, then the ratios the table prints (info: from session)."""
    t = {k: sum(x[k] for x in samples) for k in _SUMS}
    prefill_s, decode_s = t.pop("prefill_s"), t.pop("decode_s")  # totals
    by = {k: {} for k in ("hits_by_precision", "misses_by_precision")}
    for x in samples:
        for k in by:
            for p, n in x[k].items():
                by[k][p] = by[k].get(p, 0) + n
    precs = sorted(set(by["hits_by_precision"]) | set(by["misses_by_precision"]))
    hit_by = {p: by["hits_by_precision"].get(p, 0) / max(1, by["hits_by_precision"].get(p, 0)
                                                          + by["misses_by_precision"].get(p, 0)) for p in precs}
    budget_bytes, fraction = None, None  # ondemand keeps nothing
    if cfg.policy == "resident":
        budget_bytes, fraction = total, 1.0
    elif cfg.budget is not None:
        budget_bytes = info["budget_bytes"]
        fraction = budget_bytes / total
    tokens, seconds = t["prompt_tokens"] + t["generated_tokens"], prefill_s + decode_s
    return dict(
        policy=cfg.policy, variant=dict(cfg.variant), name=cfg.name, budget=cfg.budget, budget_bytes=budget_bytes,
        budget_fraction=fraction,
        prefill_s=prefill_s / len(samples), decode_tok_s=t["decode_tokens"] / decode_s if decode_s else 0.0,
        hit_rate=t["hits"] / max(1, t["hits"] + t["misses"]), hit_rate_by_precision=hit_by,
        bytes_per_token=t["bytes_read"] / tokens, loader_wait_frac=t["loader_wait_s"] / seconds,
        skipped_frac=t["skipped"] / max(1, t["selections"]),
        # MoBiLE: share of little passes redone big, and of the reads queued for them that a fallback used
        fallback_rate=t["fallbacks"] / t["little_steps"] if t["little_steps"] else None,
        fallback_prefetch_used_frac=t["fallback_prefetch_used"] / t["fallback_prefetch_issued"]
        if t["fallback_prefetch_issued"] else None,
        # ... and of those reads, the share an accepted token cancelled before the loader started them
        fallback_prefetch_cancelled_frac=t["fallback_prefetch_cancelled"] / t["fallback_prefetch_issued"]
        if t["fallback_prefetch_issued"] else None,
        fallback_bytes_saved_per_token=t["fallback_bytes_saved"] / tokens,
        eval_fallback_rate=q["fallbacks"] / q["little_steps"] if q.get("little_steps") else None,
        ppl=q["ppl"], ppl_full_precision=ref["ppl"], ppl_delta_pct=100 * (q["ppl"] / ref["ppl"] - 1),
        top1_agreement=agreement(q["predictions"], ref["predictions"]),
        tokens=tokens, seconds=seconds, prefill_s_total=prefill_s, decode_s_total=decode_s, **t, **by,
        eval_tokens=q["tokens"], eval_nll=q["nll"], eval_windows=q["windows"], tuned=info["tuned"],
        profile_ms_per_token=info["profile"], samples=samples)


def bench(s: Settings, cfgs: list[Config], repeats: int, total: int,
          log: Callable[[str], None] = print) -> tuple[list[dict], list[dict]]:
    """All configurations, interleaved: returns (run records, configurations that could not run)."""
    dense = "bf16" if s.reference == "bf16" else None
    with load(s.store, policy="resident", **dict(s.engine, high=None, dense=dense, lm_head=dense)) as ref_engine:
        log(f"reference: resident at {ref_engine.provider.opt.high}, dense {dense or 'as stored'}, "
            f"{len(s.eval_ids)} tokens")
        ref = evaluate_ppl(ref_engine, s.eval_ids, s.window, s.stride, keep_predictions=True, stepwise=s.stepwise)
    del ref_engine  # its resident pools hold every expert: freed now, not when the whole bench returns
    gc.collect()
    samples: dict[Config, list[dict]] = {c: [] for c in cfgs}
    quality, info, failed = {}, {}, []
    active = list(cfgs)
    rounds = [(r, i) for r in range(repeats) for i in range(len(s.items))]
    with tempfile.TemporaryDirectory(prefix="hobbit-bench-") as tmp:
        for n, (r, i) in enumerate(rounds):
            turn = n % max(1, len(active))  # rotate who goes first
            for cfg in active[turn:] + active[:turn]:
                try:
                    stats, q, facts = run_config(s, cfg, s.items[i], cfg not in quality, Path(tmp))
                    info.setdefault(cfg, facts)  # the first run's: it also measured quality and the profile
                except ValueError as e:  # e.g. a budget below one layer's active experts
                    failed.append(dict(policy=cfg.policy, variant=dict(cfg.variant), budget=cfg.budget, error=str(e)))
                    active.remove(cfg)
                    log(f"skipping {cfg.name} at {cfg.budget}: {e}")
                    continue
                if q is not None:
                    quality[cfg] = q
                samples[cfg].append(dict(sample(stats), repeat=r, item=i))
                log(f"[{n + 1}/{len(rounds)}] {cfg.name:>12} {cfg.budget or '-':>7} prompt {len(s.items[i][0]):>4} "
                    f"+{stats['generated_tokens']:>4}: {stats['decode_tok_s']:7.2f} tok/s, hit {stats['hit_rate']:.0%}")
    runs = [summarize(c, info[c], total, samples[c], quality[c], ref) for c in cfgs if c in active]
    return runs, failed


def load_overhead(store_path: str, runs: list[dict]) -> dict | None:
    """What a load costs beyond its read: (ondemand - resident) seconds per decode token over the time
    this disk takes to read that token's blobs (top_k x sparse layers at the high precision, read one
    by one with O_DIRECT like the loader does). 1.0 = loading costs exactly the raw reads. Also what
    verifying a blob's checksum costs, as a share of its read time (hash GB/s on a blob in RAM)."""
    by = {x["policy"]: x for x in runs}
    if not {"resident", "ondemand"} <= by.keys() or not by["ondemand"]["decode_tok_s"]:
        return None
    with ExpertStore(store_path) as store:
        c, high = store.manifest["config"], store.precisions[0]
        token_bytes = c["top_k"] * len(c["sparse_layers"]) * store.expert_nbytes(high)
        gbps = store.read_bandwidth(high) / 1e9
        blob = os.urandom(store.expert_nbytes(high))
        t0 = time.perf_counter()
        for _ in range(64):
            checksum(blob)
        hash_gbps = 64 * len(blob) / (time.perf_counter() - t0) / 1e9
    extra = 1 / by["ondemand"]["decode_tok_s"] - 1 / by["resident"]["decode_tok_s"]
    raw = token_bytes / (gbps * 1e9)
    return dict(ondemand_s_per_token=1 / by["ondemand"]["decode_tok_s"],
                resident_s_per_token=1 / by["resident"]["decode_tok_s"], bytes_per_token=token_bytes,
                disk_read_gbps=gbps, raw_read_s_per_token=raw, load_overhead_ratio=extra / raw,
                checksum_gbps=hash_gbps, checksum_cost=gbps / hash_gbps)


# -- `hobbit bench` ------------------------------------------------------------------------------
def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def mobile_variants(args: argparse.Namespace) -> list[dict]:
    """Every combination of the MOBILE_KNOBS lists given (--gamma 0.7,0.5 --fallback-prefetch fit,always: 4)."""
    lists = [[(k, float(x) if k == "gamma" else x.strip()) for x in v.split(",") if x.strip()]
             for k in MOBILE_KNOBS if (v := getattr(args, k, None))]
    return [dict(c) for c in itertools.product(*lists)]


def add_bench_args(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="decode speed, cache stats and quality of policies across budgets",
                              conflict_handler="resolve")  # --budget and --policy take lists here
    add_run_args(p)
    p.add_argument("--budget", default="10%,25%,50%", help="comma list of budgets for the caching policies: "
                   "bytes, 512MiB, or %% of expert bytes at the highest precision (default 10%%,25%%,50%%)")
    p.add_argument("--policies", "--policy", default="resident,ondemand,lru,lru+prefetch,belady,hobbit",
                   help=f"comma list from {', '.join(POLICIES)} (default: all but lfu and slru)")
    p.add_argument("--gamma", default=None, help="mobile, hobbit+mobile: comma list of confidence thresholds, one "
                   "configuration each (default 0.7)")
    p.add_argument("--fallback-prefetch", default=None, help="mobile, hobbit+mobile: comma list of fit, always, "
                   "never, one configuration each (default fit)")
    p.add_argument("--little-weights", default=None, help="mobile, hobbit+mobile: comma list of router, rescaled, "
                   "one configuration each (default router)")
    add_text_args(p, max_tokens=512)
    p.add_argument("--reference", choices=REFERENCES, default="stored", help="what ppl delta and top-1 compare "
                   "with: resident at the highest stored expert precision with the dense weights as stored and run "
                   "(stored), or with the stored dense weights and LM head dequantized to bf16 and run by plain bf16 "
                   "matmuls (bf16: the same values without the quantized kernels' arithmetic) (default stored)")
    p.add_argument("--prompt-tokens", default="16,128", help="comma list of prompt lengths (default 16,128)")
    p.add_argument("--max-new-tokens", default="32,128", help="comma list of output lengths (default 32,128)")
    p.add_argument("--prompts", type=int, default=1, help="prompts per (prompt, output) length pair (default 1)")
    p.add_argument("--repeats", type=int, default=1, help="rounds over all prompts (default 1)")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="also split N decode tokens of each "
                   "configuration into attention, router, experts, load wait, scheduler, lm_head, ... (ms)")
    add_json_arg(p, "the results (every run, machine, model, settings)")
    p.add_argument("--plot", default=None, help="write a PNG: tok/s and perplexity delta vs budget")
    p.set_defaults(func=cmd_bench)
    return p


def cmd_bench(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    cfgs = configs([x.strip() for x in args.policies.split(",") if x.strip()],
                   [x.strip() for x in args.budget.split(",") if x.strip()], mobile_variants(args))
    store = ExpertStore(args.store)
    model, total = model_info(store), store.total_nbytes(store.precisions[0])
    store.close()
    # bench sweeps policies, budgets and MoBiLE variants itself
    cfg = RunConfig.from_args(args, policy="hobbit", budget=None, gamma=None, fallback_prefetch=None,
                              little_weights=None)
    engine = dict(dtype=cfg.dtype, dense=cfg.dense, high=cfg.high, low=cfg.low, threads=cfg.threads,
                  direct_io=cfg.direct_io, io_threads=cfg.io_threads,
                  **{k: v for k, v in cfg.engine_kwargs().items()
                     if k not in ("policy", "budget", "dtype", "dense", "high", "low", "threads", "direct_io",
                                  "io_threads")})
    with load(args.store, policy="ondemand", **dict(engine, dense=None)) as probe:  # tokenizer and context only
        prompt_lens, output_lens = _ints(args.prompt_tokens), _ints(args.max_new_tokens)
        if max(prompt_lens) + max(output_lens) > probe.max_context:
            raise ValueError(f"prompt + output tokens exceed the context of {probe.max_context}")
        ids = text_token_ids(probe.tokenizer, args.text, max(args.max_tokens, max(prompt_lens) * 4), args.split)
        window = min(args.window, probe.max_context)
    items = cut_prompts(ids, prompt_lens, output_lens, args.prompts)
    offset = len(ids) // 2 + 1  # the warm-up prompt: a short slice from the middle of the text
    s = Settings(args.store, engine, ids[offset:offset + WARMUP_TOKENS], items, ids[:args.max_tokens], window,
                 min(args.stride or window, window), args.stepwise, args.profile, args.reference)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    runs, failed = bench(s, cfgs, args.repeats, total, log)
    out = dict(machine=machine_info(args.threads), model=model, load_overhead=load_overhead(args.store, runs),
               settings=dict(text=str(args.text), split=args.split, stepwise=args.stepwise,
                             prompt_tokens=prompt_lens, max_new_tokens=output_lens,
                             prompts=args.prompts, repeats=args.repeats, eval_tokens=len(s.eval_ids), window=s.window,
                             stride=s.stride, reference=s.reference, engine=engine),
               runs=runs, failed=failed)
    if emit_json(args, out):
        return 0
    print(format_table(runs))
    if args.profile:
        print(format_profiles(runs))
    if out["load_overhead"]:
        lo = out["load_overhead"]
        print(f"load overhead: ondemand - resident = {1e3 * (lo['ondemand_s_per_token'] - lo['resident_s_per_token']):.2f}"
              f" ms/token; raw reads of its {lo['bytes_per_token'] / 2**20:.2f} MiB at {lo['disk_read_gbps']:.2f} GB/s = "
              f"{1e3 * lo['raw_read_s_per_token']:.2f} ms; ratio {lo['load_overhead_ratio']:.2f}")
    if args.plot:
        plot(runs, args.plot, f"{model['name']} on {model['arch']}, {machine_info(args.threads)['cpu']}")
    return 0
