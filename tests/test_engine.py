"""Engine end to end on tiny stores: offloaded == resident, budgets, errors."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import hobbit
from hobbit.cli import main as cli_main
from hobbit.store.format import ExpertStore, StoreError

from tiny import decode_logits


def check_budget(engine) -> None:
    cache = engine.provider.scheduler.cache
    for pool, used in (cache.used.items() if cache is not None else ()):
        assert used <= cache.budgets[pool], f"pool {pool} holds {used} > budget {cache.budgets[pool]}"


PROMPT = [3, 17, 42, 99, 7, 128, 64, 5, 200, 11, 31, 77]


@pytest.mark.parametrize("precision", ["bf16", "int4", "int2"])
def test_offloaded_equals_resident(tiny_store, precision):
    ref = hobbit.load(tiny_store, policy="resident", high=precision)
    ref_logits, ref_toks = decode_logits(ref, PROMPT, 32)
    minimum = ref.provider.expert_bytes(precision) * ref.config.top_k
    ref.close()
    for policy in ("lru", "ondemand"):
        # the minimum budget (one layer's active experts) is below one token's working set across
        # the sparse layers, so every token evicts
        eng = hobbit.load(tiny_store, policy=policy, high=precision, budget=minimum)
        logits, toks = decode_logits(eng, PROMPT, 32, after_step=check_budget)
        assert toks == ref_toks
        assert torch.equal(logits, ref_logits), f"{policy} differs from resident"
        stats = eng.provider.stats
        assert sum(stats.misses.values()) > 0
        if policy == "lru":
            assert stats.evictions > 32, "the budget should force evictions every token"
        eng.close()


def test_generate_stats_and_budget_never_exceeded(tiny_store):
    eng = hobbit.load(tiny_store, policy="lru", budget="30%")
    total = eng.store.total_nbytes("bf16")
    assert eng.budget_bytes == int(total * 0.3)
    seen = []
    out = eng.generate(PROMPT, max_new_tokens=48, stop_token_ids=[], callback=lambda t: check_budget(eng) or seen.append(t))
    assert out.finish_reason == "length" and len(out.token_ids) == 48 and seen == out.token_ids
    s = out.stats
    assert s["hits"] + s["misses"] > 0 and s["bytes_read"] > 0 and s["generated_tokens"] == 48
    assert s["cached_expert_bytes"] <= eng.budget_bytes
    assert set(s["hits_by_precision"]) <= {"bf16"}
    eng.close()


def test_budget_too_small_names_minimum(tiny_store):
    with pytest.raises(ValueError, match=r"too small.*at least"):
        hobbit.load(tiny_store, policy="lru", budget=1000)


def test_budget_parsing():
    from hobbit.runtime.options import parse_budget
    assert parse_budget("2GiB", 0) == 2 << 30
    assert parse_budget("512MiB", 0) == 512 << 20
    assert parse_budget("25%", 1000) == 250
    assert parse_budget(123, 0) == 123
    for bad in ("lots", "0%", "150%", "12 parsecs"):
        with pytest.raises(ValueError, match="budget"):
            parse_budget(bad, 1000)


def test_sampling_is_seeded(tiny_store):
    eng = hobbit.load(tiny_store, policy="resident")
    a = eng.generate(PROMPT, max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=20, seed=7, stop_token_ids=[])
    b = eng.generate(PROMPT, max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=20, seed=7, stop_token_ids=[])
    assert a.token_ids == b.token_ids
    greedy = eng.generate(PROMPT, max_new_tokens=4, stop_token_ids=[])
    stop = eng.generate(PROMPT, max_new_tokens=4, stop_token_ids=[greedy.token_ids[1]])
    assert stop.finish_reason == "stop" and stop.token_ids == greedy.token_ids[:2]
    cancel = eng.generate(PROMPT, max_new_tokens=8, stop_token_ids=[], callback=lambda t: False)
    assert cancel.finish_reason == "cancelled" and len(cancel.token_ids) == 1
    eng.close()


def test_prompt_longer_than_context(tiny_store):
    eng = hobbit.load(tiny_store, policy="resident")
    with pytest.raises(ValueError, match="context"):
        eng.generate([1] * (eng.max_context + 1), max_new_tokens=1)
    with pytest.raises(ValueError, match="empty"):
        eng.generate([], max_new_tokens=1)
    assert len(eng.generate(PROMPT, max_new_tokens=2).token_ids) >= 1  # still usable
    eng.close()


def test_missing_manifest(tmp_path, tiny_checkpoint):
    with pytest.raises(StoreError, match="manifest.json is missing.*hobbit convert"):
        hobbit.load(tiny_checkpoint)
    with pytest.raises(StoreError, match="manifest.json is missing"):
        hobbit.load(tmp_path)


def test_truncated_store(tmp_path, tiny_store):
    bad = shutil.copytree(tiny_store, tmp_path / "s")
    blob = bad / "experts.bin"
    blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 2])
    with pytest.raises(StoreError, match=r"truncated.*layer \d+ expert \d+ precision \w+"):
        ExpertStore(bad)


def test_corrupt_blob_names_it_and_engine_survives(tmp_path, tiny_store):
    bad = shutil.copytree(tiny_store, tmp_path / "s")
    manifest = json.loads((bad / "manifest.json").read_text())
    layer = manifest["config"]["sparse_layers"][0]
    data = bytearray((bad / "experts.bin").read_bytes())
    for e in range(manifest["config"]["num_experts"]):  # corrupt every bf16 expert of the first sparse layer
        off = manifest["blobs"][f"{layer}/{e}/bf16"]["offset"]
        data[off + 10] ^= 0xFF
    (bad / "experts.bin").write_bytes(bytes(data))
    store = ExpertStore(bad)
    with pytest.raises(StoreError, match=f"checksum mismatch for blob layer {layer} expert 0 precision bf16"):
        store.read(layer, 0, "bf16")
    store.close()
    eng = hobbit.load(bad, policy="ondemand", budget=None)
    with pytest.raises(StoreError, match=rf"checksum mismatch for blob layer {layer} expert \d+ precision bf16"):
        eng.generate(PROMPT, max_new_tokens=2)
    # the intact int4 copies still serve: the loader thread survived the error
    eng.close()
    eng = hobbit.load(bad, policy="ondemand", high="int4")
    assert len(eng.generate(PROMPT, max_new_tokens=3, stop_token_ids=[]).token_ids) == 3
    eng.close()


def test_loader_error_surfaces_and_engine_stays_usable(tiny_store):
    eng = hobbit.load(tiny_store, policy="lru", budget="50%")
    real_read, calls = eng.store.read_into, []

    def flaky(*a):
        calls.append(a)
        if len(calls) == 1:
            raise OSError(5, "Input/output error (injected)")
        return real_read(*a)

    eng.store.read_into = flaky
    with pytest.raises(OSError, match="injected"):
        eng.generate(PROMPT, max_new_tokens=4)
    out = eng.generate(PROMPT, max_new_tokens=4, stop_token_ids=[])
    assert len(out.token_ids) == 4
    assert eng.provider.loader.alive()
    eng.close()


def test_buffered_io_matches_direct(tiny_store):
    a = hobbit.load(tiny_store, policy="ondemand", direct_io=False)
    b = hobbit.load(tiny_store, policy="ondemand")
    assert not a.store.direct
    assert torch.equal(a.logits(PROMPT), b.logits(PROMPT))
    a.close()
    b.close()


def test_unknown_policy_and_precision(tiny_store):
    with pytest.raises(ValueError, match="unknown policy"):
        hobbit.load(tiny_store, policy="fifo")
    with pytest.raises(ValueError, match="not in the store"):
        hobbit.load(tiny_store, policy="resident", high="int3")


def test_cli_run_json(tiny_store, capsys):
    assert cli_main(["run", str(tiny_store), "--prompt", "hello world", "--max-new-tokens", "5",
                     "--policy", "lru", "--budget", "40%", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stats"]["generated_tokens"] == len(out["token_ids"]) <= 5
    assert isinstance(out["text"], str)
    assert cli_main(["run", str(tiny_store), "--prompt", "hi", "--chat", "--max-new-tokens", "3"]) == 0
    text = capsys.readouterr().out
    assert "decode" in text and "read from store" in text and "peak RSS" in text


def test_cli_errors_are_clean(tmp_path, capsys):
    assert cli_main(["run", str(tmp_path), "--prompt", "x"]) == 2
    assert "manifest.json is missing" in capsys.readouterr().err


def test_sampler_follows_its_definition():
    """Temperature, top-k and top-p as defined (not as coded): p_i ∝ exp(l_i / T) over the k most likely
    tokens, cut to the smallest most-likely-first set whose mass reaches top_p, renormalized; the
    empirical frequencies of 20,000 draws match it and nothing outside the set is ever drawn."""
    import math

    from hobbit.runtime.engine import sample
    logits = [2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 3.0]
    gen = torch.Generator().manual_seed(0)
    for temperature, top_k, top_p in ((1.0, 0, 1.0), (0.7, 0, 0.8), (1.3, 5, 0.9), (1.0, 3, 1.0), (2.0, 0, 0.5)):
        w = {i: math.exp(v / temperature) for i, v in enumerate(logits)}
        order = sorted(w, key=w.get, reverse=True)[:top_k or len(w)]
        total = sum(w[i] for i in order)
        kept, mass = [], 0.0
        for i in order:  # most likely first, until the kept mass reaches top_p
            kept.append(i)
            mass += w[i] / total
            if mass >= top_p:
                break
        want = {i: w[i] / sum(w[j] for j in kept) for i in kept}
        n = 20000
        draws = [sample(torch.tensor(logits), temperature, top_p, top_k, gen) for _ in range(n)]
        assert set(draws) == set(want), (temperature, top_k, top_p)
        for i, p in want.items():  # 5 standard deviations
            assert abs(draws.count(i) / n - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-9, (temperature, top_k, top_p, i)
    assert sample(torch.tensor(logits), 0.0, 0.5, 3, gen) == 7  # temperature 0: greedy
