"""hobbit simulate: the replay's counters are the live engine's on the same routing; prefetch cuts
demand stalls; prefetch does not change results; bad traces fail clearly."""
from __future__ import annotations

import gzip
import json

import pytest
import torch

import hobbit
from hobbit.runtime.loader import DEMAND, PREFETCH
from hobbit.runtime.options import Options
from hobbit.lab.simulate import add_simulate_args, cmd_simulate, load_trace, parse_budget_for, simulate

from tiny import decode_logits

PROMPTS = ([3, 17, 42, 99, 7, 128, 64, 5, 200, 11, 31, 77], [9, 250, 14, 61])
NEW_TOKENS = 24
BUDGET = "45%"

# (policy, Options overrides): the settings checked against the live engine
SETTINGS = [
    ("resident", {}),
    ("ondemand", {}),
    ("lru", {}),
    ("lfu", {}),
    ("slru", {}),
    ("lru+prefetch", {}),
    ("hobbit", {"prefetch_depth": 0}),
    ("hobbit", {}),  # prefetch depth 2
    ("lru", {"little": 0.6}),  # the routing-mass little rule
    ("lru", {"little_rule": "adapmoe", "little": 0.3}),  # AdapMoE's weight threshold
    ("mobile", {"gamma": 0.035}),  # MoBiLE: little passes, some redone big (the tiny model's confidences)
    ("hobbit+mobile", {"gamma": 0.035}),
    # no loader thread: every fallback read is still queued when its token is accepted, so it is cancelled
    # (the trace records which; the replay's cache drops the same keys)
    ("mobile", {"gamma": 0.035, "io_threads": 0}),
    ("hobbit+mobile", {"gamma": 0.035, "io_threads": 0}),
    # a pool below a token's big set (2 sparse layers x top-2 > 3 slots): 'fit' withholds the fallback reads
    # (lru's one pool: all; hobbit's two: where the tier's pool is short), 'always' issues them
    ("mobile", {"gamma": 0.035, "budget": "20%"}),
    ("hobbit+mobile", {"gamma": 0.035, "budget": "20%"}),
    ("mobile", {"gamma": 0.035, "budget": "20%", "fallback_prefetch": "always"}),
    ("hobbit+mobile", {"gamma": 0.035, "fallback_prefetch": "never"}),
]

COMPARED = ("hits_by_precision", "misses_by_precision", "skipped", "selections", "evictions", "prefetch_issued",
            "prefetch_used", "little_steps", "fallbacks", "fallback_redone", "fallback_prefetch_issued", "fallback_prefetch_used",
            "fallback_prefetch_withheld", "fallback_prefetch_cancelled", "stale_prefetch_cancelled")


def live_run(store, trace, policy, budget=BUDGET, **options):
    """Two greedy sequences through the live engine, recording the trace."""
    eng = hobbit.load(store, budget=budget, policy=policy, low="int4" if "hobbit" in policy else None,
                      trace=trace, **options)
    read0 = eng.store.bytes_read  # resident reads every expert at load
    outs = [eng.generate(p, max_new_tokens=NEW_TOKENS, stop_token_ids=[]) for p in PROMPTS]
    eng.provider.fetcher.drain()  # the reads still queued (io_threads 0 runs them only when waited for)
    # the store's reads include those that landed after the last generate's counters were taken
    stats = dict(eng.provider.stats.as_dict(), store_bytes_read=eng.store.bytes_read - read0)
    opt, budget = eng.provider.opt, eng.budget_bytes
    loads = dict(eng.provider.loader.loads)
    eng.close()
    return stats, opt, budget, outs, loads


