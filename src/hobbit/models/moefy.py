"""MoEfication: turn a dense Llama or Qwen2 checkpoint into a Qwen2-MoE checkpoint (SmolMoE, CoderMoE).

Per layer, sequentially on calibration text (each layer sees the outputs of the already-MoEfied layers):
1. the S neurons of the dense SwiGLU MLP with the largest mean |contribution| become the shared expert;
2. the other neurons are split into E equal experts by balanced k-means of their co-activation patterns;
3. a linear router (no bias, as Qwen2-MoE has none) is trained to predict each expert's share of the
   output norm (soft cross-entropy), then sharpened by a temperature, so a gate weight tells how much
   its expert contributes;
4. per-expert output scales are fit in closed form for the weighted top-k sum (Qwen2-MoE semantics:
   softmax -> top-k -> renormalize), and the result is propagated to the next layer.
Then, optionally (`moefy_train.distill`), routers, scales, shared gates, FFN input norms and a low-rank
delta of each shared down_proj are distilled end to end against the dense model.
All of it runs the runtime's own model (`dense_model`: `Transformer.windows`, a cache-free forward over
token windows), routing (`softmax_topk`) and expert FFN (`routed_sum`, `expert_ffn`): one Llama/Qwen2.

What is learned is a small *recipe*; `apply_recipe` rebuilds the full Qwen2-MoE weights from the dense
ones. `hobbit.models.recipes.build_from_recipe` does that for a committed recipe and its GGUF asset:
SmolMoE (docs/smolmoe.md) and CoderMoE (Qwen2.5-Coder-1.5B, routed as llama.cpp's qwen2moe: no
renormalization); `hobbit moefy` (hobbit.models.recipes) runs calibration and distillation.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

from hobbit.runtime.experts import DenseExperts, expert_ffn, routed_sum
from hobbit.runtime.model import MLP, Transformer
from hobbit.runtime.routing import softmax_topk
from hobbit.store.config import ModelConfig

RECIPE = Path(__file__).parents[1] / "data" / "smolmoe_recipe.safetensors"  # SmolMoE's (from the smollm2-gguf asset)
CODERMOE_RECIPE = Path(__file__).parents[1] / "data" / "codermoe_recipe.safetensors"  # from the qwen-coder-gguf asset
DENSE_ARCHS = ("llama", "qwen2")  # qwen2 = llama + q/k/v biases
SHARED_GATE = 1e-5  # each entry of a calibrated shared-expert gate: sigmoid(x . gate) = 0.5 within ~0.1%


@dataclass
class MoefyConfig:
    experts: int = 8          # routed experts per layer
    top_k: int = 2            # default top-k written to config.json
    shared: int = 1024        # neurons of the always-on shared expert
    tau: float = 0.5          # router temperature (folded into the router weights)
    norm: bool = True         # norm_topk_prob: renormalize the top-k weights (llama.cpp's qwen2moe never does)
    tie: bool = False         # tie the embedding to lm_head (the GGUF's output.weight) before anything else
    router_epochs: int = 30
    seed: int = 0


# ---------------------------------------------------------------- the dense model (the runtime's Transformer)

def load_dense(src: str | Path) -> tuple[dict[str, Tensor], dict, str | None, dict]:
    """(fp32 state dict, HF config, tokenizer.json text, tokenizer_config) of a dense GGUF or HF folder."""
    src = Path(src)
    if src.is_file():
        from hobbit.store.gguf import load_gguf
        g = load_gguf(src)
        if g.config["model_type"] not in DENSE_ARCHS:
            raise ValueError(f"{src}: moefy needs a dense {' or '.join(DENSE_ARCHS)} model, "
                             f"not {g.config['model_type']}")
        return g.state_dict(torch.float32), g.config, g.tokenizer_json, g.tokenizer_config
    from hobbit.store.checkpoint import open_checkpoint
    ck = open_checkpoint(src)
    if ck.config.arch not in DENSE_ARCHS:
        raise ValueError(f"{src}: moefy needs a dense {' or '.join(DENSE_ARCHS)} model, not {ck.config.arch}")
    tok, tok_cfg = src / "tokenizer.json", src / "tokenizer_config.json"
    return ({k: v.float() for k, v in ck.dense_state_dict().items()}, ck.raw_config,
            tok.read_text() if tok.is_file() else None, json.loads(tok_cfg.read_text()) if tok_cfg.is_file() else {})


def tie_embeddings(sd: dict[str, Tensor], cfg: dict) -> tuple[dict[str, Tensor], dict]:
    """One matrix for embedding and lm_head: the lm_head. A GGUF of a tied HF model often holds the matrix twice,
    the output copy at the higher precision (Qwen2.5-Coder Q4_K_M: Q6_K vs Q4_K). A tied model stays as it is."""
    if "lm_head.weight" not in sd:
        return sd, dict(cfg, tie_word_embeddings=True)
    sd = {k: v for k, v in sd.items() if k != "lm_head.weight"} | {"model.embed_tokens.weight": sd["lm_head.weight"]}
    return sd, dict(cfg, tie_word_embeddings=True)


def dense_model(sd: dict[str, Tensor], cfg: dict) -> Transformer:
    """The runtime's Transformer on a dense state dict (HF names) at fp32, frozen: what calibration,
    distillation and evaluation run (`Transformer.windows`). The model shares sd's tensors, and sd's
    gate/up weights become views of the model's fused gate_up (same values): one copy of each weight."""
    model = Transformer(ModelConfig.from_hf(cfg), DenseExperts({}), torch.float32)
    model.load_dense(dict(sd))  # consumes the copy of the dict, not the tensors
    for l, block in enumerate(model.layers):
        p = f"model.layers.{l}.mlp."
        sd[p + "gate_proj.weight"], sd[p + "up_proj.weight"], _ = mlp_weights(block.mlp)
    return model.requires_grad_(False)


