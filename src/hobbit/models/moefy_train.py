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

from hobbit.models.moefy import MoefyConfig, dense_model, layer_recipe, mlp_weights, moe_forward, moe_layer
from hobbit.runtime.experts import expert_ffn
from hobbit.runtime.model import Transformer
from hobbit.runtime.routing import softmax_topk


def _moe_tensors(m0: dict[str, Tensor], p: dict[str, Tensor], E: int) -> dict[str, Tensor]:
    """The MoE tensors of a layer (as `moe_layer` makes them) from the frozen, unscaled m0 and the trainables p."""
    shared_down = m0["shared_down_proj"] * p["scale"][E]
    if "lora_a" in p:
        shared_down = shared_down + p["lora_b"] @ p["lora_a"]
    return dict(m0, router=p["router"], shared_gate=p["shared_gate"], shared_down_proj=shared_down,
                down_proj=m0["down_proj"] * p["scale"][:E, None, None])


def distill(model: Transformer, recipe: dict[str, Tensor], mc: MoefyConfig, ids: Tensor, steps: int,
            lr: float = 1e-3, batch: int = 1, rank: int = 0, seed: int = 0, log=print) -> dict[str, Tensor]:
    """Returns the recipe with its trainable tensors distilled (and 'ffn_norm', lora tensors added). The student
    is the dense `model` with trainable FFN norms (swapped in for the run, then back) and MoE FFNs."""
    g, H = torch.Generator().manual_seed(seed), model.cfg.hidden_size
    with torch.no_grad():
        teacher = torch.cat([model.windows(b) for b in ids.split(4)])  # logits are recomputed per step
    layers, params = [], []
    for l, block in enumerate(model.layers):
        r = layer_recipe(recipe, l)
        m = moe_layer(*mlp_weights(block.mlp), {k: v for k, v in r.items() if k in ("perm", "router", "shared_gate")}
                      | {"scale": torch.ones(mc.experts + 1)}, mc.shared)
        m = {k: v.to(torch.bfloat16) for k, v in m.items()}
        p = {"router": r["router"], "scale": r["scale"], "shared_gate": r["shared_gate"],
             "ffn_norm": r.get("ffn_norm", block.post_attention_layernorm.weight)}
        if rank or "lora_a" in r:  # a recipe's LoRA keeps training (its own rank)
            p["lora_a"] = r.get("lora_a", torch.randn(rank, mc.shared, generator=g) / mc.shared ** 0.5)
            p["lora_b"] = r.get("lora_b", torch.zeros(H, rank))
        p = {k: torch.nn.Parameter(v.detach().clone().float()) for k, v in p.items()}
        layers.append(m)
        params.append(p)
    opt = torch.optim.Adam([t for p in params for t in p.values()], lr=lr)
    warmup_cosine = lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * s / steps))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine)

    def mlp(l: int, x: Tensor) -> Tensor:
        return moe_forward(_moe_tensors(layers[l], params[l], mc.experts), x.reshape(-1, H), mc.top_k,
                           mc.norm).view_as(x)

    norms = [block.post_attention_layernorm.weight for block in model.layers]
    for block, p in zip(model.layers, params):
        block.post_attention_layernorm.weight = p["ffn_norm"]
    t0 = time.time()
    try:
        for step in range(steps):
            b = torch.randint(0, ids.shape[0], (batch,), generator=g)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logp = F.log_softmax(model.head(model.windows(ids[b], mlp)), -1)
            with torch.no_grad():
                tp = F.log_softmax(model.head(teacher[b]), -1)
            loss = (tp.exp() * (tp - logp)).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if step % 10 == 0 or step == steps - 1:
                log(f"step {step}: KL {loss.item():.4f} ({time.time() - t0:.0f} s)")
    finally:
        for block, w in zip(model.layers, norms):
            block.post_attention_layernorm.weight = w
    out = dict(recipe)
    for l, p in enumerate(params):
        out.update({f"layers.{l}.{k}": v.detach().clone() for k, v in p.items()})
    return out


# ---------------------------------------------------------------- evaluation

def moe_layers(model: Transformer, recipe: dict[str, Tensor], mc: MoefyConfig,
               drop_mlp: bool = False) -> list[dict[str, Tensor]]:
    """Makes the dense `model` the recipe's MoE model, in place: the recipe's FFN norms, the embedding tied to the
    LM head if mc.tie; returns its MoE layers, which `moe_forward` runs as `model.windows`' mlp.
    drop_mlp: delete each dense MLP once its MoE layer is made (CoderMoE: 12 GB -> 9 GB peak)."""
    if mc.tie:
        model.embed_tokens.weight = model.lm_head.weight
    layers = []
    for l, block in enumerate(model.layers):
        r = layer_recipe(recipe, l)
        if "ffn_norm" in r:
            block.post_attention_layernorm.weight = torch.nn.Parameter(r["ffn_norm"], requires_grad=False)
        layers.append(moe_layer(*mlp_weights(block.mlp), r, mc.shared))
        if drop_mlp:
            block.mlp = None
    return layers