@pytest.mark.parametrize("policy,overrides", SETTINGS, ids=[f"{p}-{o}" for p, o in SETTINGS])
def test_simulate_matches_live_engine(tiny_store, tmp_path, policy, overrides):
    trace = tmp_path / "t.trace.gz"
    live, opt, budget, outs, loads = live_run(tiny_store, trace, policy, **overrides)
    header, calls = load_trace(trace)
    cached = policy not in ("resident", "ondemand")
    assert (parse_budget_for(overrides.get("budget", BUDGET), header) if cached else None) == budget
    sim = simulate(header, calls, opt, budget, link_gbps=2.0)
    for k in COMPARED:
        assert sim[k] == live[k], f"{k}: simulated {sim[k]} != live {live[k]}"
    assert (sim["misses"] > 0) == (policy != "resident")
    assert (sim["hits"] > 0) == (policy != "ondemand")
    assert (sim["evictions"] > 0) == cached, "the budget should make the cache work"
    assert sim["ram_bytes_demand"] == live["bytes_demand"]
    assert sim["ram_bytes_prefetch"] == live["bytes_prefetch"]
    assert sim["ram_fallback_bytes_saved"] == live["fallback_bytes_saved"]
    assert sim["prediction"] == live["prediction"]
    # the live loader's reads are the simulated loads; its store reads are the simulated disk bytes
    # (less the prefetches whose slot was reused before their read started, and the fallback reads an
    # accepted little pass dropped before they started, and the prefetches a router made stale before they
    # started: the live loader never runs those)
    cancelled = live["prefetch_cancelled"] + live["fallback_prefetch_cancelled"] + live["stale_prefetch_cancelled"]
    assert loads == {DEMAND: sim["misses"], PREFETCH: sim["prefetch_loads"] - cancelled}
    read = live["store_bytes_read"]
    assert read >= sum(o.stats["bytes_read"] for o in outs)
    assert read + cancelled * max(header["expert_disk_bytes"].values()) >= \
        sim["bytes_demand"] + sim["bytes_prefetch"] >= read
    assert sum(sim["selections_by_precision"].values()) + sim["skipped"] == sim["selections"]
    assert sim["sequences"] == len(PROMPTS)
    # a redo is a pass, over its token and the tokens accepted little since the last big pass
    assert sim["tokens"] == sum(len(p) + NEW_TOKENS - 1 for p in PROMPTS) + live["fallbacks"] + live["fallback_redone"]
    if opt.mobile:
        assert 0 < sim["fallbacks"] < sim["little_steps"] == len(PROMPTS) * (NEW_TOKENS - 1)
        assert sim["policy"] == policy
        mode, small = opt.fallback_prefetch, "budget" in overrides
        assert (sim["fallback_prefetch_issued"] > 0) == (mode == "always" or mode == "fit" and
                                                         (not small or policy == "hobbit+mobile"))
        assert (sim["fallback_prefetch_withheld"] > 0) == (mode == "never" or mode == "fit" and small)
        if overrides.get("io_threads") == 0:
            assert sim["fallback_prefetch_cancelled"] > 0 and sim["fallback_bytes_saved"] > 0
    assert sim["demand_s"] == pytest.approx(sim["bytes_demand"] / 2e9)
    if "hobbit" in policy:
        assert sim["hits_by_precision"].get("int4", 0) + sim["misses_by_precision"].get("int4", 0) > 0
        assert sim["skipped"] > 0
        assert 0 < sim["low_share"] < 1
    if opt.depth:
        assert sim["prefetch_issued"] > 0 and sim["prediction"]["samples"] > 0


def test_one_full_precision_trace_replays_every_full_precision_policy(tiny_store, tmp_path):
    """Full-precision policies compute the same tokens, so a trace recorded under lru predicts the
    live counters of lfu, slru and lru+prefetch too. (An lru trace cannot say which prefetch reads a live
    lru+prefetch run drops unread when its router chooses otherwise: the replay counts every read as
    landed, so the live run keeps them here too.)"""
    trace = tmp_path / "lru.trace.gz"
    live_run(tiny_store, trace, "lru")
    header, calls = load_trace(trace)
    for policy in ("lfu", "slru", "lru+prefetch"):
        live, opt, budget, _, _ = live_run(tiny_store, None, policy, keep_stale_prefetch=policy == "lru+prefetch")
        sim = simulate(header, calls, opt, budget)
        for k in COMPARED:
            assert sim[k] == live[k], f"{policy} {k}: simulated {sim[k]} != live {live[k]}"


