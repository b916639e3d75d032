"""Our lean decoder: GQA attention with RoPE and a preallocated KV cache, RMSNorm, SwiGLU MLP, and a
MoE block that routes exactly like transformers and hands the expert sum to an ExpertProvider.

T = tokens in this call, S = positions attended, H = hidden, D = head_dim, E = experts,
k = experts per token, V = vocab. Module names follow HF (minus the `model.` prefix), so
`model.layers[i].mlp.gate.weight` is layer i's router and dense weights load by HF name.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import attention_mla, attention_sinks
from .config import ModelConfig
from .experts import ExpertProvider
from .routing import FP32_BUFFERS, Router

DEFAULT_MAX_SEQ_LEN = 4096  # KV cache length when none is given (capped by max_position_embeddings)


def rope_frequencies(cfg: ModelConfig, seq_len: int | None = None) -> tuple[Tensor, float]:
    """(inv_freq [D/2] fp32, cos/sin scale) as transformers computes them for each rope_type.
    seq_len only matters for 'dynamic' (NTK), which rescales the base past max_position_embeddings."""
    D, base, s = cfg.rope_dim or cfg.head_dim, cfg.rope_theta, cfg.rope_scaling or {"rope_type": "default"}
    kind, exps = s["rope_type"], torch.arange(0, D, 2, dtype=torch.int64).float() / D  # [D/2]
    if kind == "dynamic":
        n, f = max(seq_len or 0, cfg.max_position_embeddings), s["factor"]
        base = base * ((f * n / cfg.max_position_embeddings) - (f - 1)) ** (D / (D - 2))
    pos_freqs = base**exps
    inv_freq = 1.0 / pos_freqs
    if kind == "linear":
        return inv_freq / s["factor"], 1.0
    if kind == "llama3":
        f, lo, hi, old = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / lo, inv_freq / f, inv_freq)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / f + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        return _yarn(s, D, base, pos_freqs, cfg.max_position_embeddings)
    return inv_freq, 1.0


def _yarn(s: dict, D: int, base: float, pos_freqs: Tensor, max_pos: int) -> tuple[Tensor, float]:
    orig = s["original_max_position_embeddings"]
    f = s.get("factor") or max_pos / orig

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = s.get("attention_factor")
    if attn is None:
        both = s.get("mscale") and s.get("mscale_all_dim")
        attn = mscale(f, s["mscale"]) / mscale(f, s["mscale_all_dim"]) if both else mscale(f)

    def corr_dim(rotations: float) -> float:
        return D * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = corr_dim(s.get("beta_fast") or 32), corr_dim(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, D - 1)
    high = high + 0.001 if low == high else high
    extrapolate = 1 - ((torch.arange(D // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # [D/2]
    inv_freq = 1.0 / (f * pos_freqs) * (1 - extrapolate) + 1.0 / pos_freqs * extrapolate
    return inv_freq, float(attn)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _partial_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [T,n,D], cos/sin [T,1,R] with R < D: RoPE on x[..., :R], the rest passes."""
    rot, rest = x.split([cos.shape[-1], x.shape[-1] - cos.shape[-1]], dim=-1)
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()  # normalize in fp32, scale in the activation dtype, as HF does
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def fuse(self) -> None:
        """One matmul for gate and up: gate_up [2I,H] = cat(gate, up) rows."""
        self.gate_up = _cat_linear(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # [T,I] each
        return self.down_proj(F.silu(gate) * up)


def _cat_linear(*parts: nn.Linear) -> nn.Linear:
    w = torch.cat([p.weight.detach() for p in parts])  # [sum N, K]
    b = None if parts[0].bias is None else torch.cat([p.bias.detach() for p in parts])
    fused = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
    fused.weight = nn.Parameter(w, requires_grad=False)
    if b is not None:
        fused.bias = nn.Parameter(b, requires_grad=False)
    return fused


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        H, D, nh, nkv = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        self.head_dim, self.window, self.qk_norm = D, cfg.sliding_window, cfg.qk_norm
        self.scale = cfg.attention_multiplier or None  # granitemoe's softmax scale; None = D^-0.5
        self.q_proj = nn.Linear(H, nh * D, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(H, nkv * D, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(H, nkv * D, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(nh * D, H, bias=cfg.o_proj_bias)
        self.layer_window = cfg.layer_windows[layer] if cfg.layer_windows else 0  # gpt_oss: 0 = full
        if cfg.attention_sinks:
            self.sinks = nn.Parameter(torch.empty(nh))  # [nh]
        if cfg.qk_norm == "head":  # qwen3: per head, over D
            self.q_norm, self.k_norm = RMSNorm(D, cfg.rms_norm_eps), RMSNorm(D, cfg.rms_norm_eps)
        elif cfg.qk_norm == "full":  # olmoe: over the whole q / k projection
            self.q_norm, self.k_norm = RMSNorm(nh * D, cfg.rms_norm_eps), RMSNorm(nkv * D, cfg.rms_norm_eps)

    def fuse(self) -> None:
        """One matmul for q, k and v: qkv [(nh+2nkv)*D, H]."""
        self.splits = [self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features]
        self.qkv = _cat_linear(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, start_pos: int,
                k_cache: Tensor, v_cache: Tensor) -> Tensor:
        T, D = x.shape[0], self.head_dim
        q, k, v = self.qkv(x).split(self.splits, dim=-1)  # [T,nh*D], [T,nkv*D], [T,nkv*D]
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.view(T, -1, D), k.view(T, -1, D), v.view(T, -1, D)  # [T,heads,D]
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if cos.shape[-1] < D:  # partial RoPE (glm4_moe): rotate the leading rope_dim dims only
            q, k = _partial_rope(q, cos, sin), _partial_rope(k, cos, sin)
        else:
            q = q * cos + rotate_half(q) * sin  # cos/sin [T,1,D]
            k = k * cos + rotate_half(k) * sin
        end = start_pos + T
        k_cache[start_pos:end], v_cache[start_pos:end] = k, v  # caches [S_max,nkv,D]
        keys, values = k_cache[:end].transpose(0, 1), v_cache[:end].transpose(0, 1)  # [nkv,S,D]
        if self.layer_window:
            mask = attention_sinks.window_mask(start_pos, end, self.layer_window, x.device)
        if hasattr(self, "sinks"):
            y = attention_sinks.sink_attention(q.transpose(0, 1), keys, values, mask, self.sinks)  # [nh,T,D]
        else:
            y = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys[None], values[None],
                                               attn_mask=mask, scale=self.scale, enable_gqa=True)[0]  # [nh,T,D]
        return self.o_proj(y.transpose(0, 1).reshape(T, -1))


class MoE(nn.Module):
    """Router (+ qwen2 shared expert) here; the routed experts are the provider's business."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.top_k, self.norm_topk_prob = layer, cfg.top_k, cfg.norm_topk_prob
        # qwen2/qwen3/olmoe routers hand the experts weights cast to the activation dtype; mixtral keeps fp32
        self.round_weights = cfg.arch != "mixtral"
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False) if cfg.routing == "softmax" else Router(cfg)
        if cfg.shared_experts_intermediate_size:  # deepseek: always on, no gate
            self.shared_experts = MLP(cfg.hidden_size, cfg.shared_experts_intermediate_size)
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [T,H] -> logits [T,E] fp32, ids [T,k] (weight desc), weights [T,k] fp32."""
        if isinstance(self.gate, Router):
            return self.gate(x)
        logits = self.gate(x)  # [T,E] in x.dtype
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)  # [T,k], sorted descending
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.round_weights:
            weights = weights.to(x.dtype).float()
        return logits.float(), ids, weights

    def forward(self, x: Tensor, provider: ExpertProvider) -> Tensor:
        logits, ids, weights = self.route(x)
        out = provider.experts(self.layer, x, logits, ids, weights)  # [T,H]
        if hasattr(self, "shared_expert"):
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        if hasattr(self, "shared_experts"):
            out = out + self.shared_experts(x)
        return out


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.sparse = layer in cfg.sparse_layers
        self.residual_multiplier = cfg.residual_multiplier  # granitemoe scales each branch; 1 elsewhere
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = attention_mla.MLAttention(cfg) if cfg.kv_lora_rank else Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg, layer) if self.sparse else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, start_pos: int,
                k_cache: Tensor, v_cache: Tensor, provider: ExpertProvider) -> Tensor:
        m = self.residual_multiplier
        a = self.self_attn(self.input_layernorm(x), cos, sin, mask, start_pos, k_cache, v_cache)
        h = x + (a if m == 1.0 else a * m)
        y = self.post_attention_layernorm(h)
        f = self.mlp(y, provider) if self.sparse else self.mlp(y)
        return h + (f if m == 1.0 else f * m)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, provider: ExpertProvider, dtype: torch.dtype = torch.bfloat16,
                 max_seq_len: int | None = None):
        super().__init__()
        self.cfg, self.provider, self.dtype = cfg, provider, dtype
        self.max_seq_len = max_seq_len or min(cfg.max_position_embeddings, DEFAULT_MAX_SEQ_LEN)
        with torch.device("meta"):  # no memory until load_dense assigns the real weights
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
            self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # [layers, S_max, kv heads, D] each; MLA caches the latent [.., 1, r] and the rope key [.., 1, R]
        k_dims, v_dims = attention_mla.cache_dims(cfg) if cfg.kv_lora_rank else [(cfg.num_kv_heads, cfg.head_dim)] * 2
        self.register_buffer("k_cache", torch.zeros(cfg.num_layers, self.max_seq_len, *k_dims, dtype=dtype),
                             persistent=False)
        self.register_buffer("v_cache", torch.zeros(cfg.num_layers, self.max_seq_len, *v_dims, dtype=dtype),
                             persistent=False)
        inv_freq, self.rope_scale = rope_frequencies(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [D/2] fp32

    def load_dense(self, state_dict: dict[str, Tensor]) -> None:
        """Every non-expert weight by HF name; missing or unexpected names are errors."""
        ours = {_our_name(n): t for n, t in state_dict.items()}
        if self.cfg.tie_word_embeddings:
            ours.pop("lm_head.weight", None)
        expected = {n for n in self.state_dict() if not (self.cfg.tie_word_embeddings and n == "lm_head.weight")}
        missing, unexpected = sorted(expected - ours.keys()), sorted(ours.keys() - expected)
        if missing or unexpected:
            raise ValueError(f"{self.cfg.arch} dense weights do not match the model: missing {missing[:8]}"
                             f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                             f"{' ...' if len(unexpected) > 8 else ''} (our names, HF minus 'model.')")
        device = self.k_cache.device
        self.load_state_dict({n: t.to(device, torch.float32 if n.endswith(FP32_BUFFERS) else self.dtype)
                              for n, t in ours.items()}, strict=False, assign=True)
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        for m in list(self.modules()):  # fewer, bigger matmuls: per-token dispatch is the cost at batch 1
            if isinstance(m, (Attention, attention_mla.MLAttention, MLP)):
                m.fuse()

    def quantize_dense(self, fmt: str, group_size: int = 32) -> None:
        """Hold the dense projections (attention, dense/shared MLPs, LM head) in a quant format.
        Routers and the shared-expert gate stay in the activation dtype: they decide routing."""
        from .quant import QuantLinear
        for parent in list(self.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear) and name not in ("gate", "shared_expert_gate"):
                    setattr(parent, name, QuantLinear(child, fmt, group_size, self.dtype))

    def reset(self) -> None:
        self.k_cache.zero_()
        self.v_cache.zero_()

    @torch.inference_mode()
    def forward(self, tokens: Tensor, start_pos: int) -> Tensor:
        """tokens [T] int64 at positions start_pos.. -> logits [T,V] fp32; appends to the KV cache."""
        T = tokens.shape[0]
        end = start_pos + T
        if end > self.max_seq_len:
            raise ValueError(f"sequence length {end} (start_pos {start_pos} + {T} tokens) exceeds the "
                             f"model's max_seq_len {self.max_seq_len}")
        cos, sin = self._rope(start_pos, end)
        mask = self._mask(start_pos, end)
        x = self.embed_tokens(tokens)  # [T,H]
        if self.cfg.embedding_multiplier != 1.0:
            x = x * self.cfg.embedding_multiplier
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, start_pos, self.k_cache[i], self.v_cache[i], self.provider)
        logits = self.lm_head(self.norm(x))  # [T,V]
        return (logits if self.cfg.logits_scaling == 1.0 else logits / self.cfg.logits_scaling).float()

    def _rope(self, start_pos: int, end: int) -> tuple[Tensor, Tensor]:
        inv_freq, scale = self.inv_freq, self.rope_scale
        if self.cfg.rope_scaling and self.cfg.rope_scaling["rope_type"] == "dynamic" \
                and end > self.cfg.max_position_embeddings:
            inv_freq, scale = rope_frequencies(self.cfg, seq_len=end)
            inv_freq = inv_freq.to(self.inv_freq.device)
        pos = torch.arange(start_pos, end, device=inv_freq.device, dtype=torch.float32)
        freqs = pos[:, None] * inv_freq[None, :]  # [T,D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T,1,D]
        return (emb.cos() * scale).to(self.dtype), (emb.sin() * scale).to(self.dtype)

    def _mask(self, start_pos: int, end: int) -> Tensor | None:
        """[T,S] bool, True = may attend; None when a single token sees the whole cache."""
        if end - start_pos == 1 and self.cfg.sliding_window is None:
            return None
        q_pos = torch.arange(start_pos, end, device=self.k_cache.device)[:, None]  # [T,1]
        k_pos = torch.arange(end, device=self.k_cache.device)[None, :]  # [1,S]
        mask = k_pos <= q_pos
        if self.cfg.sliding_window is not None:
            mask &= k_pos > q_pos - self.cfg.sliding_window
        return mask


# HF module names -> ours: every family's router is `mlp.gate`
_RENAMES = ((".block_sparse_moe.", ".mlp."), (".mlp.router.layer.", ".mlp.gate."), (".mlp.router.", ".mlp.gate."))


def _our_name(hf_name: str) -> str:
    """'model.layers.0.block_sparse_moe.gate.weight' -> 'layers.0.mlp.gate.weight'."""
    name = hf_name.removeprefix("model.")
    for old, new in _RENAMES:
        name = name.replace(old, new)
    return name
