"""The run configuration: every knob of a run, its flags, and one pure function that settles it; torch-free.

`RunConfig` is what a user asked for (the keyword arguments of `hobbit.load`, or a command's flags).
`resolve(config, facts, tuned)` settles it against the store: the default precisions (high = the
highest stored, low for policy hobbit = the first of int4, int2, int3, int8 stored below high), the
budget's base ('25%' of all expert bytes at the highest stored precision), a dense model's policy
(resident) and the store's `hobbit tune` results (validated; the one tuned for the same high/low at the
budget nearest the run's gives policy hobbit's defaults when within TUNED_BUDGET_SPREAD of it; explicit
knobs win). Untuned, a store whose experts came quantized (a GGUF's Q4_K, MXFP4) gets t1 = t2 = 1 where its
low tier lies below that precision: the paper's thresholds assume low copies of full-precision weights,
and re-quantizing 4-bit experts to 2 bits cost CoderMoE +40% perplexity at them (results/target_bounds.json).
The engine and `hobbit simulate` both call it, so a replay runs the options the live run ran.

`add_run_args` derives every command's flags from RunConfig's fields (same names, defaults and help
everywhere): the schedule group (what `simulate` replays too) and the engine group (what loading a
model adds). `--json [FILE]` means the same on every command: the result as one JSON object, printed
instead of the human summary, or written to FILE besides it.

The tuning results are STORE/hobbit_tuned.json, one per high/low/budget: `hobbit tune` adds one with
`write_tuned`, the engine and the simulator read them with `read_tuned` and `resolve` picks with `pick_tuned`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from hobbit.policies.biglittle import FALLBACK_PREFETCH, LITTLE_RULES, LITTLE_WEIGHTS
from hobbit.runtime.options import NO_CACHE_POLICIES, POLICIES, Options, base_policy, parse_budget

# hobbit.store.quant.FORMATS, highest first (quant imports torch; a test keeps the two equal)
FORMAT_ORDER = ("fp32", "bf16", "int8", "mxfp4", "int4", "int3", "int2")
LOW_DEFAULTS = ("int4", "int2", "int3", "int8")  # the paper's pairs: bf16 + int4, int8 + int2
COMPUTE_DTYPES = ("bf16", "fp32")
DENSE_FORMATS = ("bf16", "fp32", "int8", "int4", "auto")
LM_HEAD_FORMATS = ("bf16", "int8", "int4")
TUNED_FILE = "hobbit_tuned.json"
TUNED_OPTIONS = ("t1", "t2", "low_pool_fraction", "eviction_options")  # what `hobbit tune` chooses
TUNED_BUDGET_SPREAD = 0.1  # a tuning result applies to budgets within 10% of the one it was tuned at
_ALIASES = {"bfloat16": "bf16", "float32": "fp32"}


def precision_name(x: Any) -> Any:
    """'bf16' for 'bf16', 'bfloat16' or torch.bfloat16 (and 'fp32' for float32); anything else as given."""
    if x is None or isinstance(x, str) and x not in _ALIASES:
        return x
    name = str(x).removeprefix("torch.")
    return _ALIASES.get(name, x if isinstance(x, str) else name)


def _knob(flag: str | None, help: str, group: str = "schedule", **argparse_kw) -> dict:
    return dict(flag=flag, help=help, group=group, argparse=argparse_kw)


@dataclass(frozen=True)
class RunConfig:
    """A run's knobs as asked; None means "the default" (see `resolve`)."""
    # -- the schedule: what the engine and `hobbit simulate` share
    budget: int | float | str | None = field(default="25%", metadata=_knob(
        "--budget", "RAM for cached experts: bytes, 512MiB, 2GiB, or 25%% of all expert bytes at the highest "
        "stored precision (default 25%%)"))
    policy: str = field(default="lru", metadata=_knob(
        "--policy", "expert cache policy (default lru)", choices=POLICIES))
    high: str | None = field(default=None, metadata=_knob(
        "--high", "precision of full-precision loads (default: highest stored)"))
    low: str | None = field(default=None, metadata=_knob(
        "--low", "precision of low-precision loads (hobbit; default: int4, else int2, int3, int8 below --high)"))
    t1: float | None = field(default=None, metadata=_knob(
        "--t1", "hobbit Eq. 2: high if score <= T1 (default 0.6 or tuned)", type=float))
    t2: float | None = field(default=None, metadata=_knob(
        "--t2", "hobbit Eq. 2: low if score <= T2, else skip (default 0.9 or tuned)", type=float))
    low_pool_fraction: float | None = field(default=None, metadata=_knob(
        "--low-pool-fraction", "hobbit: share of the budget for low-precision copies (default 0.25 or tuned)",
        type=float))
    eviction_options: dict | None = field(default=None, metadata=_knob(
        "--weights", "hobbit Eq. 3 eviction weights, e.g. lru=0.4,lfu=0.2,lhu=0.2,fld=0.2 (default 0.25 each "
        "or tuned)"))
    allow_low_for_high: bool = field(default=False, metadata=_knob(
        "--allow-low-for-high", "a cached low copy may serve a high request", action="store_true"))
    little: float | None = field(default=None, metadata=_knob(
        "--little", "threshold of the per-layer little rule (--little-rule; mass by default): e.g. 0.8",
        type=float, metavar="X"))
    little_rule: str | None = field(default=None, metadata=_knob(
        "--little-rule", "mass: a token whose top-ceil(k/2) experts hold X of its routing mass runs only those; "
        "adapmoe: drop experts whose normalized weight is under X (AdapMoE's baseline)", choices=LITTLE_RULES))
    little_weights: str | None = field(default=None, metadata=_knob(
        "--little-weights", "weights of the experts a little set keeps (MoBiLE's little pass, --little-rule): "
        "router = what the family's router gives that many experts (renormalized to 1 where it renormalizes its "
        "top-k, else unchanged), rescaled = rescaled to the top-k's total on every family (default router)",
        choices=LITTLE_WEIGHTS))
    gamma: float | None = field(default=None, metadata=_knob(
        "--gamma", "policies mobile, hobbit+mobile: a token decoded little whose top next-token probability is "
        "below this is redone big (default 0.7)", type=float))
    fallback_prefetch: str | None = field(default=None, metadata=_knob(
        "--fallback-prefetch", "policies mobile, hobbit+mobile: while a token runs little, read what its fallback "
        "would add: fit = only where the cache holds a token's big set at that precision (else those reads are "
        "evicted before the fallback uses them), always, or never (the fallback loads on demand) (default fit)",
        choices=FALLBACK_PREFETCH))
    prefetch_depth: int | None = field(default=None, metadata=_knob(
        "--prefetch-depth", "layers ahead to predict and prefetch (default: hobbit 2, lru+prefetch 1, others 0)",
        type=int))
    prefetch_min_precision: float | None = field(default=None, metadata=_knob(
        "--prefetch-min-precision", "read a predicted expert ahead only if the predictions at its rank have been "
        "right at least this often in this run (measured online, e.g. 0.7; default 0: every predicted miss, as "
        "HOBBIT's walk does)",
        type=float))
    keep_stale_prefetch: bool = field(default=False, metadata=_knob(
        "--keep-stale-prefetch", "finish the queued prefetch reads of a layer whose router chose other experts "
        "(by default they are dropped unread when the router runs)", action="store_true"))
    precision_map: dict | None = field(default=None, metadata=_knob(
        "--precision-map", "a JSON file {\"layer/expert\": precision}: those experts always run at that precision "
        "(one below --high), the rest at --high, instead of a per-token rule (`hobbit study` writes such maps)",
        metavar="FILE"))
    tuned: bool = field(default=True, metadata=_knob(
        "--no-tuned", "policy hobbit: ignore the store's `hobbit tune` result (by default its options are the "
        "defaults; explicit options win)", action="store_false"))
    # -- the engine: what loading the model adds
    dtype: str = field(default="bf16", metadata=_knob(
        "--dtype", "compute dtype (default bf16)", "engine", choices=COMPUTE_DTYPES))
    dense: str | None = field(default=None, metadata=_knob(
        "--dense", "precision of the dense (non-expert) weights in RAM (default: as the store holds them)",
        "engine", choices=DENSE_FORMATS))
    lm_head: str | None = field(default=None, metadata=_knob(
        "--lm-head", "precision of the LM head in RAM, made from its stored copy (default: --dense's, or as the "
        "store holds it); with --dense int4 --lm-head int8, the dense weights are as llama.cpp's Q4_0 export holds "
        "them (quality cost: README)", "engine", choices=LM_HEAD_FORMATS))
    mlock: bool = field(default=False, metadata=_knob(
        "--mlock", "lock the dense weights in RAM (needs RLIMIT_MEMLOCK)", "engine", action="store_true"))
    threads: int = field(default=1, metadata=_knob(
        "--threads", "torch compute threads (default 1; the loader uses another)", "engine", type=int))
    direct_io: bool = field(default=True, metadata=_knob(
        "--no-direct-io", "read blobs through the page cache", "engine", action="store_false"))
    prefetch_threads: int | None = field(default=None, metadata=_knob(
        "--prefetch-threads", "of the --io-threads, how many read prefetches at once (default 1: a prefetch still "
        "queued when its layer's router chose otherwise is dropped unread, a running one is not; demand loads "
        "use them all)", "engine", type=int))
    io_threads: int | None = field(default=None, metadata=_knob(
        "--io-threads", "blobs read at once, demand loads included (default: 4 when one expert is >= 1 MiB, "
        "where parallel reads raise disk throughput; else 1, the compute thread reading its own misses)",
        "engine", type=int))

    def __post_init__(self) -> None:
        for name in ("dtype", "dense", "lm_head", "high", "low"):  # torch dtypes and long names, as the short names
            object.__setattr__(self, name, precision_name(getattr(self, name)))
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype {self.dtype!r}: choose bf16 or fp32")
        if isinstance(self.precision_map, (str, Path)):
            object.__setattr__(self, "precision_map", read_precision_map(self.precision_map))

    @classmethod
    def from_args(cls, args: argparse.Namespace, **override) -> "RunConfig":
        """The config of a command's parsed flags (made by `add_run_args`); `override` wins."""
        kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
        kw.update(override)
        weights = parse_weights(getattr(args, "weights", None))
        if weights is not None:
            if base_policy(kw.get("policy", cls.policy)) != "hobbit":
                raise ValueError("--weights sets the hobbit eviction policy's Eq. 3 weights: use it with "
                                 "--policy hobbit")
            kw["eviction_options"] = {"weights": weights}
        return cls(**kw)

    def engine_kwargs(self) -> dict:
        """As `hobbit.load` keywords (only what differs from the defaults)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) != f.default}

    @property
    def reads_tuned(self) -> bool:
        """Whether `resolve` looks at the store's tuning result (policy hobbit, not --no-tuned)."""
        return self.tuned and base_policy(self.policy) == "hobbit"


