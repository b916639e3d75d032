"""`hobbit simulate`: replay a recorded routing trace through the live engine's Scheduler, no model.

The replay drives a fresh `Scheduler` through the same `run_layer` the live engine calls, with
a `Fetcher` that only counts reads (begin_sequence per sequence, run_layer per recorded layer
call with its recorded predictions, end_step per step), so its counters (hits/misses per
precision, skips, evictions, prefetches, prediction accuracy) are the live engine's counters on
the same routing by construction. On top it reports what the live engine
cannot: bytes moved in *disk* bytes (the header's `expert_disk_bytes`; the Scheduler's own byte
counters are RAM bytes, which differ, e.g. for int2), the share of selections computed at each
precision, the mixed-precision miss penalty (HOBBIT §3.4, in units of one high-precision load) and
modeled load time over a link of a given bandwidth: demand time stalls compute, prefetch time is
reported separately because it overlaps compute. With a time model (`hobbit.lab.timeline`, as
`hobbit tune` measures one) the fetcher keeps a clock instead: reads queue on one disk, the
compute waits for them, and the report adds the modeled decode time per token.

Torch-free: it imports only the torch-free schedule/trace/policies/cache modules.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

from hobbit.runtime.config import (RunConfig, StoreFacts, add_json_arg, add_run_args, emit_json, read_tuned, resolve,
                                   tuned_path)
from hobbit.runtime.config import default_precisions as _default_precisions
from hobbit.runtime.options import Options, parse_budget
from hobbit.runtime.loader import DEMAND
from hobbit.runtime.schedule import Scheduler
from hobbit.runtime.trace import LayerCall, belady_accesses, iter_steps, read_trace
from hobbit.lab.timeline import TimedFetcher, TimeModel, read_time_model

HEADER_KEYS = ("num_layers", "sparse_layers", "num_experts", "top_k", "precisions", "expert_ram_bytes",
               "expert_disk_bytes")


# -- trace ------------------------------------------------------------------------------------------

def load_trace(path: str | Path) -> tuple[dict, list[LayerCall]]:
    """`read_trace` plus a check that the header and every record carry what the replay needs;
    anything else is a ValueError that names the file."""
    header, calls = read_trace(path)  # malformed JSON or records: ValueError
    missing = [k for k in HEADER_KEYS if k not in header]
    if missing:
        raise ValueError(f"{path}: the trace header lacks {', '.join(missing)} (record the trace with "
                         f"`hobbit run ... --trace FILE` from this version)")
    for c in calls:
        if len(c.ids) != len(c.w) or any(len(i) != len(w) for i, w in zip(c.ids, c.w)) or not c.ids:
            raise ValueError(f"{path}: malformed layer call (seq {c.seq}, t {c.t}, layer {c.layer}): "
                             f"ids and weights differ in shape")
    return header, calls


def highest_total_bytes(header: dict) -> int:
    """All experts at the highest stored precision, on disk: what '25%' budgets are relative to."""
    top = header["precisions"][0]
    return len(header["sparse_layers"]) * int(header["num_experts"]) * int(header["expert_disk_bytes"][top])


def parse_budget_for(budget, header: dict) -> int | None:
    """Bytes from the engine's budget forms (123, '512MiB', '25%'), '%' relative to the trace's store."""
    if budget is None or isinstance(budget, int):
        return budget
    return parse_budget(budget, highest_total_bytes(header))


def default_precisions(header: dict, policy: str, high: str | None, low: str | None) -> tuple[str, str | None]:
    """The engine's defaults for the trace's store (`hobbit.runtime.config.default_precisions`)."""
    return _default_precisions(header["precisions"], policy, high, low)


# -- replay -----------------------------------------------------------------------------------------

class CountingFetcher:
    """The simulator's `Fetcher`: every read lands at once; loads are counted per kind and precision.
    A read can be cancelled only when the trace recorded that the live run cancelled it (`unread`: the
    keys recorded on the step about to run), so the replay's cache follows the live one's."""

    def __init__(self) -> None:
        self.loads = {"demand": Counter(), "prefetch": Counter()}  # precision -> loads
        self.unread: set = set()

    def cancel(self, key, slot: int) -> bool:
        return tuple(key) in self.unread

    def fetch(self, key, slot: int, priority: int) -> None:
        self.loads["demand" if priority == DEMAND else "prefetch"][key[2]] += 1

    def wait(self, key, slot: int) -> None:
        pass

    def landed(self, key, slot: int) -> bool:
        return True

    def drain(self) -> None:
        pass


class _Phase:
    """Counters of one kind of step: 'prefill' (a forward over >1 token) or 'decode' (one token)."""
    FIELDS = ("steps", "tokens", "demand_loads", "bytes_demand", "prefetch_loads", "bytes_prefetch", "hits")

    def __init__(self) -> None:
        self.c = Counter()

    def as_dict(self, link: float | None) -> dict:
        d = {k: self.c[k] for k in self.FIELDS}
        n = max(1, d["tokens"])
        d["demand_loads_per_token"] = d["demand_loads"] / n
        d["bytes_demand_per_token"] = d["bytes_demand"] / n
        d["demand_s_per_token"] = d["bytes_demand"] / link / n if link else None
        return d


def simulate(header: dict, calls: list[LayerCall], options: Options, budget_bytes: int | None,
             link_gbps: float | None = None, time_model: TimeModel | None = None) -> dict:
    """Replay `calls` (from `read_trace`) under `options` and a budget of `budget_bytes` (RAM bytes,
    as the engine counts them); `link_gbps` (GB/s, 1e9 bytes) models load times. Returns a report
    dict (see the module docstring; counters named as in `Stats.as_dict`, but `bytes_*` are disk
    bytes and `ram_bytes_*` the Scheduler's RAM bytes). With a `time_model` reads take disk time
    and a read still queued can be cancelled (`hobbit.lab.timeline`), instead of following the
    live run's recorded cancellations; the report's `modeled` holds the modeled times."""
    ram = {p: int(b) for p, b in header["expert_ram_bytes"].items()}
    disk = {p: int(b) for p, b in header["expert_disk_bytes"].items()}
    for name, prec in (("high", options.high), ("low", options.low)):
        if prec is not None and (prec not in ram or prec not in disk):
            raise ValueError(f"{name} precision {prec!r} is not in the trace's store "
                             f"(it has {', '.join(header['precisions'])})")
    if link_gbps is not None and link_gbps <= 0:
        raise ValueError(f"link bandwidth must be positive, got {link_gbps} GB/s")
    if time_model is not None:
        lacking = [p for p in (options.high, options.low) if p is not None
                   and (p not in time_model.read_ms or p not in time_model.expert_ms)]
        if lacking:
            raise ValueError(f"the time model has no read or expert time for {', '.join(lacking)} (it has "
                             f"{', '.join(time_model.read_ms)}): measure one on this store with `hobbit tune`")
    opt = options
    if opt.policy == "belady":
        opt = replace(opt, eviction_options={"trace": belady_accesses(calls)})
    sched = Scheduler(opt, int(header["num_layers"]), int(header["top_k"]), ram.__getitem__, budget_bytes,
                      sparse_layers=len(header["sparse_layers"]))

    fetcher = CountingFetcher() if time_model is None else TimedFetcher(time_model)
    replays_cancels = time_model is None
    loads = fetcher.loads
    clock = Counter()  # modeled seconds per phase
    served = Counter()  # precision -> token-expert selections computed with a copy at that precision
    phases = {"prefill": _Phase(), "decode": _Phase()}
    seq, sequences, steps, tokens = -1, 0, 0, 0
    stats = sched.stats
    cancelled = []  # fallback reads dropped unread (MoBiLE: accepted little passes)
    stale = []  # prefetch reads dropped unread (their layer's router chose other experts)

    for s, t, group in iter_steps(calls):
        if replays_cancels:
            fetcher.unread = set(group[0].cancelled)  # what the live run dropped unread before this step
        if s != seq:
            if s < seq:
                raise ValueError(f"trace out of order: sequence {s} after {seq}")
            for _ in range(s - seq):  # one begin_sequence per sequence the engine began
                sched.begin_sequence(fetcher)
                cancelled += sched.cancelled
            seq, sequences = s, sequences + 1
        sched.t = t
        ntok = len(group[0].ids)
        sched.begin_pass(group[0].little, fetcher, ntok)  # MoBiLE: the live run's little/fallback passes, as recorded
        cancelled += sched.cancelled
        ph = phases["prefill" if ntok > 1 and not sched.fallback_pass else "decode"]
        before = (sum(loads["demand"].values()), sum(loads["prefetch"].values()), sum(stats.hits.values()))
        bd0 = sum(disk[p] * n for p, n in loads["demand"].items())
        bp0 = sum(disk[p] * n for p, n in loads["prefetch"].items())
        t0 = fetcher.now if time_model else 0.0
        for call in group:
            prec_of = {}  # expert -> the precision it was computed at

            def compute(st, prec_of=prec_of):
                prec_of[st.expert] = st.key[2]
                if time_model:
                    fetcher.compute(time_model.expert_ms[st.key[2]])
            if replays_cancels:
                fetcher.unread = set(call.stale)  # the prefetch reads the live run dropped unread at this call
            else:
                fetcher.compute(time_model.layer_ms)
            kept = sched.run_layer(call.layer, call.rows, fetcher, compute, call.pred)
            stale += sched.stale
            # selections computed, per precision: a token's slot counts unless the plan dropped it
            for r, ids in enumerate(call.ids):
                wr = kept[r] if kept is not None else None
                for slot, e in enumerate(ids):
                    p = prec_of.get(e)
                    if p is not None and (wr is None or wr[slot] > 0):
                        served[p] += 1
        sched.end_step()
        if time_model:
            fetcher.compute(time_model.step_ms)
            clock["prefill" if ntok > 1 and not sched.fallback_pass else "decode"] += fetcher.now - t0
        steps += 1
        tokens += ntok
        ph.c["steps"] += 1
        ph.c["tokens"] += ntok
        ph.c["demand_loads"] += sum(loads["demand"].values()) - before[0]
        ph.c["prefetch_loads"] += sum(loads["prefetch"].values()) - before[1]
        ph.c["hits"] += sum(stats.hits.values()) - before[2]
        ph.c["bytes_demand"] += sum(disk[p] * n for p, n in loads["demand"].items()) - bd0
        ph.c["bytes_prefetch"] += sum(disk[p] * n for p, n in loads["prefetch"].items()) - bp0

    report = _report(header, opt, budget_bytes, link_gbps, stats, loads, served, phases,
                     sequences, steps, tokens, disk, cancelled, stale)
    if time_model:
        n = phases["decode"].c["tokens"]
        report["modeled"] = dict(time_model=time_model.as_dict(), decode_s=clock["decode"], prefill_s=clock["prefill"],
                                 decode_ms_per_token=clock["decode"] * 1e3 / n if n else None,
                                 decode_tok_s=n / clock["decode"] if n and clock["decode"] else None)
    return report


def _report(header, opt, budget_bytes, link_gbps, stats, loads, served, phases, sequences, steps, tokens,
            disk, cancelled=(), stale=()) -> dict:
    link = link_gbps * 1e9 if link_gbps else None
    base = stats.as_dict()
    precs = sorted(set(stats.hits) | set(stats.misses) | set(served), key=list(header["precisions"]).index)
    bytes_demand = sum(disk[p] * n for p, n in loads["demand"].items())
    bytes_prefetch = sum(disk[p] * n for p, n in loads["prefetch"].items())
    high_disk = disk[opt.high]
    selections = stats.selections
    n = max(1, tokens)
    options = {k: v for k, v in asdict(opt).items() if k != "eviction_options"}
    options["eviction_options"] = {k: v for k, v in opt.eviction_options.items() if k != "trace"}
    if opt.precision_map is not None:  # JSON keys are strings
        options["precision_map"] = {f"{layer}/{e}": p for (layer, e), p in sorted(opt.precision_map.items())}
    options["depth"] = opt.depth
    demand_s = bytes_demand / link if link else None
    prefetch_s = bytes_prefetch / link if link else None
    return dict(
        policy=opt.name, options=options, budget_bytes=budget_bytes, link_gbps=link_gbps,
        sequences=sequences, steps=steps, tokens=tokens,
        hits=base["hits"], misses=base["misses"], hit_rate=base["hit_rate"],
        hits_by_precision={p: stats.hits[p] for p in precs},
        misses_by_precision={p: stats.misses[p] for p in precs},
        hit_rate_by_precision={p: stats.hits[p] / max(1, stats.hits[p] + stats.misses[p]) for p in precs},
        selections=selections, skipped=stats.skipped, skip_share=stats.skipped / max(1, selections),
        selections_by_precision={p: served[p] for p in precs},
        share_by_precision={p: served[p] / max(1, selections) for p in precs},
        low_share=served[opt.low] / max(1, selections) if opt.low else 0.0,
        evictions=stats.evictions, prefetch_issued=stats.prefetch_issued, prefetch_used=stats.prefetch_used,
        little_steps=stats.little_steps, fallbacks=stats.fallbacks, fallback_redone=stats.fallback_redone,
        fallback_rate=stats.fallbacks / stats.little_steps if stats.little_steps else None,
        fallback_prefetch_issued=stats.fallback_prefetch_issued, fallback_prefetch_used=stats.fallback_prefetch_used,
        fallback_prefetch_withheld=stats.fallback_prefetch_withheld,
        fallback_prefetch_cancelled=stats.fallback_prefetch_cancelled,
        ram_fallback_bytes_saved=stats.fallback_bytes_saved,
        fallback_bytes_saved=sum(disk[k[2]] for k in cancelled),
        stale_prefetch_cancelled=stats.stale_prefetch_cancelled,
        stale_bytes_saved=sum(disk[k[2]] for k in stale),
        demand_loads_by_precision=dict(loads["demand"]), prefetch_loads_by_precision=dict(loads["prefetch"]),
        prefetch_loads=sum(loads["prefetch"].values()),
        bytes_demand=bytes_demand, bytes_prefetch=bytes_prefetch,
        ram_bytes_demand=base["bytes_demand"], ram_bytes_prefetch=base["bytes_prefetch"],
        # HOBBIT §3.4: a high miss costs C, a low miss (B_low/B_high)·C; here C = 1 high-precision load
        miss_penalty=sum(stats.misses[p] * disk[p] / high_disk for p in stats.misses),
        demand_s=demand_s, prefetch_s=prefetch_s,
        per_token=dict(misses=base["misses"] / n, bytes_demand=bytes_demand / n, bytes_prefetch=bytes_prefetch / n,
                       demand_s=demand_s / n if link else None, prefetch_s=prefetch_s / n if link else None),
        phases={k: v.as_dict(link) for k, v in phases.items() if v.c["steps"]},
        prediction=base["prediction"],
    )


# -- command line -----------------------------------------------------------------------------------

def add_simulate_args(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("simulate", help="replay a routing trace through a cache policy (no model): hit "
                              "rates, bytes moved, modeled load time")
    p.add_argument("trace", help="routing trace recorded with `hobbit run ... --trace FILE`")
    add_run_args(p, store=False, engine=False)
    p.add_argument("--link", type=float, default=None, metavar="GB/s",
                   help="storage bandwidth in GB/s for modeled load times (e.g. 3 for an NVMe SSD)")
    p.add_argument("--time-model", default=None, metavar="JSON",
                   help="model decode time (`hobbit.lab.timeline`): a JSON file holding a time model or the "
                        "`hobbit tune --json` output that measured one; queued reads then cancel as modeled. "
                        "With --link, its reads take their disk bytes over that link instead (compute as measured)")
    add_json_arg(p, "the report")
    p.set_defaults(func=cmd_simulate)
    return p


def resolve_for(header: dict, config: RunConfig):
    """`resolve` against the trace's store, as the engine resolved it (its tuning result when the store is here)."""
    store = header.get("store")
    here = bool(store) and Path(store).is_dir()
    facts = StoreFacts(tuple(header["precisions"]), highest_total_bytes(header), int(header["num_experts"]),
                       bool(header.get("norm_topk_prob", True)), header.get("source_precision"))
    return resolve(config, facts, read_tuned(store) if here and config.reads_tuned else None)


def options_from_args(args: argparse.Namespace, header: dict) -> Options:
    return resolve_for(header, RunConfig.from_args(args)).options


def _secs(x: float) -> str:
    return f"{x:.3g} s" if x >= 1 else f"{x * 1e3:.3g} ms"


def format_report(r: dict) -> str:
    mib = 2**20
    by_prec = ", ".join(f"{p} {r['hits_by_precision'][p]}/{r['misses_by_precision'][p]} "
                        f"({r['hit_rate_by_precision'][p]:.1%})" for p in r["hits_by_precision"]) or "-"
    shares = ", ".join(f"{p} {s:.1%}" for p, s in r["share_by_precision"].items())
    o = r["options"]
    setting = f"policy {r['policy']}, high {o['high']}" + (f", low {o['low']}" if o["low"] else "")
    if o["policy"] == "hobbit":
        setting += f", t1 {o['t1']}, t2 {o['t2']}, low pool {o['low_pool_fraction']:.0%}"
    setting += f", prefetch depth {o['depth']}"
    pred = r["prediction"]
    rows = [
        ("setting", setting),
        ("budget", f"{(r['budget_bytes'] or 0) / mib:.1f} MiB" if r["budget_bytes"] is not None else "-"),
        ("trace", f"{r['sequences']} sequences, {r['steps']} steps, {r['tokens']} tokens"),
        ("experts", f"hit rate {r['hit_rate']:.1%}; hits/misses by precision: {by_prec}; evictions {r['evictions']}"),
        ("selections", f"{r['selections']}: computed at {shares or '-'}; skipped {r['skipped']} "
                       f"({r['skip_share']:.1%})"),
        ("miss penalty", f"{r['miss_penalty']:.1f} high-precision loads ({r['miss_penalty'] / max(1, r['tokens']):.2f}"
                         f" per token)"),
        ("read (demand)", f"{r['bytes_demand'] / mib:.1f} MiB ({r['per_token']['bytes_demand'] / mib:.2f} MiB/token)"),
        ("read (prefetch)", f"{r['bytes_prefetch'] / mib:.1f} MiB in {r['prefetch_loads']} loads, "
                            f"{r['prefetch_used']} used, {r['stale_prefetch_cancelled']} dropped unread as the live "
                            f"run did ({r['stale_bytes_saved'] / mib:.1f} MiB)"),
    ]
    if r["link_gbps"]:
        rows.append(("modeled load time", f"demand (stalls) {_secs(r['demand_s'])} = "
                     f"{_secs(r['per_token']['demand_s'])}/token; prefetch (overlaps compute) "
                     f"{_secs(r['prefetch_s'])} at {r['link_gbps']:g} GB/s"))
    if r.get("modeled"):
        m = r["modeled"]
        rows.append(("modeled decode", f"{m['decode_ms_per_token']:.1f} ms/token ({m['decode_tok_s']:.2f} tok/s) "
                     f"under the time model" if m["decode_ms_per_token"] else "no decode steps"))
    for name, ph in r["phases"].items():
        t = f", {_secs(ph['demand_s_per_token'])}/token" if ph["demand_s_per_token"] is not None else ""
        rows.append((name, f"{ph['steps']} steps, {ph['tokens']} tokens: {ph['demand_loads_per_token']:.2f} demand "
                           f"loads/token, {ph['bytes_demand_per_token'] / mib:.2f} MiB/token{t}"))
    if r["little_steps"]:
        rows.append(("MoBiLE", f"{r['fallbacks']} of {r['little_steps']} little passes redone big "
                               f"({r['fallback_rate']:.1%}, with {r['fallback_redone']} tokens accepted little before "
                               f"them); {r['fallback_prefetch_used']} of "
                               f"{r['fallback_prefetch_issued']} fallback prefetches used by a fallback "
                               f"({r['fallback_prefetch_withheld']} withheld by --fallback-prefetch), "
                               f"{r['fallback_prefetch_cancelled']} cancelled unread "
                               f"({r['fallback_bytes_saved'] / mib:.1f} MiB saved)"))
    if pred["samples"]:
        rows.append(("prediction", f"precision {pred['precision']:.1%}, recall {pred['recall']:.1%}, top-1 "
                                   f"{pred['top1_accuracy']:.1%} over {pred['samples']} layer calls; precision by "
                                   f"rank {' '.join(f'{p:.0%}' for p in pred['rank_precision'])}"))
    return "\n".join(f"  {k:<18} {v}" for k, v in rows)


def cmd_simulate(args: argparse.Namespace) -> int:
    header, calls = load_trace(args.trace)
    run = resolve_for(header, RunConfig.from_args(args))
    if run.note:
        print(f"warning: {header['store']}/{run.note}", file=sys.stderr)
    model = read_time_model(args.time_model) if args.time_model else None
    if model and args.link:
        model = TimeModel.over_link(args.link, header["expert_disk_bytes"], model.layer_ms, model.expert_ms,
                                    model.step_ms)
    report = simulate(header, calls, run.options, run.budget_bytes, args.link, time_model=model)
    tuned = str(tuned_path(header["store"])) if run.tuned else None
    report["tuned_from"] = tuned
    if not emit_json(args, report):
        print(f"simulated {args.trace}" + (f" (hobbit options tuned in {tuned})" if tuned else ""))
        print(format_report(report))
    return 0


def main(argv: list[str] | None = None) -> int:  # `python -m hobbit.lab.simulate` before the CLI wiring
    ap = argparse.ArgumentParser(prog="hobbit")
    add_simulate_args(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(["simulate", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
