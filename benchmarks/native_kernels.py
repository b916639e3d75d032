"""hobbit's decode kernels (`hobbit.kernels`) against torch's weight-only kernels: speed and what they cost.

torch's int4 kernel converts every code to float (compute-bound) and its int8 kernel multiplies bf16 by
int8; `hobbit.kernels` rounds the activations to two int8 levels per 32 inputs and multiplies integers,
in an AVX-512 VNNI build and an AVX2 one. This measures, 1 thread, for each build this CPU runs:
  - kernel time (each kernel called directly) at one token, a few and prefill sizes for CoderMoE's int4 and
    int8 shapes and its int2 experts (torch's column: its int4 kernel on the codes expanded to int4
    beforehand, as hobbit ran int2 before its kernels read 2-bit codes): where each kind stops beating
    torch's is what kernels._VARIANTS cites; weights rotated over >= 160 MiB so they come from DRAM as in
    decode, and one int4 expert fused into one call against two native calls (a fresh process per build);
  - quality: the store decoded token by token (`resident`) with torch's kernels (HOBBIT_NATIVE=0), with each
    build (HOBBIT_NATIVE=avx512, avx2) and with exact fp32 products of the same quantized weights; each
    kernel's log-probabilities against the exact ones (KL, greedy top-1 agreement, perplexity);
  - decode tok/s and the prefill time of a --prefill-tokens prompt of `hobbit run --policy resident` with torch's
    kernels and each build, interleaved, best of --rounds.

    python benchmarks/native_kernels.py STORE --text FILE --json results/native_kernels.json [--run-args '...']
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time

import torch

from hobbit import kernels

INT4 = {"expert w13": (1088, 1536), "expert w2": (1536, 544), "qkv": (2048, 1536), "o_proj": (1536, 1536),
        "shared w13": (512, 1536), "shared w2": (1536, 256)}  # CoderMoE's int4 matrices, [N out, K in]
INT2 = {k: INT4[k] for k in ("expert w13", "expert w2")}  # the low tier's matrices
INT8 = {"lm_head": (151936, 1536), "qkv": (2048, 1536)}  # the LM head; int8 projections (--dense int8)
ROTATE_BYTES = 160 * 2**20
PROMPT = '# Python 3\ndef fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'
BUILDS = kernels.builds()  # the kernel builds this CPU runs, fastest first


def best_of(f, n: int, reps: int) -> float:
    """Seconds per call of f(0..n-1) (n weights rotated through), the best of `reps` passes."""
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for i in range(n):
            f(i)
        best = min(best, (time.perf_counter() - t) / n)
    return best


def kernel_times(reps: int) -> dict:
    from hobbit.runtime.offload import Expert
    from hobbit.store import quant as Q
    g, out = torch.Generator().manual_seed(0), {}
    shapes = [(name, "int4", s, m) for name, s in INT4.items() for m in (1,)] + \
             [("expert w13", "int4", INT4["expert w13"], m) for m in (4, 16)] + \
             [("qkv", "int4", INT4["qkv"], m) for m in (64, 512)] + \
             [(name, "int2", s, 1) for name, s in INT2.items()] + [("lm_head", "int8", INT8["lm_head"], 1)] + \
             [("qkv", "int8", INT8["qkv"], m) for m in (1, 3, 4, 64)]  # where each kind stops beating torch's
    for name, fmt, (N, K), M in shapes:
        nbytes = Q.storage_nbytes(fmt, (N, K), 32)
        n = max(2, ROTATE_BYTES // nbytes)
        q = Q.quantize(torch.randn(N, K, generator=g) * 0.05, fmt, 32)
        ws = [Q.prepare({k: v.clone() for k, v in q.items()}, fmt, (N, K), 32, torch.bfloat16) for _ in range(n)]
        x = torch.randn(M, K, generator=g).bfloat16()
        if fmt == "int8":
            torch_mm, torch_bytes = (lambda i: torch.ops.aten._weight_int8pack_mm(x, ws[i].w, ws[i].scales)), nbytes
        else:  # int2: torch's kernel reads the codes expanded to int4 (done here, untimed)
            packed = [w.w if w.bits == 4 else Q._to_int4(w.w.view(-1, K, 8 * w.bits), w.bits).view(N, K // 2) for w in ws]
            torch_mm = lambda i: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed[i], 32, ws[i].scales)
            torch_bytes = Q.storage_nbytes("int4", (N, K), 32)
        native_mm = (lambda i: kernels.int8_linear(x, ws[i].w, ws[i].scales)) if fmt == "int8" else \
            (lambda i: kernels.lowbit_linear(x, ws[i].w, ws[i].scales, (N, K), 32, ws[i].bits))
        t_torch, t_native = best_of(torch_mm, n, reps), best_of(native_mm, n, reps)
        row = {"format": fmt, "shape": [N, K], "tokens": M, "bytes": nbytes, "torch_bytes": torch_bytes,
               "torch_us": t_torch * 1e6, "native_us": t_native * 1e6,
               "torch_gb_s": torch_bytes / t_torch / 1e9, "native_gb_s": nbytes / t_native / 1e9}
        out[f"{name} {fmt} x{M}"] = row
        print(f"{name:<11} {fmt} {N}x{K} x{M}: torch {row['torch_us']:.0f} us ({row['torch_gb_s']:.1f} GB/s), "
              f"native {row['native_us']:.0f} us ({row['native_gb_s']:.1f} GB/s)", flush=True)
    (I2, H), (_, I) = INT4["expert w13"], INT4["expert w2"]
    q13 = Q.quantize(torch.randn(I2, H, generator=g) * 0.05, "int4", 32)
    q2 = Q.quantize(torch.randn(H, I, generator=g) * 0.05, "int4", 32)
    n = max(2, ROTATE_BYTES // (Q.storage_nbytes("int4", (I2, H), 32) + Q.storage_nbytes("int4", (H, I), 32)))
    es = [Expert(Q.prepare({k: v.clone() for k, v in q13.items()}, "int4", (I2, H), 32, torch.bfloat16),
                 Q.prepare({k: v.clone() for k, v in q2.items()}, "int4", (H, I), 32, torch.bfloat16)) for _ in range(n)]
    x = torch.randn(1, H, generator=g).bfloat16()
    out["expert fused"] = {"fused_us": best_of(lambda i: es[i].weighted(x, 0.5), n, reps) * 1e6,
                           "two_calls_us": best_of(lambda i: es[i](x).mul_(0.5), n, reps) * 1e6}
    print(f"one expert at one token: fused {out['expert fused']['fused_us']:.0f} us, two native calls and torch's "
          f"SwiGLU {out['expert fused']['two_calls_us']:.0f} us; build {kernels.variant()}")
    return out


_EXACT = """
from hobbit.store import quant as Q
_w = {}
def _dense(w):  # the fp32 weight a Prepared lowbit/int8 matrix stands for (int3 is int4 codes once prepared)
    if id(w) not in _w:
        if w.kind == "int8":
            q, fmt = {"q": w.w, "scale": w.scales}, "int8"
        else:
            q, fmt = {"q": w.w.view(-1, w.shape[1], 8 * w.bits), "sz": w.scales}, f"int{w.bits}"
        _w[id(w)] = (w, Q.dequantize(q, fmt, w.shape, w.group_size))
    return _w[id(w)][1]
