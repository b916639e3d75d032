"""The only thing the model knows about experts: an ExpertProvider computes the routed-expert sum.
Here too the one gated FFN (`expert_ffn`, SwiGLU by default) and the routed sum over resident experts.

T = tokens, H = hidden, I = expert intermediate, E = experts, k = experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from hobbit.store.checkpoint import Checkpoint
    from hobbit.store.config import ModelConfig


class ExpertProvider(Protocol):
    def experts(self, layer: int, x: Tensor, logits: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
        """x [T,H] router input (post-norm hidden), logits [T,E] fp32 router logits, ids [T,k] int64
        selected experts (sorted by weight desc), weights [T,k] fp32 routing weights as the family
        defines them. Returns sum_j w_j * FFN_{id_j}(x) as [T,H] in x.dtype; a provider may skip
        experts (HOBBIT) and returns the sum it computed."""
        ...


@dataclass(frozen=True)
class Act:
    """An expert's gated activation of (gate, up) [T,I] each. 'silu': silu(gate) * up (SwiGLU);
    'swiglu_clamp' (gpt_oss): gate <= limit, |up| <= limit, then (up + 1) * gate * sigmoid(alpha * gate)."""
    kind: str = "silu"
    alpha: float = 1.702
    limit: float = 7.0

    @classmethod
    def of(cls, cfg: ModelConfig) -> Act:
        if cfg.expert_act not in ("silu", "swiglu_clamp"):
            raise ValueError(f"unknown expert activation {cfg.expert_act!r}")
        return cls(cfg.expert_act, cfg.swiglu_alpha, cfg.swiglu_limit)

    def __call__(self, gate: Tensor, up: Tensor) -> Tensor:
        if self.kind == "silu":
            return F.silu(gate) * up
        gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


SILU = Act()


def expert_ffn(x: Tensor, w13: Tensor, w2: Tensor, b13: Tensor | None = None, b2: Tensor | None = None,
               act: Act = SILU) -> Tensor:
    """Gated FFN: down(act(gate x, up x)). x [T,H], w13 [2I,H] = cat(gate, up) rows, w2 [H,I],
    optional biases b13 [2I], b2 [H] -> [T,H]."""
    gate, up = F.linear(x, w13, b13).chunk(2, dim=-1)  # [T,I] each
    return F.linear(act(gate, up), w2, b2)


class DenseExperts:
    """All experts resident as plain tensors: {layer: (w13 [E,2I,H], w2 [E,H,I])}, and for families
    with expert biases {layer: (b13 [E,2I], b2 [E,H])}."""

    def __init__(self, weights: dict[int, tuple[Tensor, Tensor]], biases: dict[int, tuple[Tensor, Tensor]] | None = None,
                 act: Act = SILU):
        self.weights, self.biases, self.act = weights, biases or {}, act

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, dtype: torch.dtype | None = None) -> DenseExperts:
        cfg, weights, biases = ckpt.config, {}, {}
        for layer in cfg.sparse_layers:
            pairs = [ckpt.expert_weights(layer, e) for e in range(cfg.num_experts)]
            w13 = torch.stack([p[0] for p in pairs])  # [E,2I,H]
            w2 = torch.stack([p[1] for p in pairs])  # [E,H,I]
            weights[layer] = (w13.to(dtype or w13.dtype), w2.to(dtype or w2.dtype))
            if cfg.expert_bias:
                b = [ckpt.expert_biases(layer, e) for e in range(cfg.num_experts)]
                biases[layer] = (torch.stack([p[0] for p in b]), torch.stack([p[1] for p in b]))  # [E,2I], [E,H]
        return cls(weights, biases, Act.of(cfg))

    def experts(self, layer: int, x: Tensor, logits: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
        return routed_sum(x, ids, weights, *self.weights[layer], *self.biases.get(layer, (None, None)), self.act)


def routed_sum(x: Tensor, ids: Tensor, weights: Tensor, w13: Tensor, w2: Tensor, b13: Tensor | None = None,
               b2: Tensor | None = None, act: Act = SILU) -> Tensor:
    """sum_j weights[:, j] * FFN_{ids[:, j]}(x) over experts w13 [E,2I,H], w2 [E,H,I] (biases [E,2I], [E,H]):
    x [T,H], ids and weights [T,k] -> [T,H] in x.dtype. Differentiable (moefy distills through it)."""
    out = torch.zeros_like(x)  # [T,H]
    for e in ids.unique().tolist():  # only experts some token was routed to, ascending like HF
        tok, slot = (ids == e).nonzero(as_tuple=True)  # [n], [n]
        bias = (None, None) if b13 is None else (b13[e].to(x.dtype), b2[e].to(x.dtype))
        y = expert_ffn(x[tok], w13[e].to(x.dtype), w2[e].to(x.dtype), *bias, act=act)  # [n,H]
        out.index_add_(0, tok, (y * weights[tok, slot, None]).to(x.dtype))
    return out
