"""benchmarks/target_bounds.py end to end on the tiny store: replays, the quality probe, the oracle bound."""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

_BENCH = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(_BENCH))  # the script imports its siblings (peer_common, peer_memory)
_spec = importlib.util.spec_from_file_location("target_bounds", _BENCH / "target_bounds.py")
tb = importlib.util.module_from_spec(_spec)
sys.modules["target_bounds"] = tb
_spec.loader.exec_module(tb)

MIB = 2 ** 20


def peer_json(path: Path) -> Path:
    rows = [dict(row="ondemand", limit="25%", best_tok_s=2.0, read_per_token=30 * MIB),
            dict(row="hobbit", limit="25%", best_tok_s=5.0, read_per_token=20 * MIB),  # 100 MiB/s: the fastest
            dict(row="llama.cpp", limit="25%", best_tok_s=1.0, read_per_token=500 * MIB),  # not hobbit's rate
            dict(row="resident", limit="unlimited", best_tok_s=100.0, read_per_token=0)]
    path.write_text(json.dumps({"summary": rows}))
    return path


def test_bounds_on_the_tiny_store(tiny_store, tmp_path):
    blobs = json.loads((tiny_store / "manifest.json").read_text())["blobs"]
    budget = sum(b["nbytes"] for k, b in blobs.items() if k.endswith("/bf16")) // 4
    text = tmp_path / "calib.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a fortune. " * 200)
    args = argparse.Namespace(store=tiny_store, budget=budget, high="bf16", low="int2", pairs="1:1,0:1", tokens=6,
                              quality_tokens=64, text=text, max_dppl=1.0, hobbit_args="",
                              peer=peer_json(tmp_path / "peer.json"), limit="25%")
    out = tb.bounds(args)
    base = out["baselines"]
    assert base["belady"]["total_mib"] <= min(base["lru"]["total_mib"], base["ondemand"]["total_mib"])
    assert base["belady"]["prefetch_mib"] == 0
    rows = {(r["t1"], r["prefetch_depth"]): r for r in out["hobbit"]}
    assert set(rows) == {(1.0, None), (1.0, 0), (0.0, None), (0.0, 0)}
    assert rows[(1.0, 0)]["prefetch_mib"] == rows[(0.0, 0)]["prefetch_mib"] == 0  # depth 0: no prefetch
    assert rows[(1.0, 0)]["dppl_pct"] == 0.0 and rows[(0.0, 0)]["dppl_pct"] != 0.0  # all high: the model itself
    assert out["fewest_within_quality"]["dppl_pct"] <= 1.0
    assert out["fewest_over_belady"] == pytest.approx(out["fewest_within_quality"]["total_mib"] / base["belady"]["total_mib"])
    assert out["peer"] == dict(limit="25%", ondemand_tok_s=2.0, ondemand_read_mib=30.0, peak_read_mib_s=100.0,
                               compute_ms=10.0)
    oracle = max(1e3 * base["belady"]["total_mib"] / 100.0, 10.0)
    assert out["oracle_ms_per_token"] == pytest.approx(oracle)
    assert out["oracle_vs_ondemand"] == pytest.approx(1e3 / oracle / 2.0)
    with pytest.raises(SystemExit, match="holds every expert"):
        tb.bounds(argparse.Namespace(**{**vars(args), "budget": 4 * budget}))
