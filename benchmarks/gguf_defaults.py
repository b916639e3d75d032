"""A quantized MoE GGUF converted with the default tiers, against the old default (bf16 on top), at equal RAM.

`hobbit convert x.gguf` puts the experts' own precision on top (int4,int2 for Q4_0/Q4_1/Q4_K experts);
before, every source got bf16,int4,int2, so the top tier (and the default --high) held the same 4-bit
values at 3.2x the bytes. Both stores decode the same prompt under `--policy hobbit` untuned (what a user
runs first) at each byte budget, interleaved, best of --rounds.

    python benchmarks/gguf_defaults.py --gguf codermoe-q4_0.gguf --work /tmp/gguf-defaults \\
        --budgets 185769536,561512448 --json results/gguf_defaults.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_common import HOBBIT, machine_info  # noqa: E402
from peer_memory import PROMPT  # noqa: E402

from hobbit.store.format import ExpertStore  # noqa: E402

MIB = 2 ** 20
STORES = {"default": [], "bf16 on top (the old default)": ["--precisions", "bf16,int4,int2"]}


def convert(gguf: Path, dst: Path, extra: list[str]) -> dict:
    if not (dst / "manifest.json").is_file():
        t0 = time.perf_counter()
        subprocess.run([*HOBBIT, "convert", str(gguf), str(dst), *extra], check=True, stdout=subprocess.DEVNULL)
        print(f"converted {dst.name} in {time.perf_counter() - t0:.0f} s", flush=True)
    with ExpertStore(dst) as s:
        return dict(path=str(dst), precisions=s.precisions, source_precision=s.source_precision,
                    expert_mib={p: s.total_nbytes(p) / MIB for p in s.precisions},
                    disk_mib=sum(f.stat().st_size for f in dst.iterdir() if f.is_file()) / MIB)


def run(store: Path, budget: int, tokens: int, out: Path) -> dict:
    r = subprocess.run([*HOBBIT, "run", str(store), "--policy", "hobbit", "--budget", str(budget), "--prompt", PROMPT,
                        "--max-new-tokens", str(tokens), "--json", str(out)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"hobbit run {store} --budget {budget} failed: {r.stderr.strip()[-600:]}")
    s = json.loads(out.read_text())["stats"]
    return dict(decode_tok_s=s["decode_tok_s"], read_mib=s["bytes_read"] / MIB, hit_rate=s["hit_rate"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True, help="folder for the two stores (kept: a rerun reuses them)")
    ap.add_argument("--budgets", default="185769536,561512448", help="expert cache bytes, comma list")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    stores = {name: convert(args.gguf, args.work / f"store-{i}", extra)
              for i, (name, extra) in enumerate(STORES.items())}
    budgets = [int(b) for b in args.budgets.split(",")]
    runs = []
    for r in range(args.rounds):  # interleaved: every store at every budget once per round
        for b in budgets:
            for name, st in stores.items():
                res = run(Path(st["path"]), b, args.tokens, args.work / f"run-{r}-{b}-{len(runs)}.json")
                runs.append(dict(store=name, budget_bytes=b, round=r, **res))
                print(f"round {r} budget {b / MIB:.0f} MiB {name}: {res['decode_tok_s']:.2f} tok/s, "
                      f"{res['read_mib']:.0f} MiB read", flush=True)
    best = {f"{name}@{b}": max((x for x in runs if x["store"] == name and x["budget_bytes"] == b),
                               key=lambda x: x["decode_tok_s"]) for b in budgets for name in stores}
    old = list(STORES)[1]
    ratios = {str(b): best[f"default@{b}"]["decode_tok_s"] / best[f"{old}@{b}"]["decode_tok_s"] for b in budgets}
    for name, st in stores.items():
        print(f"{name}: tiers {','.join(st['precisions'])}, {st['disk_mib']:.0f} MiB on disk")
    for b in budgets:
        print(f"budget {b / MIB:.0f} MiB: default {best[f'default@{b}']['decode_tok_s']:.2f} tok/s, "
              f"old {best[f'{old}@{b}']['decode_tok_s']:.2f} ({ratios[str(b)]:.2f}x)")
    args.json.write_text(json.dumps(dict(machine=machine_info(), gguf=str(args.gguf), tokens=args.tokens,
                                         prompt=PROMPT, stores=stores, runs=runs, best=best, ratios=ratios,
                                         command=" ".join(sys.argv)), indent=1) + "\n")


if __name__ == "__main__":
    main()
