"""How much does reading an expert slow the compute that follows it? (why `hobbit profile` shows attention,
router and expert compute 1.3-2x slower under a budget than resident, though they do the same work)

The compute thread runs a fixed block of small decode-sized torch ops (8 x [1,1536] @ [1536,256] bf16 with
pointwise ops and a concat: ~6 MiB of weights, cache-resident when nothing else runs) right after another
thread has read one blob of SIZE KiB from FILE at a random offset (the loader's job: O_DIRECT into one of 64
reused buffers, or buffered with --buffered) and the compute thread has waited for it, as it waits for a
demand load. SIZE 0 reads nothing. 1 thread of torch compute; best of --repeats rounds of --iters blocks each.

    python benchmarks/io_interference.py FILE --sizes 0,8,64,512,1536 --json results/io_interference.json
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F


def block_us(fd: int, file_size: int, kib: int, iters: int, seed: int) -> float:
    """Mean µs of one block of small ops, each right after a wait for one read of `kib` KiB."""
    n = kib * 1024
    bufs = [mmap.mmap(-1, max(n, mmap.PAGESIZE)) for _ in range(64)]  # page aligned, as O_DIRECT needs
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(256, 1536, generator=g).bfloat16() for _ in range(8)]
    x = torch.randn(1, 1536, generator=g).bfloat16()

    def small() -> torch.Tensor:
        y = x
        for w in ws:
            h = F.silu(F.linear(y, w) * 2 + 1)  # [1,256]
            y = torch.cat([h] * 6, 1)  # [1,1536]
        return y

    def read(i: int) -> None:
        os.preadv(fd, [bufs[i % 64]], rng.randrange(0, file_size - n) // 4096 * 4096)

    for _ in range(50):
        small()
    total = 0.0
    with ThreadPoolExecutor(1) as loader:
        for i in range(iters):
            if n:
                loader.submit(read, i).result()
            t = time.perf_counter()
            small()
            total += time.perf_counter() - t
    return total / iters * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", help="a large file to read from, e.g. a store's experts.bin")
    ap.add_argument("--sizes", default="0,8,64,512,1536", help="KiB per read, comma-separated (0: no read); ratios are to the first")
    ap.add_argument("--buffered", action="store_true", help="read through the page cache instead of O_DIRECT")
    ap.add_argument("--iters", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    sizes = [int(s) for s in args.sizes.split(",")]
    fd = os.open(args.file, os.O_RDONLY | (0 if args.buffered else os.O_DIRECT))
    try:
        file_size = os.fstat(fd).st_size
        if file_size < 2 * max(sizes) * 1024:
            raise SystemExit(f"{args.file} is {file_size} bytes: too small for {max(sizes)} KiB random reads")
        best = {s: float("inf") for s in sizes}
        for r in range(args.repeats):  # rounds interleave the sizes, so drift on a shared box hits all alike
            for s in sizes:
                best[s] = min(best[s], block_us(fd, file_size, s, args.iters, seed=r))
    finally:
        os.close(fd)
    for s in sizes:
        print(f"read {s:>5} KiB before each block: {best[s]:7.1f} µs ({best[s] / best[sizes[0]]:.2f}x)")
    json.dump({"command": "python benchmarks/io_interference.py " + " ".join(
                   [args.file, "--sizes", args.sizes, *(["--buffered"] if args.buffered else []), "--iters",
                    str(args.iters), "--repeats", str(args.repeats), "--json", args.json]),
               "torch": torch.__version__, "direct_io": not args.buffered,
               "block_us": {str(s): best[s] for s in sizes}}, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
