"""The Scheduler's per-token selection (HOBBIT Eq. 2 skips, MoBiLE little set), torch-free, and
its effect end to end."""
from __future__ import annotations

import pytest

from hobbit.runtime.options import Options
from hobbit.runtime.schedule import Scheduler
from hobbit.lab.simulate import CountingFetcher

MB = 1 << 20


def scheduler(**kw) -> Scheduler:
    return Scheduler(Options(**kw), num_layers=4, top_k=3, expert_nbytes=lambda p: MB, budget_bytes=64 * MB)


def test_eq2_skip_zeroes_only_that_tokens_slot():
    s = scheduler(policy="hobbit", high="bf16", low="int4", t1=0.6, t2=0.9)
    # token 0: scores [0, .65, .95] -> high, low, skip; token 1 routes expert 3 first -> high
    rows = [([1, 2, 3], [0.65, 0.3, 0.05]), ([3, 1, 2], [0.7, 0.2, 0.1])]
    want, weights = s.select(0, rows)
    assert want == {1: "high", 2: "low", 3: "high"}
    assert weights == [[0.65, 0.3, 0.0], [0.7, 0.2, 0.1]]
    assert s.stats.skipped == 1


def test_eq2_never_skips_a_cached_expert():
    s = scheduler(policy="hobbit", high="bf16", low="int4", t1=0.6, t2=0.9)
    fetcher = CountingFetcher()
    s.run_layer(0, [([1, 3], [0.65, 0.35])], fetcher)  # expert 1 loaded high, expert 3 low (score 0.65)
    assert fetcher.loads["demand"] == {"bf16": 1, "int4": 1}
    want, weights = s.select(0, [([1, 2, 3], [0.65, 0.3, 0.05])])
    assert want[3] == "low" and weights is None and s.stats.skipped == 0
    steps = s.plan(0, [([1, 2, 3], [0.65, 0.3, 0.05])])
    assert [(x.expert, x.action) for x in steps] == [(1, "hit"), (2, "load"), (3, "hit")]


def test_full_precision_policies_keep_the_weights():
    s = scheduler(policy="lru")
    want, weights = s.select(0, [([1, 2, 3], [0.5, 0.45, 0.05])])
    assert want == {1: "high", 2: "high", 3: "high"} and weights is None


def test_little_set_for_unimportant_tokens():
    s = scheduler(policy="lru", little=0.8)
    rows = [([4, 5, 6], [0.6, 0.3, 0.1]),  # little = top-2 holds 0.9 >= 0.8: drop expert 6, rescale
            ([7, 8, 9], [0.4, 0.3, 0.3])]  # little holds 0.7: big, all three
    want, weights = s.select(0, rows)
    assert want == {4: "high", 5: "high", 6: "skip", 7: "high", 8: "high", 9: "high"}
    assert weights[0] == pytest.approx([0.6 / 0.9, 0.3 / 0.9, 0.0])
    assert weights[1] == [0.4, 0.3, 0.3]
    assert s.stats.little_tokens == 1 and s.stats.skipped == 1


def test_little_rules_and_mobile_options():
    s = scheduler(policy="lru", little_rule="adapmoe", little=0.25)
    want, weights = s.select(0, [([4, 5, 6], [0.6, 0.3, 0.1])])  # 0.1 < 0.25: dropped, the rest rescaled
    assert want == {4: "high", 5: "high", 6: "skip"} and weights[0] == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert Options(little=0.8).little_rule == "mass"
    with pytest.raises(ValueError, match="needs a threshold"):
        Options(little_rule="adapmoe")
    with pytest.raises(ValueError, match="unknown little rule"):
        Options(little_rule="median", little=0.5)
    o = Options(policy="hobbit+mobile", low="int4")
    assert (o.policy, o.mobile, o.name) == ("hobbit", True, "hobbit+mobile")
    assert Options(policy="mobile").name == "mobile" and Options(policy="lru").name == "lru"


