"""benchmarks/io_interference.py runs its block after each read and reports the mean block time."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "io_interference", Path(__file__).resolve().parents[1] / "benchmarks" / "io_interference.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_block_after_reads(tmp_path, monkeypatch):
    f = tmp_path / "blob"
    f.write_bytes(os.urandom(256 * 1024))
    reads = []
    real = os.preadv
    monkeypatch.setattr(bench.os, "preadv", lambda fd, bufs, off: reads.append(off) or real(fd, bufs, off))
    fd = os.open(f, os.O_RDONLY)  # buffered: tmp_path may not take O_DIRECT
    try:
        assert bench.block_us(fd, 256 * 1024, 0, 5, seed=0) > 0 and reads == []
        assert bench.block_us(fd, 256 * 1024, 8, 5, seed=0) > 0
    finally:
        os.close(fd)
    assert len(reads) == 5 and all(off % 4096 == 0 and off + 8192 <= 256 * 1024 for off in reads)
