"""benchmarks/peer_llamacpp.py without a llama.cpp build: arguments, output parsing, summary, measured runs."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("peer_llamacpp", Path(__file__).parents[1] / "benchmarks" / "peer_llamacpp.py")
peer = importlib.util.module_from_spec(_spec)
sys.modules["peer_llamacpp"] = peer  # dataclasses look their module up there
_spec.loader.exec_module(peer)

# `llama-bench -m SmolLM2-135M-Instruct.Q4_1.gguf -t 1 -p 0 -n 64 -r 1 -o json` (llama-cpp-python 0.3.36), trimmed
LLAMA_BENCH_JSON = """[
  {
    "build_commit": "0c1e570", "build_number": 1, "cpu_info": "AMD EPYC", "gpu_info": "", "backends": "CPU",
    "model_filename": "/root/.cache/hobbit/SmolLM2-135M-Instruct.Q4_1.gguf", "model_type": "llama 256M Q4_1",
    "model_size": 96576768, "model_n_params": 134515008, "n_batch": 2048, "n_ubatch": 512, "n_threads": 1,
    "load_mode": "auto", "repack": true, "n_prompt": 0, "n_gen": 64, "n_depth": 0,
    "test_time": "2026-11-29T18:06:22Z", "avg_ns": 368345433, "stddev_ns": 0, "avg_ts": 173.749948,
    "stddev_ts": 0.000000, "samples_ns": [ 368345433 ], "samples_ts": [ 173.75 ]
  }
]
"""


def test_parse_args_defaults_and_errors():
    a = peer.parse_args([])
    assert a.rows == ["llama.cpp", "hobbit-auto", "hobbit-int4", "hobbit-bf16"] and a.repeats == 3 and a.tokens == 64
    assert a.asset == "smollm2-gguf" and a.gguf is None and a.limit_bytes is None
    a = peer.parse_args(["--gguf", "m.gguf", "--rows", "hobbit-int8, llama.cpp", "--limit", "1.5GiB", "--json", "o.json"])
    assert a.rows == ["hobbit-int8", "llama.cpp"] and a.gguf == Path("m.gguf") and a.limit_bytes == 3 * 2**29
    assert peer.parse_args(["--llama-args", "-lm none"]).llama_args.split() == ["-lm", "none"]
    for bad in (["--rows", "vllm"], ["--rows", "hobbit-int3"], ["--repeats", "0"], ["--gguf", "a", "--asset", "b"],
                ["--limit", "lots"]):
        with pytest.raises(SystemExit):
            peer.parse_args(bad)


def test_parse_size():
    assert peer.parse_size("4096") == 4096
    assert peer.parse_size("512MiB") == peer.parse_size("512M") == 512 * 2**20
    assert peer.parse_size("2GiB") == 2 * 2**30
    with pytest.raises(ValueError, match="bad size"):
        peer.parse_size("lots")


def test_parse_llama_bench_recorded_output():
    r = peer.parse_llama_bench("main: some log line\n" + LLAMA_BENCH_JSON)  # text before the array is skipped
    assert r["tok_s"] == pytest.approx(173.749948) and r["build_commit"] == "0c1e570"
    assert r["n_gen"] == 64 and r["n_prompt"] == 0 and r["n_threads"] == 1 and r["samples_ts"] == [173.75]
    pp_only = json.dumps([dict(json.loads(LLAMA_BENCH_JSON)[0], n_gen=0, n_prompt=512)])
    with pytest.raises(ValueError, match="no text-generation test"):
        peer.parse_llama_bench(pp_only)


def test_parse_hobbit_nested_and_flat():
    stats = dict(decode_tok_s=19.2, prefill_s=0.05, decode_s=3.3, generated_tokens=65, peak_rss_bytes=10)
    r = peer.parse_hobbit("loading...\n" + json.dumps(dict(finish_reason="length", stats=stats)) + "\n")
    assert r["tok_s"] == 19.2 and r["finish_reason"] == "length" and r["generated_tokens"] == 65
    assert peer.parse_hobbit(json.dumps(stats))["tok_s"] == 19.2
    with pytest.raises(ValueError, match="no JSON"):
        peer.parse_hobbit("Traceback ...")


def test_hobbit_commands_follow_where_dense_lives():
    run_time = peer.HobbitCLI(convert_dense=False, run_dense=True)
    cmd = run_time.run_cmd(Path("s"), "int4", tokens=64, threads=1)
    assert cmd[cmd.index("--max-new-tokens") + 1] == "65"  # first token comes from prefill: 64 decode steps
    assert cmd[cmd.index("--prompt-ids") + 1] == "1" and cmd[cmd.index("--dense") + 1] == "int4"
    assert "--dense" not in run_time.convert_cmd(Path("m.gguf"), Path("s"), "int4")
    convert_time = peer.HobbitCLI(convert_dense=True, run_dense=False)
    assert convert_time.convert_cmd(Path("m.gguf"), Path("s"), "bf16")[-2:] == ["--dense", "bf16"]
    assert "--dense" not in convert_time.run_cmd(Path("s"), "bf16", 64, 1)


def test_summary_best_of_runs_and_ratio_table():
    def run(row, tok_s):
        return dict(row=row, tok_s=tok_s, max_rss_bytes=100 * 2**20)
    runs = [run("llama.cpp", 170.0), run("hobbit-int4", 20.0), run("hobbit-bf16", None),
            run("llama.cpp", 175.0), run("hobbit-int4", 35.0), run("hobbit-bf16", 17.5)]
    s = peer.summarize(runs, ["llama.cpp", "hobbit-int4", "hobbit-bf16"])
    assert s["llama.cpp"]["best_tok_s"] == 175.0 and s["llama.cpp"]["vs_llama_cpp"] == 1.0
    assert s["hobbit-int4"]["tok_s"] == [20.0, 35.0] and s["hobbit-int4"]["vs_llama_cpp"] == pytest.approx(0.2)
    assert s["hobbit-bf16"]["failed"] == 1 and s["hobbit-bf16"]["vs_llama_cpp"] == pytest.approx(0.1)
    table = peer.markdown_table(s, 64).splitlines()
    assert table[0].startswith("| row | tg64 tok/s") and len(table) == 5
    assert table[3] == "| hobbit-int4 | 35.0 | 20.0, 35.0 | 100 | 0.20 |"
    assert "| 17.5, 1 failed |" in table[4]
    alone = peer.summarize([run("hobbit-int4", 30.0)], ["hobbit-int4"])  # no llama.cpp row: no ratio
    assert alone["hobbit-int4"]["vs_llama_cpp"] is None and "| - |" in peer.markdown_table(alone, 64)


def test_own_cgroup_paths():
    v1 = "9:name=systemd:/\n4:memory:/process_api/abc\n3:cpuset:/\n0::/user.slice\n"
    assert peer._own_cgroup("memory", v1) == "/process_api/abc"
    assert peer._own_cgroup("", v1) == "/user.slice"
    assert peer._own_cgroup("memory", "0::/x\n") is None


def test_run_measured_plain():
    m = peer.run_measured([sys.executable, "-c", "print('hi'); import sys; sys.stderr.write('err')"])
    assert m.returncode == 0 and m.stdout == "hi\n" and m.stderr_tail == "err"
    assert m.max_rss_bytes > 2**20 and m.wall_s > 0 and m.limit_bytes is None and m.cgroup_peak_bytes is None


def test_run_measured_under_memory_limit():
    if os.geteuid() != 0:
        pytest.skip("memory cgroups need root")
    try:
        d, _ = peer.make_memory_cgroup(2**30, f"peer-test-{os.getpid()}")
        d.rmdir()
    except RuntimeError as e:
        pytest.skip(f"no writable memory cgroup here: {e}")
    grab = "b = bytearray({} << 20); print(len(b))"
    ok = peer.run_measured([sys.executable, "-c", grab.format(20)], limit_bytes=256 * 2**20)
    assert ok.returncode == 0 and 20 * 2**20 < ok.cgroup_peak_bytes <= 256 * 2**20 and ok.oom_kills == 0
    killed = peer.run_measured([sys.executable, "-c", grab.format(400)], limit_bytes=128 * 2**20)
    assert killed.returncode == -9 and killed.oom_kills == 1  # the cgroup's OOM killer, not ours


def test_built_llamacpp_is_found_without_rebuilding():
    bindir = peer.peers_dir() / f"llama-cpp-python-{peer.LLAMA_CPP_PYTHON}" / "build" / "bin"
    if not all((bindir / t).is_file() for t in peer.TARGETS):
        pytest.skip("needs the llama.cpp build (run benchmarks/peer_llamacpp.py once, ~5 min on 2 cores)")
    assert peer.build_llamacpp() == bindir


def test_one_store_serves_every_row_when_dense_is_a_run_option(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(peer.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    rows = ["llama.cpp", "hobbit-int4", "hobbit-bf16"]
    s = peer.convert_stores(peer.HobbitCLI(False, True), Path("m.gguf"), rows, tmp_path, {})
    assert len(calls) == 1 and s == {"hobbit-int4": tmp_path / "store-any", "hobbit-bf16": tmp_path / "store-any"}
    calls.clear()
    s = peer.convert_stores(peer.HobbitCLI(True, False), Path("m.gguf"), rows, tmp_path, {})
    assert len(calls) == 2 and s["hobbit-int4"] == tmp_path / "store-int4" and calls[0][-2:] == ["--dense", "int4"]
