"""benchmarks/gguf_defaults.py end to end on a tiny Q4 MoE GGUF: both stores, interleaved runs, the JSON."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as Q

from test_gguf import EXPERTS, QTYPES, train_bpe, write_gguf

_BENCH = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(_BENCH))
_spec = importlib.util.spec_from_file_location("gguf_defaults", _BENCH / "gguf_defaults.py")
gd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gd)


def test_both_stores_at_each_budget(tmp_path, monkeypatch):
    monkeypatch.setitem(QTYPES, "ffn_up_exps", Q.Q4_0)  # every expert tensor on a 4-bit grid
    gguf = tmp_path / "tiny-moe-q4.gguf"
    write_gguf(gguf, train_bpe(), experts=EXPERTS, seed=2)
    out = tmp_path / "out.json"
    monkeypatch.setattr(sys, "argv", ["gguf_defaults.py", "--gguf", str(gguf), "--work", str(tmp_path / "w"),
                                      "--budgets", "200000,400000", "--tokens", "3", "--rounds", "2", "--json", str(out)])
    gd.main()
    d = json.loads(out.read_text())
    old = "bf16 on top (the old default)"
    assert d["stores"]["default"]["precisions"] == ["int4", "int2"] and d["stores"][old]["precisions"][0] == "bf16"
    assert d["stores"]["default"]["source_precision"] == d["stores"][old]["source_precision"] == "int4"
    assert d["stores"]["default"]["disk_mib"] < d["stores"][old]["disk_mib"]
    assert len(d["runs"]) == 2 * 2 * 2 and {r["round"] for r in d["runs"]} == {0, 1}
    for b in (200000, 400000):
        best = d["best"][f"default@{b}"]
        assert best["decode_tok_s"] == max(r["decode_tok_s"] for r in d["runs"]
                                           if r["store"] == "default" and r["budget_bytes"] == b)
        assert d["ratios"][str(b)] == best["decode_tok_s"] / d["best"][f"{old}@{b}"]["decode_tok_s"]
    argv = sys.argv[:]
    argv[argv.index("--budgets") + 1] = "1000"  # below one layer's active experts: hobbit's own error, not a bare exit
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit, match=r"--budget 1000 failed: (?s:.*)too small"):
        gd.main()
