"""benchmarks/peer_memory.py's pure parts (no llama.cpp, no model): sizes, limits, parsing, plan, summary, table."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("peer_memory", Path(__file__).parents[1] / "benchmarks" / "peer_memory.py")
pm = importlib.util.module_from_spec(_spec)
sys.modules["peer_memory"] = pm
_spec.loader.exec_module(pm)

MIB = 2**20
# llama-completion (llama-cpp-python 0.3.36's llama.cpp) on the exported CoderMoE Q4_0, 1 thread, trimmed
LLAMA_STDERR = """0.05.422.473 I generate: n_ctx = 256, n_batch = 2048, n_predict = 32, n_keep = 0
0.08.963.867 I common_perf_print:    sampling time =      15.75 ms
0.08.963.875 I common_perf_print:        load time =     262.14 ms
0.08.963.877 I common_perf_print: prompt eval time =     261.72 ms /     4 tokens (   65.43 ms per token,    15.28 tokens per second)
0.08.963.878 I common_perf_print:        eval time =    3191.43 ms /    31 runs   (  102.95 ms per token,     9.71 tokens per second)
0.08.963.878 I common_perf_print:       total time =    3541.73 ms /    35 tokens
"""


def manifest():
    cfg = dict(num_layers=2, sparse_layers=[0, 1], num_kv_heads=2, head_dim=4)
    blobs = {f"{layer}/{e}/{p}": dict(nbytes=n) for layer in range(2) for e in range(3) for p, n in (("bf16", 400), ("int4", 100))}
    return dict(config=cfg, blobs=blobs, dense_bytes=1000, precisions=["bf16", "int4"])


def test_store_and_gguf_sizes():
    s = pm.store_sizes(manifest(), "int4", ctx=8)
    assert s == dict(dense_bytes=1000, expert_bytes=600, kv_bytes=2 * 2 * 2 * 8 * 4 * 4)  # fp32 K and V per layer
    assert pm.store_sizes(manifest(), "bf16", ctx=8)["expert_bytes"] == 2400
    with pytest.raises(ValueError, match="no int2 experts"):
        pm.store_sizes(manifest(), "int2")
    g = pm.gguf_sizes({"blk.0.ffn_up_exps.weight": 300, "blk.0.attn_q.weight": 50, "token_embd.weight": 70},
                      file_bytes=500, cfg=manifest()["config"], ctx=8)
    assert g == dict(dense_bytes=200, expert_bytes=300, kv_bytes=2 * 2 * 2 * 8 * 4 * 2)  # f16 KV
    g = pm.gguf_sizes({"blk.0.ffn_up_exps.weight": 300, "token_embd.weight": 70, "output.weight": 70},
                      file_bytes=500, cfg=manifest()["config"], ctx=8)
    assert g["dense_bytes"] == 500 - 300 - 70  # an own output.weight: the embedding is looked up by row
    assert pm.store_sizes(manifest(), "int4", ctx=8, mapped_bytes=300)["dense_bytes"] == 700


def test_limits_take_the_larger_term_and_budget_is_what_hobbit_has_left():
    hob = dict(dense_bytes=1000, expert_bytes=600, kv_bytes=40)
    lcp = dict(dense_bytes=700, expert_bytes=500, kv_bytes=20)
    lims = pm.compute_limits(hob, lcp, base_hobbit=300, base_llama=100, fractions=[0.1, 0.25])
    assert [x["label"] for x in lims] == ["10%", "25%"]
    assert lims[0]["limit_bytes"] == 1000 + 40 + 60 + 300 and lims[0]["hobbit_budget_bytes"] == 60
    assert lims[1]["limit_bytes"] == 1000 + 40 + 150 + 300 and lims[1]["expert_part_bytes"] == 150
    # a larger llama.cpp baseline raises the limit for both; hobbit's budget gets the difference
    lims = pm.compute_limits(hob, lcp, base_hobbit=300, base_llama=400, fractions=[0.1])
    assert lims[0]["limit_bytes"] == 1000 + 40 + 60 + 400 and lims[0]["hobbit_budget_bytes"] == 160
    assert pm.hobbit_baseline(dict(dense_bytes=1000, kv_cache_bytes=40, budget_bytes=60), 1500) == 400
    assert pm.hobbit_baseline(dict(dense_bytes=1000, dense_mapped_bytes=300, kv_cache_bytes=40, budget_bytes=60),
                              1500) == 700


def test_parse_llama_completion_recorded():
    r = pm.parse_llama_completion(LLAMA_STDERR, "def f")
    assert r["decode_steps"] == 31 and r["prompt_tokens"] == 4 and r["text"] == "def f"
    assert r["tok_s"] == pytest.approx(31 / 3.19143) and r["prefill_s"] == pytest.approx(0.26172)
    assert r["load_s"] == pytest.approx(0.26214) and r["decode_s"] == pytest.approx(3.19143)
    with pytest.raises(ValueError, match="no `prompt eval time`"):
        pm.parse_llama_completion("error: failed to load model")


def test_parse_hobbit_run_keeps_cache_figures():
    stats = dict(decode_tok_s=2.5, prefill_s=1.5, decode_s=12.8, generated_tokens=33, dense_bytes=10, kv_cache_bytes=2,
                 budget_bytes=5, bytes_read=123, hit_rate=0.5, loader_wait_s=3.0, baseline_rss_bytes=7)
    out = json.dumps(dict(text=" x", token_ids=[1, 2], finish_reason="length", stats=stats))
    r = pm.parse_hobbit_run("loading\n" + out + "\n")
    assert r["tok_s"] == 2.5 and r["decode_steps"] == 32 and r["bytes_read"] == 123 and r["token_ids"] == [1, 2]
    assert r["budget_bytes"] == 5 and r["text"] == " x"


def test_commands():
    c = pm.llama_cmd(Path("/b"), Path("m.gguf"), "p", tokens=32, threads=1, extra=["--no-repack"])
    assert c[0] == "/b/llama-completion" and c[c.index("-n") + 1] == "33" and c[c.index("--temp") + 1] == "0"
    assert "--no-warmup" in c and c[-1] == "--no-repack" and c[c.index("-t") + 1] == "1"
    h = pm.hobbit_cmd(Path("s"), "hobbit", [1, 2], 32, 1, "int4", "int2", 12345)
    assert h[h.index("--prompt-ids") + 1] == "1,2" and h[h.index("--max-new-tokens") + 1] == "33"
    assert h[h.index("--budget") + 1] == "12345" and h[h.index("--low") + 1] == "int2" and h[h.index("--high") + 1] == "int4"
    r = pm.hobbit_cmd(Path("s"), "resident", [1], 32, 1, "int4", "int2", 12345, trace=Path("t.gz"))
    assert "--budget" not in r and "--low" not in r and r[-2:] == ["--trace", "t.gz"]
    x = pm.hobbit_cmd(Path("s"), "lru", [1], 32, 1, "int4", None, 9, extra=pm.parse_args(
        ["--store", "s", "--gguf", "g", "--json", "j", "--hobbit-args", "--dense int4 --lm-head int8"]).hobbit_extra)
    assert x[-4:] == ["--dense", "int4", "--lm-head", "int8"]
    assert pm.owned_dense(dict(dense_bytes=1000, dense_mapped_bytes=300)) == 700


def test_plan_interleaves_every_row_each_round():
    lims = [dict(label="10%"), dict(label="25%")]
    p = pm.plan(lims, ["lru", "hobbit"], repeats=2)
    one = len(pm.LLAMA_ROWS) * 3 + 2 * 2 + 1
    assert len(p) == 2 * one and p[:one] == [(0, r, lab) for _, r, lab in p[one:]] and all(x[0] == 1 for x in p[one:])
    assert (0, "resident", "unlimited") in p and (0, "llama.cpp", "unlimited") in p and (1, "hobbit", "25%") in p
    assert (0, "resident", "10%") not in p
    own = pm.plan(lims, ["lru"], repeats=1, own=[dict(label="llama 25%")])
    assert [x for x in own if x[2] == "llama 25%"] == [(0, r, "llama 25%") for r in pm.LLAMA_ROWS]


def test_own_limits_and_peak_rss():
    lims = pm.own_limits(dict(dense_bytes=700, expert_bytes=500, kv_bytes=20), 30, [0.1, 0.5])
    assert [x["limit_bytes"] for x in lims] == [700 + 20 + 50 + 30, 700 + 20 + 250 + 30]
    assert lims[0]["label"] == "llama 10%" and lims[0]["hobbit_budget_bytes"] is None
    assert pm.peak_rss(dict(hwm_bytes=5, max_rss_bytes=9)) == 5 and pm.peak_rss(dict(hwm_bytes=None, max_rss_bytes=9)) == 9


def run(row, limit, tok_s, read=320 * MIB):
    return dict(row=row, limit=limit, limit_bytes=None if limit == "unlimited" else 1000 * MIB, tok_s=tok_s,
                prefill_s=1.0, decode_steps=32, read_bytes=read, major_faults=5, max_rss_bytes=900 * MIB,
                cgroup_peak_bytes=None if limit == "unlimited" else 990 * MIB)


def test_summary_ratios_table():
    runs = [run("llama.cpp", "25%", 2.0), run("hobbit", "25%", 3.0), run("lru", "25%", 1.5), run("ondemand", "25%", None),
            run("llama.cpp", "25%", 2.5, read=640 * MIB), run("hobbit", "25%", 2.0), run("lru", "25%", 1.0),
            run("ondemand", "25%", 0.5), run("llama.cpp", "unlimited", 9.0)]
    s = pm.summarize(runs)
    assert [(x["row"], x["limit"]) for x in s] == [("llama.cpp", "25%"), ("hobbit", "25%"), ("lru", "25%"),
                                                  ("ondemand", "25%"), ("llama.cpp", "unlimited")]
    assert s[0]["best_tok_s"] == 2.5 and s[0]["tok_s"] == [2.0, 2.5] and s[0]["read_per_token"] == 20 * MIB
    assert s[3]["failed"] == 1 and s[3]["best_tok_s"] == 0.5
    r = pm.ratios(s, "25%")
    assert r["hobbit_vs_llama_cpp"] == pytest.approx(1.2) and r["hobbit_vs_lru"] == 2.0 and r["hobbit_vs_ondemand"] == 6.0
    assert r["hobbit_vs_llama_cpp_no-repack"] is None and r["hobbit_vs_lru+prefetch"] is None
    t = pm.markdown_table(s).splitlines()
    assert t[0].startswith("| engine / policy | limit | limit MiB | decode tok/s") and len(t) == 2 + 5
    assert t[2] == "| llama.cpp | 25% | 1000 | 2.50 | 2.00, 2.50 | 1.00 | 20.0 | 5 | 900 | 990 |"
    assert t[3].startswith("| hobbit hobbit | 25% |") and "| 0.50, 1 failed |" in t[5]
    assert t[6] == "| llama.cpp | unlimited | - | 9.00 | 9.00 | 1.00 | 10.0 | 5 | 900 | - |"
