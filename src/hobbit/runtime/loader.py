"""The loader: background threads that run blob reads (demand loads and prefetches alike).

A job is a callable that reads one blob into its cache slot. Jobs carry a priority: demand loads
(the compute thread is waiting) always go before prefetches, and a queued prefetch that becomes a
demand is promoted. A queued job can be cancelled (its slot is about to be reused); a running one
cannot, so whoever reuses a slot waits for it. Any error in a job is delivered through its Future,
so it surfaces in the caller; the threads keep serving.
"""
from __future__ import annotations

import heapq
import threading
import time
from concurrent.futures import Future
from typing import Callable, Hashable

DEMAND, PREFETCH = 0, 1
_RUNNING = -1


class LoaderDead(RuntimeError):
    pass


class Loader:
    def __init__(self, threads: int = 1, name: str = "hobbit-loader", prefetch_threads: int | None = None):
        """With threads > 1, several blobs are read at once (small random reads are latency-bound);
        each thread still takes the most urgent job first. At most `prefetch_threads` (default: all) of them
        run prefetches at once: a prefetch still queued can be cancelled when its layer's router chose
        otherwise, one already running cannot, so fewer prefetches in flight waste fewer reads."""
        if threads < 0 or (threads and prefetch_threads is not None and not 1 <= prefetch_threads <= threads):
            raise ValueError(f"a loader needs threads >= 0 (0: jobs run only when waited for) and 1 <= "
                             f"prefetch_threads <= threads, got {threads} and {prefetch_threads}")
        self._prefetch_limit = threads if prefetch_threads is None else prefetch_threads
        self._prefetch_running = 0
        self._heap: list[tuple[int, int, Hashable]] = []
        self._jobs: dict[Hashable, tuple[int, Callable[[], None], Future]] = {}  # queued or running
        self._kind: dict[Hashable, int] = {}  # job -> the priority it was submitted with (what `loads` counts)
        self._cv = threading.Condition()
        self._seq = 0
        self._closed = False
        self._fatal: BaseException | None = None
        self.loads = {DEMAND: 0, PREFETCH: 0}  # jobs run, by the priority they were submitted with
        self.read_s = 0.0
        self._threads = [threading.Thread(target=self._main, name=f"{name}-{i}", daemon=True) for i in range(threads)]
        for th in self._threads:
            th.start()

    def alive(self) -> bool:
        return all(th.is_alive() for th in self._threads)

    def submit(self, job: Hashable, fn: Callable[[], None], priority: int = DEMAND, wake: bool = True) -> Future:
        """Queue `fn` under the id `job` (or return the Future of that job if it is queued or running;
        a demand promotes a queued prefetch). wake=False leaves an idle thread asleep: for a job the
        caller will soon `run_here` itself (waking a thread only to hand the GIL back and forth
        cost ~1 ms per job on a busy 2-core box); a thread that wakes for other work still takes it."""
        with self._cv:
            if self._fatal is not None or self._closed:
                raise LoaderDead(f"the loader thread is not running ({self._fatal or 'closed'})")
            if job in self._jobs:
                prio, f, fut = self._jobs[job]
                if 0 <= priority < prio:  # promote: a fresh heap entry; the stale one is skipped when popped
                    self._jobs[job] = (priority, f, fut)
                    self._push(priority, job, wake)
                return fut
            fut: Future = Future()
            self._jobs[job] = (priority, fn, fut)
            self._kind[job] = priority
            self._push(priority, job, wake)
            return fut

    def promote(self, job: Hashable) -> None:
        with self._cv:
            entry = self._jobs.get(job)
            if entry is not None and entry[0] > DEMAND:
                self._jobs[job] = (DEMAND, entry[1], entry[2])
                self._push(DEMAND, job)

    def cancel(self, job: Hashable) -> bool:
        """Drop a queued job; False when it is running (wait on its Future) or unknown."""
        with self._cv:
            entry = self._jobs.get(job)
            if entry is None or entry[0] == _RUNNING:
                return False
            del self._jobs[job]  # its heap entry is skipped when popped
            del self._kind[job]
            entry[2].cancel()
            return True

    def run_here(self, job: Hashable) -> bool:
        """Run a queued job on the calling thread (a caller about to wait for it saves the hand-off
        to a loader thread and back); False when it already started or is unknown."""
        with self._cv:
            entry = self._jobs.get(job)
            if entry is None or entry[0] == _RUNNING:
                return False
            self._jobs[job] = (_RUNNING, entry[1], entry[2])  # its heap entry is skipped when popped
        self._run(job, entry[0], entry[1], entry[2])
        return True

    def _run(self, job: Hashable, prio: int, fn: Callable[[], None], fut: Future, counted: bool = False) -> None:
        """Run one job; `counted`: a loader thread took it as a prefetch (it holds one of the prefetch places)."""
        t0 = time.perf_counter()
        try:
            fn()
            error = None
        except Exception as e:  # delivered to whoever waits on this job
            error = e
        with self._cv:
            self.read_s += time.perf_counter() - t0
            self._jobs.pop(job, None)
            self.loads[self._kind.pop(job, prio)] += 1
            if counted:
                self._prefetch_running -= 1
                self._cv.notify()  # a thread held back by the prefetch limit may go
        if fut.done():  # close() already failed it
            return
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)

    def _push(self, priority: int, job: Hashable, wake: bool = True) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (priority, self._seq, job))
        if wake:
            self._cv.notify()

    def _take(self) -> tuple[Hashable, int, Callable[[], None], Future] | None:
        """The most urgent runnable job, marked running (under the lock); None when there is none, or only
        prefetches while the prefetch places are full."""
        while self._heap:
            prio, _, job = self._heap[0]
            entry = self._jobs.get(job)
            if entry is None or entry[0] != prio:
                heapq.heappop(self._heap)  # stale entry of a promoted or cancelled job
                continue
            if prio >= PREFETCH and self._prefetch_running >= self._prefetch_limit:
                return None  # demand loads sort first: only prefetches are queued
            heapq.heappop(self._heap)
            self._jobs[job] = (_RUNNING, entry[1], entry[2])  # neither promoted nor cancelled any more
            self._prefetch_running += prio >= PREFETCH
            return job, prio, entry[1], entry[2]
        return None

    def _main(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._closed and (taken := self._take()) is None:
                        self._cv.wait()
                    if self._closed:
                        return
                job, prio, fn, fut = taken
                self._run(job, prio, fn, fut, counted=prio >= PREFETCH)
        except BaseException as e:  # a bug in the loop itself: fail every waiter instead of hanging them
            with self._cv:
                self._fatal = e
                for _, _, fut in self._jobs.values():
                    if not fut.done():
                        fut.set_exception(LoaderDead(f"the loader thread died: {e!r}"))
                self._jobs.clear()
                self._kind.clear()
            raise

    def close(self) -> None:
        with self._cv:
            self._closed = True
            for _, _, fut in self._jobs.values():
                if not fut.done():
                    fut.set_exception(LoaderDead("the loader was closed"))
            self._jobs.clear()
            self._kind.clear()
            self._cv.notify_all()
        for th in self._threads:
            th.join(timeout=10)
