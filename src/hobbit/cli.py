"""The `hobbit` command."""
from __future__ import annotations

import argparse
import json
import sys

from hobbit.runtime.options import POLICIES


def add_engine_args(p: argparse.ArgumentParser, store: bool = True, policy: str = "lru") -> None:
    """Options every command that loads a store shares."""
    if store:
        p.add_argument("store", help="expert store folder (made by `hobbit convert`)")
    p.add_argument("--budget", default="25%", help="RAM for cached experts: bytes, 512MiB, 2GiB, or 25%% "
                   "of all expert bytes at the highest stored precision (default 25%%)")
    p.add_argument("--policy", default=policy, choices=POLICIES, help=f"expert cache policy (default {policy})")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="compute dtype (default bf16)")
    p.add_argument("--dense", default=None, choices=("bf16", "fp32", "int8", "int4", "auto"),
                   help="precision of the dense (non-expert) weights in RAM (default: as the store holds them)")
    p.add_argument("--mlock", action="store_true", help="lock the dense weights in RAM (needs RLIMIT_MEMLOCK)")
    p.add_argument("--high", default=None, help="precision of full-precision loads (default: highest stored)")
    p.add_argument("--low", default=None, help="precision of low-precision loads (hobbit policy)")
    p.add_argument("--t1", type=float, default=None, help="hobbit Eq. 2: high if score <= T1 (default 0.6 or tuned)")
    p.add_argument("--t2", type=float, default=None, help="hobbit Eq. 2: low if score <= T2, else skip (default 0.9 or tuned)")
    add_little_args(p)
    p.add_argument("--prefetch-depth", type=int, default=None,
                   help="layers ahead to predict and prefetch (default: hobbit 2, lru+prefetch 1, others 0)")
    p.add_argument("--threads", type=int, default=1, help="torch compute threads (default 1; the loader uses another)")
    p.add_argument("--no-direct-io", action="store_true", help="read blobs through the page cache")
    p.add_argument("--io-threads", type=int, default=1, help="blobs read at once by the loader (default 1)")


LITTLE_OPTIONS = ("little", "little_rule", "gamma")


def add_little_args(p: argparse.ArgumentParser) -> None:
    """Per-token expert-count rules: the per-layer little rules and MoBiLE's confidence threshold."""
    p.add_argument("--little", type=float, default=None, metavar="X",
                   help="threshold of the per-layer little rule (--little-rule; mass by default): e.g. 0.8")
    p.add_argument("--little-rule", default=None, choices=("mass", "adapmoe"),
                   help="mass: a token whose top-ceil(k/2) experts hold X of its routing mass runs only those; "
                        "adapmoe: drop experts whose normalized weight is under X (AdapMoE's baseline)")
    p.add_argument("--gamma", type=float, default=None, help="policies mobile, hobbit+mobile: a token decoded "
                   "little whose top next-token probability is below this is redone big (default 0.7)")


def engine_from_args(args: argparse.Namespace):
    from hobbit.runtime.engine import load
    options = {k: getattr(args, k) for k in ("t1", "t2", "prefetch_depth", *LITTLE_OPTIONS)
               if getattr(args, k, None) is not None}
    return load(args.store, budget=args.budget, policy=args.policy, dtype=args.dtype, high=args.high,
                low=args.low, threads=args.threads, direct_io=not args.no_direct_io, dense=args.dense,
                io_threads=args.io_threads, mlock=args.mlock,
                trace=getattr(args, "trace", None), **options)


def cmd_convert(args: argparse.Namespace) -> int:
    from hobbit.store.convert import convert, describe
    dst = convert(args.src, args.dst, precisions=args.precisions, group_size=args.group_size, dense=args.dense)
    print(describe(dst))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from hobbit.store.export import export_gguf
    out = export_gguf(args.store, args.out, args.type, allow_inexact=args.allow_inexact)
    print(f"{out}: {args.type} GGUF, {out.stat().st_size / 2**20:.1f} MiB")
    return 0