Q._quant_mm = lambda x, w: (x.float() @ _dense(w).T).to(x.dtype)
"""


def _logprobs(store: str, text: str, tokens: int, run_args: list[str], way: str, dest: str) -> None:
    """Decode `text` one token at a time in a fresh process -> dest. way: a build of the kernels ('avx512',
    'avx2'), 'torch' (HOBBIT_NATIVE=0: torch's kernels) or 'exact' (every int4/int8 product in fp32 on the
    dequantized weight)."""
    code = ("import argparse, sys, torch, hobbit; from hobbit.runtime.config import RunConfig, add_run_args\n"
            + (_EXACT if way == "exact" else "") +
            "store, text, n, dest, *args = sys.argv[1:]\n"
            "ap = argparse.ArgumentParser(); add_run_args(ap)\n"
            "eng = hobbit.load(store, config=RunConfig.from_args(ap.parse_args([store, '--policy', 'resident', *args])))\n"
            "ids = torch.tensor(eng.tokenizer.encode(open(text).read())[:int(n)])\n"
            "seq = eng.sequence()\n"
            "with torch.inference_mode():\n"
            "    lp = torch.cat([seq.step(ids[i:i + 1]).float().log_softmax(-1) for i in range(len(ids))])\n"
            "torch.save({'ids': ids, 'logp': lp}, dest)\n")
    subprocess.run([sys.executable, "-c", code, store, text, str(tokens), dest, *run_args], env=_env(way), check=True)


def _env(way: str) -> dict:
    return {**os.environ, "HOBBIT_NATIVE": way if way in BUILDS else "0", "OMP_NUM_THREADS": "1"}


def quality(store: str, text: str, tokens: int, run_args: list[str]) -> dict:
    """Torch's kernels and each build against exact fp32 products of the same quantized weights."""
    ways = ["exact", "torch", *BUILDS]
    with tempfile.TemporaryDirectory() as tmp:
        lp = {}
        for way in ways:
            t = time.perf_counter()
            _logprobs(store, text, tokens, run_args, way, f"{tmp}/{way}.pt")
            lp[way] = torch.load(f"{tmp}/{way}.pt")
            print(f"  decoded {tokens} tokens one at a time, {way} products: {time.perf_counter() - t:.0f} s", flush=True)
    ids, ref, tn = lp["exact"]["ids"], lp["exact"]["logp"], lp["torch"]["logp"]
    ppl = lambda p: float(torch.exp(-p[:-1].gather(1, ids[1:, None]).mean()))  # noqa: E731
    out = {"store": store, "text": text, "tokens": int(ids.numel()), "run_args": run_args, "ppl_exact": ppl(ref)}
    for way in ways[1:]:
        p = lp[way]["logp"]
        out[way] = {"kl_vs_exact": float((ref.exp() * (ref - p)).sum(-1).mean()),
                    "top1_vs_exact": float((ref.argmax(-1) == p.argmax(-1)).float().mean()), "ppl": ppl(p),
                    "top1_vs_torch": float((tn.argmax(-1) == p.argmax(-1)).float().mean())}
        print(f"{way} kernels vs exact fp32 products: KL {out[way]['kl_vs_exact']:.4f}, top-1 "
              f"{out[way]['top1_vs_exact']:.1%}, ppl {out[way]['ppl']:.3f} (exact {out['ppl_exact']:.3f})")
    return out