@dataclass(frozen=True)
class StoreFacts:
    """What `resolve` needs to know of a store (or of a trace's header)."""
    precisions: tuple[str, ...]  # stored expert precisions, highest first
    total_bytes: int  # all expert bytes at the highest precision: the base of '25%'
    num_experts: int  # 0: a dense model
    norm_topk_prob: bool = True  # the family renormalizes its top-k weights (the little sets' default)
    source_precision: str | None = None  # the tier holding the source's experts as shipped, if they were quantized


@dataclass(frozen=True)
class Resolved:
    options: Options
    budget_bytes: int | None
    tuned: bool  # the store's tuning result gave policy hobbit's defaults
    note: str | None = None  # why a tuning result was not used


def default_precisions(precisions: Sequence[str], policy: str, high: str | None,
                       low: str | None) -> tuple[str, str | None]:
    """high = the highest stored precision; low (hobbit) = the first of int4, int2, int3, int8 stored below high."""
    precs = list(precisions)
    high = high or (precs[0] if precs else "bf16")
    if low is None and base_policy(policy) == "hobbit" and high in FORMAT_ORDER:
        lower = [p for p in precs if p in FORMAT_ORDER and FORMAT_ORDER.index(p) > FORMAT_ORDER.index(high)]
        low = next((p for p in LOW_DEFAULTS if p in lower), None)
    return high, low


