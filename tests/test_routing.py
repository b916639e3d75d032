"""Each routing rule in hobbit.runtime.routing against transformers' own router module on the same logits:
random logits, logits with ties, and group limits that bind."""
from __future__ import annotations

import pytest
import torch

from hobbit.runtime import routing

transformers = pytest.importorskip("transformers")
E = 16


def _logits(kind: str, seed: int, T: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(T, E, generator=g)  # [T,E]
    if kind == "ties":  # few distinct values: many equal scores, within and across groups
        x = torch.randint(-2, 3, (T, E), generator=g).float()
    return x


def _hf_router(cls_name: str, **cfg):
    """transformers' router with weight = I, so its logits are its input."""
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as v2
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as v3
    from transformers.models.glm4_moe import modeling_glm4_moe as glm

    family = {"DeepseekV2TopkRouter": (v2, "DeepseekV2Config"), "DeepseekV3TopkRouter": (v3, "DeepseekV3Config"),
              "Glm4MoeTopkRouter": (glm, "Glm4MoeConfig")}[cls_name]
    config = getattr(transformers, family[1])(hidden_size=E, num_attention_heads=4, n_routed_experts=E, **cfg)
    router = getattr(family[0], cls_name)(config)
    with torch.no_grad():
        router.weight.copy_(torch.eye(E))
    return router


def _same_choice(ids, weights, hf_ids, hf_weights):
    """Same expert set and per-expert weight per token; ours sorted by weight, descending."""
    assert torch.equal(ids.sort(-1).values, hf_ids.sort(-1).values)
    assert torch.equal(weights, hf_weights.gather(-1, (hf_ids[:, None, :] == ids[:, :, None]).int().argmax(-1)))
    assert (weights[:, :-1] >= weights[:, 1:]).all()


@pytest.mark.parametrize("kind", ["random", "ties"])
@pytest.mark.parametrize("method,n_group,topk_group", [("greedy", 1, 1), ("group_limited_greedy", 4, 2),
                                                       ("group_limited_greedy", 8, 1)])
def test_deepseek_v2_matches_transformers(kind, method, n_group, topk_group):
    hf = _hf_router("DeepseekV2TopkRouter", num_experts_per_tok=2, topk_method=method, n_group=n_group,
                    topk_group=topk_group, routed_scaling_factor=1.5)
    for seed in range(3):
        x = _logits(kind, seed)
        with torch.no_grad():
            _, hf_w, hf_ids = hf(x)
        ids, w = routing.deepseek_v2(x, 2, method, n_group, topk_group, 1.5)
        _same_choice(ids, w, hf_ids, hf_w)
        groups = [len(set((r // (E // n_group)).tolist())) for r in ids]  # every token within topk_group groups
        assert max(groups) <= topk_group


@pytest.mark.parametrize("router", ["DeepseekV3TopkRouter", "Glm4MoeTopkRouter"])
@pytest.mark.parametrize("kind", ["random", "ties"])
@pytest.mark.parametrize("norm,n_group,topk_group,k", [(True, 4, 2, 4), (False, 8, 3, 2), (True, 1, 1, 6)])
def test_sigmoid_group_matches_transformers(router, kind, norm, n_group, topk_group, k):
    hf = _hf_router(router, num_experts_per_tok=k, n_group=n_group, topk_group=topk_group,
                    norm_topk_prob=norm, routed_scaling_factor=2.5)
    bias = 0.1 * torch.randn(E, generator=torch.Generator().manual_seed(9))
    if kind == "ties":
        bias = bias.round(decimals=1)
    hf.e_score_correction_bias.copy_(bias)
    for seed in range(3):
        x = _logits(kind, seed)
        with torch.no_grad():
            _, hf_w, hf_ids = hf(x)
        ids, w = routing.sigmoid_group(x, bias, k, n_group, topk_group, norm, 2.5)
        _same_choice(ids, w, hf_ids, hf_w)
        groups = [len(set((r // (E // n_group)).tolist())) for r in ids]
        assert max(groups) <= topk_group


def test_bias_steers_choice_not_weights():
    """The correction bias picks experts; the weights are the unbiased sigmoid scores."""
    x = torch.zeros(1, E)
    bias = torch.zeros(E)
    bias[5] = 1.0
    ids, w = routing.sigmoid_group(x, bias, 1, 1, 1, False, 1.0)
    assert ids.tolist() == [[5]] and w.tolist() == [[0.5]]


def test_unknown_v2_method_is_an_error():
    with pytest.raises(ValueError, match="group_limited_greedy"):
        routing.deepseek_v2(torch.zeros(1, E), 2, "noaux_tc", 1, 1, 1.0)


@pytest.mark.parametrize("kind", ["random", "ties"])
@pytest.mark.parametrize("family", ["gpt_oss", "granitemoe"])
def test_topk_softmax_matches_transformers(kind, family):
    from transformers.models.gpt_oss import modeling_gpt_oss as oss
    from transformers.models.granitemoe import modeling_granitemoe as granite

    cfg = dict(hidden_size=E, num_attention_heads=4, num_local_experts=E, num_experts_per_tok=4)
    if family == "gpt_oss":
        hf = oss.GptOssTopKRouter(transformers.GptOssConfig(**cfg))
    else:
        hf = granite.GraniteMoeTopKRouter(transformers.GraniteMoeConfig(**cfg))
    with torch.no_grad():
        hf.weight.copy_(torch.eye(E))
        if family == "gpt_oss":
            hf.bias.zero_()
    for seed in range(3):
        x = _logits(kind, seed)
        with torch.no_grad():
            _, hf_w, hf_ids = hf(x)
        ids, w = routing.topk_softmax(x, 4)
        _same_choice(ids, w, hf_ids, hf_w.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["random", "ties", "negative"])
@pytest.mark.parametrize("eps", [0.0, 0.01, 0.3])
def test_sparsemixer_matches_transformers(kind, eps, dtype):
    """phimoe's router in eval mode (no jitter, the threshold only): same two experts, bit-identical weights,
    also on tied maxima (the first index wins, twice) and all-negative logits (the clamp in the factor)."""
    from transformers.models.phimoe import modeling_phimoe as phi

    hf = phi.PhimoeTopKRouter(transformers.PhimoeConfig(hidden_size=E, num_attention_heads=4, num_local_experts=E,
                                                         router_jitter_noise=eps)).eval().to(dtype)
    with torch.no_grad():
        hf.weight.copy_(torch.eye(E))
    for seed in range(3):
        x = _logits("ties" if kind == "ties" else "random", seed).to(dtype)
        if kind == "negative":
            x = -x.abs() - 0.5
        with torch.no_grad():
            _, hf_w, hf_ids = hf(x)
        ids, w = routing.sparsemixer(x, eps)
        _same_choice(ids, w, hf_ids, hf_w.float())
        assert (ids[:, 0] != ids[:, 1]).all()
        if kind == "ties":  # the first of tied maxima wins, as HF's max
            first = (x == x.max(-1, keepdim=True).values).int().argmax(-1)
            assert (hf_ids[:, 0] == first).all()
