"""The replay's time model: one disk queue (demand before prefetch, started reads run to their end),
a compute clock, exact timelines on hand-made traces. `hobbit tune`'s time objective: tests/test_tune.py."""
from __future__ import annotations

import json

import pytest

from hobbit.lab.simulate import load_trace, simulate
from hobbit.lab.timeline import TimedFetcher, TimeModel
from hobbit.runtime.loader import DEMAND, PREFETCH
from hobbit.runtime.options import Options
from hobbit.runtime.trace import TraceWriter

MODEL = TimeModel(read_ms={"bf16": 2.0, "int4": 1.0}, layer_ms=1.0, expert_ms={"bf16": 0.5, "int4": 0.25}, step_ms=3.0)


def test_demand_reads_go_before_queued_prefetches_not_before_a_started_one():
    f = TimedFetcher(MODEL)
    f.fetch((1, 0, "bf16"), 0, PREFETCH)  # the disk is idle: starts at once, ends at 2 ms
    f.fetch((1, 1, "bf16"), 1, PREFETCH)
    f.fetch((0, 2, "bf16"), 2, DEMAND)
    f.wait((0, 2, "bf16"), 2)
    assert f.now == pytest.approx(4e-3)  # behind the running prefetch only
    assert not f.landed((1, 1, "bf16"), 1)
    f.compute(1.0)
    assert f.landed((1, 0, "bf16"), 0) and not f.landed((1, 1, "bf16"), 1)  # the queued one started at 4 ms
    f.wait((1, 1, "bf16"), 1)
    assert f.now == pytest.approx(6e-3)
    assert f.loads["prefetch"]["bf16"] == 2 and f.loads["demand"]["bf16"] == 1


def test_only_a_queued_read_cancels_and_waiting_promotes_a_prefetch():
    f = TimedFetcher(MODEL)
    f.fetch((1, 0, "int4"), 0, PREFETCH)  # starts at once
    f.fetch((1, 1, "int4"), 1, PREFETCH)
    f.fetch((1, 2, "int4"), 2, PREFETCH)
    assert not f.cancel((1, 0, "int4"), 0)  # running: it completes
    assert f.cancel((1, 1, "int4"), 1) and not f.cancel((1, 1, "int4"), 1)
    assert f.loads["prefetch"]["int4"] == 2  # a cancelled read never reads
    f.fetch((0, 3, "int4"), 3, DEMAND)
    f.wait((1, 2, "int4"), 2)  # the compute thread waits for it: it goes before the later demand read
    assert f.now == pytest.approx(2e-3)
    f.fetch((0, 4, "int4"), 0, DEMAND)  # slot 0 again: its read has landed, nothing to wait for
    f.drain()
    assert f.now == pytest.approx(4e-3)


def test_time_model_checks_its_numbers():
    with pytest.raises(ValueError, match="must be >= 0"):
        TimeModel({"bf16": -1.0}, 1.0, {"bf16": 0.1})
    with pytest.raises(ValueError, match="needs read_ms"):
        TimeModel.from_dict({"layer_ms": 1})
    assert TimeModel.from_dict(MODEL.as_dict()) == MODEL
    link = TimeModel.over_link(2.0, {"bf16": 4_000_000}, 1.0, {"bf16": 0.5})
    assert link.read_ms == {"bf16": pytest.approx(2.0)}
    with pytest.raises(ValueError, match="positive"):
        TimeModel.over_link(0, {"bf16": 1}, 1.0, {"bf16": 0.5})


def _trace(tmp_path):
    """One decode step over two MoE layers (top-2 of 8): layer 0 routes experts 0 and 5, layer 1 experts
    1 and 3, which layer 0's stacked gate predicts."""
    header = dict(num_layers=2, sparse_layers=[0, 1], num_experts=8, top_k=2, precisions=["bf16", "int4"],
                  expert_ram_bytes={"bf16": 1 << 20, "int4": 1 << 18}, expert_disk_bytes={"bf16": 1 << 20, "int4": 1 << 18})
    path = tmp_path / "one.trace.gz"
    w = TraceWriter(path, header, logits=False)
    w.begin_sequence()
    w.record(0, 0, [([0, 5], [0.6, 0.4])], None, {1: [(1, 0.6), (3, 0.4)]})
    w.record(0, 1, [([1, 3], [0.7, 0.3])], None, {})
    w.close()
    return load_trace(path)


