"""`hobbit bench`'s output: the summary table, the profile split and the plot, from its run records."""
from __future__ import annotations

from pathlib import Path

from hobbit.lab.profile import PARTS
from hobbit.runtime.options import NO_CACHE_POLICIES, POLICIES


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def format_table(runs: list[dict]) -> str:
    head = ("policy", "budget", "MiB", "prefill s", "tok/s", "hit", "hit by precision", "KiB/tok", "wait", "skip",
            "ppl", "Δppl", "top1", "fallback")
    rows = [head]
    for x in runs:
        rows.append((x["name"], _pct(x["budget_fraction"]),
                     "-" if x["budget_bytes"] is None else f"{x['budget_bytes'] / 2**20:.1f}",
                     f"{x['prefill_s']:.3f}", f"{x['decode_tok_s']:.2f}", _pct(x["hit_rate"]),
                     " ".join(f"{p}:{v:.0%}" for p, v in x["hit_rate_by_precision"].items()) or "-",
                     f"{x['bytes_per_token'] / 1024:.1f}", _pct(x["loader_wait_frac"]), _pct(x["skipped_frac"]),
                     f"{x['ppl']:.3f}", f"{x['ppl_delta_pct']:+.2f}%", f"{x['top1_agreement']:.1%}",
                     _pct(x["fallback_rate"])))
    return _columns(rows)


def format_profiles(runs: list[dict]) -> str:
    """ms per decode token by part, one column per configuration."""
    cols = [(f"{x['name']} {_pct(x['budget_fraction'])}", x["profile_ms_per_token"]) for x in runs]
    rows = [["part", *(c for c, _ in cols)]] + [[p, *(f"{m[p]:.2f}" for _, m in cols)] for p in PARTS]
    rows.append(["total", *(f"{sum(m.values()):.2f}" for _, m in cols)])
    return _columns(rows)


def _columns(rows: list) -> str:
    """Rows of cells as aligned text: the first column left-aligned, the rest right-aligned."""
    widths = [max(len(r[j]) for r in rows) for j in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def plot(runs: list[dict], path: str | Path, title: str) -> None:
    """Two panels against budget: decode tok/s and perplexity delta (%), one line per policy;
    policies without a cache (resident, ondemand) are horizontal dashed lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = ((axes[0], "decode_tok_s", "decode tokens/s"),
              (axes[1], "ppl_delta_pct", "perplexity Δ vs full precision (%)"))
    for ax, key, label in panels:
        names = list(dict.fromkeys(x["name"] for x in runs))
        for name in names:
            pts = [x for x in runs if x["name"] == name]
            policy = pts[0]["policy"]
            color = f"C{POLICIES.index(policy)}"  # a policy keeps its color across panels and benchmarks
            if policy in NO_CACHE_POLICIES:
                ax.axhline(pts[0][key], color=color, linestyle="--", linewidth=1.2, label=name)
            else:  # a policy's variants: the same color, another marker
                marker = "osD^v<>"[[n for n in names if n.split()[0] == policy].index(name) % 7]
                pts.sort(key=lambda x: x["budget_fraction"])
                ax.plot([100 * x["budget_fraction"] for x in pts], [x[key] for x in pts], color=color, marker=marker,
                        label=name)
        ax.set_xlabel("expert budget (% of expert bytes at the highest precision)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