def mlp_weights(mlp: MLP) -> tuple[Tensor, Tensor, Tensor]:
    """A dense MLP's (gate_proj [F,H], up_proj [F,H], down_proj [H,F]) weights, as views."""
    gate, up = mlp.gate_up.weight.chunk(2)
    return gate, up, mlp.down_proj.weight


# ---------------------------------------------------------------- MoE layers from a recipe

def moe_layer(gate: Tensor, up: Tensor, down: Tensor, r: dict[str, Tensor], S: int) -> dict[str, Tensor]:
    """Qwen2-MoE tensors of a layer: its dense MLP's rows/columns (gate, up [F,H], down [H,F]) reordered by
    the layer's recipe r and scaled."""
    perm, E = r["perm"].long(), r["router"].shape[0]
    g, u, d = gate[perm], up[perm], down[:, perm]
    I = (perm.numel() - S) // E
    scale = r["scale"]
    d_r = d[:, S:].reshape(-1, E, I) * scale[:E, None]  # [H,E,I]
    d_s = d[:, :S] * scale[E] + (r["lora_b"] @ r["lora_a"] if "lora_a" in r else 0)
    return dict(router=r["router"], shared_gate=r["shared_gate"],
                shared_gate_proj=g[:S], shared_up_proj=u[:S], shared_down_proj=d_s,
                gate_proj=g[S:].reshape(E, I, -1), up_proj=u[S:].reshape(E, I, -1),
                down_proj=d_r.permute(1, 0, 2).contiguous())


def moe_forward(m: dict[str, Tensor], x: Tensor, k: int, norm: bool = True) -> Tensor:
    """The Qwen2-MoE block of layer tensors m (`moe_layer`) on x [N,H], of the runtime's parts: softmax-top-k
    routing, the weighted sum of the selected experts, the shared expert gated by a sigmoid."""
    ids, w = softmax_topk(x @ m["router"].T, k, norm)
    out = routed_sum(x, ids, w, torch.cat((m["gate_proj"], m["up_proj"]), 1), m["down_proj"])  # w13 [E,2I,H]
    shared = expert_ffn(x, torch.cat((m["shared_gate_proj"], m["shared_up_proj"])), m["shared_down_proj"])
    return out + torch.sigmoid(x @ m["shared_gate"].T) * shared


# ---------------------------------------------------------------- calibration

