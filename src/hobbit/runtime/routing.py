"""Routing rules: one pure function per rule, each choosing exactly the experts and weights
transformers' router of that family chooses, plus the Router module that holds the weights of the
families routed beyond plain softmax-top-k under their HF names.

T = tokens, H = hidden, E = experts, G = expert groups, k = experts per token.
Every rule returns (ids [T,k] int64, weights [T,k] fp32) sorted by weight, descending.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from hobbit.store.config import ModelConfig

RULES = ("softmax", "deepseek_v2", "sigmoid_group", "topk_softmax", "sparsemixer")  # ModelConfig.routing
FP32_BUFFERS = ("e_score_correction_bias",)  # held in fp32 whatever the activation dtype, as HF does


def softmax_topk(logits: Tensor, top_k: int, norm: bool) -> tuple[Tensor, Tensor]:
    """qwen2_moe / qwen3_moe / olmoe / mixtral (and moefy's routers): softmax in fp32, top-k, divided by
    their sum if `norm` (norm_topk_prob). logits [T,E] in any float dtype."""
    weights, ids = torch.topk(F.softmax(logits, dim=-1, dtype=torch.float32), top_k, dim=-1)  # [T,k], descending
    return ids, (weights / weights.sum(dim=-1, keepdim=True) if norm else weights)


def _by_weight(ids: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Reorder the k slots by weight, descending (HF's sorted=False top-k leaves them unordered)."""
    weights, order = weights.sort(dim=-1, descending=True, stable=True)  # [T,k]
    return ids.gather(-1, order), weights


def _group_mask(scores: Tensor, group_score: Tensor, topk_group: int) -> Tensor:
    """[T,E] bool, True for experts in the `topk_group` best groups; group_score [T,G]."""
    T, G = group_score.shape
    keep = torch.zeros_like(group_score)
    keep.scatter_(1, torch.topk(group_score, k=topk_group, dim=-1, sorted=False)[1], 1)  # [T,G]
    return keep.bool()[:, :, None].expand(T, G, scores.shape[-1] // G).reshape(T, -1)  # [T,E]


def deepseek_v2(logits: Tensor, top_k: int, method: str, n_group: int, topk_group: int,
                scale: float) -> tuple[Tensor, Tensor]:
    """softmax; 'greedy' top-k, or 'group_limited_greedy': keep the `topk_group` groups with the best
    single expert, zero the rest, then top-k; weights (not renormalized) x scale. logits [T,E] fp32."""
    scores = logits.float().softmax(dim=-1)  # [T,E]
    if method == "group_limited_greedy":
        T, E = scores.shape
        best = scores.view(T, n_group, E // n_group).max(dim=-1).values  # [T,G]
        scores = scores.masked_fill(~_group_mask(scores, best, topk_group), 0.0)
    elif method != "greedy":
        raise ValueError(f"deepseek_v2 topk_method {method!r}: transformers knows 'greedy' and 'group_limited_greedy'")
    weights, ids = torch.topk(scores, k=top_k, dim=-1, sorted=False)  # [T,k]
    return _by_weight(ids, weights * scale)


def sigmoid_group(logits: Tensor, bias: Tensor, top_k: int, n_group: int, topk_group: int, norm: bool,
                  scale: float) -> tuple[Tensor, Tensor]:
    """DeepSeek-V3 / GLM-4-MoE: sigmoid scores; choose on scores + bias [E] within the `topk_group`
    groups whose two best biased scores sum highest; weights are the unbiased scores, / their sum if
    `norm`, x scale. logits [T,E] fp32."""
    scores = logits.float().sigmoid()  # [T,E]
    choice = scores + bias  # [T,E]
    T, E = choice.shape
    best_two = choice.view(T, n_group, E // n_group).topk(2, dim=-1)[0].sum(dim=-1)  # [T,G]
    choice = choice.masked_fill(~_group_mask(choice, best_two, topk_group), float("-inf"))
    ids = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]  # [T,k]
    weights = scores.gather(1, ids)  # [T,k]
    if norm:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return _by_weight(ids, weights * scale)


def topk_softmax(logits: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """gpt_oss / granitemoe: top-k of the logits, then softmax over those k, rounded to the logits' dtype
    (granitemoe's fp32 softmax cast back to the activation dtype gives the same). logits [T,E]."""
    top, ids = torch.topk(logits, top_k, dim=-1)  # [T,k], sorted descending
    return ids, F.softmax(top, dim=-1, dtype=top.dtype).float()


def sparsemixer(logits: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """phimoe at inference (transformers' `sparsemixer`, training=False): always two experts. The first is
    the argmax; its weight is its softmax over the experts whose logit lies within relative distance 2*eps
    of the max ((max - s) / max(|s|, max) <= 2 eps). The second is the argmax of the rest, weighted by its
    softmax over the rest within 2 eps of it. Same ops as transformers, in the logits' dtype, so the
    weights are bit-identical (then fp32). logits [T,E]."""
    weights, ids, scores = [], [], logits
    for _ in range(2):
        top, idx = scores.max(dim=-1, keepdim=True)  # [T,1]: the first of tied maxima, as HF
        factor = logits.abs().clamp(min=top)  # HF divides by |logits| (not the masked scores) both times
        gates = scores.masked_fill((top - logits) / factor > 2 * eps, float("-inf")).softmax(dim=-1)
        weights.append(gates.gather(-1, idx))
        ids.append(idx)
        scores = torch.scatter(logits, -1, idx, float("-inf"))  # the second pick never repeats the first
    return _by_weight(torch.cat(ids, dim=-1), torch.cat(weights, dim=-1).float())


class Router(nn.Module):
    """`mlp.gate` of the families routed by a rule here: weight [E,H] (+ e_score_correction_bias [E],
    or bias [E] for gpt_oss; HF `mlp.router` / granitemoe `block_sparse_moe.router.layer`). DeepSeek/GLM
    logits are computed in fp32 from the weight upcast; gpt_oss / granitemoe / phimoe in the activation dtype,
    as transformers' routers do."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.routing not in RULES[1:]:
            raise ValueError(f"Router: routing {cfg.routing!r} is not one of {RULES[1:]}")
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        if cfg.routing == "sigmoid_group":
            self.register_buffer("e_score_correction_bias", torch.empty(cfg.num_experts, dtype=torch.float32))
        if cfg.router_bias:
            self.bias = nn.Parameter(torch.empty(cfg.num_experts))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [T,H] -> logits [T,E] fp32, ids [T,k] (weight desc), weights [T,k] fp32."""
        c = self.cfg
        if c.routing in ("topk_softmax", "sparsemixer"):
            logits = F.linear(x, self.weight, getattr(self, "bias", None))  # [T,E] in x.dtype
            if c.routing == "sparsemixer":
                return (logits.float(), *sparsemixer(logits, c.router_jitter))
            return (logits.float(), *topk_softmax(logits, c.top_k))
        logits = F.linear(x.float(), self.weight.float())  # [T,E]
        if c.routing == "deepseek_v2":
            ids, weights = deepseek_v2(logits, c.top_k, c.topk_method, c.n_group, c.topk_group,
                                       c.routed_scaling_factor)
        else:
            ids, weights = sigmoid_group(logits, self.e_score_correction_bias, c.top_k, c.n_group, c.topk_group,
                                         c.norm_topk_prob, c.routed_scaling_factor)
        return logits, ids, weights
