"""MoBiLE decoding (policies mobile, hobbit+mobile): a fallback redoes the token big at the same
position, with the tokens accepted little before it, leaving the state of a big-only decode;
confident tokens stay little."""
from __future__ import annotations

import pytest
import torch

import hobbit

from hobbit.runtime.loader import PREFETCH

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


def test_a_fallback_redoes_the_tokens_accepted_little_before_it(tiny_store):
    """Three tokens accepted little, then one that falls back: the big pass recomputes all four at their
    positions (one pass, as BiLD's big model catches up), so the KV cache and the last logits are a
    big-only decode's (to bf16 rounding: four rows in one pass instead of one each); the position
    advances once per token and the clock once per pass."""
    toks = [5, 9, 11, 13]
    ref = hobbit.load(tiny_store, budget=BUDGET, policy="lru")
    eng = hobbit.load(tiny_store, budget=BUDGET, policy="mobile")
    end = len(PROMPT) + len(toks)
    with torch.inference_mode():
        rs, seq = ref.sequence(), eng.sequence()
        rs.step(torch.tensor(PROMPT)), seq.step(torch.tensor(PROMPT))
        for i, tok in enumerate(toks):
            want = rs.step(torch.tensor([tok]))
            seq.gamma = 0.0 if i < 3 else 1.01  # accept three little passes, then fall back
            got = seq.step(torch.tensor([tok]))
            assert got.shape == want.shape and seq.pos == rs.pos
            assert len(seq.accepted_little) == (i + 1 if i < 3 else 0)
            if i < 3:
                assert not torch.allclose(got, want, atol=1e-2)  # a little pass
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
        for mine, theirs in ((eng.model.k_cache, ref.model.k_cache), (eng.model.v_cache, ref.model.v_cache)):
            torch.testing.assert_close(mine[:, :, :end].float(), theirs[:, :, :end].float(), atol=2e-2, rtol=2e-2)
        assert eng.provider.scheduler.t == 1 + 3 + 2  # prefill, three little passes, the last token twice
    s = eng.provider.stats.as_dict()
    assert (s["little_steps"], s["fallbacks"], s["fallback_redone"]) == (4, 1, 3)
    assert s["fallback_reused"] == 0  # the fallback has four rows: its little outputs are for one
    ref.close(), eng.close()


def test_little_weights_are_the_router_s_own_unless_rescaled(tiny_store, tmp_path):
    """The tiny qwen2_moe never renormalizes its top-k: its little pass keeps the router's weights by
    default, and `little_weights="rescaled"` scales them to the top-k's total, another result. On a copy
    whose family renormalizes, both rules are the same weights."""
    import json
    import shutil
    renorm = shutil.copytree(tiny_store, tmp_path / "renorm")
    manifest = json.loads((renorm / "manifest.json").read_text())
    manifest["config"]["norm_topk_prob"] = True
    (renorm / "manifest.json").write_text(json.dumps(manifest))
    for store, same in ((tiny_store, False), (renorm, True)):
        runs = [_decode(store, "mobile", gamma=0.0, little_weights=w)[0] for w in ("router", "rescaled")]
        assert torch.equal(runs[0][0], runs[1][0])  # the prefill is big
        assert torch.equal(runs[0], runs[1]) == same


