"""ExpertCache: byte budgets per pool, pins, CacheFull, counters, invariants under random use."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hobbit.runtime.cache import CacheFull, ExpertCache
from hobbit.policies import LFU, LRU, SLRU, Multidim

A, B, C, D = (0, 0, "bf16"), (0, 1, "bf16"), (0, 2, "bf16"), (0, 3, "bf16")
LOW_A = (0, 0, "int4")


def one_pool(budget=300, policy=None):
    return ExpertCache({"all": budget}, lambda prec: "all", policy or LRU())


def two_pools(high=200, low=100):
    return ExpertCache({"high": high, "low": low}, lambda prec: "high" if prec == "bf16" else "low", LRU())


def test_insert_get_touch_and_lru_eviction():
    c = one_pool()
    for i, k in enumerate((A, B, C)):
        assert c.insert(k, f"w{i}", 100, 0, 0, True) == []
    assert c.get(B) == "w1" and c.get(D) is None
    assert c.used == {"all": 300} and c.budgets == {"all": 300}
    c.touch(A, 1, 0, True)
    assert c.insert(D, "w3", 100, 1, 0, True) == [B]  # B least recent
    assert B not in c and len(c) == 3
    assert c.insert(B, "w1", 150, 2, 0, True) == [C, A]  # needs two evictions
    assert c.used == {"all": 250}
    assert c.counters == {"inserts": 5, "evictions": 3, "evicted_bytes": 300, "rejected": 0}


def test_pinned_keys_are_never_evicted():
    c = one_pool()
    for k in (A, B, C):
        c.insert(k, k, 100, 0, 0, True)
    c.pin(A)
    c.pin(B)
    assert c.insert(D, D, 100, 0, 0, True) == [C]
    assert A in c and B in c


def test_cache_full_when_pinned_or_too_big_and_nothing_changes():
    c = one_pool()
    for k in (A, B, C):
        c.insert(k, k, 100, 0, 0, True)
        c.pin(k)
    with pytest.raises(CacheFull) as err:
        c.insert(D, D, 50, 0, 0, True)
    assert err.value.min_bytes == 350 and err.value.pool == "all"
    assert c.keys() == [A, B, C] and c.used == {"all": 300}
    c.unpin(C)
    with pytest.raises(CacheFull) as err:
        c.insert(D, D, 400, 0, 0, True)  # bigger than the pool, even with C gone
    assert err.value.min_bytes == 600
    assert c.keys() == [A, B, C]
    assert c.insert(D, D, 50, 0, 0, True) == [C]
    assert c.counters["rejected"] == 2


def test_item_bigger_than_empty_pool():
    c = one_pool(budget=10)
    with pytest.raises(CacheFull) as err:
        c.insert(A, A, 11, 0, 0, True)
    assert err.value.min_bytes == 11 and "at least 11 bytes" in str(err.value)


def test_pools_are_separate():
    c = two_pools()
    c.insert(A, "hi", 200, 0, 0, True)
    c.insert(LOW_A, "lo", 100, 0, 0, False)
    assert c.used == {"high": 200, "low": 100}
    assert c.insert((0, 1, "int4"), "lo1", 100, 1, 0, False) == [LOW_A]  # the high pool is untouched
    assert c.insert(B, "hi1", 150, 1, 0, True) == [A]
    assert c.used == {"high": 150, "low": 100}


def test_pins_are_counted_and_may_precede_insert():
    c = one_pool(budget=200)
    c.pin(C)  # a prefetch in flight
    c.insert(C, C, 100, 0, 0, True)
    c.insert(A, A, 100, 0, 0, True)
    c.pin(C)
    c.unpin(C)
    assert c.is_pinned(C)
    assert c.insert(B, B, 100, 0, 0, True) == [A]
    c.unpin(C)
    c.unpin(C)  # no pins left: no-op
    assert not c.is_pinned(C)
    c.pin(B)
    c.unpin_all()
    assert not c.is_pinned(B)


def test_reinsert_keeps_payload_and_counts_as_use():
    c = one_pool(budget=200)
    c.insert(A, "first", 100, 0, 0, True)
    c.insert(B, B, 100, 0, 0, True)
    assert c.insert(A, "second", 100, 1, 0, True) == []
    assert c.get(A) == "first" and c.used == {"all": 200}
    assert c.insert(C, C, 100, 1, 0, True) == [B]  # A was used more recently


def test_reset_sequence_clears_policy_records():
    c = one_pool(budget=200, policy=LFU())
    c.insert(A, A, 100, 0, 0, True)
    for _ in range(3):
        c.touch(A, 0, 0, True)
    c.insert(B, B, 100, 0, 0, True)
    c.reset_sequence()
    c.touch(B, 0, 0, True)
    assert c.insert(C, C, 100, 0, 0, True) == [A]  # A's count is gone with the old sequence


def test_errors():
    c = two_pools()
    with pytest.raises(KeyError):
        c.touch(A, 0, 0, True)
    bad = ExpertCache({"all": 100}, lambda prec: "elsewhere", LRU())
    with pytest.raises(KeyError, match="elsewhere"):
        bad.insert(A, A, 10, 0, 0, True)
    with pytest.raises(ValueError):
        ExpertCache({"all": -1}, lambda prec: "all", LRU())

    class Rogue(LRU):
        def victim(self, candidates, t, layer_now):
            return D

    rogue = ExpertCache({"all": 100}, lambda prec: "all", Rogue())
    rogue.insert(A, A, 100, 0, 0, True)
    with pytest.raises(RuntimeError, match="not an evictable candidate"):
        rogue.insert(B, B, 100, 0, 0, True)


ops = st.lists(
    st.tuples(
        st.sampled_from(["insert", "pin", "unpin", "touch", "reset"]),
        st.integers(0, 2),  # layer
        st.integers(0, 3),  # expert
        st.sampled_from(["bf16", "int4"]),
        st.integers(0, 120),  # nbytes
    ),
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(ops, st.sampled_from(["lru", "lfu", "slru", "multidim"]))
def test_invariants_under_random_use(operations, policy_name):
    policy = {"lru": LRU(), "lfu": LFU(), "slru": SLRU(), "multidim": Multidim(3)}[policy_name]
    c = ExpertCache({"high": 250, "low": 100}, lambda prec: "high" if prec == "bf16" else "low", policy)
    sizes = {}
    for t, (op, layer, expert, prec, nbytes) in enumerate(operations):
        key = (layer, expert, prec)
        if op == "insert":
            pinned_before = [k for k in c.keys() if c.is_pinned(k)]
            was_cached = key in c
            try:
                evicted = c.insert(key, key, nbytes, t, layer, prec == "bf16")
            except CacheFull as err:
                assert err.min_bytes > c.budgets[err.pool]
                continue
            if not was_cached:
                sizes[key] = nbytes
            assert not set(evicted) & set(pinned_before)
            assert key in c
        elif op == "pin":
            c.pin(key)
        elif op == "unpin":
            c.unpin(key)
        elif op == "touch" and key in c:
            c.touch(key, t, layer, prec == "bf16")
        elif op == "reset":
            c.reset_sequence()
        for pool in c.budgets:
            assert c.used[pool] == sum(sizes[k] for k in c.keys() if c.pool_of(k[2]) == pool)
            assert c.used[pool] <= c.budgets[pool]
