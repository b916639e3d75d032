"""hobbit study: the importance signals and the per-token rule (unit), and the whole command on the tiny
store: the report's structure, every table number a value of study.json, resume and re-render."""
from __future__ import annotations

import json
import re

import pytest
import torch

import hobbit
from hobbit.cli import main
from hobbit.lab.study_measure import (PerTokenPrecision, bottom, eq2_scores, low_share, routing_stats, signals,
                                      spearman, t1_for_share)
from hobbit.lab.study_analysis import FMT, fmt
from hobbit.runtime.trace import LayerCall



def call(seq, layer, ids, w):
    return LayerCall(seq, 0, layer, ids, w, None, {})


CALLS = [call(0, 1, [[0, 1], [0, 2], [3, 0]], [[0.7, 0.3], [0.6, 0.4], [0.9, 0.1]]),
         call(1, 1, [[1, 0]], [[0.5, 0.5]])]


def test_signals_definitions():
    p_top = {(0, 0): 0.9, (0, 1): 0.5, (0, 2): 0.2, (1, 0): 0.8}
    nll = {(0, 0): 1.0, (0, 1): 2.0, (0, 2): 3.0}
    st = routing_stats(CALLS, p_top, nll)
    assert st["tokens"] == {"1": 4}
    keys = [f"1/{e}" for e in range(5)]
    s = signals(st, keys)
    assert s["frequency"]["1/0"] == 4 / 4 and s["frequency"]["1/4"] == 0
    assert s["weight"]["1/0"] == pytest.approx((0.7 + 0.6 + 0.1 + 0.5) / 4)
    assert s["hybrid"]["1/0"] == pytest.approx((0.7 + 0.6 + 0.1 + 0.5) / 4)  # frequency x mean weight
    assert s["hybrid"]["1/3"] == pytest.approx(0.9 / 4) and s["weight"]["1/3"] == pytest.approx(0.9)
    assert s["confidence"]["1/2"] == pytest.approx(0.5)  # 1 - p_top of its one token
    assert s["confidence"]["1/0"] == pytest.approx((0.1 + 0.5 + 0.8 + 0.2) / 4)
    assert s["loss"]["1/3"] == pytest.approx(3.0)
    # weight favours the rare expert 3 (one heavy selection); frequency and hybrid favour expert 0
    assert bottom(s["weight"], 0.4) == ["1/4", "1/1"]  # 1/1 and 1/2 tie at 0.4: lower id first
    assert bottom(s["frequency"], 0.4) == ["1/4", "1/2"]  # tie (1 selection each) broken by expert id
    assert bottom(s["hybrid"], 1.0)[-1] == "1/0"
    assert bottom(s["weight"], 0.0) == []


def test_eq2_threshold_for_a_low_share():
    scores, total = eq2_scores(CALLS)
    assert total == 8 and sorted(scores) == pytest.approx([0.5, 0.6, 0.7, 0.9])
    assert t1_for_share(scores, total, 0.0) == 1.0
    for share, want in ((0.125, 1), (0.25, 2), (0.5, 4), (0.9, 4)):  # at most the non-top-1 selections
        t1 = t1_for_share(scores, total, share)
        assert low_share(CALLS, t1) == want / total


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2], [5, 5, 6]) == pytest.approx(1.0)


def test_per_token_rule_provider(tiny_store):
    """t1 = 1: nothing goes low, bit for bit the resident engine; t1 = 0: every second expert runs low."""
    prompt = [3, 17, 42, 99, 7, 128, 64, 5]
    ref = hobbit.load(tiny_store, policy="resident")
    want = ref.logits(prompt)
    low = hobbit.load(tiny_store, policy="resident", high="int2")
    ref.model.provider = PerTokenPrecision(ref.provider.resident, low.provider.resident, 1.0)
    assert torch.equal(ref.logits(prompt), want)
    ref.model.provider = PerTokenPrecision(ref.provider.resident, low.provider.resident, 0.0)
    assert not torch.equal(ref.logits(prompt), want)
    ref.close(), low.close()


def _numbers(doc) -> set[str]:
    out = set()

    def walk(v):
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            for kind in FMT:
                out.add(fmt(v, kind))
    walk(doc)
    return out


