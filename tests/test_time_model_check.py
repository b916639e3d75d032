"""benchmarks/time_model_check.py: live runs' traces replayed under a tune result's time model."""
from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from test_timeline import MODEL, _trace

_spec = importlib.util.spec_from_file_location("time_model_check",
                                               Path(__file__).parents[1] / "benchmarks" / "time_model_check.py")
tmc = importlib.util.module_from_spec(_spec)
sys.modules["time_model_check"] = tmc
_spec.loader.exec_module(tmc)


def test_modeled_beside_live(tmp_path):
    _trace(tmp_path)  # one.trace.gz: lru models 14 ms/token, lru+prefetch 12.5 under MODEL
    tune = tmp_path / "tune.json"
    tune.write_text(json.dumps({"options": {}, "calibration": {"time_model": MODEL.as_dict()}}))
    for name, tok_s in (("a_lru", 50.0), ("a_pf", 100.0)):  # live: 20 and 10 ms per token
        shutil.copy(tmp_path / "one.trace.gz", tmp_path / f"{name}.trace.gz")
        (tmp_path / f"{name}.json").write_text(json.dumps({"stats": {"budget_bytes": 8 << 20, "decode_tok_s": tok_s,
                                                                      "bytes_read": 4 << 20}}))
    cases = {"lru": {"runs": str(tmp_path / "a_lru.json"), "options": {"policy": "lru", "high": "bf16"}},
             "lru+prefetch": {"runs": str(tmp_path / "a_pf.json"), "options": {"policy": "lru+prefetch", "high": "bf16"}}}
    out = tmc.check(tune, cases)
    rows = {r["case"]: r for r in out["rows"]}
    assert rows["lru"]["modeled_ms_per_token"] == pytest.approx(14.0) and rows["lru"]["ratio"] == pytest.approx(0.7)
    assert rows["lru+prefetch"]["modeled_ms_per_token"] == pytest.approx(12.5)
    assert rows["lru"]["modeled_bytes_read"] == 4 << 20
    assert out["live_order"] == out["modeled_order"] == ["lru+prefetch", "lru"]
    with pytest.raises(SystemExit, match="no run JSON"):
        tmc.check(tune, {"x": {"runs": str(tmp_path / "none*.json"), "options": {"policy": "lru", "high": "bf16"}}})
