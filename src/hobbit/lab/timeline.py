"""A time model for `hobbit simulate`: one disk and one compute thread on a shared clock.

The miss penalty counts demand loads only, so it cannot see that prefetches share the disk with
them: with 5 MB bf16 experts the reads ahead fill the disk and the demand loads queue behind them
(`results/tuned_options_bf16.json`). This model can. The disk serves one read at a time, each
taking its precision's `read_ms` (what `hobbit tune` measured and fitted, `hobbit.lab.calibration`;
or its disk bytes over a given link, `TimeModel.over_link`), the most urgent first (demand before
prefetch, then in the order queued), as the live loader does; a read still queued can be cancelled
or promoted to demand, a started one runs to its end. The compute thread spends `layer_ms` per MoE layer call before its experts
(attention, router, norms, the scheduler's own Python), `expert_ms[precision]` per expert it
computes, and `step_ms` per forward step (LM head, sampling, embedding); `wait` blocks it until
the read lands. Modeled decode time per token is then the clock over decode steps.

One server for the disk: several reads in flight share its bandwidth, so a single queue is the
model; the engine's parallel reads are in the fitted read times, not modeled apart.
Compute times are per decode token; a prefill step's expert and layer work is charged once per
call like a decode step's (the model is for decode).

Torch-free.
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from hobbit.policies.eviction import Key
from hobbit.runtime.loader import DEMAND


@dataclass(frozen=True)
class TimeModel:
    """Where a decode token's time goes, in the model's terms (all ms)."""

    read_ms: Mapping[str, float]  # per precision: one blob read into its slot, ready to compute
    layer_ms: float
    expert_ms: Mapping[str, float]
    step_ms: float = 0.0

    def __post_init__(self):
        times = {"layer_ms": self.layer_ms, "step_ms": self.step_ms,
                 **{f"read_ms[{k}]": v for k, v in self.read_ms.items()},
                 **{f"expert_ms[{k}]": v for k, v in self.expert_ms.items()}}
        bad = {k: v for k, v in times.items() if not v >= 0}
        if bad:
            raise ValueError(f"the time model's times must be >= 0 ms, got {bad}")

    @classmethod
    def over_link(cls, link_gbps: float, disk_bytes: Mapping[str, int], layer_ms: float,
                  expert_ms: Mapping[str, float], step_ms: float = 0.0) -> "TimeModel":
        """Reads that take their disk bytes over a link of `link_gbps` (1e9 bytes/s) and nothing else."""
        if not link_gbps > 0:
            raise ValueError(f"link bandwidth must be positive, got {link_gbps} GB/s")
        return cls({p: b / (link_gbps * 1e6) for p, b in disk_bytes.items()}, layer_ms, expert_ms, step_ms)

    def as_dict(self) -> dict:
        return dict(read_ms=dict(self.read_ms), layer_ms=self.layer_ms, expert_ms=dict(self.expert_ms),
                    step_ms=self.step_ms)

    @classmethod
    def from_dict(cls, d: Mapping) -> "TimeModel":
        try:
            return cls({k: float(v) for k, v in d["read_ms"].items()}, float(d["layer_ms"]),
                       {k: float(v) for k, v in d["expert_ms"].items()}, float(d.get("step_ms", 0.0)))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"a time model needs read_ms {{precision: ms}}, layer_ms, expert_ms {{precision: ms}} "
                             f"and step_ms; got {dict(d)!r} ({e!r})") from None


def read_time_model(path: str | Path) -> TimeModel:
    """A time model from a JSON file: the model itself, or a `hobbit tune --json` result holding one."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the time model {path}: {e}") from None
    if isinstance(d, dict) and "calibration" in d:
        d = d["calibration"].get("time_model")
    if not isinstance(d, dict):
        raise ValueError(f"{path} holds no time model: pass the JSON `hobbit tune --json` wrote, or "
                         f"{{\"read_ms\": {{precision: ms}}, \"layer_ms\": .., \"expert_ms\": {{..}}, \"step_ms\": ..}}")
    return TimeModel.from_dict(d)


@dataclass
class _Read:
    key: Key
    priority: int
    kind: str  # 'demand' / 'prefetch': as submitted (what `loads` counts)
    seq: int
    queued_at: float
    end: float | None = None  # set when the disk starts it


@dataclass
class TimedFetcher:
    """The simulator's `Fetcher` under a `TimeModel`: reads take their `read_ms`, waits advance the clock.
    `loads` counts reads per kind and precision, as `CountingFetcher`'s do (a cancelled read is
    uncounted: it never reads). `now` is the compute thread's clock in seconds."""

    model: TimeModel
    now: float = 0.0
    loads: dict = field(default_factory=lambda: {"demand": Counter(), "prefetch": Counter()})
    _free_at: float = 0.0  # when the disk finishes its current read
    _reads: dict = field(default_factory=dict)  # (precision, slot) -> _Read (latest into that slot)
    _queued: dict = field(default_factory=dict)  # (precision, slot) -> _Read not started
    _seq: int = 0

    # -- the compute thread ------------------------------------------------------------------------
    def compute(self, ms: float) -> None:
        self.now += ms / 1e3

    # -- the disk ----------------------------------------------------------------------------------
    def _start_next(self, until: float | None) -> bool:
        """Start the read the disk takes next if that happens by `until` (None: whenever it is); False if none."""
        if not self._queued:
            return False
        at = max(self._free_at, min(r.queued_at for r in self._queued.values()))
        if until is not None and at > until:
            return False
        slot, r = min(((s, r) for s, r in self._queued.items() if r.queued_at <= at),
                      key=lambda sr: (sr[1].priority, sr[1].seq))
        del self._queued[slot]
        r.end = at + self.model.read_ms[r.key[2]] / 1e3
        self._free_at = r.end
        return True

    def _advance(self) -> None:
        while self._start_next(self.now):
            pass

    # -- Fetcher -----------------------------------------------------------------------------------
    def fetch(self, key: Key, slot: int, priority: int) -> None:
        self._advance()
        where = (key[2], slot)
        prev = self._reads.get(where)
        if prev is not None and where in self._queued:  # evicted before its read started: never read
            del self._queued[where]
            self.loads[prev.kind][key[2]] -= 1
        elif prev is not None and prev.end is not None and prev.end > self.now:
            self.now = prev.end  # a read into this slot is running: it finishes before the slot is reused
        self._seq += 1
        kind = "demand" if priority == DEMAND else "prefetch"
        self._reads[where] = self._queued[where] = _Read(key, priority, kind, self._seq, self.now)
        self.loads[kind][key[2]] += 1

    def wait(self, key: Key, slot: int) -> None:
        self._advance()
        r = self._reads.get((key[2], slot))
        if r is None or r.key != key:
            return
        if r.end is None:
            r.priority = DEMAND  # the compute thread waits for it: a queued prefetch is promoted
            while r.end is None:
                self._start_next(None)
        self.now = max(self.now, r.end)

    def landed(self, key: Key, slot: int) -> bool:
        self._advance()
        r = self._reads.get((key[2], slot))
        return r is None or r.key != key or (r.end is not None and r.end <= self.now)

    def cancel(self, key: Key, slot: int) -> bool:
        self._advance()
        where = (key[2], slot)
        r = self._queued.get(where)
        if r is None or r.key != key:
            return False
        del self._queued[where]
        del self._reads[where]
        self.loads[r.kind][key[2]] -= 1
        return True

    def drain(self) -> None:
        while self._start_next(None):
            pass
        self.now = max(self.now, self._free_at)