def test_accepted_tokens_cancel_their_queued_fallback_reads(tiny_store):
    """No loader thread (io_threads 0): a prefetch stays queued until someone waits for it, so with gamma 0
    (every token accepted) each fallback read is still queued when the next token starts and is dropped
    unread: none runs, their keys leave the cache and their slots are free again; the logits are those of
    a run whose loader did read them."""
    ref_logits, ref_toks, _, _ = _decode(tiny_store, "mobile", gamma=0.0)
    eng = hobbit.load(tiny_store, budget=BUDGET, policy="mobile", gamma=0.0, io_threads=0)
    logits, toks = decode_logits(eng, PROMPT, STEPS)
    assert toks == ref_toks and torch.equal(logits, ref_logits)
    sched, stats = eng.provider.scheduler, eng.provider.stats
    seq = eng.sequence()  # again, up to a token that leaves fallback reads queued (which one: the kernels decide)
    with torch.inference_mode():
        seq.step(torch.tensor(PROMPT))
        for tok in range(5, 5 + STEPS):
            seq.step(torch.tensor([tok]))
            if sched._fallback:
                break
    pending = [k for k in sched._fallback]  # that token's reads: cancelled when the next sequence begins
    eng.provider.begin_sequence()
    s = stats.as_dict()
    assert s["fallback_prefetch_issued"] > 0
    assert s["fallback_prefetch_used"] == 0
    # every fallback read was dropped unread: by acceptance, or (evicted first) by its slot's reuse
    assert s["fallback_prefetch_cancelled"] + s["prefetch_cancelled"] == s["fallback_prefetch_issued"]
    assert s["fallback_prefetch_cancelled"] > 0 and pending
    assert s["fallback_bytes_saved"] == s["fallback_prefetch_cancelled"] * eng.provider.expert_bytes("bf16")
    assert eng.provider.loader.loads[PREFETCH] == 0
    assert not any(k in sched.cache for k in pending)
    for prec, n in sched.capacity.items():  # every slot is either free or holds a cached key, once
        held = [slot for k, slot in sched._slot.items() if k[2] == prec]
        assert sorted(held + sched._free[prec]) == list(range(n))
        assert all(k in sched.cache for k in sched._slot)
    eng.close()


def test_a_started_fallback_read_completes_and_stays_cached(tiny_store):
    """A fallback read that is running when its token is accepted is not cancelled: it finishes and its
    copy stays cached (and serves a later request without a read)."""
    eng = hobbit.load(tiny_store, budget=BUDGET, policy="mobile", gamma=0.0, io_threads=0)
    sched, fetcher = eng.provider.scheduler, eng.provider.fetcher
    seq = eng.sequence()
    with torch.inference_mode():
        seq.step(torch.tensor(PROMPT))
        for tok in range(5, 5 + STEPS):  # little passes, until one queues fallback reads
            seq.step(torch.tensor([tok]))
            if sched._fallback:
                break
        first = next(iter(sched._fallback))
        fetcher.wait(first, sched._slot[first])  # one of them runs (here, to completion)
        issued = eng.provider.stats.fallback_prefetch_issued
        seq.step(torch.tensor([6]))  # accepted: the others are cancelled, the one that ran is kept
    s = eng.provider.stats
    assert first in sched.cache and first not in sched.cancelled
    assert s.fallback_prefetch_cancelled >= 1 and s.fallback_prefetch_cancelled + s.prefetch_cancelled <= issued - 1
    eng.close()


def test_the_redo_reuses_the_first_sparse_layer_little_outputs(tiny_store):
    """With every token falling back, each redo takes ceil(k/2) expert outputs of its first sparse layer
    from the little pass (same input, same copy); the decode stays bit-identical to big-only (above)."""
    _, _, _, stats = _decode(tiny_store, "mobile", gamma=1.01)
    eng = hobbit.load(tiny_store, budget=BUDGET, policy="lru")
    k = eng.config.top_k
    eng.close()
    from hobbit.policies.biglittle import little_k
    assert 0 < stats["fallback_reused"] <= STEPS * little_k(k)


def test_withheld_fallback_reads_change_no_result(tiny_store):
    """Below a token's big set (2 sparse layers x top-2 > 3 slots at 20%) 'fit' leaves the fallback to
    demand loads; every token is redone big, so the logits are those of reading the tail ahead."""
    runs = {}
    for mode in ("fit", "always"):
        eng = hobbit.load(tiny_store, budget="20%", policy="mobile", gamma=1.01, fallback_prefetch=mode)
        runs[mode] = decode_logits(eng, PROMPT, STEPS), eng.provider.stats.as_dict()
        eng.close()
    (fit_logits, fit_toks), fit = runs["fit"]
    (always_logits, always_toks), always = runs["always"]
    assert fit_toks == always_toks and torch.equal(fit_logits, always_logits)
    assert fit["fallback_prefetch_issued"] == 0 and fit["fallback_prefetch_withheld"] > 0
    assert always["fallback_prefetch_issued"] > 0 and always["fallback_prefetch_withheld"] == 0
    assert fit["bytes_prefetch"] < always["bytes_prefetch"]