def test_study_command_on_the_tiny_store(tiny_store, tmp_path):
    words = "the quick brown fox jumps over a lazy dog while hobbits sing of rings and rivers".split()
    for i, name in enumerate(("calib", "a", "b")):
        g = torch.Generator().manual_seed(i)
        (tmp_path / f"{name}.txt").write_text(" ".join(words[j] for j in torch.randint(len(words), (600,), generator=g)))
    out = tmp_path / "study"
    argv = ["study", str(tiny_store), "--out", str(out), "--fractions", "0,50,100", "--bits", "4,2",
            "--signals", "hybrid,confidence", "--dynamic-fractions", "25", "--native-fractions", "50",
            "--window", "32", "--windows", "1", "--calib-tokens", "64", "--trace-tokens", "12",
            "--budgets", "25,50", "--links", "1,10", "--calib-text", str(tmp_path / "calib.txt"),
            "--eval-text", f"a={tmp_path / 'a.txt'}", "--eval-text", f"b={tmp_path / 'b.txt'}"]
    assert main(argv) == 0
    report = (out / "report.md").read_text()
    doc = json.loads((out / "study.json").read_text())
    for head in ("## Decision", "## Setup", "quality", "which importance signal", "resident experts per budget",
                 "modeled decode speed", "expert kernel time", "## Reproduce"):
        assert head in report, head
    s = doc["stores"][0]
    for png in (f"quality_{s['store']}.png", f"frontier_{s['store']}.png", f"speed_{s['store']}.png"):
        assert (out / png).stat().st_size > 1000
    assert {p["kind"] for p in s["points"]} == {"baseline", "uniform", "static", "native", "dynamic"}
    assert {p["fmt"] for p in s["points"] if p["kind"] == "static"} == {"int4", "int2"}
    assert s["command"] in report and (out / ".gitignore").read_text() == "cache/\n"
    ram = s["ram_bytes"]["int2"] / s["ram_bytes"]["int4"]  # an int2 slot holds its stored codes where the kernels read them
    assert doc["summary"]["int2_ram_over_int4"] == [ram] and f"int2 expert's RAM slot at {ram:.2f}x" in report
    from hobbit import kernels
    assert (ram < 1) == kernels.available()

    # every number in a table cell is a value of study.json in one of the report's formats
    known = _numbers(doc)
    cells = [c.strip() for line in report.splitlines() if line.startswith("| ") for c in line.strip("|").split("|")]
    checked = 0
    for c in cells:
        for num in re.findall(r"-?\d+(?:\.\d+)?(?:%|x)?", c):
            if re.fullmatch(r"-?\d+(?:\.\d+)?(?:%|x)?", c.replace(" GB/s", "").split(" (")[0]) is None:
                continue  # a name with digits in it (bf16+int2, ...)
            assert num in known or num.rstrip("%") in known, f"{num!r} in cell {c!r} is not a study.json value"
            checked += 1
    assert checked > 100

    # a rerun resumes from the cache; a re-render shows a changed JSON value
    cache = sorted((out / "cache").rglob("*.json"))
    stamps = [p.stat().st_mtime_ns for p in cache]
    assert main(argv) == 0
    assert [p.stat().st_mtime_ns for p in cache] == stamps
    doc["stores"][0]["points"][0]["texts"]["a"]["ppl"] = 123.4567
    (out / "study.json").write_text(json.dumps(doc))
    assert main(["study", "--out", str(out), "--render-only"]) == 0
    assert "123.457" in (out / "report.md").read_text()


def test_study_on_a_store_whose_top_tier_is_int4(tmp_path, monkeypatch):
    """A Q4 GGUF converts to int4,int2 by default: the study runs on it (int4 is its full precision, so it
    gets its own decision and stays out of the cross-store answer, which is about float tiers above int4)."""
    from gguf import GGMLQuantizationType as Q
    from hobbit.store.convert import convert
    from test_gguf import EXPERTS, QTYPES, train_bpe, write_gguf
    monkeypatch.setitem(QTYPES, "ffn_up_exps", Q.Q4_0)
    write_gguf(tmp_path / "q4.gguf", train_bpe(), experts=EXPERTS, seed=2)
    store = convert(tmp_path / "q4.gguf", tmp_path / "store", progress=False)
    words = "the quick brown fox jumps over a lazy dog while hobbits sing of rings and rivers".split()
    for i, name in enumerate(("calib", "a")):
        g = torch.Generator().manual_seed(i)
        (tmp_path / f"{name}.txt").write_text(" ".join(words[j] for j in torch.randint(len(words), (600,), generator=g)))
    out = tmp_path / "study"
    assert main(["study", str(store), "--out", str(out), "--fractions", "0,50", "--bits", "2", "--signals", "hybrid",
                 "--dynamic-fractions", "25", "--native-fractions", "50", "--window", "32", "--windows", "1",
                 "--calib-tokens", "64", "--trace-tokens", "12", "--budgets", "50", "--links", "1",
                 "--calib-text", str(tmp_path / "calib.txt"), "--eval-text", f"a={tmp_path / 'a.txt'}"]) == 0
    doc = json.loads((out / "study.json").read_text())
    s = doc["stores"][0]
    assert (s["high"], s["native"]) == ("int4", "int4 (as its gguf source shipped the experts)")
    assert doc["summary"]["stores"] == 0 and "**Answer" not in (out / "report.md").read_text()
    assert s["analysis"]["decision"]["total_cells"] == 1
