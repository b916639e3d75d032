"""Perplexity of each dense run precision: SmolLM2-135M (its Q4_1 GGUF) and SmolMoE, each converted
with `hobbit convert --dense X` (experts bf16), evaluated resident on held-out text.

    python benchmarks/dense_quality.py --json results/dense_quality.json

`hobbit eval STORE --text austen:pride_and_prejudice --max-tokens 512 --window 256 --policy resident`
per store; the README's dense table takes its perplexities from the JSON.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import hobbit
from hobbit.models.recipes import asset_path  # smolmoe is made from a recipe
from hobbit.store.convert import convert
from hobbit.lab.evaluate import evaluate_ppl, text_token_ids

FORMATS = ("bf16", "int8", "int4", "auto")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--window", type=int, default=256)
    args = ap.parse_args()
    sources = {"smollm2": asset_path("smollm2-gguf"), "smolmoe": asset_path("smolmoe")}
    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="hobbit-dense-") as tmp:
        for model, src in sources.items():
            for fmt in FORMATS:
                store = convert(src, Path(tmp) / f"{model}-{fmt}", precisions="bf16", dense=fmt, progress=False)
                with hobbit.load(store, policy="resident") as eng:
                    ids = text_token_ids(eng.tokenizer, "austen:pride_and_prejudice", args.max_tokens, "test")
                    r = evaluate_ppl(eng, ids[:args.max_tokens], args.window, args.window)
                out.setdefault(model, {})[fmt] = r["ppl"]
                print(f"{model:<8} --dense {fmt:<5} ppl {r['ppl']:.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(text="austen:pride_and_prejudice", max_tokens=args.max_tokens,
                                                   window=args.window, ppl=out), indent=1))


if __name__ == "__main__":
    main()
