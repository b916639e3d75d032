"""hobbit eval: strided windows, perplexity by hand, top-1 agreement, the command's JSON."""
from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F

import hobbit
from hobbit.lab.evaluate import add_eval_args, agreement, cmd_eval, evaluate_ppl, text_token_ids, top1_agreement, windows

TEXT = ("Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition, seemed to "
        "unite some of the best blessings of existence; and had lived nearly twenty-one years in the world with "
        "very little to distress or vex her.\n") * 3


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "emma.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def resident(tiny_store):
    with hobbit.load(tiny_store, policy="resident") as eng:
        yield eng


@pytest.mark.parametrize("n,window,stride", [(2, 2, 1), (10, 4, 2), (100, 16, 5), (100, 16, 15), (17, 32, 8)])
def test_overlapping_windows_score_each_token_once(n, window, stride):
    scored = []
    for begin, end, first in windows(n, window, stride):
        assert begin < first < end <= n and end - begin <= window
        assert first - begin >= min(window - stride, first)  # context before every scored token
        scored.extend(range(first, end))
    assert scored == list(range(1, n))


def test_disjoint_windows_skip_each_window_start():
    spans = windows(10, 4, 4)
    assert spans == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
    with pytest.raises(ValueError):
        windows(10, 4, 5)


def test_ppl_equals_exp_mean_nll_by_hand(resident, text):
    ids = text_token_ids(resident.tokenizer, text, max_tokens=96, split="all")
    assert len(ids) == 96
    logits = resident.logits(ids)
    nll = F.cross_entropy(logits[:-1].double(), torch.tensor(ids[1:]), reduction="sum").item()
    one = evaluate_ppl(resident, ids, window=96)
    assert one["tokens"] == 95 and one["windows"] == 1
    assert one["ppl"] == pytest.approx(math.exp(nll / 95), rel=1e-9)
    assert math.isfinite(one["ppl"]) and one["ppl"] > 1
    # two windows of 64 with stride 32: the second scores 64..95 from the logits of ids[32:96]
    first, second = resident.logits(ids[:64])[:63], resident.logits(ids[32:96])[31:63]
    nll2 = F.cross_entropy(torch.cat([first, second]).double(), torch.tensor(ids[1:96]), reduction="sum").item()
    two = evaluate_ppl(resident, ids, window=64, stride=32)
    assert (two["tokens"], two["windows"]) == (95, 2)
    assert two["nll"] == pytest.approx(nll2, rel=1e-9)


def test_top1_agreement(tiny_store, resident, text):
    ids = text_token_ids(resident.tokenizer, text, max_tokens=128, split="all")
    with hobbit.load(tiny_store, policy="resident") as same:
        assert top1_agreement(same, resident, ids, window=64, stride=32) == 1.0
    with hobbit.load(tiny_store, policy="lru", budget="50%") as lru:
        assert top1_agreement(lru, resident, ids, window=64) == 1.0  # caching never changes the numbers
    assert agreement([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    with pytest.raises(ValueError):
        agreement([1, 2], [1])


def _eval_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_eval_args(parser.add_subparsers())
    return parser.parse_args(["eval", *argv])


def test_eval_command_json(tiny_store, resident, text, capsys):
    args = _eval_args([str(tiny_store), "--text", str(text), "--split", "all", "--window", "64",
                       "--max-tokens", "200", "--policy", "lru", "--budget", "50%", "--json"])
    assert cmd_eval(args) == 0
    res = json.loads(capsys.readouterr().out)
    for key in ("ppl", "tokens", "policy", "budget_bytes", "nll", "windows", "hit_rate", "bytes_read", "seconds"):
        assert key in res, key
    assert res["policy"] == "lru" and res["budget_bytes"] > 0 and res["bytes_read"] > 0
    assert (res["tokens"], res["windows"]) == (196, 4)  # disjoint windows at 0, 64, 128, 192 skip their first
    assert res["ppl"] == pytest.approx(math.exp(res["nll"] / res["tokens"]))
    ids = text_token_ids(resident.tokenizer, text, max_tokens=200, split="all")
    assert res["ppl"] == pytest.approx(evaluate_ppl(resident, ids, window=64)["ppl"], rel=1e-9)
    args = _eval_args([str(tiny_store), "--text", str(text), "--split", "all", "--window", "64",
                       "--max-tokens", "100", "--policy", "resident"])
    assert cmd_eval(args) == 0
    assert "ppl" in capsys.readouterr().out


def test_stepwise_scoring_matches_prefill_at_full_precision(tiny_store):
    import hobbit
    eng = hobbit.load(tiny_store, policy="resident", dtype="fp32")
    ids = [3, 17, 42, 99, 7, 128, 64, 5, 200, 11]
    a, b = eng.logits(ids), eng.logits(ids, stepwise=True)
    assert a.shape == b.shape and (a - b).abs().max() < 1e-4  # same math, one token per pass
    res = evaluate_ppl(eng, ids, window=10, stepwise=True)
    assert res["stepwise"] and res["ppl"] == pytest.approx(evaluate_ppl(eng, ids, window=10)["ppl"], rel=1e-4)
    eng.close()
