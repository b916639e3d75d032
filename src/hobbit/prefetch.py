"""The loader: one background thread that reads expert blobs and prepares them for compute.

Requests carry a priority: demand loads (the compute thread is waiting) always go before
prefetches, and a queued prefetch that becomes a demand is promoted. One blob is read at a time,
so a wrong prefetch delays a demand load by at most one blob read. Any error on the thread is
delivered through the request's Future, so it surfaces in the caller; the thread keeps serving.
"""
from __future__ import annotations

import heapq
import threading
import time
from concurrent.futures import Future
from typing import Callable

Key = tuple[int, int, str]  # (layer, expert, precision)
DEMAND, PREFETCH = 0, 1


class LoaderDead(RuntimeError):
    pass


class Loader:
    def __init__(self, read: Callable[[Key], object], threads: int = 1, name: str = "hobbit-loader"):
        """read(key) -> payload runs on a loader thread (disk read + prepare). With threads > 1,
        several blobs are read at once (small random reads are latency-bound); each thread still
        takes the most urgent request first."""
        self._read = read
        self._heap: list[tuple[int, int, Key]] = []
        self._pending: dict[Key, tuple[int, Future]] = {}  # key -> (priority, future), queued or running
        self._cv = threading.Condition()
        self._seq = 0
        self._closed = False
        self._fatal: BaseException | None = None
        self.loads = {DEMAND: 0, PREFETCH: 0}
        self.read_s = 0.0
        self._threads = [threading.Thread(target=self._main, name=f"{name}-{i}", daemon=True) for i in range(threads)]
        for th in self._threads:
            th.start()

    def alive(self) -> bool:
        return all(th.is_alive() for th in self._threads)

    def request(self, key: Key, priority: int = DEMAND) -> Future:
        """Queue a load (or join one in flight); a demand promotes a queued prefetch."""
        with self._cv:
            if self._fatal is not None or self._closed:
                raise LoaderDead(f"the loader thread is not running ({self._fatal or 'closed'})")
            if key in self._pending:
                prio, fut = self._pending[key]
                if priority < prio:  # promote: push a fresh entry; the stale one is skipped when popped
                    self._pending[key] = (priority, fut)
                    self._push(priority, key)
                return fut
            fut: Future = Future()
            self._pending[key] = (priority, fut)
            self._push(priority, key)
            return fut

    def in_flight(self, key: Key) -> Future | None:
        with self._cv:
            entry = self._pending.get(key)
            return entry[1] if entry else None

    def cancel_prefetches(self) -> None:
        """Drop queued (not yet started) prefetches, e.g. when a sequence ends."""
        with self._cv:
            keep = []
            for prio, seq, key in self._heap:
                entry = self._pending.get(key)
                if entry and entry[0] == PREFETCH and prio == PREFETCH:  # still queued, not running
                    del self._pending[key]
                    entry[1].cancel()
                    continue
                keep.append((prio, seq, key))
            self._heap = keep
            heapq.heapify(self._heap)

    def _push(self, priority: int, key: Key) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (priority, self._seq, key))
        self._cv.notify()

    def _main(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._heap and not self._closed:
                        self._cv.wait()
                    if self._closed:
                        return
                    prio, _, key = heapq.heappop(self._heap)
                    entry = self._pending.get(key)
                    if entry is None or entry[0] != prio:
                        continue  # stale entry of a promoted or cancelled request
                    fut = entry[1]
                    self._pending[key] = (-1, fut)  # running: neither promoted nor cancelled any more
                t0 = time.perf_counter()
                try:
                    result, error = self._read(key), None
                except Exception as e:  # delivered to whoever waits on this key
                    result, error = None, e
                with self._cv:
                    self.read_s += time.perf_counter() - t0
                    self._pending.pop(key, None)
                    self.loads[prio] += 1
                if fut.done():  # close() already failed it, or a queued prefetch was cancelled
                    continue
                if error is None:
                    fut.set_result(result)
                else:
                    fut.set_exception(error)
        except BaseException as e:  # a bug in the loop itself: fail every waiter instead of hanging them
            with self._cv:
                self._fatal = e
                for _, fut in self._pending.values():
                    if not fut.done():
                        fut.set_exception(LoaderDead(f"the loader thread died: {e!r}"))
                self._pending.clear()
            raise

    def close(self) -> None:
        with self._cv:
            self._closed = True
            for _, fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(LoaderDead("the loader was closed"))
            self._pending.clear()
            self._cv.notify_all()
        for th in self._threads:
            th.join(timeout=10)