def below_source(policy: str, low: str | None, source: str | None) -> bool:
    """Whether policy hobbit's low tier would re-quantize quantized source experts below their own precision
    (the paper's thresholds assume a low tier made from full-precision weights)."""
    return (base_policy(policy) == "hobbit" and low in FORMAT_ORDER and source in FORMAT_ORDER
            and FORMAT_ORDER.index(low) > FORMAT_ORDER.index(source))


def read_precision_map(path: str | Path) -> dict[tuple[int, int], str]:
    """{(layer, expert): precision} from a JSON file {"layer/expert": precision}; ValueError names what is wrong."""
    try:
        doc = json.loads(Path(path).read_text())
        return {tuple(int(i) for i in k.split("/", 1)): str(v) for k, v in doc.items()}
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"--precision-map {path}: expected a JSON object like {{\"3/5\": \"int2\"}} "
                         f"(layer/expert: precision), got {type(e).__name__}: {e}") from None


def resolve(config: RunConfig, facts: StoreFacts, tuned: list[dict] | None = None) -> Resolved:
    """The settled run (module docstring). `tuned` is the store's `read_tuned` results, or None. Pure."""
    high, low = default_precisions(facts.precisions, config.policy, config.high, config.low)
    policy = config.policy if facts.num_experts else "resident"  # a dense model has no experts to offload
    budget = parse_budget(config.budget, facts.total_bytes) if policy not in NO_CACHE_POLICIES else None
    knobs = {k: getattr(config, k) for k in ("t1", "t2", "low_pool_fraction", "eviction_options", "little",
                                             "little_rule", "gamma", "fallback_prefetch",
                                             "prefetch_depth", "prefetch_min_precision")
             if getattr(config, k) is not None}
    used, note = False, None
    if tuned and config.reads_tuned:
        result, note = pick_tuned(tuned, high, low, budget)
        if result is not None:
            knobs, used = {**check_tuned_options(result["options"]), **knobs}, True
    if not used and config.t1 is None and config.t2 is None and below_source(policy, low, facts.source_precision):
        knobs = {**knobs, "t1": 1.0, "t2": 1.0}
        note = "; ".join(filter(None, [note, (
            f"manifest.json: the experts came as {facts.source_precision}, above the {low} tier, and no tuning result "
            f"applies, so policy hobbit loads nothing below {facts.source_precision} (t1 = t2 = 1); `hobbit tune` "
            f"measures whether {low} pays, or pass --t1 / --t2")]))
    if config.precision_map and config.low is None:  # the map names the low tier
        low = next(iter(set(config.precision_map.values()) - {high}), low)
    if config.little_weights not in (None, *LITTLE_WEIGHTS):
        raise ValueError(f"unknown little weights {config.little_weights!r}; choose from {', '.join(LITTLE_WEIGHTS)}")
    renorm = config.little_weights == "rescaled" or facts.norm_topk_prob
    options = Options(policy=policy, high=high, low=low, allow_low_for_high=config.allow_low_for_high,
                      keep_stale_prefetch=config.keep_stale_prefetch, precision_map=config.precision_map,
                      little_renorm=renorm, **knobs)
    return Resolved(options, budget, used, note)


