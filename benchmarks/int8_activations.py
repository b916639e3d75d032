"""Would llama.cpp's int8 x int8 products pay here? Speed and quality of three ways to multiply by an int8 weight.

llama.cpp computes a Q8_0 matrix by rounding the activations to int8 as well (per 32 values) and multiplying
int8 by int8 with VNNI. hobbit's int8 is weight-only (torch's ``_weight_int8pack_mm``, bf16 activations).
This measures, 1 thread:
  - kernel time at one token for the shapes of a CoderMoE-sized model, weights rotated over >= 160 MiB so
    they come from DRAM as in decode: ``int8pack`` (the engine's), ``int_mm`` (each activation row rounded to
    int8 with its own scale, then ``torch._int_mm``: zero-copy on the stored codes) and ``fbgemm`` (torch's
    dynamic quantized linear: its own packed copy of the weight, activations rounded with one scale per call);
  - quality on a store whose experts, dense projections and LM head are int8: the model's log-probabilities
    over a text with every int8 matrix computed each way, against the same model with those matrices computed
    exactly in fp32 (KL divergence, greedy top-1 agreement, perplexity). fbgemm runs one row per call here,
    as decode does (one scale per call would make a row's result depend on the others).

    python benchmarks/int8_activations.py STORE --text FILE --tokens 384 --json results/int8_activations.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

import hobbit
from hobbit.store import quant as Q

sys.path.insert(0, str(Path(__file__).resolve().parent))
from native_kernels import best_of  # noqa: E402  (benchmarks/: the same rotated best-of timing)

SHAPES = {"lm_head": (151936, 1536), "qkv": (2048, 1536), "o_proj": (1536, 1536), "expert w13": (1120, 1536),
          "expert w2": (1536, 560)}  # CoderMoE's int8 matrices, [N out, K in]
ROTATE_BYTES = 160 * 2**20


def _int_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [T,K] -> fp32 [T,N]: each row of x rounded to int8 (symmetric, its own scale), int8 x int8 -> int32."""
    xf = x.float()
    sx = xf.abs().amax(1, keepdim=True).div_(127).clamp_min_(1e-30)  # [T,1]
    return torch._int_mm(torch.round(xf / sx).to(torch.int8), q.t()).mul(sx).mul_(scale.float())  # int32 -> fp32


def _fbgemm_pack(q: torch.Tensor, scale: torch.Tensor):
    with warnings.catch_warnings():  # torch 2.13 deprecates quantized tensors; the packed op is what we time
        warnings.simplefilter("ignore")
        codes = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros(q.shape[0], dtype=torch.long), 0)
    return torch.ops.quantized.linear_prepack(codes, None)


def _fbgemm(x: torch.Tensor, packed) -> torch.Tensor:
    """One call per row: the activation scale is per call, so this keeps every row's result its own."""
    return torch.cat([torch.ops.quantized.linear_dynamic(x[i:i + 1].float(), packed, False) for i in range(x.shape[0])])


def kernel_times(reps: int) -> dict:
    out = {}
    for name, (N, K) in SHAPES.items():
        n = max(1, ROTATE_BYTES // (N * K))
        g = torch.Generator().manual_seed(0)
        qs = [torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g) for _ in range(n)]
        ss = [torch.rand(N, generator=g).add_(0.5).mul_(1e-3).bfloat16() for _ in range(n)]
        ps = [_fbgemm_pack(q, s) for q, s in zip(qs, ss)]
        x = torch.randn(1, K, generator=g).bfloat16()
        ways = {"int8pack": lambda i: torch.ops.aten._weight_int8pack_mm(x, qs[i], ss[i]),
                "int_mm": lambda i: _int_mm(x, qs[i], ss[i]),
                "fbgemm": lambda i: torch.ops.quantized.linear_dynamic(x.float(), ps[i], False)}
        row = {}
        for way, f in ways.items():
            best = best_of(f, n, reps)
            row[way] = {"ms": best * 1e3, "gb_s": N * K / best / 1e9}
        out[name] = {"shape": [N, K], **row}
        print(f"{name:<11} {N}x{K}: " + "  ".join(f"{w} {r['ms']:.3f} ms ({r['gb_s']:.1f} GB/s)" for w, r in row.items()),
              flush=True)
    return out


def quality(store: str, text: str, tokens: int) -> dict:
    eng = hobbit.load(store, policy="resident", dense="int8", lm_head="int8", high="int8")
    ids = torch.tensor(eng.tokenizer.encode(open(text).read())[:tokens])
    packed: dict[int, object] = {}
    ways = {"fp32": lambda x, w: x.float() @ (w.w.float() * w.scales.float()[:, None]).T,
            "int8pack": lambda x, w: torch.ops.aten._weight_int8pack_mm(x.bfloat16().contiguous(), w.w, w.scales).float(),
            "int_mm": lambda x, w: _int_mm(x, w.w, w.scales),
            "fbgemm": lambda x, w: _fbgemm(x, packed.get(id(w)) or packed.setdefault(id(w), _fbgemm_pack(w.w, w.scales)))}
    linear, forward = Q.linear, Q.QuantLinear.forward
    logp = {}
    try:
        for way, f in ways.items():
            def lin(x, w, f=f):
                return f(x, w).to(x.dtype) if w.kind == "int8" else linear(x, w)

            def fwd(self, x, f=f):
                if self.w.kind != "int8":
                    return forward(self, x)
                y = f(x, self.w).to(x.dtype)
                return y if self.bias is None else y + self.bias
            Q.linear, Q.QuantLinear.forward = lin, fwd
            t = time.perf_counter()
            with torch.inference_mode():
                logp[way] = eng.sequence().step(ids).float().log_softmax(-1)  # [T,V]
            print(f"  {way}: {time.perf_counter() - t:.1f} s", flush=True)
    finally:
        Q.linear, Q.QuantLinear.forward = linear, forward
    ref = logp["fp32"]
    nll = lambda lp: float(-lp[:-1].gather(1, ids[1:, None]).mean())  # noqa: E731
    out = {}
    for way, lp in logp.items():
        out[way] = {"kl_vs_fp32": float((ref.exp() * (ref - lp)).sum(-1).mean()),
                    "top1_vs_fp32": float((ref.argmax(-1) == lp.argmax(-1)).float().mean()),
                    "ppl": float(torch.tensor(nll(lp)).exp())}
        print(f"{way:<9} KL {out[way]['kl_vs_fp32']:.4f}  top-1 {out[way]['top1_vs_fp32']:.1%}  ppl {out[way]['ppl']:.3f}")
    return {"store": store, "text": text, "tokens": int(ids.numel()), "ways": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store", help="a store with int8 experts and an int8 LM head (hobbit convert --precisions int8,...)")
    ap.add_argument("--text", required=True, help="text file for the quality comparison")
    ap.add_argument("--tokens", type=int, default=384)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    times = kernel_times(args.reps)
    q = quality(args.store, args.text, args.tokens)
    json.dump({"command": "python benchmarks/int8_activations.py " + " ".join(
                   f"{a}" for a in (args.store, "--text", args.text, "--tokens", args.tokens, "--reps", args.reps,
                                    "--json", args.json)),
               "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "threads": 1},
               "kernel_ms_at_one_token": times, "quality": q}, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
