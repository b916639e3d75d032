"""End-to-end distillation of a MoEfied model's small parameters against the dense model.

Trainable, per layer: the router, the per-expert output scales, the shared-expert gate, the FFN input
norm, and optionally a rank-r delta of the shared expert's down_proj. The expert weights stay the dense
model's. Loss: KL(dense || MoE) of the next-token distributions on calibration windows.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from hobbit.models.moefy import Dense, MoefyConfig, layer_recipe, moe_forward, moe_layer, route, tie_embeddings


def _moe_tensors(m0: dict[str, Tensor], p: dict[str, Tensor], E: int) -> dict[str, Tensor]:
    """The MoE tensors of a layer (as `moe_layer` makes them) from the frozen, unscaled m0 and the trainables p."""
    shared_down = m0["shared_down_proj"] * p["scale"][E]
    if "lora_a" in p:
        shared_down = shared_down + p["lora_b"] @ p["lora_a"]
    return dict(m0, router=p["router"], shared_gate=p["shared_gate"], shared_down_proj=shared_down,
                down_proj=m0["down_proj"] * p["scale"][:E, None, None])


def distill(dense: Dense, recipe: dict[str, Tensor], mc: MoefyConfig, ids: Tensor, steps: int, lr: float = 1e-3,
            batch: int = 1, rank: int = 0, seed: int = 0, log=print) -> dict[str, Tensor]:
    """Returns the recipe with its trainable tensors distilled (and 'ffn_norm', lora tensors added)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        teacher = torch.cat([dense.final_hidden(b) for b in ids.split(4)])  # logits are recomputed per step
    layers, params = [], []
    for l in range(dense.L):
        r = layer_recipe(recipe, l)
        m = moe_layer(dense, l, {k: v for k, v in r.items() if k in ("perm", "router", "shared_gate")}
                      | {"scale": torch.ones(mc.experts + 1)}, mc.shared)
        m = {k: v.to(torch.bfloat16) for k, v in m.items()}
        p = {"router": r["router"], "scale": r["scale"], "shared_gate": r["shared_gate"],
             "ffn_norm": r.get("ffn_norm", dense.w(l, "post_attention_layernorm"))}
        if rank or "lora_a" in r:  # a recipe's LoRA keeps training (its own rank)
            p["lora_a"] = r.get("lora_a", torch.randn(rank, mc.shared, generator=g) / mc.shared ** 0.5)
            p["lora_b"] = r.get("lora_b", torch.zeros(dense.H, rank))
        p = {k: v.clone().float().requires_grad_() for k, v in p.items()}
        layers.append(m)
        params.append(p)
    opt = torch.optim.Adam([t for p in params for t in p.values()], lr=lr)
    warmup_cosine = lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * s / steps))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine)
    t0 = time.time()
    for step in range(steps):
        b = torch.randint(0, ids.shape[0], (batch,), generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = dense.embed(ids[b])
            for l in range(dense.L):
                h = dense.attention(l, h)
                x = F.rms_norm(h, (dense.H,), params[l]["ffn_norm"], dense.eps)
                m = _moe_tensors(layers[l], params[l], mc.experts)
                h = h + moe_forward(m, x.reshape(-1, dense.H), mc.top_k, mc.norm).view_as(h)
            logp = F.log_softmax(dense.logits(h).float(), -1)
        with torch.no_grad():
            tp = F.log_softmax(dense.logits(teacher[b]), -1)
        loss = (tp.exp() * (tp - logp)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 10 == 0 or step == steps - 1:
            log(f"step {step}: KL {loss.item():.4f} ({time.time() - t0:.0f} s)")
    out = dict(recipe)
    for l, p in enumerate(params):
        out.update({f"layers.{l}.{k}": v.detach().clone() for k, v in p.items()})
    return out


# ---------------------------------------------------------------- evaluation

def moe_layers(dense: Dense, recipe: dict[str, Tensor], mc: MoefyConfig) -> tuple[Dense, list[dict[str, Tensor]]]:
    """The MoE model of a recipe for our reference forward: (Dense with the recipe's FFN norms, MoE layers)."""
    sd, cfg = tie_embeddings(dense.sd, dense.cfg) if mc.tie else (dict(dense.sd), dense.cfg)
    for l in range(dense.L):
        if f"layers.{l}.ffn_norm" in recipe:
            sd[f"model.layers.{l}.post_attention_layernorm.weight"] = recipe[f"layers.{l}.ffn_norm"]
    moe_dense = Dense(sd, cfg)
    return moe_dense, [moe_layer(dense, l, layer_recipe(recipe, l), mc.shared) for l in range(dense.L)]


def perplexity(dense: Dense, ids: Tensor, mlp=None, batch: int = 4) -> float:
    """exp(mean next-token NLL) over windows ids [B,T], each window on its own."""
    total = 0.0
    with torch.no_grad():
        for b in ids.split(batch):
            lg = dense.forward(b, mlp)[:, :-1]
            total += F.cross_entropy(lg.reshape(-1, lg.shape[-1]), b[:, 1:].reshape(-1), reduction="sum").item()
    return math.exp(total / ids[:, 1:].numel())


def _pearson(a: Tensor, b: Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return (a @ b / (a.norm() * b.norm() + 1e-12)).item()


def routing_stats(dense: Dense, layers: list[dict[str, Tensor]], ids: Tensor, k: int, norm: bool = True,
                  t1: float = 0.6) -> dict:
    """Perplexity and per-layer routing statistics of the MoE at top-k over windows ids [B,T] (docs/smolmoe.md)."""
    rec, nll = [[] for _ in layers], 0.0

    def mlp(l, x):
        xf = x.reshape(-1, x.shape[-1])
        m = layers[l]
        w, ids_ = route(xf @ m["router"].T, k, norm)
        ynorm = torch.zeros(ids_.shape)                         # unweighted expert output norms [N,k]
        for e in range(m["router"].shape[0]):
            n, j = (ids_ == e).nonzero(as_tuple=True)
            a = F.silu(xf[n] @ m["gate_proj"][e].T) * (xf[n] @ m["up_proj"][e].T)
            ynorm[n, j] = (a @ m["down_proj"][e].T).norm(dim=-1)
        rec[l].append((ids_.view(*x.shape[:2], k), w, ynorm))
        return moe_forward(m, xf, k, norm).view_as(x)

    with torch.no_grad():
        for b in ids.split(2):
            lg = dense.forward(b, mlp)[:, :-1]
            nll += F.cross_entropy(lg.reshape(-1, lg.shape[-1]), b[:, 1:].reshape(-1), reduction="sum").item()
    E, per_layer = layers[0]["router"].shape[0], []
    for r in rec:
        sel = torch.cat([t[0] for t in r])                     # [B,T,k]
        w = torch.cat([t[1] for t in r])
        ynorm = torch.cat([t[2] for t in r])
        wn = w / w.sum(-1, keepdim=True)
        contrib = w * ynorm
        use = torch.bincount(sel.flatten(), minlength=E).float()
        use = use / use.sum()
        ent = -(use * use.clamp_min(1e-12).log()).sum().item() / math.log(E)
        top1 = sel[..., 0]
        rep = (top1[:, 1:] == top1[:, :-1]).float().mean().item()
        score = wn.cumsum(-1)[:, :-1]                           # HOBBIT Eq. 2 scores of ranks 1..k-1
        per_layer.append(dict(
            entropy=ent, max_pick_rate=use.max().item() * k, top1_repeat=rep,
            corr_contrib=_pearson(wn.flatten(), (contrib / contrib.sum(-1, keepdim=True)).flatten()),
            corr_output=_pearson(wn.flatten(), (ynorm / ynorm.sum(-1, keepdim=True)).flatten()),
            low_precision=(score > t1).float().mean().item(), w0=wn[:, 0].mean().item(),
            w1_hist=torch.histc(wn[:, 1], 5, 0, 0.5).div(wn.shape[0]).tolist()))
    mean = {key: sum(p[key] for p in per_layer) / len(per_layer) for key in per_layer[0] if key != "w1_hist"}
    return dict(perplexity=math.exp(nll / ids[:, 1:].numel()), mean=mean, layers=per_layer)


def main(argv: list[str] | None = None) -> int:
    """Held-out perplexity of the dense model and of a recipe's MoE at each top-k, with its routing statistics."""
    import argparse
    import json

    from hobbit.models.assets import asset_path
    from hobbit.models.moefy import CODERMOE_RECIPE, RECIPE, load_dense, load_recipe
    from hobbit.models.moefy_text import EVAL_TEXTS, eval_windows
    p = argparse.ArgumentParser(prog="python -m hobbit.models.moefy_train", description=main.__doc__)
    p.add_argument("--model", choices=("smolmoe", "codermoe"), default="smolmoe",
                   help="sets the defaults of --src and --recipe, and the held-out texts (hobbit.models.moefy_text)")
    p.add_argument("--src", help="dense GGUF/HF folder (default: the model's source asset)")
    p.add_argument("--recipe", help="default: the model's committed recipe")
    p.add_argument("--top-k", type=int, nargs="*", help="top-k values to evaluate (default: the recipe's; none: "
                   "`--top-k` alone)")
    p.add_argument("--dense", action=argparse.BooleanOptionalAction, default=True, help="evaluate the dense model")
    p.add_argument("--windows", type=int, default=8, help="512-token windows per text")
    p.add_argument("--stats-windows", type=int, help="routing statistics on the first N windows only (default: "
                   "all, scored in the same pass as the perplexity)")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    source, recipe_path = {"smolmoe": ("smollm2-gguf", RECIPE),
                           "codermoe": ("qwen-coder-gguf", CODERMOE_RECIPE)}[args.model]
    sd, cfg, tok, _ = load_dense(args.src or asset_path(source))
    dense, texts = Dense(sd, cfg), eval_windows(tok, args.model, args.windows)
    res = {"held_out": EVAL_TEXTS[args.model], "windows": args.windows, "perplexity": {}, "routing": {}}

    def save() -> None:  # after each model: a long run leaves what it has
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1) + "\n")

    if args.dense:
        res["perplexity"]["dense"] = {t: round(perplexity(dense, ids, batch=1), 3) for t, ids in texts.items()}
        print("dense", res["perplexity"]["dense"], flush=True)
        save()
    if args.top_k == []:  # dense only: no recipe needed
        return 0
    recipe, mc, prov = load_recipe(args.recipe or recipe_path)
    res.update(recipe=str(args.recipe or recipe_path), moefy=vars(mc), provenance=prov)
    md, layers = moe_layers(dense, recipe, mc)
    n_stats = min(args.stats_windows or args.windows, args.windows)
    for k in args.top_k or [mc.top_k]:
        stats = {t: routing_stats(md, layers, ids[:n_stats], k, mc.norm) for t, ids in texts.items()}
        ppl = {t: s.pop("perplexity") for t, s in stats.items()}
        if n_stats < args.windows:
            def mlp(l: int, x: Tensor, k: int = k) -> Tensor:
                return moe_forward(layers[l], x.reshape(-1, x.shape[-1]), k, mc.norm).view_as(x)
            ppl = {t: perplexity(md, ids, mlp) for t, ids in texts.items()}
        res["perplexity"][f"top{k}"] = {t: round(v, 3) for t, v in ppl.items()}
        res["routing"][f"top{k}"] = stats
        print(f"top{k}", res["perplexity"][f"top{k}"], {t: s["mean"] for t, s in stats.items()}, flush=True)
        save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