def test_modeled_timeline_of_one_token(tmp_path):
    header, calls = _trace(tmp_path)
    # lru: per layer 1 ms, then read (2 ms) and compute (0.5 ms) each expert, the second read
    # overlapping the first expert's compute: 1 + 2 + 2 + 0.5 per layer, twice, + 3 ms LM head = 14 ms
    lru = simulate(header, calls, Options(policy="lru", high="bf16"), 8 << 20, time_model=MODEL)
    assert lru["modeled"]["decode_ms_per_token"] == pytest.approx(14.0)
    # layer 0 reads layer 1's predicted experts behind its own: they land at 7 and 9 ms, layer 1's
    # compute starts at 6.5: 14 - 1.5 ms
    pf = simulate(header, calls, Options(policy="lru+prefetch", high="bf16"), 8 << 20, time_model=MODEL)
    assert pf["modeled"]["decode_ms_per_token"] == pytest.approx(12.5) and pf["prefetch_used"] == 2
    assert pf["modeled"]["time_model"] == MODEL.as_dict() and pf["modeled"]["decode_tok_s"] == pytest.approx(80)
    assert "modeled" not in simulate(header, calls, Options(policy="lru", high="bf16"), 8 << 20)


def test_read_time_model_files(tmp_path):
    from hobbit.lab.timeline import read_time_model
    (tmp_path / "m.json").write_text(json.dumps(MODEL.as_dict()))
    (tmp_path / "tuned.json").write_text(json.dumps({"options": {}, "calibration": {"time_model": MODEL.as_dict()}}))
    (tmp_path / "old.json").write_text(json.dumps({"options": {}, "calibration": {}}))
    (tmp_path / "bad.json").write_text("{")
    assert read_time_model(tmp_path / "m.json") == MODEL == read_time_model(tmp_path / "tuned.json")
    with pytest.raises(ValueError, match="holds no time model"):
        read_time_model(tmp_path / "old.json")
    with pytest.raises(ValueError, match="cannot read the time model"):
        read_time_model(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="cannot read the time model"):
        read_time_model(tmp_path / "missing.json")


def test_simulate_names_what_the_time_model_lacks(tmp_path):
    header, calls = _trace(tmp_path)
    bf16_only = TimeModel({"bf16": 2.0}, 1.0, {"bf16": 0.5})
    with pytest.raises(ValueError, match="no read or expert time for int4"):
        simulate(header, calls, Options(policy="hobbit", high="bf16", low="int4"), 8 << 20, time_model=bf16_only)


def test_cli_time_model_over_another_link(tmp_path, capsys):
    """--time-model with --link: the measured compute, reads of the trace's disk bytes over that link."""
    import argparse
    from hobbit.lab.simulate import add_simulate_args, cmd_simulate
    _trace(tmp_path)
    (tmp_path / "m.json").write_text(json.dumps(MODEL.as_dict()))
    ap = argparse.ArgumentParser()
    add_simulate_args(ap.add_subparsers())
    base = ["simulate", str(tmp_path / "one.trace.gz"), "--policy", "lru", "--high", "bf16", "--budget", str(8 << 20),
            "--time-model", str(tmp_path / "m.json"), "--json"]
    assert cmd_simulate(ap.parse_args(base)) == 0
    assert json.loads(capsys.readouterr().out)["modeled"]["decode_ms_per_token"] == pytest.approx(14.0)
    # 1 MiB over 1.048576 GB/s: 1 ms a read instead of the measured 2: per layer 1 + 1 + 1 + 0.5, + 3 ms LM head
    assert cmd_simulate(ap.parse_args([*base, "--link", str((1 << 20) / 1e6)])) == 0
    assert json.loads(capsys.readouterr().out)["modeled"]["decode_ms_per_token"] == pytest.approx(10.0)
