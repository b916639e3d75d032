"""Dense SmolLM2-135M decode speed: hobbit (bf16 and int4 dense weights) vs transformers, one process.

    python benchmarks/bench_dense.py [--tokens 64] [--repeats 3] [--json runs/dense.json]

At this size the cost is per-token dispatch, not bytes. Every engine runs on 1 torch thread, greedy,
the same prompt; the best of `repeats` is reported and every run is in the JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import torch

import hobbit
from hobbit.assets import asset_path
from hobbit.convert import convert


def time_hobbit(store, dense: str | None, ids: list[int], tokens: int) -> float:
    eng = hobbit.load(store, dense=dense)
    eng.generate(ids, max_new_tokens=4, stop_token_ids=[])  # warm-up
    out = eng.generate(ids, max_new_tokens=tokens, stop_token_ids=[])
    eng.close()
    return out.stats["decode_tok_s"]


def time_transformers(model, ids: list[int], tokens: int) -> float:
    x = torch.tensor([ids])
    with torch.inference_mode():
        model.generate(x, max_new_tokens=4, do_sample=False, min_new_tokens=4)
        t0 = time.perf_counter()
        first = model.generate(x, max_new_tokens=1, do_sample=False)  # prefill + first token, as hobbit's prefill_s
        t1 = time.perf_counter()
        model.generate(x, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        t2 = time.perf_counter()
    del first
    return (tokens - 1) / ((t2 - t1) - (t1 - t0))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    gguf = asset_path("smollm2-gguf")
    with tempfile.TemporaryDirectory() as tmp:
        store = convert(gguf, f"{tmp}/store", progress=False)
        eng = hobbit.load(store)
        ids = eng.tokenizer.encode("The history of the Shire begins with the wandering days of the hobbits,")
        eng.close()
        from transformers import AutoModelForCausalLM
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16).eval()
        runs = []
        for r in range(a.repeats):  # interleaved, so drift hits every engine alike
            for name, fn in (("hobbit bf16", lambda: time_hobbit(store, None, ids, a.tokens)),
                             ("hobbit int4 dense", lambda: time_hobbit(store, "int4", ids, a.tokens)),
                             ("transformers bf16", lambda: time_transformers(hf, ids, a.tokens))):
                runs.append(dict(engine=name, repeat=r, decode_tok_s=fn()))
                print(f"repeat {r} {name:>18}: {runs[-1]['decode_tok_s']:7.2f} tok/s", flush=True)
    best = {n: max(x["decode_tok_s"] for x in runs if x["engine"] == n) for n in dict.fromkeys(x["engine"] for x in runs)}
    print("best:", ", ".join(f"{n} {v:.1f} tok/s" for n, v in best.items()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(machine=dict(platform=platform.platform(), torch=torch.__version__, threads=1),
                           tokens=a.tokens, runs=runs, best=best), f, indent=1)


if __name__ == "__main__":
    main()
