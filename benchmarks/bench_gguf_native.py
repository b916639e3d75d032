"""Native 4-bit grid vs re-fit: error of hobbit's int4 (group 32) against a GGUF's own dequantization.

Usage: python benchmarks/bench_gguf_native.py [--out results/bench_gguf_native.json]

For real Q4_1 (SmolLM2-135M) and Q4_K (Qwen2.5-Coder-1.5B) tensors, and Q4_0 made by gguf-py from
the Coder's dequantized weights, the reference is gguf.quants.dequantize of the stored blocks; the
figures are relative Frobenius errors ||W - ref|| / ||ref|| of
  native  hobbit.store.gguf_native: the GGUF's codes kept, scale and zero rounded to bf16,
  refit   quant.quantize(ref, "int4", 32): hobbit's least-squares fit of the dequantized weight,
plus `zero-ls`, native with each group's zero re-solved by least squares after the bf16 scale
rounding (codes still kept), to show how much of native's error is bf16 rounding. 1 thread.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from hobbit.store import quant
from hobbit.models.assets import asset_path
from hobbit.store.gguf import dequantize_tensor, load_gguf
from hobbit.store.gguf_native import GROUP, affine_4bit, int4_storage

# (asset, GGUF tensor names); Q4_0 rows are re-quantized from the Coder's own tensors
SOURCES = {
    "smollm2-gguf": ["blk.0.ffn_gate.weight", "blk.15.ffn_up.weight", "blk.29.ffn_down.weight",
                     "blk.15.attn_q.weight"],
    "qwen-coder-gguf": ["blk.0.ffn_gate.weight", "blk.14.ffn_up.weight", "blk.27.ffn_gate.weight",
                        "blk.14.attn_q.weight"],
}
Q4_0_FROM = ("qwen-coder-gguf", ["blk.14.ffn_up.weight", "blk.14.attn_output.weight"])


def rel(w: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(w - ref) / np.linalg.norm(ref))


def zero_ls(codes: np.ndarray, a: np.ndarray, b: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Native grid with bf16 scale, the zero re-solved per group for that scale, then rounded."""
    s = torch.from_numpy(a).bfloat16().float().numpy()
    q = codes.reshape(*a.shape, GROUP).astype(np.float32) - 8
    zero = (ref.reshape(q.shape) - q * s[..., None]).mean(-1)
    zero = torch.from_numpy(zero).bfloat16().float().numpy()
    return (q * s[..., None] + zero[..., None]).reshape(ref.shape)


def measure(name: str, qtype: GGMLQuantizationType, data: np.ndarray, ref: np.ndarray) -> dict:
    shape = tuple(ref.shape)
    t0 = time.perf_counter()
    codes, a, b = affine_4bit(data, qtype)
    native = quant.dequantize(int4_storage(codes, a, b), "int4", shape, GROUP).numpy()
    t1 = time.perf_counter()
    refit = quant.dequantize(quant.quantize(torch.from_numpy(ref), "int4", GROUP), "int4", shape, GROUP).numpy()
    t2 = time.perf_counter()
    row = dict(tensor=name, type=qtype.name, shape=list(shape), native=rel(native, ref),
               zero_ls=rel(zero_ls(codes, a, b, ref), ref), refit=rel(refit, ref),
               native_s=round(t1 - t0, 3), refit_s=round(t2 - t1, 3))
    print(f"{name:<44} {qtype.name:<5} {str(shape):<14} native {row['native']:.5f}  zero-ls {row['zero_ls']:.5f}"
          f"  refit {row['refit']:.5f}  ({row['native_s']:.2f} s vs {row['refit_s']:.2f} s)", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_gguf_native.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for asset, names in SOURCES.items():
        m = load_gguf(asset_path(asset))
        for n in names:
            t = m.raw_tensor(n)
            rows.append(measure(f"{asset}:{n}", t.tensor_type, t.data, dequantize_tensor(t)))
    m = load_gguf(asset_path(Q4_0_FROM[0]))
    for n in Q4_0_FROM[1]:
        blocks = quantize(dequantize_tensor(m.raw_tensor(n)), GGMLQuantizationType.Q4_0)
        ref = dequantize(blocks, GGMLQuantizationType.Q4_0)
        rows.append(measure(f"{Q4_0_FROM[0]}:{n} (as Q4_0)", GGMLQuantizationType.Q4_0, blocks, ref))
    summary = {}
    for qtype in sorted({r["type"] for r in rows}):
        sel = [r for r in rows if r["type"] == qtype]
        summary[qtype] = {k: float(np.mean([r[k] for r in sel])) for k in ("native", "zero_ls", "refit")}
        print(f"mean {qtype}: native {summary[qtype]['native']:.5f}, zero-ls {summary[qtype]['zero_ls']:.5f}, "
              f"refit {summary[qtype]['refit']:.5f}")
    with open(args.out, "w") as f:
        json.dump({"rows": rows, "mean": summary}, f, indent=1)


if __name__ == "__main__":
    main()
