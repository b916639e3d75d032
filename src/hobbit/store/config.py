"""ModelConfig: the one description of a model every other module reads, built from HF config.json."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# HF `architectures[0]` -> our family name.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "OlmoeForCausalLM": "olmoe",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "Glm4MoeForCausalLM": "glm4_moe",
    "GptOssForCausalLM": "gpt_oss",
    "GraniteMoeForCausalLM": "granitemoe",
    "PhimoeForCausalLM": "phimoe",
}
MLA_FAMILIES = ("deepseek_v2", "deepseek_v3")
# Values transformers uses when config.json leaves a field out.
DEFAULT_ROPE_THETA = {"llama": 1e4, "qwen2": 1e4, "mixtral": 1e6, "qwen2_moe": 1e4, "qwen3_moe": 1e4, "olmoe": 1e4,
                      "deepseek_v2": 1e4, "deepseek_v3": 1e4, "glm4_moe": 1e4, "gpt_oss": 15e4,
                      "granitemoe": 1e4, "phimoe": 1e6}
DEFAULT_RMS_EPS = {"llama": 1e-6, "qwen2": 1e-6, "mixtral": 1e-5, "qwen2_moe": 1e-6, "qwen3_moe": 1e-6, "olmoe": 1e-5,
                   "deepseek_v2": 1e-6, "deepseek_v3": 1e-6, "glm4_moe": 1e-5, "gpt_oss": 1e-5,
                   "granitemoe": 1e-6, "phimoe": 1e-5}
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


class UnsupportedArchitecture(ValueError):
    pass


@dataclass
class ModelConfig:
    arch: str  # 'llama' | 'qwen2' | 'mixtral' | 'qwen2_moe' | 'qwen3_moe' | 'olmoe' | 'deepseek_v2' | 'deepseek_v3'
    #            | 'glm4_moe' | 'gpt_oss' | 'granitemoe' | 'phimoe'
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP width (llama, and dense layers of MoE models)
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # {'rope_type': 'linear'|'dynamic'|'llama3'|'yarn', ...}; None = plain RoPE
    max_position_embeddings: int
    tie_word_embeddings: bool
    num_experts: int = 0  # 0 -> dense model
    top_k: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False  # renormalize the top-k weights to sum 1 (always True for mixtral)
    shared_expert_intermediate_size: int = 0  # qwen2_moe shared expert (sigmoid-gated); 0 = none
    qk_norm: str = "none"  # 'none' | 'head' (qwen3: over head_dim) | 'full' (olmoe: over the whole projection)
    sparse_layers: tuple[int, ...] = ()  # layer indices whose MLP is a MoE block
    attention_bias: bool = False  # bias on q/k/v (qwen2, qwen2_moe); o_proj never has one here
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None  # mixtral / qwen3_moe with use_sliding_window: keys within the last W
    rope_dim: int = 0  # rotated (leading) dims per head; 0 = head_dim (MLA: qk_rope_head_dim; glm4_moe: partial)
    # routing rule (routing.RULES): 'softmax' (top-k of softmax), 'deepseek_v2', 'sigmoid_group' (deepseek_v3)
    # glm4_moe routes as deepseek_v3; 'topk_softmax' (gpt_oss, granitemoe): softmax of the top-k logits
    routing: str = "softmax"
    topk_method: str = "greedy"  # deepseek_v2: 'greedy' | 'group_limited_greedy'
    n_group: int = 1  # expert groups for group-limited top-k
    topk_group: int = 1  # groups kept per token
    routed_scaling_factor: float = 1.0  # routed weights x this
    shared_experts_intermediate_size: int = 0  # deepseek/glm4_moe: ungated, HF `shared_experts`; 0 = none
    # MLA (deepseek): kv_lora_rank > 0 means latent attention; q_lora_rank 0 = plain q_proj
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False  # rotate (x0,x1),(x2,x3).. pairs (deepseek) instead of the two halves
    # gpt_oss: per-layer windows, attention sinks, biases everywhere, clamped SwiGLU experts
    layer_windows: tuple[int, ...] = ()  # per layer: its own sliding window, 0 = full attention; () = none
    attention_sinks: bool = False  # a learned per-head logit joins every softmax (and takes probability mass)
    o_proj_bias: bool = False
    router_bias: bool = False
    expert_bias: bool = False  # experts carry b13 [2I] (gate, up) and b2 [H]; stored in every blob, fp32
    expert_act: str = "silu"  # 'silu': silu(g)*u | 'swiglu_clamp': (clamp(u,+-L)+1) * g'*sigmoid(alpha*g'), g'=min(g,L)
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    # granitemoe scales: embeddings x, each residual branch x, attention softmax scale (0 = D^-0.5), logits /
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float = 0.0
    logits_scaling: float = 1.0
    # phimoe: LayerNorm (weight and bias, eps = rms_norm_eps) instead of RMSNorm, lm_head bias, and
    # sparsemixer's mask threshold (HF `router_jitter_noise`: at inference a threshold, not noise)
    norm: str = "rms"  # 'rms' | 'layernorm'
    lm_head_bias: bool = False
    router_jitter: float = 0.0

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a transformers config.json dict (legacy rope_scaling or v5 rope_parameters)."""
        arch = _family(d)
        n_layers = d["num_hidden_layers"]
        n_heads = d["num_attention_heads"]
        _reject(d, arch)
        common = dict(
            arch=arch,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            num_layers=n_layers,
            num_heads=n_heads,
            num_kv_heads=d.get("num_key_value_heads") or n_heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // n_heads,
            intermediate_size=d["intermediate_size"],
            rms_norm_eps=d.get("rms_norm_eps", DEFAULT_RMS_EPS[arch]),
            max_position_embeddings=d["max_position_embeddings"],
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids(d.get("eos_token_id")),
        )
        common["rope_theta"], common["rope_scaling"], partial = _rope(d, arch)
        if arch in (*MLA_FAMILIES, "glm4_moe"):
            return cls._deepseek_style(d, common, partial)
        if arch == "gpt_oss":  # every layer sparse; `intermediate_size` is the expert width
            windows = tuple(d["sliding_window"] if t == "sliding_attention" else 0
                            for t in d.get("layer_types") or ["sliding_attention", "full_attention"] * n_layers)
            return cls(**common, num_experts=d["num_local_experts"], top_k=d["num_experts_per_tok"],
                       moe_intermediate_size=d["intermediate_size"], sparse_layers=tuple(range(n_layers)),
                       attention_bias=bool(d.get("attention_bias", True)), o_proj_bias=bool(d.get("attention_bias", True)),
                       routing="topk_softmax", layer_windows=windows[:n_layers], attention_sinks=True,
                       router_bias=True, expert_bias=True, expert_act="swiglu_clamp",
                       swiglu_alpha=float(d.get("swiglu_alpha", 1.702)), swiglu_limit=float(d.get("swiglu_limit", 7.0)))
        if arch == "granitemoe":  # every layer sparse, expert width `intermediate_size`, muP-style multipliers
            return cls(**common, num_experts=d["num_local_experts"], top_k=d["num_experts_per_tok"],
                       moe_intermediate_size=d["intermediate_size"], sparse_layers=tuple(range(n_layers)),
                       attention_bias=bool(d.get("attention_bias", False)),
                       o_proj_bias=bool(d.get("attention_bias", False)), routing="topk_softmax",
                       embedding_multiplier=float(d.get("embedding_multiplier", 1.0)),
                       residual_multiplier=float(d.get("residual_multiplier", 1.0)),
                       attention_multiplier=float(d.get("attention_multiplier", 1.0)),
                       logits_scaling=float(d.get("logits_scaling", 1.0)))
        if arch == "phimoe":  # every layer sparse, expert width `intermediate_size`; biases as the config says
            return cls(**common, num_experts=d["num_local_experts"], top_k=d["num_experts_per_tok"],
                       moe_intermediate_size=d["intermediate_size"], sparse_layers=tuple(range(n_layers)),
                       attention_bias=bool(d.get("attention_bias", False)),
                       o_proj_bias=bool(d.get("attention_bias", False)), routing="sparsemixer",
                       sliding_window=d.get("sliding_window"), norm="layernorm",
                       lm_head_bias=bool(d.get("lm_head_bias", False)),
                       router_jitter=float(d.get("router_jitter_noise", 0.01)))
        if arch in ("llama", "qwen2"):  # dense; qwen2 always has q/k/v bias
            return cls(**common, attention_bias=arch == "qwen2")
        n_exp = d["num_local_experts"] if "num_local_experts" in d else d["num_experts"]  # v5 writes either
        moe = dict(num_experts=n_exp, top_k=d["num_experts_per_tok"])
        if arch in ("mixtral", "olmoe"):  # every layer sparse; expert width is `intermediate_size`
            return cls(
                **common,
                **moe,
                moe_intermediate_size=d["intermediate_size"],
                norm_topk_prob=arch == "mixtral" or bool(d.get("norm_topk_prob", False)),
                qk_norm="full" if arch == "olmoe" else "none",
                sparse_layers=tuple(range(n_layers)),
                sliding_window=d.get("sliding_window") if arch == "mixtral" else None,
            )
        # qwen2_moe / qwen3_moe: layer i is sparse unless listed in mlp_only_layers or off the step
        step, dense_only = d.get("decoder_sparse_step", 1), set(d.get("mlp_only_layers") or ())
        sparse = tuple(i for i in range(n_layers) if i not in dense_only and (i + 1) % step == 0)
        return cls(
            **common,
            **moe,
            moe_intermediate_size=d["moe_intermediate_size"],
            norm_topk_prob=bool(d.get("norm_topk_prob", False)),
            shared_expert_intermediate_size=d.get("shared_expert_intermediate_size", 0) if arch == "qwen2_moe" else 0,
            qk_norm="head" if arch == "qwen3_moe" else "none",
            sparse_layers=sparse if n_exp > 0 else (),
            attention_bias=bool(d.get("qkv_bias", True)) if arch == "qwen2_moe" else False,
            sliding_window=d.get("sliding_window") if d.get("use_sliding_window") else None,
        )

    @classmethod
    def _deepseek_style(cls, d: dict[str, Any], common: dict[str, Any], partial: float) -> ModelConfig:
        """DeepSeek-V2/V3 (MLA) and GLM-4-MoE (GQA, partial RoPE, optional q/k norm): dense layers before
        `first_k_dense_replace`, ungated shared experts; V3 and GLM route alike."""
        arch, n_exp, moe_i = common["arch"], d["n_routed_experts"], d["moe_intermediate_size"]
        v3 = arch != "deepseek_v2"
        if arch == "glm4_moe":
            attention = dict(qk_norm="head" if d.get("use_qk_norm") else "none",
                             rope_dim=int(common["head_dim"] * partial))
        else:
            rope = d["qk_rope_head_dim"]
            common = {**common, "num_kv_heads": common["num_heads"], "head_dim": d["qk_nope_head_dim"] + rope}
            attention = dict(
                rope_dim=rope, q_lora_rank=d.get("q_lora_rank") or 0, kv_lora_rank=d["kv_lora_rank"],
                qk_nope_head_dim=d["qk_nope_head_dim"], v_head_dim=d["v_head_dim"],
                rope_interleave=arch == "deepseek_v2" or bool(d.get("rope_interleave", True)))
        return cls(
            **common,
            **attention,
            num_experts=n_exp,
            top_k=d["num_experts_per_tok"],
            moe_intermediate_size=moe_i,
            norm_topk_prob=v3 and bool(d.get("norm_topk_prob", True)),  # transformers' V2 never renormalizes
            sparse_layers=tuple(range(d.get("first_k_dense_replace") or 0, common["num_layers"])) if n_exp else (),
            attention_bias=bool(d.get("attention_bias", False)),
            routing="sigmoid_group" if v3 else "deepseek_v2",
            topk_method="greedy" if v3 else d.get("topk_method") or "greedy",  # V3 ignores it (e.g. 'noaux_tc')
            n_group=d.get("n_group") or 1,
            topk_group=d.get("topk_group") or 1,
            routed_scaling_factor=float(d.get("routed_scaling_factor", 2.5 if arch == "deepseek_v3" else 1.0)),
            shared_experts_intermediate_size=moe_i * (d.get("n_shared_experts") or 0),
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["sparse_layers"] = list(self.sparse_layers)
        d["eos_token_ids"] = list(self.eos_token_ids)
        d["layer_windows"] = list(self.layer_windows)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}")
        d = dict(d)
        d["sparse_layers"] = tuple(d.get("sparse_layers", ()))
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        d["layer_windows"] = tuple(d.get("layer_windows", ()))
        return cls(**d)


