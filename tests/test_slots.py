"""Slot pools and the live fetcher: loads land in preallocated slots, a reused slot never shows a
stale read, and the engine's Sequence owns the clock."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import pytest
import torch

import hobbit
from hobbit.runtime.loader import DEMAND, PREFETCH, Loader
from hobbit.runtime.offload import SlotFetcher, SlotPool
from hobbit.runtime.options import Stats
from hobbit.store.format import ExpertStore, blob_tensors

from tiny import decode_logits


def blob_bytes(store: ExpertStore, layer: int, expert: int, prec: str) -> torch.Tensor:
    parts = store.read(layer, expert, prec)
    return torch.cat([t.reshape(-1).view(torch.uint8) for p in ("w13", "w2") for t in parts[p].values()])


def slot_bytes(pool: SlotPool, slot: int) -> torch.Tensor:
    parts = blob_tensors(pool.raw[slot], pool.specs)
    return torch.cat([t.reshape(-1).view(torch.uint8) for p in ("w13", "w2") for t in parts[p].values()])


@pytest.mark.parametrize("prec", ["bf16", "int4", "int2"])
def test_pool_slots_are_views_and_load_in_place(tiny_store, prec):
    store = ExpertStore(tiny_store)
    pool = SlotPool(store, prec, 3, torch.bfloat16)
    ptrs = [(e.w13.w.data_ptr(), e.w2.w.data_ptr()) for e in pool.experts]
    pool.load(1, 0, 5)
    assert torch.equal(slot_bytes(pool, 1), blob_bytes(store, 0, 5, prec))
    assert [(e.w13.w.data_ptr(), e.w2.w.data_ptr()) for e in pool.experts] == ptrs  # nothing reallocated
    # int2 is read as stored by the native kernels, else expanded for torch's int4 kernel into a per-slot buffer
    assert pool.zero_copy == (prec != "int2" or pool.experts[0].w13.bits == 2)
    x = torch.randn(2, store.shapes()["w13"][1], dtype=torch.bfloat16)
    ref = SlotPool(store, prec, 1, torch.bfloat16)
    ref.load(0, 0, 5)
    assert torch.equal(pool.experts[1](x), ref.experts[0](x))
    store.close()


class GatedStore:
    """Wraps a store so a read of one chosen blob blocks until released."""

    def __init__(self, store: ExpertStore, blocked: tuple[int, int, str]):
        self.store, self.blocked = store, blocked
        self.started, self.release = threading.Event(), threading.Event()
        self.reads: list[tuple[int, int, str]] = []
        self.real = store.read_into
        store.read_into = self.read_into

    def read_into(self, layer, expert, prec, dst):
        if (layer, expert, prec) == self.blocked:
            self.started.set()
            assert self.release.wait(10)
        self.reads.append((layer, expert, prec))
        return self.real(layer, expert, prec, dst)


@contextmanager
def gated_fetcher(path, slots: int, blocked: tuple[int, int, str]):
    """(bf16 pool of `slots`, the GatedStore blocking `blocked`, a SlotFetcher over the pool, its Stats)."""
    store = ExpertStore(path)
    pool, gate, loader, stats = SlotPool(store, "bf16", slots, torch.bfloat16), GatedStore(store, blocked), Loader(), Stats()
    try:
        yield pool, gate, SlotFetcher({"bf16": pool}, loader, stats), stats
    finally:
        gate.release.set()
        loader.close()
        store.close()


def test_reused_slot_cancels_a_queued_read(tiny_store):
    with gated_fetcher(tiny_store, 2, (0, 0, "bf16")) as (pool, gate, fetcher, stats):
        fetcher.fetch((0, 0, "bf16"), 1, PREFETCH)  # occupies the loader thread (blocked)
        assert gate.started.wait(10)
        fetcher.fetch((2, 3, "bf16"), 0, PREFETCH)  # queued behind it
        fetcher.fetch((2, 6, "bf16"), 0, DEMAND)  # slot 0 reused before the queued read started
        assert stats.prefetch_cancelled == 1
        gate.release.set()
        fetcher.wait((2, 6, "bf16"), 0)
        fetcher.drain()
        assert (2, 3, "bf16") not in gate.reads, "the cancelled read must never run"
        assert torch.equal(slot_bytes(pool, 0), blob_bytes(pool.store, 2, 6, "bf16"))


def test_reused_slot_waits_for_a_running_read(tiny_store):
    with gated_fetcher(tiny_store, 1, (0, 2, "bf16")) as (pool, gate, fetcher, _):
        fetcher.fetch((0, 2, "bf16"), 0, PREFETCH)
        assert gate.started.wait(10)  # the read into slot 0 is running and blocked
        threading.Timer(0.2, gate.release.set).start()
        t0 = time.perf_counter()
        fetcher.fetch((2, 4, "bf16"), 0, DEMAND)  # must wait for the running read before reusing the slot
        assert time.perf_counter() - t0 >= 0.15
        fetcher.wait((2, 4, "bf16"), 0)
        assert gate.reads == [(0, 2, "bf16"), (2, 4, "bf16")]
        assert torch.equal(slot_bytes(pool, 0), blob_bytes(pool.store, 2, 4, "bf16"))


def test_loads_allocate_no_expert_memory(tiny_store):
    """Every slot tensor is allocated at load time; decoding under eviction creates none."""
    eng = hobbit.load(tiny_store, policy="lru", budget=eng_min(tiny_store))
    ptrs = {id(e): (e.w13.w.data_ptr(), e.w2.w.data_ptr()) for p in eng.provider.pools.values() for e in p.experts}
    decode_logits(eng, [3, 17, 42, 99], 16)
    assert eng.provider.stats.evictions > 16
    assert {id(e): (e.w13.w.data_ptr(), e.w2.w.data_ptr())
            for p in eng.provider.pools.values() for e in p.experts} == ptrs
    eng.close()


def eng_min(store) -> int:
    ref = hobbit.load(store, policy="ondemand")
    n = ref.provider.expert_bytes("bf16") * ref.config.top_k
    ref.close()
    return n


def test_sequence_owns_position_and_clock(tiny_store):
    eng = hobbit.load(tiny_store, policy="lru", budget="40%")
    prompt = [5, 9, 33, 70]
    out = eng.generate(prompt, max_new_tokens=6, stop_token_ids=[])
    seq = eng.sequence()
    with torch.inference_mode():
        logits = seq.step(torch.tensor(prompt))
        toks = []
        for _ in range(6):
            toks.append(int(logits[-1].argmax()))
            logits = seq.step(torch.tensor([toks[-1]]))
    assert toks == out.token_ids
    assert seq.pos == len(prompt) + 6 and eng.provider.scheduler.t == 7  # one step per forward pass
    eng.close()


def test_prefetch_threads_bound_the_prefetches_in_flight_not_the_demand_loads():
    """3 threads, 1 for prefetches: a second prefetch waits queued (so it can still be cancelled) while the
    first runs, yet a demand load runs at once on another thread."""
    with pytest.raises(ValueError, match="prefetch_threads"):
        Loader(threads=2, prefetch_threads=3)
    loader = Loader(threads=3, prefetch_threads=1)
    gate, started, running, most = threading.Event(), [], [0], [0]
    lock = threading.Lock()

    def job(name):
        def run():
            with lock:
                started.append(name)
                running[0] += 1
                most[0] = max(most[0], running[0])
            gate.wait(10)
            with lock:
                running[0] -= 1
        return run
    try:
        p1 = loader.submit("p1", job("p1"), PREFETCH)
        p2 = loader.submit("p2", job("p2"), PREFETCH)
        deadline = time.perf_counter() + 10
        while "p1" not in started and time.perf_counter() < deadline:
            time.sleep(0.01)
        d = loader.submit("d", job("d"), DEMAND)
        while "d" not in started and time.perf_counter() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)  # p2 had every chance to start on the third thread
        assert started == ["p1", "d"] and loader.cancel("p2")  # still queued: dropped unread
        gate.set()
        for f in (p1, d):
            f.result(10)
        assert p2.cancelled() and most[0] == 2
    finally:
        gate.set()
        loader.close()


def test_more_prefetch_threads_than_loader_threads_is_refused(tiny_store):
    with pytest.raises(ValueError, match="--prefetch-threads 2 must be between 1 and the loader's 1 thread"):
        hobbit.load(tiny_store, policy="lru", budget="50%", io_threads=1, prefetch_threads=2)
