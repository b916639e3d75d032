"""The `hobbit` command."""
from __future__ import annotations

import argparse
import sys

from hobbit.runtime.config import RunConfig, add_json_arg, add_run_args, emit_json


def engine_from_args(args: argparse.Namespace):
    from hobbit.runtime.engine import load
    return load(args.store, config=RunConfig.from_args(args), trace=getattr(args, "trace", None))


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
        ("read from store", f"{s['bytes_read'] / 2**20:.1f} MiB; prefetches {s['prefetch_used']} of "
                            f"{s['prefetch_issued']} used, {s['stale_prefetch_cancelled']} dropped unread (router chose otherwise)"),
        ("waited for loader", f"{s['loader_wait_s']:.3f} s"),
        ("memory", f"experts cached {s['cached_expert_bytes'] / 2**20:.1f} MiB of budget "
                   f"{(s['budget_bytes'] or 0) / 2**20:.1f} MiB, dense {s['dense_bytes'] / 2**20:.1f} MiB, "
                   f"KV cache {s['kv_cache_bytes'] / 2**20:.1f} MiB, peak RSS {s['peak_rss_bytes'] / 2**20:.0f} MiB"),
    ]
    if s.get("little_steps"):
        rows.append(("MoBiLE", f"{s['fallbacks']} of {s['little_steps']} little passes redone big (with "
                               f"{s['fallback_redone']} tokens accepted little before them); "
                               f"{s['fallback_prefetch_used']} of {s['fallback_prefetch_issued']} fallback prefetches used, "
                               f"{s['fallback_prefetch_withheld']} withheld (--fallback-prefetch)"))
    return "\n".join(f"  {k:<18} {v}" for k, v in rows)


def cmd_run(args: argparse.Namespace) -> int:
    return generate_and_report(engine_from_args(args), args)


def generate_and_report(engine, args: argparse.Namespace) -> int:
    """Stream the answer to args.prompt (or args.prompt_ids), then the stats block (or one JSON object)."""
    from hobbit.runtime.tokenizer import TextDeltas
    tok = engine.tokenizer
    if args.prompt_ids is not None:
        ids = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
    else:
        if tok is None:
            sys.exit(f"error: {args.store} has no tokenizer.json, so text prompts can't be encoded; "
                     f"pass --prompt-ids 1,2,3 or convert a model folder that has tokenizer files")
        ids = tok.encode_chat([{"role": "user", "content": args.prompt}]) if args.chat else tok.encode(args.prompt)
    stream = TextDeltas(tok) if tok is not None else None
    quiet = args.json == "-"

    def on_token(t: int) -> None:
        if not quiet:
            print(stream.push(t) if stream else f"{t} ", end="", flush=True)

    out = engine.generate(ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, seed=args.seed, callback=on_token)
    text = tok.decode(out.token_ids) if tok is not None else None
    from hobbit import kernels
    native = kernels.variant()  # which decode kernels ran: worth knowing when comparing speeds
    if not emit_json(args, dict(text=text, token_ids=out.token_ids, prompt_ids=ids, finish_reason=out.finish_reason,
                                policy=engine.policy, native_kernels=native, stats=out.stats)):
        print((stream.flush() if stream else "") + f"\n\n[{out.finish_reason}] policy {engine.policy}")
        print(_format_stats(out.stats))
        print(f"  {'kernels':<18} " + (f"hobbit's {native} build at decode (HOBBIT_NATIVE=0: torch's)" if native
                                       else "torch's (no AVX2/AVX-512, no C compiler, or HOBBIT_NATIVE=0)"))
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
    if not emit_json(args, r):
        print(f"{args.store}: policy {args.policy}, budget {args.budget}\n" + format_profile(r))
    return 0


def cmd_assets(args: argparse.Namespace) -> int:
    from hobbit.models.recipes import asset_path
    print(asset_path(args.name))
    return 0