def oracle_forward(m: dict[str, Tensor], scale: Tensor, x: Tensor, k: int) -> Tensor:
    """About the best any router and expert scales can do with these experts: each token [N,H] gets the k experts
    with the largest output norm, each and the shared expert at weight 1 (the dense MLP's own coefficients);
    `scale` (the recipe's) is divided out of m's down_proj. On CoderMoE layers 3/7/14/21 (4096 calibration tokens),
    a greedy best set with per-token least-squares weights had a local error at most 0.011 lower (0.240 vs 0.251)."""
    E = m["gate_proj"].shape[0]
    Y = torch.stack([expert_ffn(x, torch.cat((m["gate_proj"][e], m["up_proj"][e])), m["down_proj"][e])
                     for e in range(E)], 1) / scale[:E, None].to(x.dtype)  # [N,E,H]
    mask = torch.zeros(x.shape[0], E, dtype=x.dtype).scatter_(1, Y.norm(dim=-1).topk(k, -1).indices, 1.0)
    shared = expert_ffn(x, torch.cat((m["shared_gate_proj"], m["shared_up_proj"])), m["shared_down_proj"])
    return (Y * mask[..., None]).sum(1) + shared / scale[E].to(x.dtype)


def perplexity(model: Transformer, ids: Tensor, mlp=None, batch: int = 4) -> float:
    """exp(mean next-token NLL) over windows ids [B,T], each window on its own."""
    total = 0.0
    with torch.no_grad():
        for b in ids.split(batch):
            lg = model.head(model.windows(b, mlp))[:, :-1]
            total += F.cross_entropy(lg.reshape(-1, lg.shape[-1]), b[:, 1:].reshape(-1), reduction="sum").item()
    return math.exp(total / ids[:, 1:].numel())


def _pearson(a: Tensor, b: Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return (a @ b / (a.norm() * b.norm() + 1e-12)).item()


def routing_stats(model: Transformer, layers: list[dict[str, Tensor]], ids: Tensor, k: int, norm: bool = True,
                  t1: float = 0.6) -> dict:
    """Perplexity and per-layer routing statistics of the MoE (`moe_layers`) at top-k over windows ids [B,T]
    (docs/smolmoe.md)."""
    rec, nll = [[] for _ in layers], 0.0

    def mlp(l, x):
        xf = x.reshape(-1, x.shape[-1])
        m = layers[l]
        ids_, w = softmax_topk(xf @ m["router"].T, k, norm)
        ynorm = torch.zeros(ids_.shape)                         # unweighted expert output norms [N,k]
        for e in range(m["router"].shape[0]):
            n, j = (ids_ == e).nonzero(as_tuple=True)
            w13 = torch.cat((m["gate_proj"][e], m["up_proj"][e]))  # [2I,H]
            ynorm[n, j] = expert_ffn(xf[n], w13, m["down_proj"][e]).norm(dim=-1)
        rec[l].append((ids_.view(*x.shape[:2], k), w, ynorm))
        return moe_forward(m, xf, k, norm).view_as(x)

    with torch.no_grad():
        for b in ids.split(2):
            lg = model.head(model.windows(b, mlp))[:, :-1]
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
    p.add_argument("--oracle", action="store_true", help="also the perplexity with oracle routing at each top-k "
                   "(oracle_forward: the k largest expert outputs per token, at weight 1)")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    if any(k < 2 for k in args.top_k or []):  # the statistics compare the top-1 weight with the rest
        p.error(f"--top-k {min(args.top_k)}: routing statistics need k >= 2 (ranks 1..k are compared)")
    torch.set_num_threads(1)
    source, recipe_path = {"smolmoe": ("smollm2-gguf", RECIPE),
                           "codermoe": ("qwen-coder-gguf", CODERMOE_RECIPE)}[args.model]
    sd, cfg, tok, _ = load_dense(args.src or asset_path(source))
    model, texts = dense_model(sd, cfg), eval_windows(tok, args.model, args.windows)
    del sd  # the model holds the weights
    res = {"held_out": EVAL_TEXTS[args.model], "windows": args.windows, "perplexity": {}, "routing": {}}

    def save() -> None:  # after each model: a long run leaves what it has
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1) + "\n")

    if args.dense:
        res["perplexity"]["dense"] = {t: round(perplexity(model, ids, batch=1), 3) for t, ids in texts.items()}
        print("dense", res["perplexity"]["dense"], flush=True)
        save()
    if args.top_k == []:  # dense only: no recipe needed
        return 0
    recipe, mc, prov = load_recipe(args.recipe or recipe_path)
    res.update(recipe=str(args.recipe or recipe_path), moefy=vars(mc), provenance=prov)
    layers = moe_layers(model, recipe, mc, drop_mlp=True)  # the dense model is scored above; now the MoE
    n_stats = min(args.stats_windows or args.windows, args.windows)
    for k in args.top_k or [mc.top_k]:
        stats = {t: routing_stats(model, layers, ids[:n_stats], k, mc.norm) for t, ids in texts.items()}
        ppl = {t: s.pop("perplexity") for t, s in stats.items()}
        if n_stats < args.windows:
            def mlp(l: int, x: Tensor, k: int = k) -> Tensor:
                return moe_forward(layers[l], x.reshape(-1, x.shape[-1]), k, mc.norm).view_as(x)
            ppl = {t: perplexity(model, ids, mlp) for t, ids in texts.items()}
        res["perplexity"][f"top{k}"] = {t: round(v, 3) for t, v in ppl.items()}
        res["routing"][f"top{k}"] = stats
        print(f"top{k}", res["perplexity"][f"top{k}"], {t: s["mean"] for t, s in stats.items()}, flush=True)
        save()
        if args.oracle:
            def omlp(l: int, x: Tensor, k: int = k) -> Tensor:
                return oracle_forward(layers[l], recipe[f"layers.{l}.scale"], x.reshape(-1, x.shape[-1]), k).view_as(x)
            res["perplexity"][f"oracle_top{k}"] = {t: round(perplexity(model, ids, omlp, batch=2), 3)
                                                   for t, ids in texts.items()}
            print(f"oracle top{k}", res["perplexity"][f"oracle_top{k}"], flush=True)
            save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
