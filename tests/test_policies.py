"""Torch-free policy tests: hand-worked Eq. 2 / Eq. 3 examples, small traces, Belady as a bound."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hobbit.policies import (
    LFU,
    LRU,
    SLRU,
    Belady,
    Multidim,
    PredictionStats,
    ServeRule,
    decide,
    layer_weights,
    little_k,
    little_mass,
    little_weights,
    make_evictor,
    plan_prefetch,
    ranks_worth_reading,
    scores,
)

A, B, C, D = (0, 0, "bf16"), (0, 1, "bf16"), (0, 2, "bf16"), (0, 3, "bf16")


def touch_all(policy, keys, t=0, layer_now=0, high=True):
    for k in keys:
        policy.touch(k, t, layer_now, high)


# --- Eq. 2 precision rule -------------------------------------------------------------------


def test_eq2_worked_example():
    assert scores([0.5, 0.3, 0.2]) == pytest.approx([0.0, 0.5, 0.8])
    assert decide([0.5, 0.3, 0.2], 0.6, 0.9) == ["high", "high", "low"]


def test_eq2_normalizes_and_thresholds_are_inclusive():
    # [3, 2] normalizes to [0.6, 0.4]: score 0.6 <= T1 → high.
    assert decide([3, 2], 0.6, 0.9) == ["high", "high"]
    # Mixtral top-2: second expert high iff w1 >= 0.4, low iff 0.1 <= w1 < 0.4, else skip.
    assert decide([0.7, 0.3], 0.6, 0.9) == ["high", "low"]
    assert decide([0.9, 0.1], 0.6, 0.9) == ["high", "low"]
    assert decide([0.95, 0.05], 0.6, 0.9) == ["high", "skip"]
    # Top-8 "nucleus": after 60% of the mass → low, after 90% → skip.
    w = [0.3, 0.2, 0.15, 0.1, 0.1, 0.06, 0.05, 0.04]
    assert decide(w, 0.6, 0.9) == ["high", "high", "high", "low", "low", "low", "skip", "skip"]


def test_eq2_top1_always_high_and_validation():
    assert decide([1.0], 0.0, 0.0) == ["high"]
    assert decide([0.5, 0.5], 0.0, 0.0) == ["high", "skip"]
    with pytest.raises(ValueError):
        decide([0.2, 0.8], 0.6, 0.9)  # not sorted descending
    with pytest.raises(ValueError):
        decide([0.5, 0.5], 0.9, 0.6)  # t1 > t2
    with pytest.raises(ValueError):
        decide([], 0.6, 0.9)


def test_serve_rule():
    strict, lenient = ServeRule(), ServeRule(allow_low_for_high=True)
    assert strict.serve("high", have_high=True, have_low=True) == "high"
    assert strict.serve("low", have_high=True, have_low=False) == "high"  # hit on high
    assert strict.serve("low", have_high=True, have_low=True) == "high"  # a high copy always serves
    assert strict.serve("low", have_high=False, have_low=True) == "low"
    assert strict.serve("high", have_high=False, have_low=True) is None  # miss
    assert lenient.serve("high", have_high=False, have_low=True) == "low"
    assert strict.serve("low", have_high=False, have_low=False) is None
    with pytest.raises(ValueError):
        strict.serve("skip", True, True)


# --- Eviction: LRU, LFU, SLRU -------------------------------------------------------------------


def test_lru():
    p = LRU()
    touch_all(p, [A, B, C, A])
    assert p.victim([A, B, C], 1, 0) == B
    p.remove(B)
    assert p.victim([A, C], 1, 0) == C
    assert p.victim([A, C, D], 1, 0) == D  # never seen → oldest
    p.reset()  # recency is not a per-sequence record
    assert p.victim([A, C], 0, 0) == C


def test_lfu_counts_with_lru_tiebreak_and_reset():
    p = LFU()
    touch_all(p, [A, B, A, C])
    assert p.victim([A, B, C], 1, 0) == B  # B and C used once; B less recent
    touch_all(p, [A, A, B])
    assert p.victim([A, B, C], 2, 0) == C
    p.reset()
    p.touch(C, 0, 0, True)
    assert p.victim([A, B, C], 0, 0) == A  # counts cleared: A, B at 0, A least recent


def test_lfu_counts_survive_eviction_within_a_sequence():
    p = LFU()
    touch_all(p, [A, A, A, B])
    p.remove(A)
    p.touch(A, 1, 0, True)  # re-inserted: its count is 4, not 1
    assert p.victim([A, B], 1, 0) == B


def test_slru_segments():
    p = SLRU(protected_fraction=0.5)
    touch_all(p, [A, B, C])
    assert [p.segment(k) for k in (A, B, C)] == ["probation"] * 3
    p.touch(A, 1, 0, True)  # second use → protected
    assert p.segment(A) == "protected"
    assert p.victim([A, B, C], 1, 0) == B  # least recent in probation
    p.touch(B, 2, 0, True)
    assert (p.segment(A), p.segment(B)) == ("protected", "protected")
    # Eviction cuts protected to floor(0.5 * 3) = 1: A is demoted to the recent end of probation.
    assert p.victim([A, B, C], 2, 0) == C
    assert (p.segment(A), p.segment(B)) == ("probation", "protected")
    assert p.victim([A, B], 2, 0) == A
    assert p.victim([B], 2, 0) == B  # only protected candidates left
    p.remove(B)
    assert p.segment(B) is None


def test_slru_resists_a_scan_better_than_lru():
    # Experts 0 and 1 are reused; a scan of six one-off experts passes through 3 slots.
    token = [(0, 0), (0, 1), (0, 0), (0, 1)] + [(0, e) for e in range(2, 8)] + [(0, 0), (0, 1)]
    assert simulate(SLRU(protected_fraction=0.67), [[token]], 3) == 8  # 0, 1 and the scan
    assert simulate(LRU(), [[token]], 3) == 10  # the scan flushes 0 and 1


# --- Eviction: HOBBIT Eq. 3 ---------------------------------------------------------------------


def test_eq3_hand_worked_priority():
    p = Multidim(num_layers=4)  # default weights 0.25 each
    x, y, z = (0, 1, "bf16"), (1, 2, "bf16"), (2, 3, "int4")
    p.touch(x, 0, 0, True)
    p.touch(y, 0, 1, True)
    p.touch(z, 0, 2, False)  # low-precision use: H not updated
    p.touch(x, 1, 0, True)
    # Now token t=1 (T = 2), computing layer 1, l_n = 4.
    # x: R=2 F=2 H=2, fld = 1 - ((0-1+4)%4)/4 = 0.25 → 0.25*(1 + 1 + 1 + 0.25)  = 0.8125
    # y: R=1 F=1 H=1, fld = 1 - 0/4 = 1             → 0.25*(.5 + .5 + .5 + 1)   = 0.625
    # z: R=1 F=1 H=0, fld = 1 - 1/4 = 0.75          → 0.25*(.5 + .5 + 0 + .75)  = 0.4375
    assert p.priority(x, 1, 1) == pytest.approx(0.8125)
    assert p.priority(y, 1, 1) == pytest.approx(0.625)
    assert p.priority(z, 1, 1) == pytest.approx(0.4375)
    assert p.victim([x, y, z], 1, 1) == z
    assert LRU_victim([x, y, z, x], [x, y, z]) == y  # LRU would choose differently

    fld_only = Multidim(num_layers=4, weights={"lru": 0, "lfu": 0, "lhu": 0, "fld": 2})
    assert fld_only.weights["fld"] == 1.0  # normalized
    assert fld_only.victim([x, y, z], 1, 1) == x  # the layer just computed goes first

    p.reset()  # records cleared: only the FLD term is left
    assert p.priority(x, 0, 1) == pytest.approx(0.25 * 0.25)
    assert p.priority(y, 0, 1) == pytest.approx(0.25 * 1.0)


def LRU_victim(touches, candidates):
    p = LRU()
    touch_all(p, touches)
    return p.victim(candidates, 0, 0)


def test_eq3_weight_validation():
    with pytest.raises(ValueError):
        Multidim(4, weights={"lru": 1.0})
    with pytest.raises(ValueError):
        Multidim(4, weights={"lru": -1, "lfu": 1, "lhu": 1, "fld": 1})
    with pytest.raises(ValueError):
        Multidim(0)


# --- Belady and the factory ---------------------------------------------------------------------


def test_belady_evicts_farthest_next_use():
    # one sequence, one layer: token 0 uses A,B,C; token 1 uses A; token 2 uses B; token 3 uses D
    trace = [(0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 0, 2), (0, 1, 0, 0), (0, 2, 0, 1), (0, 3, 0, 3)]
    p = Belady(trace)
    p.reset()
    touch_all(p, [A, B, C])  # all at t=0 (touch_all uses t=0, layer 0)
    assert (p.next_use(A, 0, 0), p.next_use(B, 0, 0), p.next_use(C, 0, 0)) == ((0, 1, 0), (0, 2, 0), Belady.NEVER)
    assert p.victim([A, B, C], 0, 0) == C
    # at token 3, layer 0: D is about to be used (not touched yet), A and B never again
    assert p.next_use(D, 3, 0) == (0, 3, 0)
    assert p.victim([A, D], 3, 0) == A
    p.reset()  # a second sequence: nothing recorded for it
    assert p.next_use(D, 0, 0) == Belady.NEVER


def test_make_evictor():
    assert isinstance(make_evictor("lru", 4), LRU)
    assert isinstance(make_evictor("lfu", 4), LFU)
    assert make_evictor("slru", 4, protected_fraction=0.5).protected_fraction == 0.5
    assert make_evictor("multidim", 4).num_layers == 4
    assert make_evictor("belady", 4, trace=[(0, 0, 0, 1)]).next_use((0, 1, "bf16"), 0, 0) == (0, 0, 0)
    with pytest.raises(ValueError, match="lru, lfu, slru, multidim, belady"):
        make_evictor("fifo", 4)
    with pytest.raises(ValueError, match="trace"):
        make_evictor("belady", 4)
    with pytest.raises(TypeError):
        make_evictor("lru", 4, weights={})


def simulate(policy, sequences, capacity: int) -> int:
    """Misses of a capacity-in-slots cache driven by ``policy`` (demand fetch, unit-size entries).

    ``sequences``: list of sequences; a sequence is a list of tokens; a token is a list of
    (layer, expert) accesses in order.
    """
    cached: list = []
    misses = 0
    for seq in sequences:
        policy.reset()
        for t, token in enumerate(seq):
            for layer, expert in token:
                key = (layer, expert, "bf16")
                if key not in cached:
                    misses += 1
                    if len(cached) == capacity:
                        victim = policy.victim(list(cached), t, layer)
                        cached.remove(victim)
                        policy.remove(victim)
                    cached.append(key)
                policy.touch(key, t, layer, True)
    return misses


@st.composite
def workloads(draw):
    layers = draw(st.integers(1, 3))
    experts = draw(st.integers(2, 6))
    k = draw(st.integers(1, 2))
    layer_experts = st.lists(st.integers(0, experts - 1), min_size=1, max_size=k, unique=True)
    token = st.tuples(*[layer_experts] * layers).map(
        lambda per_layer: [(layer, e) for layer, es in enumerate(per_layer) for e in es]
    )
    sequences = draw(st.lists(st.lists(token, min_size=1, max_size=8), min_size=1, max_size=2))
    capacity = draw(st.integers(1, layers * experts))
    return layers, sequences, capacity


@settings(max_examples=100, deadline=None)
@given(workloads())
def test_belady_is_a_lower_bound(workload):
    layers, sequences, capacity = workload
    trace = [(s, t, layer, e) for s, seq in enumerate(sequences) for t, token in enumerate(seq) for layer, e in token]
    best = simulate(Belady(trace), sequences, capacity)
    for policy in (LRU(), LFU(), SLRU(), SLRU(protected_fraction=0.5), Multidim(layers)):
        assert best <= simulate(policy, sequences, capacity), policy.name


# --- Prefetch walk and prediction accounting ----------------------------------------------------


def test_prefetch_walks_past_cached_layers():
    cached = {(2, 5, "high"), (2, 1, "low")}
    calls = []

    def is_cached(layer, expert, tier):
        calls.append((layer, expert, tier))
        return (layer, expert, tier) in cached

    predicted = {3: [(0, 0.5), (4, 0.5)], 2: [(1, 0.3), (5, 0.7)], 4: [(7, 1.0)]}
    plan = plan_prefetch(predicted, is_cached, 0.6, 0.9)
    # Layer 2: weights sorted [0.7, 0.3] → high, low; both cached → walk on.
    # Layer 3: [0.5, 0.5] → high, high; both miss → load, stop (layer 4 not visited).
    assert plan.stop_layer == 3
    assert plan.loads == [(3, 0, "high"), (3, 4, "high")]
    assert plan.pins == [(2, 5, "high"), (2, 1, "low"), (3, 0, "high"), (3, 4, "high")]
    assert all(layer != 4 for layer, _, _ in calls)


def test_prefetch_all_cached_and_skipped_experts():
    plan = plan_prefetch({1: [(7, 0.95), (6, 0.05)]}, lambda layer, e, tier: e == 7, 0.6, 0.9)
    assert plan.stop_layer is None and plan.loads == []
    assert plan.pins == [(1, 7, "high")]  # expert 6 would be skipped: not loaded, not pinned
    first_misses = plan_prefetch({1: [(0, 1.0)], 2: [(3, 1.0)]}, lambda *k: False, 0.6, 0.9)
    assert first_misses.loads == [(1, 0, "high")] and first_misses.stop_layer == 1


def test_prediction_stats():
    s = PredictionStats()
    assert (s.precision, s.recall, s.top1_accuracy) == (1.0, 1.0, 1.0)
    s.add([3, 1], [3, 2])  # tp 1, fp 1, fn 1, top-1 hit
    s.add([4], [5, 4])  # tp 1, fn 1, top-1 miss
    assert s.precision == pytest.approx(2 / 3)
    assert s.recall == pytest.approx(2 / 4)
    assert s.top1_accuracy == pytest.approx(1 / 2)
    assert s.as_dict()["samples"] == 2
    assert (s.rank_hits, s.rank_total, s.rank_precision) == ([2, 0], [2, 1], [1.0, 0.0])  # ranks 0: 3, 4; 1: 1
    assert PredictionStats.from_counts(s.as_dict()) == s


def test_prefetch_reads_only_the_ranks_it_is_given():
    """A miss at a rank past `ranks` stays a prediction: pinned, not loaded; the walk still stops at its layer."""
    predicted = {1: [(4, 0.2), (0, 0.5), (9, 0.3)], 2: [(3, 1.0)]}
    all_ranks = plan_prefetch(predicted, lambda *k: False, 1.0, 1.0)
    two = plan_prefetch(predicted, lambda *k: False, 1.0, 1.0, ranks=2)
    assert all_ranks.loads == [(1, 0, "high"), (1, 9, "high"), (1, 4, "high")]  # by predicted weight
    assert two.loads == [(1, 0, "high"), (1, 9, "high")] and two.pins == all_ranks.pins and two.stop_layer == 1
    only_low_rank_missing = plan_prefetch(predicted, lambda layer, e, tier: e != 4, 1.0, 1.0, ranks=2)
    assert only_low_rank_missing.loads == [] and only_low_rank_missing.stop_layer == 1  # layer 2 not walked


def test_ranks_worth_reading_cuts_at_the_first_imprecise_rank():
    s = PredictionStats(rank_hits=[60, 50, 10, 60], rank_total=[64, 64, 64, 64])  # 94%, 78%, 16%, 94%
    assert ranks_worth_reading(s, 0.7) == 2  # rank 3's precision does not bring rank 2 back
    assert ranks_worth_reading(s, 0.8) == 1
    assert ranks_worth_reading(s, 0.1) is None and ranks_worth_reading(s, 0.0) is None
    few = PredictionStats(rank_hits=[60, 0], rank_total=[64, 63])  # rank 1: too few samples to judge
    assert ranks_worth_reading(few, 0.7) is None and ranks_worth_reading(few, 0.7, min_samples=63) == 1


# --- MoBiLE big-little ----------------------------------------------------------------------------


def test_biglittle_little_set():
    assert [little_k(k) for k in (1, 2, 3, 4, 8)] == [1, 1, 2, 2, 4]
    w = [0.4, 0.3, 0.2, 0.1]
    assert little_mass(w) == pytest.approx(0.7)
    assert little_weights(w) == pytest.approx([0.4 / 0.7, 0.3 / 0.7])
    assert layer_weights(w, 0.6) == pytest.approx([0.4 / 0.7, 0.3 / 0.7])  # little suffices
    assert layer_weights(w, 0.8) == w  # important token at this layer: big
    # Unnormalized family weights (sum 0.5): rescaled, the little set keeps the same total; as the
    # router gives them (a family that never renormalizes), the kept weights are the router's own.
    assert little_weights([0.3, 0.1, 0.05, 0.05]) == pytest.approx([0.375, 0.125])
    assert little_weights([0.3, 0.1, 0.05, 0.05], renorm=False) == [0.3, 0.1]
    assert layer_weights([0.3, 0.1, 0.05, 0.05], 0.6, renorm=False) == [0.3, 0.1]
    with pytest.raises(ValueError):
        little_mass([0.1, 0.9])


def test_adapmoe_drops_small_normalized_weights():
    from hobbit.policies import adapmoe_weights
    assert adapmoe_weights([0.7, 0.3], 0.35) == pytest.approx([1.0])  # AdapMoE's top-2 code: keep top-1, renormalized
    assert adapmoe_weights([0.7, 0.3], 0.3) == [0.7, 0.3]  # at the threshold: kept
    assert adapmoe_weights([0.3, 0.1, 0.1], 0.25) == pytest.approx([0.5])  # unnormalized: same total
    assert adapmoe_weights([0.3, 0.1, 0.1], 0.25, renorm=False) == [0.3]  # or the router's own weight
    assert adapmoe_weights([0.5, 0.3, 0.2], 0.0) == [0.5, 0.3, 0.2]
    assert adapmoe_weights([0.2, 0.2], 1.0) == pytest.approx([0.4])  # the top-1 always stays
    with pytest.raises(ValueError, match="threshold"):
        adapmoe_weights([0.5, 0.5], 1.5)


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 5), st.booleans(), st.integers(0, 6)), min_size=1,
                max_size=40), st.integers(0, 3))
@settings(max_examples=100, deadline=None)
def test_eq3_victim_is_the_lowest_priority(uses, layer_now):
    """The inlined scan picks exactly min over (priority, recency, key), ties included."""
    p = Multidim(num_layers=4, weights={"lru": 0.3, "lfu": 0.1, "lhu": 0.2, "fld": 0.4})
    keys = []
    for layer, expert, high, t in uses:
        key = (layer, expert, "bf16" if high else "int4")
        p.touch(key, t, layer, high)
        keys.append(key)
    keys = sorted(set(keys))
    t = max(u[3] for u in uses)
    expected = min(keys, key=lambda k: (p.priority(k, t, layer_now), p._recency.stamp(k), k))
    assert p.victim(keys, t, layer_now) == expected