def _format_stats(s: dict) -> str:
    by_prec = ", ".join(f"{p} {s['hits_by_precision'].get(p, 0)}/{s['misses_by_precision'].get(p, 0)}"
                        for p in sorted(set(s["hits_by_precision"]) | set(s["misses_by_precision"]))) or "-"
    rows = [
        ("prompt tokens", f"{s['prompt_tokens']}"),
        ("prefill", f"{s['prefill_s']:.3f} s"),
        ("decode", f"{s['generated_tokens']} tokens, {s['decode_tok_s']:.2f} tok/s"),
        ("experts", f"hit rate {s['hit_rate']:.1%}, hits/misses by precision: {by_prec}, skipped {s['skipped']}"),
        ("read from store", f"{s['bytes_read'] / 2**20:.1f} MiB"),
        ("waited for loader", f"{s['loader_wait_s']:.3f} s"),
        ("memory", f"experts cached {s['cached_expert_bytes'] / 2**20:.1f} MiB of budget "
                   f"{(s['budget_bytes'] or 0) / 2**20:.1f} MiB, dense {s['dense_bytes'] / 2**20:.1f} MiB, "
                   f"KV cache {s['kv_cache_bytes'] / 2**20:.1f} MiB, peak RSS {s['peak_rss_bytes'] / 2**20:.0f} MiB"),
    ]
    if s.get("little_steps"):
        rows.append(("MoBiLE", f"{s['fallbacks']} of {s['little_steps']} little passes redone big; "
                               f"{s['fallback_prefetch_used']} of {s['fallback_prefetch_issued']} fallback prefetches used"))
    return "\n".join(f"  {k:<18} {v}" for k, v in rows)


def cmd_run(args: argparse.Namespace) -> int:
    return generate_and_report(engine_from_args(args), args)


def generate_and_report(engine, args: argparse.Namespace) -> int:
    """Stream the answer to args.prompt (or args.prompt_ids), then the stats block (or one JSON object)."""
    from hobbit.runtime.tokenizer import TextStream
    tok = engine.tokenizer
    if args.prompt_ids is not None:
        ids = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
    else:
        if tok is None:
            sys.exit(f"error: {args.store} has no tokenizer.json, so text prompts can't be encoded; "
                     f"pass --prompt-ids 1,2,3 or convert a model folder that has tokenizer files")
        ids = tok.encode_chat([{"role": "user", "content": args.prompt}]) if args.chat else tok.encode(args.prompt)
    stream = TextStream(tok) if tok is not None else None

    def on_token(t: int) -> None:
        if not args.json:
            print(stream.push(t) if stream else f"{t} ", end="", flush=True)

    out = engine.generate(ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, seed=args.seed, callback=on_token)
    text = tok.decode(out.token_ids) if tok is not None else None
    if args.json:
        print(json.dumps(dict(text=text, token_ids=out.token_ids, prompt_ids=ids, finish_reason=out.finish_reason,
                              policy=engine.policy, stats=out.stats)))
    else:
        print(f"\n\n[{out.finish_reason}] policy {engine.policy}")
        print(_format_stats(out.stats))
    engine.close()
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from hobbit.lab.profile import format_profile, profile_decode
    engine = engine_from_args(args)
    prompt = [100 + i % max(1, engine.config.vocab_size - 100) for i in range(args.prompt_tokens)]
    try:
        profile_decode(engine, prompt, min(4, args.tokens))  # warm-up: first-touch pages, checksums
        r = profile_decode(engine, prompt, args.tokens)
    finally:
        engine.close()
    r.update(store=args.store, policy=args.policy, budget=args.budget)
    print(json.dumps(r) if args.json else f"{args.store}: policy {args.policy}, budget {args.budget}\n"
          + format_profile(r))
    return 0


def cmd_assets(args: argparse.Namespace) -> int:
    from hobbit.models.assets import asset_path
    print(asset_path(args.name))
    return 0


