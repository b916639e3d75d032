"""hobbit bench on the tiny store: JSON schema, recomputable numbers, belady from a trace, plot."""
from __future__ import annotations

import argparse
import json

import pytest

from hobbit.lab.bench import Config, add_bench_args, cmd_bench, configs, cut_prompts, mobile_variants
from hobbit.lab.bench_report import format_table

RUN_KEYS = {"policy": str, "budget_bytes": int, "budget_fraction": float, "prefill_s": float, "decode_tok_s": float,
            "hit_rate": float, "hit_rate_by_precision": dict, "bytes_per_token": float, "loader_wait_frac": float,
            "skipped_frac": float, "ppl": float, "ppl_full_precision": float, "top1_agreement": float}


def test_configs_and_prompts():
    cfgs = configs(["resident", "lru", "ondemand", "lru"], ["10%", "50%"])
    assert cfgs == [Config("resident", None), Config("lru", "10%"), Config("lru", "50%"), Config("ondemand", None)]
    with pytest.raises(ValueError, match="unknown policies"):
        configs(["fifo"], ["10%"])
    parser = argparse.ArgumentParser()
    add_bench_args(parser.add_subparsers())
    args = parser.parse_args(["bench", "store", "--gamma", "0.7,0.3", "--fallback-prefetch", "fit,always"])
    variants = mobile_variants(args)
    assert variants == [dict(gamma=g, fallback_prefetch=f) for g in (0.7, 0.3) for f in ("fit", "always")]
    cfgs = configs(["lru", "hobbit+mobile"], ["25%"], variants)
    assert cfgs[0] == Config("lru", "25%") and len(cfgs) == 5  # only MoBiLE policies take the variants
    assert cfgs[-1].name == "hobbit+mobile gamma=0.3 fallback_prefetch=always"
    assert mobile_variants(parser.parse_args(["bench", "store"])) == [{}]
    ids = list(range(1000))
    items = cut_prompts(ids, [16, 128], [32, 128], per_pair=2)
    assert [(len(p), n) for p, n in items] == [(16, 32), (16, 128), (128, 32), (128, 128)] * 2
    assert len({p[0] for p, _ in items}) == len(items)  # every prompt starts elsewhere
    assert all(p == ids[p[0]:p[0] + len(p)] for p, _ in items)