def test_prefetch_reduces_demand_stalls(tiny_store, tmp_path):
    trace = tmp_path / "t.trace.gz"
    _, opt, budget, _, _ = live_run(tiny_store, trace, "lru")
    header, calls = load_trace(trace)
    for policy in ("lru", "hobbit"):
        base = Options(policy=policy, high="bf16", low="int4" if policy == "hobbit" else None)
        none = simulate(header, calls, Options(**{**base.__dict__, "prefetch_depth": 0}), budget, link_gbps=1.0)
        pre = simulate(header, calls, Options(**{**base.__dict__, "prefetch_depth": 1}), budget, link_gbps=1.0)
        assert pre["prefetch_issued"] > 0 and pre["prefetch_used"] > 0
        assert pre["misses"] < none["misses"], policy
        assert pre["demand_s"] < none["demand_s"], policy
        assert pre["phases"]["decode"]["demand_s_per_token"] < none["phases"]["decode"]["demand_s_per_token"]


def test_belady_is_a_bound(tiny_store, tmp_path):
    trace = tmp_path / "t.trace.gz"
    _, _, budget, _, _ = live_run(tiny_store, trace, "lru")
    header, calls = load_trace(trace)
    misses = {p: simulate(header, calls, Options(policy=p, high="bf16"), budget)["misses"]
              for p in ("lru", "lfu", "slru", "belady")}
    assert misses["belady"] <= min(misses.values())
    ondemand = simulate(header, calls, Options(policy="ondemand", high="bf16"), None)
    assert ondemand["hits"] == 0 and ondemand["misses"] >= misses["lru"]


def test_prefetch_leaves_results_unchanged(tiny_store):
    results = {}
    for policy, kw in (("lru", {}), ("lru+prefetch", {}), ("lru+prefetch", {"io_threads": 2})):
        eng = hobbit.load(tiny_store, budget=BUDGET, policy=policy, **kw)
        results[(policy, bool(kw))] = decode_logits(eng, PROMPTS[0], NEW_TOKENS)
        if policy != "lru":
            assert eng.provider.stats.prefetch_issued > 0
        eng.close()
    ref_logits, ref_toks = results[("lru", False)]
    for key, (logits, toks) in results.items():
        assert toks == ref_toks, key
        assert torch.equal(logits, ref_logits), key


def _args(trace, *extra):
    import argparse
    ap = argparse.ArgumentParser()
    add_simulate_args(ap.add_subparsers())
    return ap.parse_args(["simulate", str(trace), *extra])


def test_cli(tiny_store, tmp_path, capsys):
    trace = tmp_path / "t.trace.gz"
    live, _, _, _, _ = live_run(tiny_store, trace, "hobbit", prefetch_depth=0)
    assert cmd_simulate(_args(trace, "--policy", "hobbit", "--budget", BUDGET, "--low", "int4",
                              "--prefetch-depth", "0", "--json")) == 0
    r = json.loads(capsys.readouterr().out)
    for k in COMPARED:
        assert r[k] == live[k]
    assert cmd_simulate(_args(trace, "--policy", "hobbit", "--budget", "50%", "--link", "3", "--t1", "0.5",
                              "--weights", "lru=1,lfu=0,lhu=0,fld=1")) == 0
    text = capsys.readouterr().out
    assert "hit rate" in text and "modeled load time" in text and "t1 0.5" in text
    assert cmd_simulate(_args(trace, "--policy", "lru", "--budget", BUDGET, "--little", "0.6", "--json")) == 0
    little = json.loads(capsys.readouterr().out)
    assert little["options"]["little"] == 0.6 and little["skipped"] > 0
    assert cmd_simulate(_args(trace, "--policy", "lru", "--budget", BUDGET, "--little-rule", "adapmoe", "--little",
                              "0.3", "--json")) == 0
    adap = json.loads(capsys.readouterr().out)
    assert adap["options"]["little_rule"] == "adapmoe" and adap["skipped"] > 0
    with pytest.raises(ValueError, match="weights"):
        cmd_simulate(_args(trace, "--policy", "lru", "--budget", "50%", "--weights", "lru=1"))
    with pytest.raises(ValueError, match="not in the trace's store"):
        cmd_simulate(_args(trace, "--policy", "lru", "--budget", "50%", "--high", "fp32"))
    with pytest.raises(ValueError, match="too small"):
        cmd_simulate(_args(trace, "--policy", "lru", "--budget", "1000"))