DEMO_PROMPT = "Tell me about the Shire, where hobbits live."


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on the embedded default model: SmolMoE's experts on disk under a 25% budget."""
    from hobbit.models.recipes import asset_path
    store = asset_path("smolmoe-store")  # built and cached on first use (a few minutes), then instant
    args.store, args.chat, args.prompt_ids = str(store), True, None
    print(f"store: {store}\npolicy {args.policy}, budget {args.budget} of the expert bytes\n", flush=True)
    return generate_and_report(engine_from_args(args), args)


def cmd_serve(args: argparse.Namespace) -> int:
    try:  # before loading the model: fastapi and uvicorn are the `serve` extra
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"`hobbit serve` needs {e.name or 'fastapi and uvicorn'}, which is not installed: "
                           f"pip install 'hobbit-moe[serve]'") from None
    from hobbit.serve.server import run_server
    run_server(engine_from_args(args), host=args.host, port=args.port)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from hobbit.serve.chat import ChatSession, run_chat
    run_chat(ChatSession(engine_from_args(args), system=args.system, max_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_p=args.top_p, seed=args.seed))
    return 0


def _sampling_args(p: argparse.ArgumentParser, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                   seed: int | None = None, top_k: bool = True) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=temperature)
    p.add_argument("--top-p", type=float, default=top_p)
    if top_k:
        p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=seed)


def _convert(sub) -> None:
    p = sub.add_parser("convert", help=HELP["convert"])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--precisions", default=None,
                   help="comma list of fp32,bf16,int8,mxfp4,int4,int3,int2 (default bf16,int4,int2; quantized "
                        "experts keep their precision on top: mxfp4,int4,int2 for MXFP4, and from a GGUF int4,int2 "
                        "for Q4_0/Q4_1/Q4_K, int8,int4,int2 for other quantized types)")
    p.add_argument("--group-size", type=int, default=None,
                   help="quantization group size (default 64, or the largest of 128/64/32 that fits the experts; "
                        "32 where a GGUF's 4-bit grid is kept)")
    p.add_argument("--dense", default=None, choices=("fp32", "bf16", "int8", "int4", "auto"),
                   help="run precision of the dense projections, stored as such so loading never quantizes "
                        "(default auto: int4 g32 where lossless, i.e. 4-bit sources, else int8; routers and "
                        "norms stay as in the source)")
    p.set_defaults(func=cmd_convert)


def _export(sub) -> None:
    p = sub.add_parser("export", help=HELP["export"])
    p.add_argument("store")
    p.add_argument("out", help="the .gguf file to write")
    p.add_argument("--type", default="bf16", choices=("bf16", "q8_0", "q4_0"),
                   help="weight type (norms, biases, routers stay F32; q4_0 keeps embeddings/output at q8_0)")
    p.add_argument("--allow-inexact", action="store_true",
                   help="export even if llama.cpp will run the model differently: with norm_topk_prob = true "
                        "hobbit renormalizes the top-k routing weights, llama.cpp's qwen2moe does not")
    p.set_defaults(func=cmd_export)


