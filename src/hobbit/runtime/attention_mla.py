"""DeepSeek-V2/V3 multi-head latent attention (MLA) with a compressed KV cache.

Per position the cache holds the normalized KV latent c [r] and the rotated shared rope key
k_pe [R], never per-head K/V: (r + R) values per layer and position instead of nh * (Dn + R + Dv).
Prefill expands the latent into per-head keys and values; a decode step (T == 1) instead absorbs
kv_b_proj into the query and the output (scores = (q_nope W_uk) . c + q_pe . k_pe, out = (p c) W_uv),
so its cost does not grow with nh * (Dn + Dv) per cached position.

T = tokens, S = positions attended, H = hidden, nh = heads, r = kv_lora_rank, R = qk_rope_head_dim,
Dn = qk_nope_head_dim, Dv = v_head_dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from hobbit.store.config import ModelConfig
from hobbit.runtime.layers import RMSNorm, apply_rope

NORM_EPS = 1e-6  # transformers builds q_a_layernorm / kv_a_layernorm with the RMSNorm default, not rms_norm_eps


def cache_dims(cfg: ModelConfig) -> tuple[tuple[int, int], tuple[int, int]]:
    """(heads, dim) of the two cache tensors: latent (1, r), rope key (1, R)."""
    return (1, cfg.kv_lora_rank), (1, cfg.rope_dim)


def softmax_scale(cfg: ModelConfig) -> float:
    """(Dn + R)^-0.5, times mscale^2 for a scaled RoPE with `mscale_all_dim` (DeepSeek's YaRN)."""
    scale = (cfg.qk_nope_head_dim + cfg.rope_dim) ** -0.5
    s = cfg.rope_scaling or {}
    factor, m = s.get("factor", 1.0), s.get("mscale_all_dim") or 0
    if m and factor > 1:
        scale *= (0.1 * m * math.log(factor) + 1.0) ** 2
    return scale


def rope_interleaved(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x0,x1),(x2,x3).. x [T,n,R]; cos [T,1,R] (halves repeated), sin [T,1,R] = (-sin | sin)
    as model.py tabulates it. The output lists the rotated even dims, then the odd ones: q and k get
    the same order, so q.k is unchanged."""
    c, s = cos[..., : cos.shape[-1] // 2], sin[..., sin.shape[-1] // 2:]  # [T,1,R/2]
    x1, x2 = x[..., 0::2], x[..., 1::2]  # [T,n,R/2]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


class MLAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()

        H, nh, r, R = cfg.hidden_size, cfg.num_heads, cfg.kv_lora_rank, cfg.rope_dim
        self.nh, self.r, self.R, self.Dn, self.Dv = nh, r, R, cfg.qk_nope_head_dim, cfg.v_head_dim
        qk = self.Dn + R
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(H, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, nh * qk, bias=False)
        else:
            self.q_proj = nn.Linear(H, nh * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(H, r + R, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(r, NORM_EPS)
        self.kv_b_proj = nn.Linear(r, nh * (self.Dn + self.Dv), bias=False)
        self.o_proj = nn.Linear(nh * self.Dv, H, bias=cfg.attention_bias)
        self.scale = softmax_scale(cfg)
        self.rope = rope_interleaved if cfg.rope_interleave else apply_rope

    def absorb(self) -> None:
        """After loading: split kv_b_proj (kept unquantized, dense.py) into per-head up-projections of
        the latent, w_uk [nh,Dn,r] and w_uv [nh,Dv,r]."""
        w = self.kv_b_proj.weight.detach().view(self.nh, self.Dn + self.Dv, self.r)
        self.w_uk, self.w_uv = w[:, : self.Dn].contiguous(), w[:, self.Dn:].contiguous()
        del self.kv_b_proj

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, start_pos: int,
                latent_cache: Tensor, rope_cache: Tensor) -> Tensor:
        """x [T,H]; cos/sin [T,1,R]; mask [T,S] bool or None; caches [1,S_cap,r] and [1,S_cap,R] (fp32)."""
        T = x.shape[0]
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if hasattr(self, "q_b_proj") else self.q_proj(x)
        q_nope, q_pe = q.view(T, self.nh, -1).split([self.Dn, self.R], dim=-1)  # [T,nh,Dn], [T,nh,R]
        c, k_pe = self.kv_a_proj_with_mqa(x).split([self.r, self.R], dim=-1)  # [T,r], [T,R]
        q_pe, k_pe = self.rope(q_pe, cos, sin), self.rope(k_pe[:, None], cos, sin)  # [T,nh,R], [T,1,R]
        end = start_pos + T
        latent_cache[0, start_pos:end], rope_cache[0, start_pos:end] = self.kv_a_layernorm(c), k_pe[:, 0]
        lat, k_rot = latent_cache[0, :end].to(x.dtype), rope_cache[0, :end].to(x.dtype)  # [S,r], [S,R]: exact
        if T == 1:  # absorbed: attend in latent space, one shared "head" of width r + R
            q_lat = torch.einsum("thd,hdr->htr", q_nope, self.w_uk)  # [nh,T,r]
            qa = torch.cat((q_lat, q_pe.transpose(0, 1)), dim=-1)  # [nh,T,r+R]
            ka = torch.cat((lat, k_rot), dim=-1)  # [S,r+R]
            o = F.scaled_dot_product_attention(qa[None], ka[None, None], lat[None, None], attn_mask=mask,
                                               scale=self.scale, enable_gqa=True)[0]  # [nh,T,r]
            y = torch.einsum("htr,hvr->thv", o, self.w_uv)  # [T,nh,Dv]
        else:  # expanded: per-head keys and values from the latent
            k_nope = torch.einsum("sr,hdr->hsd", lat, self.w_uk)  # [nh,S,Dn]
            v = torch.einsum("sr,hvr->hsv", lat, self.w_uv)  # [nh,S,Dv]
            keys = torch.cat((k_nope, k_rot[None].expand(self.nh, -1, -1)), dim=-1)  # [nh,S,Dn+R]
            qs = torch.cat((q_nope, q_pe), dim=-1).transpose(0, 1)  # [nh,T,Dn+R]
            y = F.scaled_dot_product_attention(qs[None], keys[None], v[None], attn_mask=mask,
                                               scale=self.scale)[0].transpose(0, 1)  # [T,nh,Dv]
        return self.o_proj(y.reshape(T, -1))
