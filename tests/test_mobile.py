"""MoBiLE decoding (policies mobile, hobbit+mobile): a fallback redoes the token big at the same
position, leaving exactly the state of a big-only decode; confident tokens stay little."""
from __future__ import annotations

import pytest
import torch

import hobbit

from tiny import decode_logits

PROMPT = [3, 17, 42, 99, 7, 128, 64, 5]
STEPS = 16
BUDGET = "45%"


def _decode(store, policy, **kw):
    eng = hobbit.load(store, budget=BUDGET, policy=policy, **kw)
    logits, toks = decode_logits(eng, PROMPT, STEPS)
    end = len(PROMPT) + STEPS
    kv = (eng.model.k_cache[:, :, :end].clone(), eng.model.v_cache[:, :, :end].clone())  # [L,nkv,S,D]
    stats = eng.provider.stats.as_dict()
    eng.close()
    return logits, toks, kv, stats


def test_all_fallbacks_equal_a_big_only_decode(tiny_store):
    """gamma above 1: every token is decoded little, then redone big; the redo overwrites the little
    pass's KV entries, so logits and the whole KV cache equal a big-only (lru) decode's, bit for bit."""
    ref_logits, ref_toks, ref_kv, _ = _decode(tiny_store, "lru")
    logits, toks, kv, stats = _decode(tiny_store, "mobile", gamma=1.01)
    assert toks == ref_toks
    assert torch.equal(logits, ref_logits)
    assert torch.equal(kv[0], ref_kv[0]) and torch.equal(kv[1], ref_kv[1])
    assert stats["little_steps"] == stats["fallbacks"] == STEPS
    assert 0 < stats["fallback_prefetch_used"] <= stats["fallback_prefetch_issued"]


def test_confident_tokens_stay_little(tiny_store):
    big_logits, _, _, _ = _decode(tiny_store, "lru")
    logits, _, _, stats = _decode(tiny_store, "mobile", gamma=0.0)
    assert stats["little_steps"] == STEPS and stats["fallbacks"] == 0
    assert not torch.equal(logits[1:], big_logits[1:])  # the first row comes from the (big) prefill
    assert torch.equal(logits[0], big_logits[0])


def test_mixed_fallbacks_and_accepted_logits(tiny_store):
    """A gamma inside the tiny model's confidence range (its top probabilities are ~0.02-0.08): some
    tokens fall back. Each returned row is the accepted pass's: below gamma only after a redo."""
    logits, _, _, stats = _decode(tiny_store, "hobbit+mobile", gamma=0.035, low="int4")
    assert 0 < stats["fallbacks"] < stats["little_steps"] == STEPS


def test_redo_needs_the_last_pass_tokens(tiny_store):
    eng = hobbit.load(tiny_store, budget=BUDGET, policy="lru")
    seq = eng.sequence()
    with torch.inference_mode():
        seq.step(torch.tensor(PROMPT))
        first = seq.forward(torch.tensor([5]), little=True)
        assert seq.pos == len(PROMPT) + 1
        again = seq.redo(torch.tensor([5]))
        assert seq.pos == len(PROMPT) + 1 and eng.provider.scheduler.t == 3  # a pass more, no position more
        assert not torch.equal(first, again)
        with pytest.raises(ValueError, match="redo needs"):
            seq.redo(torch.tensor([5, 6]))
    eng.close()
