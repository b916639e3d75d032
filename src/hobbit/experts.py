"""The only thing the model knows about experts: an ExpertProvider computes the routed-expert sum.

T = tokens, H = hidden, I = expert intermediate, E = experts, k = experts per token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from .checkpoint import Checkpoint


class ExpertProvider(Protocol):
    def experts(self, layer: int, x: Tensor, logits: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
        """x [T,H] router input (post-norm hidden), logits [T,E] fp32 router logits, ids [T,k] int64
        selected experts (sorted by weight desc), weights [T,k] fp32 routing weights as the family
        defines them. Returns sum_j w_j * FFN_{id_j}(x) as [T,H] in x.dtype; a provider may skip
        experts (HOBBIT) and returns the sum it computed."""
        ...


def expert_ffn(x: Tensor, w13: Tensor, w2: Tensor) -> Tensor:
    """SwiGLU: down(silu(gate x) * up x). x [T,H], w13 [2I,H] = cat(gate, up) rows, w2 [H,I] -> [T,H]."""
    gate, up = F.linear(x, w13).chunk(2, dim=-1)  # [T,I] each
    return F.linear(F.silu(gate) * up, w2)


class DenseExperts:
    """All experts resident as plain tensors: {layer: (w13 [E,2I,H], w2 [E,H,I])}."""

    def __init__(self, weights: dict[int, tuple[Tensor, Tensor]]):
        self.weights = weights

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, dtype: torch.dtype | None = None) -> DenseExperts:
        cfg, weights = ckpt.config, {}
        for layer in cfg.sparse_layers:
            pairs = [ckpt.expert_weights(layer, e) for e in range(cfg.num_experts)]
            w13 = torch.stack([p[0] for p in pairs])  # [E,2I,H]
            w2 = torch.stack([p[1] for p in pairs])  # [E,H,I]
            weights[layer] = (w13.to(dtype or w13.dtype), w2.to(dtype or w2.dtype))
        return cls(weights)

    def experts(self, layer: int, x: Tensor, logits: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
        w13, w2 = self.weights[layer]
        out = torch.zeros_like(x)  # [T,H]
        for e in ids.unique().tolist():  # only experts some token was routed to, ascending like HF
            tok, slot = (ids == e).nonzero(as_tuple=True)  # [n], [n]
            y = expert_ffn(x[tok], w13[e].to(x.dtype), w2[e].to(x.dtype))  # [n,H]
            out.index_add_(0, tok, (y * weights[tok, slot, None]).to(x.dtype))
        return out