# -- the tuning result --------------------------------------------------------------------------------

def tuned_path(store: str | Path) -> Path:
    return Path(store) / TUNED_FILE


def check_tuned_options(opts: Any) -> dict:
    """The options of a tuning result, or ValueError naming what is wrong with them."""
    if not isinstance(opts, dict):
        raise ValueError("'options' is not an object")
    unknown = set(opts) - set(TUNED_OPTIONS)
    if unknown:
        raise ValueError(f"unknown options {', '.join(sorted(unknown))}")
    for k in ("t1", "t2", "low_pool_fraction"):
        v = opts.get(k)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= 1
                              or math.isnan(v)):
            raise ValueError(f"{k} must be a number in [0, 1], got {v!r}")
    ev = opts.get("eviction_options")
    if ev is not None and not (isinstance(ev, dict) and isinstance(ev.get("weights", {}), dict)):
        raise ValueError(f"eviction_options must be an object with 'weights', got {ev!r}")
    return dict(opts)


def read_tuned(store: str | Path) -> list[dict]:
    """Every tuning result of a store, each validated; [] when it has none. The file holds
    {"results": [...]}, one per high/low/budget `hobbit tune` ran (a file of one bare result, as
    `hobbit tune` wrote before, is read as that one)."""
    path = tuned_path(store)
    if not path.is_file():
        return []
    try:
        doc = json.loads(path.read_text())
        results = doc["results"] if isinstance(doc, dict) and "results" in doc else [doc]
        if not isinstance(results, list):
            raise TypeError("'results' is not a list")
        for result in results:
            _check_result(result)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a valid tuning result ({e}); re-run `hobbit tune` or delete it") from e
    return results


