"""Building blocks the attention variants share: RoPE (frequencies as transformers computes them for
each rope_type, and the rotation), RMSNorm and LayerNorm (phimoe). D = head_dim, T = tokens.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from hobbit.store.config import ModelConfig


def rope_frequencies(cfg: ModelConfig, seq_len: int | None = None) -> tuple[Tensor, float]:
    """(inv_freq [D/2] fp32, cos/sin scale) as transformers computes them for each rope_type.
    seq_len only matters for 'dynamic' (NTK), which rescales the base past max_position_embeddings, and
    'longrope' (phimoe), whose long factors and mscale replace the short ones past the original length."""
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
    if kind == "longrope":
        return _longrope(s, D, base, seq_len, cfg.max_position_embeddings)
    return inv_freq, 1.0


def _longrope(s: dict, D: int, base: float, seq_len: int | None, max_pos: int) -> tuple[Tensor, float]:
    """LongRoPE (Phi-3.5-MoE): per-frequency factors, short up to `original_max_position_embeddings`, long
    past it, and cos/sin x `short_mscale` / `long_mscale` (PhimoeRotaryEmbedding; without them transformers'
    attention factor sqrt(1 + ln(f) / ln(orig)))."""
    orig = s["original_max_position_embeddings"]
    long = bool(seq_len and seq_len > orig)
    ext = torch.tensor(s["long_factor" if long else "short_factor"], dtype=torch.float32)  # [D/2]
    inv_freq = 1.0 / (ext * base ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    mscale = s.get("long_mscale" if long else "short_mscale")
    if mscale is None:
        f = s.get("factor") or max_pos / orig
        mscale = s.get("attention_factor") or (1.0 if f <= 1 else math.sqrt(1 + math.log(f) / math.log(orig)))
    return inv_freq, float(mscale)


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


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [T,heads,D]; cos [T,1,D], sin [T,1,D] with the rotate-half sign folded in (-sin | sin):
    rotate_half(x) * sin == roll(x, D/2) * (-sin | sin), so RoPE is three ops."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)


def apply_partial_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on the leading cos.shape[-1] dims of x [T,heads,D] (glm4_moe's partial RoPE), the rest passes."""
    R = cos.shape[-1]
    if R == x.shape[-1]:
        return apply_rope(x, cos, sin)
    return torch.cat((apply_rope(x[..., :R], cos, sin), x[..., R:]), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: Tensor) -> Tensor:
        # normalize in fp32, scale in the activation dtype, as HF does
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


class LayerNorm(nn.Module):
    """phimoe's nn.LayerNorm (weight and bias), computed in the activation dtype as HF does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


def norm(cfg: ModelConfig, dim: int) -> nn.Module:
    """The family's hidden-state norm: RMSNorm, or LayerNorm with bias (phimoe)."""
    return LayerNorm(dim, cfg.rms_norm_eps) if cfg.norm == "layernorm" else RMSNorm(dim, cfg.rms_norm_eps)