@pytest.fixture(scope="module")
def bench_result(tiny_store, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    text = tmp / "text.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                    "must be in want of a wife.\n" * 6, encoding="utf-8")
    parser = argparse.ArgumentParser()
    add_bench_args(parser.add_subparsers())
    args = parser.parse_args(["bench", str(tiny_store), "--budget", "1%,50%", "--policies", "resident,ondemand,lru,belady",
                              "--text", str(text), "--split", "all", "--prompt-tokens", "8,16",
                              "--max-new-tokens", "6", "--window", "64", "--max-tokens", "128", "--profile", "3",
                              "--json", str(tmp / "out.json"), "--plot", str(tmp / "out.png")])
    assert cmd_bench(args) == 0
    return json.loads((tmp / "out.json").read_text()), tmp


def test_schema(bench_result):
    out, tmp = bench_result
    assert {"machine", "model", "runs"} <= set(out)
    m = out["machine"]
    assert isinstance(m["cpu"], str) and m["cores"] >= 1 and m["ram_bytes"] > 0 and m["threads"] == 1
    assert isinstance(m["torch"], str)
    assert out["model"]["arch"] == "qwen2_moe" and out["model"]["precisions"][0] == "bf16"
    assert [(r["policy"], r["budget_fraction"]) for r in out["runs"]] == [
        ("resident", 1.0), ("ondemand", None), ("lru", pytest.approx(0.5)), ("belady", pytest.approx(0.5))]
    # 1% is below one layer's active experts: reported, not run
    assert [(f["policy"], f["budget"]) for f in out["failed"]] == [("lru", "1%"), ("belady", "1%")]
    for run in out["runs"]:
        for key, typ in RUN_KEYS.items():
            ok = typ if run["policy"] != "ondemand" or key not in ("budget_bytes", "budget_fraction") else type(None)
            assert isinstance(run[key], ok), (run["policy"], key, run[key])
    assert (tmp / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_numbers_recomputable(bench_result):
    out, _ = bench_result
    total = out["model"]["expert_bytes"]["bf16"]
    for r in out["runs"]:
        s = r["samples"]
        assert len(s) == 2 and {x["prompt_tokens"] for x in s} == {8, 16} and all(x["generated_tokens"] == 6 for x in s)
        assert r["tokens"] == sum(x["prompt_tokens"] + x["generated_tokens"] for x in s)
        assert r["bytes_read"] == sum(x["bytes_read"] for x in s)
        assert r["bytes_per_token"] == pytest.approx(r["bytes_read"] / r["tokens"])
        assert r["hit_rate"] == pytest.approx(r["hits"] / (r["hits"] + r["misses"]))
        for p, rate in r["hit_rate_by_precision"].items():
            assert rate == pytest.approx(r["hits_by_precision"][p] / (r["hits_by_precision"][p] + r["misses_by_precision"][p]))
        assert r["prefill_s"] == pytest.approx(sum(x["prefill_s"] for x in s) / len(s))
        assert r["decode_tok_s"] == pytest.approx(sum(x["decode_tokens"] for x in s) / sum(x["decode_s"] for x in s))
        assert r["loader_wait_frac"] == pytest.approx(r["loader_wait_s"] / (r["prefill_s_total"] + r["decode_s_total"]))
        assert r["skipped_frac"] == pytest.approx(r["skipped"] / r["selections"])
        assert r["ppl_delta_pct"] == pytest.approx(100 * (r["ppl"] / r["ppl_full_precision"] - 1))
        if r["policy"] != "ondemand":
            assert r["budget_fraction"] == pytest.approx(r["budget_bytes"] / total)
        # full-precision policies compute the same numbers as the reference
        assert r["ppl"] == pytest.approx(r["ppl_full_precision"], rel=1e-9) and r["top1_agreement"] == 1.0
    runs = {r["policy"]: r for r in out["runs"]}
    assert runs["resident"]["hit_rate"] == 1.0 and runs["resident"]["bytes_read"] == 0
    assert 0 < runs["lru"]["bytes_read"] < runs["ondemand"]["bytes_read"]
    # belady replays the trace of the same calls, so it can only miss less than lru at that budget
    assert runs["belady"]["misses"] <= runs["lru"]["misses"]


def test_table_rows_come_from_the_json(bench_result):
    out, _ = bench_result
    lines = format_table(out["runs"]).splitlines()
    assert lines[0].split()[:3] == ["policy", "budget", "MiB"] and len(lines) == 1 + len(out["runs"])
    for line, r in zip(lines[1:], out["runs"]):
        cells = line.split()
        assert cells[0] == r["policy"]
        assert f"{r['decode_tok_s']:.2f}" in cells and f"{r['ppl']:.3f}" in cells
        assert f"{r['bytes_per_token'] / 1024:.1f}" in cells and f"{r['top1_agreement']:.1%}" in cells


def test_load_overhead_is_recomputable(bench_result):
    out, _ = bench_result
    lo, runs = out["load_overhead"], {r["policy"]: r for r in out["runs"]}
    assert lo["ondemand_s_per_token"] == pytest.approx(1 / runs["ondemand"]["decode_tok_s"])
    assert lo["resident_s_per_token"] == pytest.approx(1 / runs["resident"]["decode_tok_s"])
    m = out["model"]
    assert lo["bytes_per_token"] == m["top_k"] * m["sparse_layers"] * m["expert_bytes"]["bf16"] // (
        m["sparse_layers"] * m["num_experts"])  # every bf16 blob of the tiny store has one size
    assert lo["disk_read_gbps"] > 0
    assert lo["raw_read_s_per_token"] == pytest.approx(lo["bytes_per_token"] / (lo["disk_read_gbps"] * 1e9))
    assert lo["load_overhead_ratio"] == pytest.approx(
        (lo["ondemand_s_per_token"] - lo["resident_s_per_token"]) / lo["raw_read_s_per_token"])
    assert lo["checksum_cost"] == pytest.approx(lo["disk_read_gbps"] / lo["checksum_gbps"])


def test_profile_split_per_configuration(bench_result):
    out, _ = bench_result
    for r in out["runs"]:
        split = r["profile_ms_per_token"]
        assert set(split) == {"attention", "router", "dense_mlp", "experts_compute", "load_wait", "predict",
                              "scheduler", "lm_head", "sampling", "other"}
        assert split["attention"] > 0 and split["lm_head"] > 0 and split["experts_compute"] > 0
        if r["policy"] == "resident":
            assert split["load_wait"] == 0  # nothing is ever loaded
        if r["policy"] == "ondemand":
            assert split["load_wait"] > 0  # every expert is read while the compute thread waits


def test_reference_ignores_dense_overrides(tiny_store, tmp_path):
    """--dense / --lm-head change the configurations, never the full-precision reference they are scored against."""
    text = tmp_path / "text.txt"
    text.write_text("It is a truth universally acknowledged, that a single man must be in want of a wife.\n" * 4)
    refs = []
    for flags in ([], ["--dense", "int8", "--lm-head", "int4"]):
        parser = argparse.ArgumentParser()
        add_bench_args(parser.add_subparsers())
        out = tmp_path / f"out{len(flags)}.json"
        assert cmd_bench(parser.parse_args(["bench", str(tiny_store), "--policies", "resident", "--text", str(text),
                                            "--split", "all", "--prompt-tokens", "8", "--max-new-tokens", "2",
                                            "--window", "32", "--max-tokens", "64", "--json", str(out), *flags])) == 0
        run = json.loads(out.read_text())["runs"][0]
        refs.append((run["ppl_full_precision"], run["ppl"]))
    assert refs[0][0] == refs[1][0] == refs[0][1]  # same reference; resident as stored is the reference
    assert refs[1][1] != refs[1][0]  # the overridden dense weights do change the scored run


def test_reference_bf16_dequantizes_every_dense_weight(tiny_store, tmp_path):
    """--reference bf16 scores against the store with its dense weights and LM head at bf16: a resident run
    with --dense bf16 --lm-head bf16 is exactly it, and it is another model than the stored dense weights."""
    text = tmp_path / "text.txt"
    text.write_text("It is a truth universally acknowledged, that a single man must be in want of a wife.\n" * 4)
    runs = {}
    for name, flags in (("stored", []), ("bf16", ["--dense", "bf16", "--lm-head", "bf16"])):
        parser = argparse.ArgumentParser()
        add_bench_args(parser.add_subparsers())
        out = tmp_path / f"{name}.json"
        assert cmd_bench(parser.parse_args(["bench", str(tiny_store), "--policies", "resident", "--text", str(text),
                                            "--split", "all", "--prompt-tokens", "8", "--max-new-tokens", "2",
                                            "--window", "32", "--max-tokens", "64", "--reference", "bf16",
                                            "--json", str(out), *flags])) == 0
        doc = json.loads(out.read_text())
        assert doc["settings"]["reference"] == "bf16"
        runs[name] = doc["runs"][0]
    assert runs["bf16"]["ppl"] == runs["bf16"]["ppl_full_precision"] and runs["bf16"]["top1_agreement"] == 1.0
    assert runs["stored"]["ppl_full_precision"] == runs["bf16"]["ppl_full_precision"]
    assert runs["stored"]["ppl"] != runs["stored"]["ppl_full_precision"]