def test_mobile_little_pass_prefetches_what_a_fallback_adds():
    s = scheduler(policy="hobbit", high="bf16", low="int4", t1=0.6, t2=0.9, mobile=True)
    f = CountingFetcher()
    rows = [([1, 2, 3], [0.5, 0.3, 0.2])]  # k=3: little = experts 1, 2; scores [0, .5, .8]: 2 high, 3 low
    s.begin_pass(True)
    weights = s.run_layer(0, rows, f)
    assert weights[0] == pytest.approx([0.625, 0.375, 0.0])
    assert f.loads["demand"] == {"bf16": 2} and f.loads["prefetch"] == {"int4": 1}  # expert 3, at Eq. 2's tier
    s.end_step()
    s.begin_pass(False)  # unsure: the same token again, big
    assert s.run_layer(0, rows, f) is None
    assert f.loads["demand"] == {"bf16": 2}  # the fallback hit everything
    s.end_step()
    st = s.stats
    assert (st.little_steps, st.fallbacks, st.fallback_prefetch_issued, st.fallback_prefetch_used) == (1, 1, 1, 1)
    s.begin_pass(True)  # the next token; a confident one needs no fallback: no big pass follows
    s.run_layer(0, [([4, 5, 1], [0.5, 0.4, 0.1])], f)  # score of expert 1 is 0.9 <= t2, but it is cached: no read
    s.end_step()
    s.begin_pass(True)
    assert st.little_steps == 3 and st.fallbacks == 1


@pytest.mark.parametrize("little", [True, False])
def test_a_little_pass_reads_ahead_only_the_predicted_little_sets(little):
    """HOBBIT's prefetch in a little pass walks each predicted layer's first ceil(k/2) experts (by predicted
    weight): those are all the little pass computes; what a fallback adds is the fallback reads' business
    (withheld here: 'never'). A big pass reads ahead all k."""
    s = scheduler(policy="hobbit", high="bf16", low="int4", t1=1.0, t2=1.0, mobile=True, fallback_prefetch="never")
    f = CountingFetcher()
    s.begin_pass(little)
    predicted = {1: [(7, 0.2), (5, 0.5), (6, 0.3)]}  # k = 3: the little set is 5 and 6
    s.run_layer(0, [([1, 2, 3], [0.5, 0.3, 0.2])], f, predicted=predicted)
    assert s.stats.prefetch_issued == (2 if little else 3)
    assert s._prefetched == ({(1, 5, "bf16"), (1, 6, "bf16")} | (set() if little else {(1, 7, "bf16")}))
    assert s._predicted[1] == [7, 5, 6]  # prediction accuracy is still counted on the whole prediction


def test_fallback_reads_fit_when_the_pool_holds_the_big_set():
    from hobbit.policies.biglittle import fallback_reads_fit
    assert fallback_reads_fit(capacity=224, layers=28, big=8)  # CoderMoE at 50%: 8 of 16 per layer
    assert not fallback_reads_fit(capacity=112, layers=28, big=8)  # at 25%: half a token's working set
    assert fallback_reads_fit(capacity=112, layers=28, big=4)  # a tier holding half of each layer's big set
    with pytest.raises(ValueError):
        fallback_reads_fit(capacity=8, layers=0, big=1)
    with pytest.raises(ValueError, match="unknown fallback prefetch"):
        Options(fallback_prefetch="sometimes")


@pytest.mark.parametrize("mode,budget,issued", [("fit", 12, True), ("fit", 11, False), ("always", 11, True),
                                                ("never", 64, False)])
def test_fallback_reads_only_where_the_pool_keeps_them(mode, budget, issued):
    """4 layers x top-3: a token's big set is 12 copies. A pool of 11 cannot keep it until the fallback,
    so 'fit' leaves the tail to demand loads (withheld); 'always' reads it anyway; 'never' never does."""
    s = Scheduler(Options(policy="mobile", fallback_prefetch=mode), num_layers=4, top_k=3,
                  expert_nbytes=lambda p: MB, budget_bytes=budget * MB)
    f = CountingFetcher()
    s.begin_pass(True)
    for layer in range(4):
        s.run_layer(layer, [([1, 2, 3], [0.5, 0.3, 0.2])], f)
    st = s.stats
    assert (st.fallback_prefetch_issued, st.fallback_prefetch_withheld) == \
        ((4, 0) if issued else (0, 4))
    assert sum(f.loads["prefetch"].values()) == st.fallback_prefetch_issued


