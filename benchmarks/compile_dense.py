"""Does torch.compile speed up the dense decode step? One store, eager vs compiled, 1 thread.

    python benchmarks/compile_dense.py STORE [--mode max-autotune-no-cudagraphs] [--steps 40]

Compiles Transformer.forward (one token, the position dynamic) with inductor freezing on (the
CPU GEMM templates engage at M = 1), and prints the compile
time and min / median step time of eager, compiled, eager again (interleaved against drift).
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("store")
    ap.add_argument("--mode", default="max-autotune-no-cudagraphs")
    ap.add_argument("--steps", type=int, default=40)
    a = ap.parse_args()
    torch.set_num_threads(1)
    import torch._inductor.config as inductor_config
    inductor_config.freezing = True
    import hobbit
    eng = hobbit.load(a.store, policy="resident")
    model = eng.model
    step = type(model).forward.__wrapped__  # forward without its inference_mode decorator: dynamo traces it
    ids = eng.tokenizer.encode("The history of the Shire begins with the wandering days of the hobbits,")
    tok, P = torch.tensor([5]), len(ids)

    def timed(fn, label: str) -> None:
        ts = []
        for i in range(a.steps):
            t = time.perf_counter()
            fn(model, tok, P + i)
            ts.append(time.perf_counter() - t)
        print(f"{label:>12}: min {min(ts) * 1e3:.2f} ms, median {sorted(ts)[len(ts) // 2] * 1e3:.2f} ms", flush=True)

    with torch.inference_mode():
        model.reset()
        model.forward(torch.tensor(ids), 0)
        timed(step, "eager")
        compiled = torch.compile(step, mode=a.mode)
        t0 = time.perf_counter()
        compiled(model, tok, P)
        t1 = time.perf_counter()
        compiled(model, tok, P + 1)  # a new position: the recompile with a dynamic position
        t2 = time.perf_counter()
        print(f"compile {t1 - t0:.1f} s, recompile (dynamic position) {t2 - t1:.1f} s", flush=True)
        timed(compiled, "compiled")
        timed(step, "eager again")


if __name__ == "__main__":
    main()