def eos_ids(v: int | list[int] | None) -> tuple[int, ...]:
    """HF eos_token_id (int, list or None) -> tuple."""
    if v is None:
        return ()
    return (int(v),) if isinstance(v, int) else tuple(int(x) for x in v)


def _family(d: dict[str, Any]) -> str:
    archs = d.get("architectures") or []
    for a in archs:
        if a in ARCHITECTURES:
            return ARCHITECTURES[a]
    if not archs and d.get("model_type") in ARCHITECTURES.values():
        return d["model_type"]
    got = archs or d.get("model_type")
    raise UnsupportedArchitecture(f"unsupported architecture {got!r}; supported: {', '.join(ARCHITECTURES)}")


def _reject(d: dict[str, Any], arch: str) -> None:
    """Fail loud on config features our model does not implement, instead of computing wrong logits."""
    problems = []
    if d.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={d['hidden_act']!r}")
    if arch not in ("qwen2", "qwen2_moe", "glm4_moe", "gpt_oss", "granitemoe", "phimoe", *MLA_FAMILIES) \
            and d.get("attention_bias"):
        problems.append("attention_bias=True")
    if d.get("mlp_bias"):
        problems.append("mlp_bias=True")
    if d.get("clip_qkv") is not None:
        problems.append(f"clip_qkv={d['clip_qkv']}")
    if arch in ("qwen2", "qwen2_moe") and d.get("use_sliding_window"):
        problems.append("use_sliding_window=True (per-layer windows)")
    if arch in MLA_FAMILIES and (d.get("moe_layer_freq") or 1) != 1:
        problems.append(f"moe_layer_freq={d['moe_layer_freq']} (transformers makes every later layer sparse)")
    if arch == "deepseek_v2" and (d.get("topk_method") or "greedy") not in ("greedy", "group_limited_greedy"):
        problems.append(f"topk_method={d['topk_method']!r}")
    kind = (d.get("quantization_config") or {}).get("quant_method")
    if d.get("quantization_config") and not (arch == "gpt_oss" and kind == "mxfp4"):  # gpt-oss MXFP4 experts are read
        problems.append(f"quantization_config ({kind or '?'}): dequantize the checkpoint to bf16 first")
    if arch == "phimoe" and d.get("num_experts_per_tok", 2) != 2:  # sparsemixer always picks two
        problems.append(f"num_experts_per_tok={d['num_experts_per_tok']} (transformers' sparsemixer routes top-2)")
    if (d.get("pretraining_tp") or 1) != 1:
        problems.append(f"pretraining_tp={d['pretraining_tp']}")
    if problems:
        raise UnsupportedArchitecture(f"{arch}: unsupported config options: {', '.join(problems)}")


