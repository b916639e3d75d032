"""The static per-expert precision map (Options.precision_map): an all-high map is resident bit for
bit; a mixed map computes each expert at its mapped precision, the same offloaded as resident, on
every policy, and `hobbit simulate` replays it as the live engine runs it."""
from __future__ import annotations

import pytest
import torch

import hobbit
from hobbit.lab.simulate import load_trace, simulate
from hobbit.runtime.options import Options
from hobbit.runtime.schedule import Scheduler

from tiny import decode_logits

PROMPT = [3, 17, 42, 99, 7, 128, 64, 5, 200, 11, 31, 77]
STEPS = 16


def run(store, policy, budget="45%", **kw):
    eng = hobbit.load(store, budget=budget, policy=policy, **kw)
    out = decode_logits(eng, PROMPT, STEPS)
    stats = eng.provider.stats.as_dict()
    eng.close()
    return out, stats


def expert_keys(store):
    eng = hobbit.load(store, policy="resident")
    keys = sorted(eng.provider.resident)
    eng.close()
    return keys


def test_all_high_map_equals_resident_bit_for_bit(tiny_store):
    (ref, ref_toks), _ = run(tiny_store, "resident")
    high = {k: "bf16" for k in expert_keys(tiny_store)}
    for policy in ("resident", "lru", "slru", "ondemand", "hobbit"):
        (logits, toks), stats = run(tiny_store, policy, precision_map=high)
        assert toks == ref_toks, policy
        assert torch.equal(logits, ref), policy
        assert set(stats["hits_by_precision"]) | set(stats["misses_by_precision"]) == {"bf16"}, policy


def test_mixed_map_is_per_expert_and_offloaded_equals_resident(tiny_store):
    keys = expert_keys(tiny_store)
    mixed = {k: ("int2" if i % 2 else "bf16") for i, k in enumerate(keys)}
    (ref, _), _ = run(tiny_store, "resident")
    (res, res_toks), res_stats = run(tiny_store, "resident", precision_map=mixed)
    assert not torch.equal(res, ref), "int2 experts must change the logits"
    assert set(res_stats["hits_by_precision"]) == {"bf16", "int2"}
    for policy in ("lru", "slru", "ondemand"):
        (logits, toks), stats = run(tiny_store, policy, precision_map=mixed)
        assert toks == res_toks and torch.equal(logits, res), policy
        assert stats["skipped"] == 0
        assert stats["misses_by_precision"]["int2"] > 0 and stats["misses_by_precision"]["bf16"] > 0


def test_all_low_map_equals_a_uniform_low_run(tiny_store):
    low = {k: "int4" for k in expert_keys(tiny_store)}
    (uniform, _), _ = run(tiny_store, "resident", high="int4")
    (mapped, _), _ = run(tiny_store, "resident", precision_map=low)
    assert torch.equal(uniform, mapped)


def test_map_options_validate_and_pick_low():
    assert Options(policy="lru", high="bf16", precision_map={(0, 1): "int2"}).low == "int2"
    assert Options(policy="lru", precision_map={(0, 1): "bf16"}).low is None
    with pytest.raises(ValueError, match="two tiers"):
        Options(policy="lru", precision_map={(0, 1): "int2", (0, 2): "int4"})
    with pytest.raises(ValueError, match="two tiers"):
        Options(policy="hobbit", low="int4", precision_map={(0, 1): "int2"})


def test_scheduler_uses_the_map_instead_of_eq2():
    """Torch-free: the map decides tiers whatever the routing weights say; nothing is skipped."""
    opt = Options(policy="hobbit", high="bf16", precision_map={(0, 3): "int2"}, t1=0.0, t2=0.0)
    sched = Scheduler(opt, num_layers=1, top_k=2, expert_nbytes=lambda p: 100 if p == "bf16" else 20,
                      budget_bytes=10_000)
    want, weights = sched.select(0, [([3, 5], [0.9, 0.1]), ([5, 3], [0.5, 0.5])])
    assert want == {3: "low", 5: "high"} and weights is None
    assert sched.capacity == {"bf16": 75, "int2": 125}  # hobbit's pools: 75% / 25% of the budget


def test_simulate_replays_a_mapped_run(tiny_store, tmp_path):
    keys = expert_keys(tiny_store)
    mixed = {k: "int4" for k in keys[::3]}
    trace = tmp_path / "t.trace.gz"
    eng = hobbit.load(tiny_store, budget="45%", policy="slru", precision_map=mixed, trace=trace)
    decode_logits(eng, PROMPT, STEPS)
    live, opt, budget = eng.provider.stats.as_dict(), eng.provider.opt, eng.budget_bytes
    eng.close()
    header, calls = load_trace(trace)
    sim = simulate(header, calls, opt, budget, link_gbps=1.0)
    for k in ("hits_by_precision", "misses_by_precision", "evictions", "selections", "skipped"):
        assert sim[k] == live[k], k
    assert sim["options"]["precision_map"]["%d/%d" % keys[0]] == "int4"


def test_precision_map_flag_reads_a_json_file(tmp_path):
    from hobbit.runtime.config import RunConfig, StoreFacts, resolve
    path = tmp_path / "map.json"
    path.write_text('{"0/1": "int2", "1/3": "int2"}')
    cfg = RunConfig(policy="hobbit", precision_map=str(path))  # as `--precision-map FILE` gives it
    assert cfg.precision_map == {(0, 1): "int2", (1, 3): "int2"}
    opts = resolve(cfg, StoreFacts(("bf16", "int4", "int2"), 1 << 20, 4)).options
    assert (opts.high, opts.low, opts.precision_map) == ("bf16", "int2", {(0, 1): "int2", (1, 3): "int2"})
    path.write_text('["0/1"]')
    with pytest.raises(ValueError, match="precision-map .*layer/expert"):
        RunConfig(precision_map=str(path))