def _check_result(result: Any) -> None:
    check_tuned_options(result["options"])
    if not isinstance(result.get("calibration"), dict):
        raise TypeError("'calibration' is not an object")
    if not isinstance(result.get("budget_bytes"), int) or result["budget_bytes"] <= 0:
        raise TypeError("'budget_bytes' (the budget it was tuned at) is not a positive integer")


def _tuned_for(result: dict) -> tuple:
    return result["calibration"].get("high"), result["calibration"].get("low"), result["budget_bytes"]


def pick_tuned(results: list[dict], high: str, low: str | None, budget: int | None) -> tuple[dict | None, str | None]:
    """The result tuned for high+low at the budget nearest `budget`, when within TUNED_BUDGET_SPREAD of it
    (what suits one budget can hurt another); else (None, why not)."""
    pair = [r for r in results if _tuned_for(r)[:2] == (high, low)]
    if not pair:
        tuned = ", ".join(sorted({f"{h}+{lo}" for h, lo, _ in map(_tuned_for, results)}))
        return None, (f"{TUNED_FILE} was tuned for {tuned}, not {high}+{low}: using the default thresholds; "
                      f"run `hobbit tune` for this pair")
    best = min(pair, key=lambda r: abs((budget or 0) - r["budget_bytes"]))
    if budget is not None and abs(budget - best["budget_bytes"]) <= TUNED_BUDGET_SPREAD * best["budget_bytes"]:
        return best, None
    at = ", ".join(f"{r['budget_bytes'] / 2**20:.0f}" for r in sorted(pair, key=lambda r: r["budget_bytes"]))
    return None, (f"{TUNED_FILE} was tuned for {high}+{low} at {at} MiB, not {(budget or 0) / 2**20:.0f} MiB "
                  f"(what suits one budget can hurt another): using the default thresholds; run "
                  f"`hobbit tune --budget` with this budget")


def write_tuned(store: str | Path, result: dict) -> Path:
    """Add a tuning result to the store's (checked first), replacing one for the same high/low and budget."""
    _check_result(result)
    results = [r for r in read_tuned(store) if _tuned_for(r) != _tuned_for(result)] + [result]
    path = tuned_path(store)
    order = sorted(results, key=lambda r: (str(_tuned_for(r)[:2]), r["budget_bytes"]))
    path.write_text(json.dumps({"results": order}, indent=1) + "\n")
    return path


# -- flags ---------------------------------------------------------------------------------------

def parse_weights(spec: str | None) -> dict | None:
    """'lru=0.4,lfu=0.2,lhu=0.2,fld=0.2' -> dict (Eq. 3 weights of the hobbit eviction policy)."""
    if not spec:
        return None
    out = {}
    for part in spec.split(","):
        name, sep, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"--weights {spec!r}: use name=value pairs, e.g. lru=0.4,lfu=0.2,lhu=0.2,fld=0.2")
    return out


def add_run_args(p: argparse.ArgumentParser, store: bool = True, engine: bool = True, **defaults) -> None:
    """The flags of RunConfig's fields: the schedule group, and the engine group unless engine=False
    (`hobbit simulate` has no model). `defaults` changes a default (`hobbit demo`: policy hobbit)."""
    if store:
        p.add_argument("store", help="expert store folder (made by `hobbit convert`)")
    for f in dataclasses.fields(RunConfig):
        m = f.metadata
        if m["group"] == "engine" and not engine:
            continue
        default = defaults.get(f.name, f.default)
        help = m["help"] if f.name not in defaults else m["help"].split(" (default")[0] + f" (default {default})"
        kw = dict(m["argparse"])
        if f.name == "eviction_options":
            p.add_argument(m["flag"], dest="weights", default=None, help=help)
            continue
        p.add_argument(m["flag"], dest=f.name, default=default, help=help, **kw)


def add_json_arg(p: argparse.ArgumentParser, what: str = "the result") -> None:
    """`--json [FILE]`, the same on every command."""
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help=f"{what} as one JSON object: printed instead of the summary, or written to FILE")


def emit_json(args: argparse.Namespace, doc: Any) -> bool:
    """Honour --json: print `doc` (True: print nothing else) or write it to FILE (False: print the summary too)."""
    if args.json == "-":
        print(json.dumps(doc))
        return True
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    return False