def _run(store: str, run_args: list[str], way: str, *prompt: str, new: int) -> dict:
    r = subprocess.run([sys.executable, "-m", "hobbit.cli", "run", store, "--policy", "resident", *run_args, *prompt,
                        "--max-new-tokens", str(new), "--json"], env=_env(way), capture_output=True, text=True, check=True)
    return json.loads(r.stdout)["stats"]


def decode_speed(store: str, run_args: list[str], rounds: int, tokens: int, text: str, prefill: int) -> dict:
    """Resident decode tok/s (the short prompt, `tokens` steps) and prefill seconds of a `prefill`-token prompt
    from `text`, torch's kernels and each build, interleaved, best of `rounds`."""
    from hobbit.runtime.tokenizer import Tokenizer
    ids = Tokenizer.from_dir(store).encode(open(text).read(), add_special_tokens=False)[:prefill]
    runs = {way: [] for way in ("torch", *BUILDS)}
    pre = {way: [] for way in runs}
    for _ in range(rounds):
        for way in runs:
            runs[way].append(_run(store, run_args, way, "--prompt", PROMPT, new=tokens + 1)["decode_tok_s"])
            pre[way].append(_run(store, run_args, way, "--prompt-ids", ",".join(map(str, ids)), new=1)["prefill_s"])
            print(f"  resident, {way}: decode {runs[way][-1]:.2f} tok/s, prefill of {len(ids)} tokens "
                  f"{pre[way][-1]:.2f} s", flush=True)
    best = {w: max(v) for w, v in runs.items()}
    best_pre = {w: min(v) for w, v in pre.items()}
    print(f"resident (best of {rounds}): decode " + ", ".join(f"{w} {b:.2f}" for w, b in best.items())
          + " tok/s; prefill " + ", ".join(f"{w} {b:.2f}" for w, b in best_pre.items()) + " s")
    return {"runs_tok_s": runs, "best_tok_s": best, "speedup": {w: best[w] / best["torch"] for w in BUILDS},
            "tokens": tokens, "prefill_tokens": len(ids), "runs_prefill_s": pre, "best_prefill_s": best_pre,
            "prefill_speedup": {w: best_pre["torch"] / best_pre[w] for w in BUILDS}}


def kernel_times_per_build(reps: int) -> dict:
    """kernel_times in a fresh process per build (HOBBIT_NATIVE decides which one loads)."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for build in BUILDS:
            subprocess.run([sys.executable, __file__, "--kernels-only", f"{tmp}/{build}.json", "--reps", str(reps)],
                           env=_env(build), check=True)
            out[build] = json.load(open(f"{tmp}/{build}.json"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store", nargs="?")
    ap.add_argument("--text", help="text file for the quality comparison")
    ap.add_argument("--tokens", type=int, default=256, help="tokens decoded one at a time for the quality comparison")
    ap.add_argument("--run-args", default="--high int4 --dense int4 --lm-head int8",
                    help="engine options of the quality and decode runs (as `hobbit run` takes them)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=48)
    ap.add_argument("--prefill-tokens", type=int, default=512, help="prompt tokens (from --text) of the prefill runs")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json")
    ap.add_argument("--kernels-only", metavar="FILE", help="(internal) kernel times of the build HOBBIT_NATIVE loads")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.kernels_only:
        json.dump(kernel_times(args.reps), open(args.kernels_only, "w"))
        return
    if not (args.store and args.text and args.json):
        ap.error("STORE, --text and --json are required")
    if not BUILDS:
        ap.error("this CPU runs none of hobbit's kernel builds (AVX2 or AVX-512): nothing to compare")
    run_args = shlex.split(args.run_args)
    result = {"command": "python benchmarks/native_kernels.py " + shlex.join(sys.argv[1:]),
              "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "threads": 1},
              "builds": BUILDS,
              "kernels": kernel_times_per_build(args.reps),
              "decode": decode_speed(args.store, run_args, args.rounds, args.decode_tokens, args.text,
                                     args.prefill_tokens),
              "quality": quality(args.store, args.text, args.tokens, run_args)}
    json.dump(result, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