def test_fallback_reads_fit_per_precision_pool():
    """hobbit's two pools: a layer's tail is read at its Eq. 2 tier only if that tier's pool holds the
    layer's big-set copies at that tier for every layer (4 layers; 6 high slots, 6 low slots)."""
    s = Scheduler(Options(policy="hobbit", high="bf16", low="int4", t1=0.85, t2=0.95, mobile=True,
                          low_pool_fraction=0.5, prefetch_depth=0), num_layers=4, top_k=3,
                  expert_nbytes=lambda p: MB, budget_bytes=12 * MB)
    assert s.capacity == {"bf16": 6, "int4": 6}
    f = CountingFetcher()
    s.begin_pass(True)
    s.run_layer(0, [([1, 2, 3], [0.5, 0.3, 0.2])], f)  # scores [0, .5, .8]: all high, 4 x 3 > 6: withheld
    assert (s.stats.fallback_prefetch_issued, s.stats.fallback_prefetch_withheld) == (0, 1)
    s.run_layer(1, [([1, 2, 3], [0.6, 0.3, 0.1])], f)  # scores [0, .6, .9]: expert 3 low, 4 x 1 <= 6: read
    assert (s.stats.fallback_prefetch_issued, s.stats.fallback_prefetch_withheld) == (1, 1)
    assert f.loads["prefetch"] == {"int4": 1}


def test_little_end_to_end(tiny_store):
    import hobbit
    prompt = [3, 17, 42, 99, 7, 128]
    ref = hobbit.load(tiny_store, policy="lru", budget="50%")
    never = hobbit.load(tiny_store, policy="lru", budget="50%", little=1.01)
    always = hobbit.load(tiny_store, policy="lru", budget="50%", little=0.0)
    base = ref.logits(prompt)
    assert (never.logits(prompt) == base).all()  # the big set every time: unchanged
    out = always.generate(prompt, max_new_tokens=4, stop_token_ids=[])
    sparse = len(always.config.sparse_layers)
    # top-2 routers: the little set is the top-1 expert, for every token at every sparse layer
    assert out.stats["little_tokens"] == sparse * (len(prompt) + 3)
    assert out.stats["skipped"] == out.stats["little_tokens"]
    assert not (always.logits(prompt) == base).all()
    for e in (ref, never, always):
        e.close()


@pytest.mark.parametrize("keep,started", [(False, False), (True, False), (False, True)])
def test_a_prefetch_its_router_did_not_choose_is_dropped_unread(keep, started):
    """Layer 0 predicts experts 1 and 2 of layer 1; layer 1's router chooses 1 and 3. Expert 2's read is
    dropped when it has not started (its slot serves expert 3's load), unless --keep-stale-prefetch."""
    s = Scheduler(Options(policy="lru+prefetch", high="bf16", keep_stale_prefetch=keep), num_layers=2, top_k=2,
                  expert_nbytes=lambda p: MB, budget_bytes=4 * MB)
    f = CountingFetcher()
    s.run_layer(0, [([0, 5], [0.6, 0.4])], f, predicted={1: [(1, 0.6), (2, 0.4)]})
    assert f.loads == {"demand": {"bf16": 2}, "prefetch": {"bf16": 2}} and (1, 2, "bf16") in s.cache
    f.unread = set() if started else {(1, 2, "bf16")}  # what a live loader has not started
    s.run_layer(1, [([1, 3], [0.7, 0.3])], f)
    dropped = not keep and not started
    assert s.stale == ([(1, 2, "bf16")] if dropped else [])
    assert ((1, 2, "bf16") in s.cache) != dropped
    assert s.stats.stale_prefetch_cancelled == dropped and s.stats.stale_bytes_saved == dropped * MB
    assert s.stats.prefetch_used == 1 and s.stats.misses["bf16"] == 3  # 0, 5, then 3 (1 was prefetched)
    assert s.stats.evictions == (0 if dropped else 1)  # expert 3 took the dropped read's slot