def balanced_kmeans(feat: Tensor, E: int, iters: int = 20, seed: int = 0) -> Tensor:
    """Cosine k-means of L2-normalized rows with exactly n/E rows per cluster (greedy assignment)."""
    n, cap = feat.shape[0], feat.shape[0] // E
    cent = feat[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:E]]
    assign = None
    for _ in range(iters):
        order = (feat @ cent.T).flatten().argsort(descending=True).tolist()
        new, count, left = [-1] * n, [0] * E, n
        for idx in order:
            i, e = divmod(idx, E)
            if new[i] < 0 and count[e] < cap:
                new[i], left = e, left - 1
                count[e] += 1
                if not left:
                    break
        new = torch.tensor(new)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        cent = F.normalize(torch.stack([feat[assign == e].mean(0) for e in range(E)]), dim=-1)
    return assign


def train_router(x: Tensor, target: Tensor, epochs: int, seed: int, lr: float = 3e-3, bs: int = 4096) -> Tensor:
    """Linear router [E,H] whose softmax fits target [N,E] (soft cross-entropy, Adam)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.zeros(target.shape[1], x.shape[1], requires_grad=True)
    opt = torch.optim.Adam([w], lr=lr)
    for _ in range(epochs):
        for b in torch.randperm(x.shape[0], generator=g).split(bs):
            loss = -(target[b] * F.log_softmax(x[b] @ w.T, -1)).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return w.detach()


def calibrate_layer(mlp: MLP, x: Tensor, mc: MoefyConfig) -> tuple[dict[str, Tensor], Tensor]:
    """(recipe of a layer, its dense MLP's output [N,H]) from its FFN inputs x [N,H]."""
    E, S = mc.experts, mc.shared
    a, d = mlp.act(x), mlp.down_proj.weight
    c = a.abs() * d.norm(dim=0)                                  # |contribution| per token and neuron
    shared = c.mean(0).argsort(descending=True)[:S]
    rest = torch.ones(a.shape[1], dtype=torch.bool)
    rest[shared] = False
    rest = rest.nonzero().squeeze(1)
    sub = c[:: max(1, c.shape[0] // 8192), rest]               # clustering on <= ~8k tokens
    sub = sub / (sub.mean(1, keepdim=True) + 1e-6)
    feat = F.normalize((sub - sub.mean(0)).T, dim=-1)          # neuron co-activation (correlation) features
    assign = balanced_kmeans(feat, E, seed=mc.seed)
    groups = [rest[assign == e] for e in range(E)]
    perm = torch.cat([shared, *groups])
    Y = torch.stack([a[:, gi] @ d[:, gi].T for gi in groups], 1)  # [N,E,H] expert outputs
    norms = Y.norm(dim=-1)
    router = train_router(x, norms / norms.sum(-1, keepdim=True), mc.router_epochs, mc.seed) / mc.tau
    ids, w = softmax_topk(x @ router.T, mc.top_k, mc.norm)
    wf = torch.zeros_like(norms).scatter_(1, ids, w)
    # per-expert scale s: min sum_n ||sum_e w_ne s_e Y_ne - r_n||^2, r = the routed part of the dense output
    r = Y.sum(1)
    A = torch.einsum("ne,nf,nef->ef", wf, wf, Y @ Y.transpose(1, 2))
    b = (wf * (Y @ r[:, :, None]).squeeze(-1)).sum(0)
    s = torch.linalg.solve(A + 1e-6 * A.diagonal().mean() * torch.eye(E), b)
    # shared gate ~0 -> sigmoid ~0.5, so the shared expert's down_proj is scaled by 2; not exactly 0: llama.cpp's
    # qwen2moe computes that sigmoid as silu(z) / z, NaN at z = 0
    return (dict(perm=perm.to(torch.int16), router=router, shared_gate=torch.full((1, x.shape[1]), SHARED_GATE),
                 scale=torch.cat([s, torch.tensor([2.0])])), r + a[:, shared] @ d[:, shared].T)


def calibrate(model: Transformer, ids: Tensor, mc: MoefyConfig, log=print) -> dict[str, Tensor]:
    """Sequential layer-by-layer calibration on token windows ids [B,T] -> recipe tensors: one forward of the
    dense model in which each layer's FFN is calibrated, then replaced by its MoE, when the forward reaches it."""
    recipe, t = {}, time.time()

    def calibrated(l: int, x: Tensor) -> Tensor:  # layer l's FFN inputs [B,T,H], layers < l already MoE
        nonlocal t
        xf = x.reshape(-1, x.shape[-1])
        r, ref = calibrate_layer(model.layers[l].mlp, xf, mc)
        recipe.update({f"layers.{l}.{k}": v for k, v in r.items()})
        m = moe_layer(*mlp_weights(model.layers[l].mlp), r, mc.shared)
        y = torch.cat([moe_forward(m, xc, mc.top_k, mc.norm) for xc in xf.split(8192)])
        rel = ((y - ref).pow(2).sum() / ref.pow(2).sum()).item()
        log(f"layer {l:2d}: relative FFN error {rel:.3f} ({time.time() - t:.1f} s)")
        t = time.time()
        return y.view_as(x)

    model.windows(ids, calibrated)
    return recipe


# ---------------------------------------------------------------- recipe -> Qwen2-MoE checkpoint

def save_recipe(path: str | Path, recipe: dict[str, Tensor], mc: MoefyConfig, provenance: dict) -> None:
    meta = {"moefy": json.dumps(asdict(mc)), "provenance": json.dumps(provenance)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sorted(recipe.items())}, str(path), metadata=meta)


def load_recipe(path: str | Path) -> tuple[dict[str, Tensor], MoefyConfig, dict]:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        recipe = {k: f.get_tensor(k) for k in f.keys()}
    return recipe, MoefyConfig(**json.loads(meta["moefy"])), json.loads(meta.get("provenance", "{}"))


def layer_recipe(recipe: dict[str, Tensor], l: int) -> dict[str, Tensor]:
    return {k.split(".", 2)[2]: v for k, v in recipe.items() if k.startswith(f"layers.{l}.")}


def qwen2_moe_config(cfg: dict, mc: MoefyConfig) -> dict:
    I = (cfg["intermediate_size"] - mc.shared) // mc.experts
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "rope_theta", "rope_scaling",
            "rope_parameters",
            "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id")
    return dict({k: cfg[k] for k in keep if k in cfg}, architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe",
                num_experts=mc.experts, num_experts_per_tok=mc.top_k, moe_intermediate_size=I,
                shared_expert_intermediate_size=mc.shared, norm_topk_prob=mc.norm, decoder_sparse_step=1,
                mlp_only_layers=[], qkv_bias=True, use_sliding_window=False, output_router_logits=False,
                torch_dtype="bfloat16")


def apply_recipe(sd: dict[str, Tensor], cfg: dict, recipe: dict[str, Tensor], mc: MoefyConfig,
                 dtype: torch.dtype = torch.bfloat16) -> tuple[dict[str, Tensor], dict]:
    """Dense Llama/Qwen2 weights + recipe -> (Qwen2-MoE state dict with per-expert names, config.json dict)."""
    if mc.tie:
        sd, cfg = tie_embeddings(sd, cfg)
    out = {name: w for name, w in sd.items() if ".mlp." not in name}
    for l in range(cfg["num_hidden_layers"]):
        r, p = layer_recipe(recipe, l), f"model.layers.{l}."
        m = moe_layer(*(sd[p + f"mlp.{proj}_proj.weight"] for proj in ("gate", "up", "down")), r, mc.shared)
        if "ffn_norm" in r:
            out[p + "post_attention_layernorm.weight"] = r["ffn_norm"]
        for proj in ("q", "k", "v"):  # Qwen2-MoE always has q/k/v biases: a Llama's are zero
            rows = sd[p + f"self_attn.{proj}_proj.weight"].shape[0]
            out.setdefault(p + f"self_attn.{proj}_proj.bias", torch.zeros(rows))
        out[p + "mlp.gate.weight"] = m["router"]
        out[p + "mlp.shared_expert_gate.weight"] = m["shared_gate"]
        for proj in ("gate", "up", "down"):
            out[p + f"mlp.shared_expert.{proj}_proj.weight"] = m[f"shared_{proj}_proj"]
            for e in range(mc.experts):
                out[p + f"mlp.experts.{e}.{proj}_proj.weight"] = m[f"{proj}_proj"][e]
    return {k: v.to(dtype).contiguous() for k, v in out.items()}, qwen2_moe_config(cfg, mc)


def write_checkpoint(out_dir: str | Path, state: dict[str, Tensor], config: dict, tokenizer_json: str | None,
                     tokenizer_config: dict) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(dict(sorted(state.items())), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer_json is not None:
        (out / "tokenizer.json").write_text(tokenizer_json)
        (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return out