def test_bad_trace_files(tmp_path):
    def gz(name, text):
        p = tmp_path / name
        with gzip.open(p, "wt") as f:
            f.write(text)
        return p

    plain = tmp_path / "plain.txt"
    plain.write_text("hello\n")
    cases = {
        plain: "not a readable hobbit routing trace",
        tmp_path / "missing.gz": "not a readable hobbit routing trace",
        gz("empty.gz", ""): "not a readable",
        gz("other.gz", json.dumps({"format": "something"}) + "\n"): "not a hobbit routing trace",
        gz("list.gz", "[1, 2]\n"): "not a (readable )?hobbit routing trace",
        gz("nohdr.gz", json.dumps({"format": "hobbit-trace", "version": 1}) + "\n"): "header lacks",
        gz("badrec.gz", json.dumps({"format": "hobbit-trace", "version": 1}) + "\n" + json.dumps({"seq": 0}) + "\n"):
            "not a (readable )?hobbit routing trace",
        gz("trunc.gz", json.dumps({"format": "hobbit-trace", "version": 1}) + "\n{\"seq\": 0, "): "not a readable",
    }
    for path, message in cases.items():
        with pytest.raises(ValueError, match=message):
            load_trace(path)
        with pytest.raises(ValueError, match=message):
            cmd_simulate(_args(path, "--budget", "25%"))


def test_default_precisions_follow_the_engine(tiny_store):
    from hobbit.store.quant import FORMATS
    from hobbit.lab.simulate import default_precisions
    from hobbit.runtime.config import FORMAT_ORDER
    assert FORMAT_ORDER == FORMATS
    h = {"precisions": ["bf16", "int8", "int4", "int2"]}
    assert default_precisions(h, "hobbit", None, None) == ("bf16", "int4")
    assert default_precisions(h, "hobbit", "int8", None) == ("int8", "int4")
    assert default_precisions({"precisions": ["int8", "int2"]}, "hobbit", None, None) == ("int8", "int2")
    assert default_precisions(h, "lru", None, None) == ("bf16", None)
    eng = hobbit.load(tiny_store, budget=BUDGET, policy="hobbit")
    assert (eng.provider.opt.high, eng.provider.opt.low) == default_precisions(h, "hobbit", None, None)
    eng.close()


def test_a_traced_stale_prefetch_is_replayed_as_dropped(tmp_path):
    """The writer puts a call's dropped prefetch reads on that call's record; the replay drops exactly
    those (a read the trace does not name landed, as every simulated read does)."""
    from hobbit.runtime.trace import TraceWriter
    header = dict(num_layers=2, sparse_layers=[0, 1], num_experts=8, top_k=2, precisions=["bf16"],
                  expert_ram_bytes={"bf16": 1 << 20}, expert_disk_bytes={"bf16": 1 << 20})
    path = tmp_path / "stale.trace.gz"
    for named in ([(1, 2, "bf16")], []):
        w = TraceWriter(path, header, logits=False)
        w.begin_sequence()
        w.record(0, 0, [([0, 5], [0.6, 0.4])], None, {1: [(1, 0.6), (2, 0.4)]})
        w.record(0, 1, [([1, 3], [0.7, 0.3])], None, {})
        w.stale(named)  # layer 1's router chose 1 and 3: the read of expert 2 was dropped, or it had landed
        w.close()
        _, calls = load_trace(path)
        assert [c.stale for c in calls] == [[], named]
        r = simulate(header, calls, Options(policy="lru+prefetch", high="bf16"), 4 << 20)
        assert r["prefetch_loads"] == 2 and r["stale_prefetch_cancelled"] == len(named)
        assert r["stale_bytes_saved"] == len(named) << 20
        assert r["evictions"] == (0 if named else 1)  # expert 3 takes the dropped read's slot