def _rope(d: dict[str, Any], arch: str) -> tuple[float, dict | None, float]:
    """(theta, scaling dict or None, partial rotary factor) from legacy `rope_theta`+`rope_scaling`
    or v5 `rope_parameters`."""
    # transformers gives a legacy rope_scaling priority over rope_parameters
    params = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
    theta = params.pop("rope_theta", None) or d.get("rope_theta") or DEFAULT_ROPE_THETA[arch]
    kind = params.pop("rope_type", None) or params.get("type") or "default"
    params.pop("type", None)
    kind = "longrope" if kind == "su" else kind  # Phi-3's first name for it
    if kind not in ROPE_TYPES:
        raise UnsupportedArchitecture(f"rope_type {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    default_partial = 0.5 if arch == "glm4_moe" else 1.0  # transformers' Glm4MoeConfig default
    partial = params.pop("partial_rotary_factor", None) or d.get("partial_rotary_factor") or default_partial
    if partial != 1.0 and arch != "glm4_moe":
        raise UnsupportedArchitecture(f"partial_rotary_factor={partial} is not supported for {arch}")
    if kind == "default":
        return float(theta), None, partial
    if kind in ("llama3", "yarn", "longrope"):
        params.setdefault("original_max_position_embeddings", d["max_position_embeddings"])
    if kind == "longrope":
        if d.get("original_max_position_embeddings"):  # Phi-3's top-level field wins, as in transformers
            params["original_max_position_embeddings"] = d["original_max_position_embeddings"]
        missing = [k for k in ("short_factor", "long_factor") if k not in params]
        if arch != "phimoe" or missing:
            raise UnsupportedArchitecture(f"longrope for {arch}" + (f" without {missing}" if missing else "")
                                          + " is not supported (phimoe only)")
    return float(theta), {"rope_type": kind, **params}, partial