DEMO_PROMPT = "Tell me about the Shire, where hobbits live."


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on the embedded default model: SmolMoE's experts on disk under a 25% budget."""
    from hobbit.models.assets import asset_path
    store = asset_path("smolmoe-store")  # built and cached on first use (a few minutes), then instant
    args.store, args.chat, args.prompt_ids = str(store), True, None
    print(f"store: {store}\npolicy {args.policy}, budget {args.budget} of the expert bytes\n", flush=True)
    return generate_and_report(engine_from_args(args), args)


def cmd_serve(args: argparse.Namespace) -> int:
    from hobbit.serve.server import run_server
    run_server(engine_from_args(args), host=args.host, port=args.port)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from hobbit.serve.chat import ChatSession, run_chat
    run_chat(ChatSession(engine_from_args(args), system=args.system, max_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_p=args.top_p, seed=args.seed))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hobbit", description="Run MoE LLMs bigger than RAM: experts on disk, "
                                 "cached at mixed precision.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a Hugging Face model folder or GGUF into an expert store")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--precisions", default="bf16,int4,int2", help="comma list of fp32,bf16,int8,int4,int3,int2")
    p.add_argument("--group-size", type=int, default=None,
                   help="quantization group size (default 64, or the largest of 128/64/32 that fits the experts)")
    p.add_argument("--dense", default=None, choices=("fp32", "bf16", "int8", "int4", "auto"),
                   help="run precision of the dense projections, stored as such so loading never quantizes "
                        "(default auto: int4 g32 where lossless, i.e. 4-bit sources, else int8; routers and "
                        "norms stay as in the source)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export", help="write a store as a GGUF that stock llama.cpp runs (qwen2moe, qwen2, llama)")
    p.add_argument("store")
    p.add_argument("out", help="the .gguf file to write")
    p.add_argument("--type", default="bf16", choices=("bf16", "q8_0", "q4_0"),
                   help="weight type (norms, biases, routers stay F32; q4_0 keeps embeddings/output at q8_0)")
    p.add_argument("--allow-inexact", action="store_true",
                   help="export even if llama.cpp will run the model differently: with norm_topk_prob = true "
                        "hobbit renormalizes the top-k routing weights, llama.cpp's qwen2moe does not")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("run", help="generate text from a prompt, streaming, then print stats")
    add_engine_args(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt")
    g.add_argument("--prompt-ids", help="comma-separated token ids (works without a tokenizer)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--trace", default=None, help="record the routing trace here (for `hobbit simulate`)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("profile", help="split a decode token's time into attention, router, experts, load wait, "
                       "scheduler, lm_head, sampling (ms per token)")
    add_engine_args(p)
    p.add_argument("--prompt-tokens", type=int, default=16, help="prompt length (token ids 100, 101, ...)")
    p.add_argument("--tokens", type=int, default=32, help="decode tokens timed")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("demo", help="run SmolMoE (built from SmolLM2-135M) with experts on disk, under a 25%% budget")
    add_engine_args(p, store=False, policy="hobbit")
    p.add_argument("--prompt", default=DEMO_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=64)
    # SmolMoE is a 135M model that loops when greedy: sample lightly, seeded, so runs repeat
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("assets", help="print the local path of a verified asset, fetching/building it on first use")
    p.add_argument("name", help="smollm2-gguf | austen | wiki | smolmoe | smolmoe-store | qwen-coder-gguf | codermoe "
                   "| codermoe-store")
    p.set_defaults(func=cmd_assets)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions)")
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("chat", help="interactive terminal chat: streaming answers, history, stats line")
    add_engine_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=cmd_chat)

    from hobbit.models.moefy import add_moefy_args, moefy_main
    p = sub.add_parser("moefy", help="split a dense Llama's FFN neurons into experts and learn routers "
                       "(writes a Qwen2-MoE checkpoint; SmolMoE is made this way)")
    add_moefy_args(p)
    p.set_defaults(func=moefy_main)

    from hobbit.lab.bench import add_bench_args
    from hobbit.lab.evaluate import add_eval_args
    from hobbit.lab.simulate import add_simulate_args
    from hobbit.lab.study import add_study_args
    from hobbit.lab.tune import add_tune_args
    for add in (add_eval_args, add_bench_args, add_simulate_args, add_tune_args, add_study_args):
        add(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
