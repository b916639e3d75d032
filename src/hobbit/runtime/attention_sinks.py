"""gpt_oss attention pieces: softmax with a learned per-head sink logit, and a layer's own sliding window.

nh = query heads, nkv = key/value heads, T = queries, S = keys, D = head_dim.
"""

from __future__ import annotations

import torch
from torch import Tensor


def window_mask(start_pos: int, end: int, window: int, device: torch.device) -> Tensor:
    """[T,S] bool, True = may attend: causal, and only the last `window` positions (key > query - window)."""
    q_pos = torch.arange(start_pos, end, device=device)[:, None]  # [T,1]
    k_pos = torch.arange(end, device=device)[None, :]  # [1,S]
    return (k_pos <= q_pos) & (k_pos > q_pos - window)


def sink_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, sinks: Tensor, scale: float) -> Tensor:
    """q [nh,T,D], k/v [nkv,S,D], mask [T,S] bool or None, sinks [nh] -> [nh,T,D]. The sink joins each
    row's softmax as one more logit with no value: it takes probability mass, adds nothing."""
    nh, T, D = q.shape
    k, v = (t.repeat_interleave(nh // t.shape[0], dim=0) for t in (k, v))  # [nh,S,D]
    scores = (q @ k.transpose(1, 2)) * scale  # [nh,T,S]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    logits = torch.cat((scores, sinks.to(scores.dtype)[:, None, None].expand(nh, T, 1)), dim=-1)  # [nh,T,S+1]
    logits = logits - logits.max(dim=-1, keepdim=True).values  # as transformers: stable in bf16 too
    probs = torch.softmax(logits, dim=-1)[..., :-1]  # drop the sink's share
    return probs.to(v.dtype) @ v