def _run(sub) -> None:
    p = sub.add_parser("run", help=HELP["run"])
    add_run_args(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt")
    g.add_argument("--prompt-ids", help="comma-separated token ids (works without a tokenizer)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _sampling_args(p, max_new_tokens=64)
    add_json_arg(p, "the answer, token ids and stats")
    p.add_argument("--trace", default=None, help="record the routing trace here (for `hobbit simulate`)")
    p.set_defaults(func=cmd_run)


def _profile(sub) -> None:
    p = sub.add_parser("profile", help=HELP["profile"])
    add_run_args(p)
    p.add_argument("--prompt-tokens", type=int, default=16, help="prompt length (token ids 100, 101, ...)")
    p.add_argument("--tokens", type=int, default=32, help="decode tokens timed")
    add_json_arg(p, "the split")
    p.set_defaults(func=cmd_profile)


def _demo(sub) -> None:
    p = sub.add_parser("demo", help=HELP["demo"])
    add_run_args(p, store=False, policy="hobbit")
    p.add_argument("--prompt", default=DEMO_PROMPT)
    # SmolMoE is a 135M model that loops when greedy: sample lightly, seeded, so runs repeat
    _sampling_args(p, max_new_tokens=64, temperature=0.7, top_p=0.9, seed=0)
    add_json_arg(p, "the answer, token ids and stats")
    p.set_defaults(func=cmd_demo)


def _assets(sub) -> None:
    p = sub.add_parser("assets", help=HELP["assets"])
    p.add_argument("name", help="smollm2-gguf | austen | wiki | smolmoe | smolmoe-store | qwen-coder-gguf | codermoe "
                   "| codermoe-store")
    p.set_defaults(func=cmd_assets)


def _serve(sub) -> None:
    p = sub.add_parser("serve", help=HELP["serve"])
    add_run_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=cmd_serve)


def _chat(sub) -> None:
    p = sub.add_parser("chat", help=HELP["chat"])
    add_run_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    _sampling_args(p, max_new_tokens=512, top_k=False)
    p.set_defaults(func=cmd_chat)


def _moefy(sub) -> None:
    from hobbit.models.recipes import add_moefy_args, moefy_main
    p = sub.add_parser("moefy", help=HELP["moefy"])
    add_moefy_args(p)
    p.set_defaults(func=moefy_main)


def _eval(sub) -> None:
    from hobbit.lab.evaluate import add_eval_args
    add_eval_args(sub)


def _bench(sub) -> None:
    from hobbit.lab.bench import add_bench_args
    add_bench_args(sub)


def _simulate(sub) -> None:
    from hobbit.lab.simulate import add_simulate_args
    add_simulate_args(sub)


def _tune(sub) -> None:
    from hobbit.lab.tune import add_tune_args
    add_tune_args(sub)


def _study(sub) -> None:
    from hobbit.lab.study import add_study_args
    add_study_args(sub)


# every command: its one line in `hobbit --help`, and what adds its parser (importing only that command's modules,
# so `hobbit --help` and `hobbit simulate` never import torch)
HELP = {
    "convert": "convert a Hugging Face model folder or GGUF into an expert store",
    "export": "write a store as a GGUF that stock llama.cpp runs (qwen2moe, qwen2, llama)",
    "run": "generate text from a prompt, streaming, then print stats",
    "profile": "split a decode token's time into attention, router, experts, load wait, scheduler, lm_head, "
               "sampling (ms per token)",
    "demo": "run SmolMoE (built from SmolLM2-135M) with experts on disk, under a 25%% budget",
    "assets": "print the local path of a verified asset, fetching/building it on first use",
    "serve": "OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions)",
    "chat": "interactive terminal chat: streaming answers, history, stats line",
    "moefy": "split a dense Llama's FFN neurons into experts and learn routers (writes a Qwen2-MoE checkpoint; "
             "SmolMoE is made this way)",
    "eval": "perplexity over sliding windows of a text, with expert-cache stats",
    "bench": "decode speed, cache stats and quality of policies across budgets",
    "simulate": "replay a routing trace through a cache policy (no model): hit rates, bytes moved, modeled load time",
    "tune": "calibrate HOBBIT's thresholds, low-pool share and eviction weights for a store and budget (writes "
            "STORE/hobbit_tuned.json)",
    "study": "report: is mixed-precision expert caching worth it (quality when cold experts go to 4/3/2 bits, "
             "importance signals, resident gain, modeled decode speed)",
}
COMMANDS = {"convert": _convert, "export": _export, "run": _run, "profile": _profile, "demo": _demo, "assets": _assets,
            "serve": _serve, "chat": _chat, "moefy": _moefy, "eval": _eval, "bench": _bench, "simulate": _simulate,
            "tune": _tune, "study": _study}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The `hobbit` parser; with `only`, the other commands are listed but get no flags (nothing imported for them)."""
    ap = argparse.ArgumentParser(prog="hobbit", description="Run MoE LLMs bigger than RAM: experts on disk, "
                                 "cached at mixed precision.")
    sub = ap.add_subparsers(dest="command", required=True)
    for name, add in COMMANDS.items():
        if only is None or name == only:
            add(sub)
        else:
            sub.add_parser(name, help=HELP[name])
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), "")
    args = build_parser(only=command if command in COMMANDS else "").parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