@pytest.mark.parametrize("min_precision", [0.7, 0.0])
def test_a_rank_whose_predictions_miss_is_no_longer_read_ahead(min_precision):
    """Layer 0 predicts layer 1's experts as (1, then 2); the router takes 1 and 3. Rank 1's read stops once it
    has been wrong MIN_RANK_SAMPLES times (it stays a pinned prediction), unless the rule is off."""
    from hobbit.policies.prefetch import MIN_RANK_SAMPLES
    s = Scheduler(Options(policy="lru+prefetch", high="bf16", prefetch_min_precision=min_precision), num_layers=2,
                  top_k=2, expert_nbytes=lambda p: MB, budget_bytes=8 * MB)
    f = CountingFetcher()
    s.run_layer(0, [([4, 5], [0.6, 0.4])], f, predicted={1: [(1, 0.6), (2, 0.4)]})
    assert f.loads["prefetch"] == {"bf16": 2}  # no samples yet: every rank is read
    s.run_layer(1, [([1, 3], [0.7, 0.3])], f)
    assert s.stats.prediction.rank_hits == [1, 0] and s.stats.prediction.rank_total == [1, 1]
    for _ in range(MIN_RANK_SAMPLES - 1):
        s.stats.prediction.add([1, 2], [1, 3])
    s.end_step()
    loads = s.prefetch(0, {1: [(6, 0.6), (7, 0.4)]})
    assert [k for k, _ in loads] == [(1, 6, "bf16")] + ([] if min_precision else [(1, 7, "bf16")])


def test_prefetch_min_precision_is_a_share():
    with pytest.raises(ValueError, match="prefetch min precision must be in"):
        Options(prefetch_min_precision=1.5)


class InFlightFetcher(CountingFetcher):
    """Reads land only when waited for: every copy read by a load is still in flight until its `wait`."""

    def __init__(self) -> None:
        super().__init__()
        self.in_flight: set = set()

    def fetch(self, key, slot: int, priority: int) -> None:
        super().fetch(key, slot, priority)
        self.in_flight.add(key)

    def wait(self, key, slot: int) -> None:
        self.in_flight.discard(key)

    def landed(self, key, slot: int) -> bool:
        return key not in self.in_flight


@pytest.mark.parametrize("slots,order", [(8, [3, 0, 1, 2]),  # the hit first, then the reads in id order
                                         (5, [0, 3, 1, 2])])  # the plan's order until the waiting load is placed
def test_copies_that_landed_compute_before_reads_in_flight(slots, order):
    """Layer 0 holds experts 4 and (more recent) 3; layer 1's predicted 5 and 6 are pinned. Layer 0 then
    takes 0-3: the hit on 3 is pinned before any load evicts (1 takes 4's slot). With room for every
    load, the landed hit computes first; while a load waits for room the order is the plan's, as replayed."""
    s = Scheduler(Options(policy="lru+prefetch", high="bf16"), num_layers=2, top_k=4, expert_nbytes=lambda p: MB,
                  budget_bytes=slots * MB)
    f = InFlightFetcher()
    s.run_layer(0, [([4], [1.0])], f)
    s.run_layer(0, [([3], [1.0])], f, predicted={1: [(5, 0.6), (6, 0.4)]})
    f.in_flight -= {(0, 3, "bf16"), (0, 4, "bf16")}
    done = []
    s.run_layer(0, [([0, 1, 2, 3], [0.4, 0.3, 0.2, 0.1])], f, compute=lambda step: done.append(step.expert))
    assert done == order and s.stats.hits["bf16"] == 1 and s.stats.misses["bf16"] == 5


def test_hobbit_at_t1_one_gives_the_whole_budget_to_high_copies():
    """Eq. 2 never asks for low at t1 = 1, so no share of the budget is held back for low copies."""
    two = scheduler(policy="hobbit", high="bf16", low="int4", t1=0.6, t2=0.9, low_pool_fraction=0.25)
    assert two.capacity == {"bf16": 48, "int4": 16}
    one = scheduler(policy="hobbit", high="bf16", low="int4", t1=1.0, t2=1.0, low_pool_fraction=0.25)
    assert one.capacity == {"bf16": 64} and one.cache.budgets == {"all": 64 * MB}
