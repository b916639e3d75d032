"""Routing traces: per layer call, the tokens' router logits, selected experts and weights, plus the
stacked-gate predictions for later layers. gzip'd JSON lines, torch-free to read, so
`hobbit simulate` replays any policy over a trace without the model.

    {"format": "hobbit-trace", "version": 1, "num_layers": .., "sparse_layers": [..], ...}   header
    {"seq": 0, "t": 0, "layer": 1, "ids": [[3, 5], ...], "w": [[.6, .4], ...],
     "logits": [[...], ...], "pred": {"2": [[3, 0.7], [1, 0.3]], ...}}                       one layer call
    (+ "little": 1 on a MoBiLE little pass; a big pass after it at the next t is its fallback)
    (+ "cancelled": [[layer, expert, precision], ...] on the first call after an accepted little pass:
     the fallback reads that were dropped unread, so a replay's books follow the live run's)
    (+ "stale": [[layer, expert, precision], ...]: this call's prefetch reads its router made stale and
     the scheduler dropped unread; a record is written once the scheduler has run its call)
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

FORMAT = "hobbit-trace"


@dataclass
class LayerCall:
    seq: int
    t: int
    layer: int
    ids: list[list[int]]  # per token, sorted by weight desc
    w: list[list[float]]
    logits: list[list[float]] | None
    pred: dict[int, list[tuple[int, float]]]
    little: bool = False  # a MoBiLE little pass
    cancelled: list[tuple[int, int, str]] = field(default_factory=list)  # fallback reads dropped before this call
    stale: list[tuple[int, int, str]] = field(default_factory=list)  # prefetch reads this call dropped unread

    @property
    def rows(self) -> list[tuple[list[int], list[float]]]:
        return list(zip(self.ids, self.w))


class TraceWriter:
    def __init__(self, path: str | Path, header: dict, logits: bool = True):
        self.f = gzip.open(path, "wt", encoding="utf-8")
        self.f.write(json.dumps(dict(header, format=FORMAT, version=1)) + "\n")
        self.seq = -1
        self.logits = logits
        self._cancelled: list = []  # noted by `cancelled`, written with the next record
        self._pending: dict | None = None  # the last record, not written yet

    def cancelled(self, keys) -> None:
        """The scheduler dropped these fallback reads unread (an accepted little pass)."""
        self._cancelled += [list(k) for k in keys]

    def begin_sequence(self) -> None:
        self.seq += 1

    def record(self, t: int, layer: int, rows, logits, predicted: dict[int, list[tuple[int, float]]],
               little: bool = False) -> None:
        """rows: [(ids, weights)] per token; logits: [T,E] tensor or None."""
        rec = dict(seq=self.seq, t=t, layer=layer, ids=[r[0] for r in rows],
                   # weights exactly (JSON floats round-trip): bf16 routing weights often sit exactly on
                   # an Eq. 2 / little-set threshold, and rounding would flip the replayed decision
                   w=[list(r[1]) for r in rows],
                   pred={str(j): [[e, w] for e, w in p] for j, p in predicted.items()})
        if little:
            rec["little"] = 1
        if self._cancelled:
            rec["cancelled"], self._cancelled = self._cancelled, []
        if self.logits and logits is not None:
            rec["logits"] = [[round(x, 4) for x in row] for row in logits.tolist()]
        self._flush()
        self._pending = rec  # written with the next record, after `stale` has had its say

    def stale(self, keys) -> None:
        """The scheduler dropped these prefetch reads of the last recorded call unread (its router chose
        other experts)."""
        if keys:
            self._pending.setdefault("stale", []).extend(list(k) for k in keys)

    def _flush(self) -> None:
        if self._pending is not None:
            self.f.write(json.dumps(self._pending) + "\n")
            self._pending = None

    def close(self) -> None:
        self._flush()
        self.f.close()


def read_trace(path: str | Path) -> tuple[dict, list[LayerCall]]:
    """(header, layer calls in recorded order); a clear error if the file is not a trace."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            header = json.loads(f.readline())
            if not isinstance(header, dict) or header.get("format") != FORMAT:
                raise ValueError(f"{path} is not a hobbit routing trace (record one with `hobbit run ... --trace FILE`)")
            calls = [_call(json.loads(line)) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError, EOFError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} is not a readable hobbit routing trace: {e}") from e
    return header, calls


def _call(r: dict) -> LayerCall:
    return LayerCall(r["seq"], r["t"], r["layer"], r["ids"], r["w"], r.get("logits"),
                     {int(j): [(int(e), float(w)) for e, w in p] for j, p in r.get("pred", {}).items()},
                     bool(r.get("little", 0)), *([(int(l), int(e), str(p)) for l, e, p in r.get(k, [])]
                                                 for k in ("cancelled", "stale")))


def iter_steps(calls: list[LayerCall]) -> Iterator[tuple[int, int, list[LayerCall]]]:
    """Group layer calls into (seq, t, calls of that forward step) in order."""
    group: list[LayerCall] = []
    for c in calls:
        if group and (c.seq, c.t) != (group[0].seq, group[0].t):
            yield group[0].seq, group[0].t, group
            group = []
        group.append(c)
    if group:
        yield group[0].seq, group[0].t, group


def belady_accesses(calls: list[LayerCall]) -> list[tuple[int, int, int, int]]:
    """The (seq, t, layer, expert) uses Belady's policy needs: unique experts per layer call."""
    return [(c.seq, c.t, c.layer, e) for c in calls for e in sorted({e for ids in c.ids for e in ids})]
