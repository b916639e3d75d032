"""llama.cpp architectures in HF terms, as data: tensor names per architecture, which GGUF metadata
keys make which HF config fields, and the few steps a name map cannot say (HF's fused expert tensors
rebuilt from llama.cpp's split ones, gpt-oss's MXFP4 experts handed on as their own codes, DeepSeek's
kv_b_proj rebuilt from its per-head halves).

Read by `gguf.py`; what llama.cpp's `convert_hf_to_gguf.py` writes for each architecture is the
reference (tests/test_gguf_families.py writes tiny GGUFs the same way).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType, ReaderTensor

from hobbit.store import mxfp4

TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


@dataclass(frozen=True)
class GGUFArch:
    """How one llama.cpp architecture names things in HF terms."""

    dense: str                  # HF architectures[0] without experts
    moe: str | None             # ... with experts (None: this arch has none)
    block: dict[str, str]       # per-layer tensors beyond BLOCK_NAMES: GGUF part -> HF module
    experts: str                # HF module of one expert, {e} = its index (stacked: of all experts)
    expert_proj: dict[str, str]  # stacked GGUF expert tensor -> HF projection name
    permute_qk: bool            # llama.cpp interleaved Q/K rows for its rotary kernel (NORM rope)
    stacked: bool = False       # experts stay stacked [E, ...] and `finalize` builds HF's fused tensors
    skip: tuple[str, ...] = ()  # GGUF tensors that are config, not weights (phimoe's rope factors)
    bare: tuple[str, ...] = ()  # parts whose HF name has no .weight (gpt-oss `self_attn.sinks`)
    joined: tuple[str, ...] = ()  # parts `finalize` joins into one HF tensor (deepseek2's attn_k_b + attn_v_b)

    @property
    def held(self) -> tuple[str, ...]:
        """GGUF parts held back for `finalize`: the joined ones and stacked experts."""
        return self.joined + (tuple(self.expert_proj) if self.stacked else ())


_QWEN2MOE_BLOCK = {"ffn_gate_inp": "mlp.gate", "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
                   "ffn_gate_shexp": "mlp.shared_expert.gate_proj", "ffn_up_shexp": "mlp.shared_expert.up_proj",
                   "ffn_down_shexp": "mlp.shared_expert.down_proj"}
_SPLIT_EXPERTS = {"ffn_gate_exps": "gate", "ffn_up_exps": "up", "ffn_down_exps": "down"}
_QWEN_EXPERTS = {"ffn_gate_exps": "gate_proj", "ffn_down_exps": "down_proj", "ffn_up_exps": "up_proj"}
# DeepSeek-V3-style MoE block (glm4moe, deepseek2): router + correction bias, ungated shared experts
_V3_MOE_BLOCK = {"ffn_gate_inp": "mlp.gate", "exp_probs_b": "mlp.gate.e_score_correction_bias",
                 "ffn_gate_shexp": "mlp.shared_experts.gate_proj", "ffn_up_shexp": "mlp.shared_experts.up_proj",
                 "ffn_down_shexp": "mlp.shared_experts.down_proj"}
# MLA: q_proj unfactored (V2-Lite) or q_a/q_b LoRA; kv_b_proj whole (older GGUFs) or split per head into
# k_b (transposed) and v_b, which keep the converter's own intermediate names until `finalize` joins them
_MLA_BLOCK = {"attn_q_a": "self_attn.q_a_proj", "attn_q_a_norm": "self_attn.q_a_layernorm",
              "attn_q_b": "self_attn.q_b_proj", "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
              "attn_kv_a_norm": "self_attn.kv_a_layernorm", "attn_kv_b": "self_attn.kv_b_proj",
              "attn_k_b": "self_attn.k_b_proj", "attn_v_b": "self_attn.v_b_proj"}
ARCHS: dict[str, GGUFArch] = {
    "llama": GGUFArch("LlamaForCausalLM", "MixtralForCausalLM", {"ffn_gate_inp": "block_sparse_moe.gate"},
                      "block_sparse_moe.experts.{e}",
                      {"ffn_gate_exps": "w1", "ffn_down_exps": "w2", "ffn_up_exps": "w3"}, permute_qk=True),
    "qwen2": GGUFArch("Qwen2ForCausalLM", None, {}, "", {}, permute_qk=False),
    "qwen2moe": GGUFArch("Qwen2MoeForCausalLM", "Qwen2MoeForCausalLM", _QWEN2MOE_BLOCK, "mlp.experts.{e}",
                         _QWEN_EXPERTS, permute_qk=False),
    # Phi3MiniModel's writer: no Q/K permutation (NEOX rope), LayerNorm weight + bias, output bias; LongRoPE
    # factors as tensors rope_factors_long / _short
    "phimoe": GGUFArch("PhimoeForCausalLM", "PhimoeForCausalLM", {"ffn_gate_inp": "block_sparse_moe.gate"},
                       "block_sparse_moe.experts.{e}", {"ffn_gate_exps": "w1", "ffn_down_exps": "w2", "ffn_up_exps": "w3"},
                       permute_qk=False, skip=("rope_factors_long", "rope_factors_short")),
    # GraniteModel is a LlamaModel (Q/K permuted); input_linear [E,2I,H] was split into gate and up
    "granitemoe": GGUFArch("GraniteMoeForCausalLM", "GraniteMoeForCausalLM",
                           {"ffn_gate_inp": "block_sparse_moe.router.layer"}, "block_sparse_moe", _SPLIT_EXPERTS,
                           permute_qk=True, stacked=True),
    # GptOssModel: gate_up de-interleaved into gate and up (weights, MXFP4 repacked, and biases), sinks
    "gpt-oss": GGUFArch("GptOssForCausalLM", "GptOssForCausalLM",
                        {"ffn_gate_inp": "mlp.router", "attn_sinks": "self_attn.sinks",
                         "post_attention_norm": "post_attention_layernorm"}, "mlp.experts", _SPLIT_EXPERTS,
                        permute_qk=False, stacked=True, bare=("attn_sinks",)),
    # Glm4MoeModel: no Q/K permutation (NEOX), per-expert tensors stacked, shared experts as *_shexp, the
    # sigmoid router's correction bias as exp_probs_b, multi-token-prediction layers appended (skipped)
    "glm4moe": GGUFArch("Glm4MoeForCausalLM", "Glm4MoeForCausalLM",
                        {**_V3_MOE_BLOCK, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
                         "post_attention_norm": "post_attention_layernorm"}, "mlp.experts.{e}", _QWEN_EXPERTS,
                        permute_qk=False, bare=("exp_probs_b",)),
    # DeepseekV2Model (V2, V2-Lite, V3, R1, Kimi-K2): no Q/K permutation (NORM rope on adjacent pairs, which
    # is DeepSeek's interleaved rope), MLA tensors, per-expert tensors stacked; `finalize` rebuilds kv_b_proj
    "deepseek2": GGUFArch("DeepseekV2ForCausalLM", "DeepseekV2ForCausalLM", {**_V3_MOE_BLOCK, **_MLA_BLOCK},
                          "mlp.experts.{e}", _QWEN_EXPERTS, permute_qk=False, bare=("exp_probs_b",),
                          joined=("attn_k_b", "attn_v_b")),
}
MODEL_TYPES = {"LlamaForCausalLM": "llama", "MixtralForCausalLM": "mixtral", "Qwen2ForCausalLM": "qwen2",
               "Qwen2MoeForCausalLM": "qwen2_moe", "PhimoeForCausalLM": "phimoe",
               "GraniteMoeForCausalLM": "granitemoe", "GptOssForCausalLM": "gpt_oss", "Glm4MoeForCausalLM": "glm4_moe",
               "DeepseekV2ForCausalLM": "deepseek_v2", "DeepseekV3ForCausalLM": "deepseek_v3"}


def rope_scaling(meta: dict, arch: str, unsupported: type[Exception]) -> dict | None:
    """HF rope_scaling from `{arch}.rope.scaling.*` (phimoe's LongRoPE comes from tensors: `config`)."""
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    factor = float(meta[f"{arch}.rope.scaling.factor"])
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn" and arch == "gpt-oss":  # HF gpt-oss: untruncated correction range (GGUF does not say)
        return {"rope_type": "yarn", "factor": factor, "truncate": False,
                "original_max_position_embeddings": meta[f"{arch}.rope.scaling.original_context_length"],
                "beta_fast": float(meta.get(f"{arch}.rope.scaling.yarn_beta_fast", 32.0)),
                "beta_slow": float(meta.get(f"{arch}.rope.scaling.yarn_beta_slow", 1.0))}
    if kind == "yarn" and arch == "deepseek2":
        return _deepseek2_yarn(meta, factor, unsupported)
    raise unsupported(f"GGUF rope scaling type {kind!r} for {arch!r} is not supported "
                      f"(supported: none, linear; yarn for gpt-oss and deepseek2)")


def _deepseek2_yarn(meta: dict, factor: float, unsupported: type[Exception]) -> dict:
    """HF DeepSeek YaRN: llama.cpp reads mscale_all_dim from yarn_log_multiplier (written x 0.1) and takes
    mscale equal to it, so cos/sin are unscaled and the softmax scale gains mscale_all_dim's factor squared."""
    g = lambda key, default=None: meta.get(f"deepseek2.rope.scaling.{key}", default)  # noqa: E731
    if g("yarn_log_multiplier") is None:  # llama.cpp then scales q_pe/k_pe too: not transformers' DeepSeek
        raise unsupported("deepseek2 YaRN without deepseek2.rope.scaling.yarn_log_multiplier (the HF config's "
                          "mscale_all_dim x 0.1) is not supported; re-convert with a current convert_hf_to_gguf.py")
    m = float(g("yarn_log_multiplier")) / 0.1
    return {"rope_type": "yarn", "factor": factor, "mscale": m, "mscale_all_dim": m,
            "original_max_position_embeddings": g("original_context_length", meta["deepseek2.context_length"]),
            "beta_fast": float(g("yarn_beta_fast", 32.0)), "beta_slow": float(g("yarn_beta_slow", 1.0))}


def config(arch: str, meta: dict, shapes: dict[str, tuple[int, ...]], raw: dict[str, ReaderTensor],
           config: dict, unsupported: type[Exception] = ValueError) -> None:
    """In place: the HF config fields of phimoe / granitemoe / gpt-oss / glm4moe / deepseek2 beyond the common ones."""
    g = lambda key, default=None: meta.get(f"{arch}.{key}", default)  # noqa: E731
    if arch == "glm4moe":
        return _glm4moe(g, shapes, config, unsupported)
    if arch == "deepseek2":
        return _deepseek2(g, shapes, config, unsupported)
    experts = dict(num_local_experts=g("expert_count"), num_experts_per_tok=g("expert_used_count"))
    if arch == "phimoe":  # GGUF does not carry the sparsemixer threshold: Phi-3.5-MoE's own 0.01
        config.update(experts, intermediate_size=shapes[_first(shapes, ".experts.0.w1.weight")][0],
                      lm_head_bias="lm_head.bias" in shapes, router_jitter_noise=0.01,
                      sliding_window=g("attention.sliding_window") or None)
        if "rope_factors_long.weight" in raw:  # LongRoPE; llama.cpp's attn_factor is the mscale it applies
            orig, mscale = g("rope.scaling.original_context_length"), float(g("rope.scaling.attn_factor", 1.0))
            factors = {k: np.asarray(raw[f"rope_factors_{k}.weight"].data, np.float32).tolist() for k in ("long", "short")}
            config.update(original_max_position_embeddings=orig, rope_scaling={
                "rope_type": "longrope", "long_factor": factors["long"], "short_factor": factors["short"],
                "long_mscale": mscale, "short_mscale": mscale, "original_max_position_embeddings": orig})
    elif arch == "granitemoe":  # llama.cpp: no attention.scale means 1/sqrt(head_dim)
        config.update(experts, intermediate_size=shapes[_first(shapes, ".block_sparse_moe.gate.weight")][1],
                      attention_multiplier=float(g("attention.scale", config["head_dim"] ** -0.5)),
                      embedding_multiplier=float(g("embedding_scale", 1.0)),
                      residual_multiplier=float(g("residual_scale", 1.0)), logits_scaling=float(g("logit_scale", 1.0)))
    elif arch == "gpt-oss":  # llama.cpp: sliding window on even layers, full on odd ones
        n = config["num_hidden_layers"]
        limit = g("swiglu_clamp_exp")  # newer llama.cpp writes it (per layer); gpt-oss GGUFs rely on 7.0
        if limit is not None:
            config["swiglu_limit"] = float(limit[0] if isinstance(limit, list) else limit)
        config.update(experts, intermediate_size=g("expert_feed_forward_length"), attention_bias=True,
                      sliding_window=g("attention.sliding_window"),
                      layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)])
        if raw["blk.0.ffn_gate_exps.weight"].tensor_type == GGMLQuantizationType.MXFP4:
            config["quantization_config"] = {"quant_method": "mxfp4"}


def _glm4moe(g, shapes: dict, config: dict, unsupported: type[Exception]) -> None:
    if g("expert_gating_func", 2) != 2:  # llama.cpp: 1 softmax, 2 sigmoid
        raise unsupported(f"glm4moe with expert_gating_func={g('expert_gating_func')} (GLM routes by sigmoid)")
    n = config["num_hidden_layers"] - (g("nextn_predict_layers") or 0)  # MTP layers are appended: not run
    dense = g("leading_dense_block_count") or 0
    config.update(num_hidden_layers=n, n_routed_experts=g("expert_count"), num_experts_per_tok=g("expert_used_count"),
                  moe_intermediate_size=g("expert_feed_forward_length"), n_shared_experts=g("expert_shared_count") or 0,
                  first_k_dense_replace=dense, routed_scaling_factor=float(g("expert_weights_scale", 1.0)),
                  norm_topk_prob=bool(g("expert_weights_norm", False)), n_group=g("expert_group_count") or 1,
                  topk_group=g("expert_group_used_count") or 1, num_nextn_predict_layers=0,
                  use_qk_norm=f"model.layers.{dense}.self_attn.q_norm.weight" in shapes,
                  partial_rotary_factor=g("rope.dimension_count") / config["head_dim"])
    config.pop("num_experts", None)


def _deepseek2(g, shapes: dict, config: dict, unsupported: type[Exception]) -> None:
    """DeepseekV2ForCausalLM for softmax routing, DeepseekV3ForCausalLM for sigmoid, from the keys llama.cpp's
    deepseek2 loader reads. Routing is what the file says, read as llama.cpp reads it: no group keys means one
    group (greedy top-k over all experts; for V3 / R1 not the HF config's groups). One deliberate difference:
    softmax (V2) groups are chosen by their best expert, as transformers' V2 `group_limited_greedy` does;
    llama.cpp scores every arch's groups by their best two, so on a grouped V2 file its choices can differ."""
    def need(key: str):
        if g(key) is None:
            raise unsupported(f"deepseek2 GGUF lacks the metadata key deepseek2.{key}, which llama.cpp's deepseek2 "
                              f"loader requires; re-convert with a current convert_hf_to_gguf.py")
        return g(key)

    has = lambda part: any(part in name for name in shapes)  # noqa: E731
    n_head = config["num_attention_heads"]
    if g("expert_count") is None:
        raise unsupported("deepseek2 without experts (a dense MLA model) is not supported")
    gating = g("expert_gating_func") or 1  # llama.cpp: no key means softmax (DeepSeek-V2 / V2.5 GGUFs)
    if gating not in (1, 2):
        raise unsupported(f"deepseek2 expert_gating_func={gating} is not supported (1 softmax: V2, 2 sigmoid: V3)")
    v3, norm = gating == 2, bool(g("expert_weights_norm", False))
    if has(".e_score_correction_bias") != v3:
        raise unsupported("deepseek2 GGUF with " + ("sigmoid routing but no exp_probs_b" if v3 else
                          "exp_probs_b but softmax routing (no deepseek2.expert_gating_func=2)") +
                          ": transformers' DeepSeek-V3 routes by sigmoid with that bias, V2 by softmax without it")
    if norm and not v3:
        raise unsupported("deepseek2 softmax routing with expert_weights_norm=true: transformers' DeepSeek-V2 "
                          "never renormalizes")
    groups = g("expert_group_count") or 1
    used = need("expert_group_used_count") if groups > 1 else 1
    mla = g("attention.key_length_mla") is not None  # llama.cpp's is_mla: kv_b split into k_b / v_b
    if has(".k_b_proj.") != mla or has(".v_b_proj.") != mla or has(".kv_b_proj.") == mla:
        raise unsupported("deepseek2 GGUF must hold attn_kv_b (without attention.key_length_mla) or attn_k_b + "
                          "attn_v_b (with attention.key_length_mla / value_length_mla), as llama.cpp loads them")
    head_k = need("attention.key_length_mla") if mla else g("attention.key_length", config["hidden_size"] // n_head)
    head_v = need("attention.value_length_mla") if mla else g("attention.value_length", config["hidden_size"] // n_head)
    if float(g("rope.scaling.attn_factor", 1.0)) != 1.0 or g("attention.temperature_scale"):
        raise unsupported("deepseek2 rope.scaling.attn_factor / attention.temperature_scale are not supported")
    rope, ff = need("rope.dimension_count"), need("expert_feed_forward_length")
    config.update(
        architectures=["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
        model_type="deepseek_v3" if v3 else "deepseek_v2",
        num_hidden_layers=config["num_hidden_layers"] - (g("nextn_predict_layers") or 0),  # MTP appended: not run
        num_key_value_heads=n_head, head_dim=rope, rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        n_routed_experts=g("expert_count"), num_experts_per_tok=need("expert_used_count"),
        moe_intermediate_size=ff[0] if isinstance(ff, list) else ff,  # llama.cpp: layer 0's width for all
        n_shared_experts=need("expert_shared_count"), first_k_dense_replace=g("leading_dense_block_count") or 0,
        routed_scaling_factor=float(g("expert_weights_scale") or 1.0),  # absent or 0: llama.cpp does not scale
        norm_topk_prob=norm, n_group=groups, topk_group=used, moe_layer_freq=1,
        q_lora_rank=need("attention.q_lora_rank") if has(".q_a_proj.") else None,
        kv_lora_rank=need("attention.kv_lora_rank"), qk_rope_head_dim=rope, qk_nope_head_dim=head_k - rope,
        v_head_dim=head_v)
    if v3:
        config.update(rope_interleave=True, num_nextn_predict_layers=0)
    else:
        config["topk_method"] = "group_limited_greedy" if groups > 1 else "greedy"


def _first(shapes: dict, suffix: str) -> str:
    return next(n for n in shapes if n.endswith(suffix))


Dequant = Callable[[ReaderTensor], np.ndarray]


def finalize(arch: str, held: dict[str, ReaderTensor], dequant: Dequant) -> Iterator[tuple[str, torch.Tensor]]:
    """HF tensors from the GGUF tensors `GGUFArch.held` names (by the names `_hf_shapes` gives them)."""
    if arch == "deepseek2":
        yield from _kv_b(held, dequant)
    else:
        yield from _fused_experts(arch, held, dequant)


def _kv_b(held: dict[str, ReaderTensor], dequant: Dequant) -> Iterator[tuple[str, torch.Tensor]]:
    """kv_b_proj [n*(Dn+Dv), r] (per head: Dn key rows, then Dv value rows) from the converter's split:
    k_b [n, r, Dn] (transposed per head) and v_b [n, Dv, r]."""
    for name, t in held.items():
        if name.endswith(".k_b_proj.weight"):
            k = torch.from_numpy(dequant(t))  # [n, r, Dn]
            v = torch.from_numpy(dequant(held[name.replace(".k_b_proj.", ".v_b_proj.")]))  # [n, Dv, r]
            yield name.replace(".k_b_proj.", ".kv_b_proj."), torch.cat((k.transpose(1, 2), v), dim=1).flatten(0, 1)


def _fused_experts(arch: str, stacked: dict[str, ReaderTensor], dequant: Dequant) -> Iterator[tuple[str, torch.Tensor]]:
    """HF's fused expert tensors from llama.cpp's stacked gate / up / down ones (named
    `model.layers.{i}.{experts}.{gate|up|down}.{weight|bias}`)."""
    layers = sorted({int(n.split(".")[2]) for n in stacked})
    for i in layers:
        part = {".".join(n.split(".")[-2:]): t for n, t in stacked.items() if n.startswith(f"model.layers.{i}.")}
        f = lambda k: torch.from_numpy(np.ascontiguousarray(dequant(part[k])))  # noqa: E731
        if arch == "granitemoe":  # input_linear [E,2I,H] = gate rows, then up; output_linear [E,H,I]
            p = f"model.layers.{i}.block_sparse_moe."
            yield p + "input_linear.weight", torch.cat((f("gate.weight"), f("up.weight")), dim=1)
            yield p + "output_linear.weight", f("down.weight")
            continue
        p = f"model.layers.{i}.mlp.experts."  # gpt-oss: gate/up interleaved, as on disk
        yield p + "gate_up_proj_bias", _interleave(f("gate.bias"), f("up.bias"))
        yield p + "down_proj_bias", f("down.bias")
        if part["gate.weight"].tensor_type == GGMLQuantizationType.MXFP4:  # the codes, as the HF checkpoint has them
            (gb, gs), (ub, us), (db, ds) = (_mxfp4_stack(part[k + ".weight"]) for k in ("gate", "up", "down"))
            yield p + "gate_up_proj_blocks", _interleave(gb, ub)
            yield p + "gate_up_proj_scales", _interleave(gs, us)
            yield p + "down_proj_blocks", db
            yield p + "down_proj_scales", ds
        else:  # on disk in-features first: gate_up [E,H,2I], down [E,I,H]
            yield p + "gate_up_proj", _interleave(f("gate.weight"), f("up.weight")).transpose(1, 2).contiguous()
            yield p + "down_proj", f("down.weight").transpose(1, 2).contiguous()


def _interleave(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[E,I,...] twice -> [E,2I,...] with rows a0,b0,a1,b1,.."""
    return torch.stack((a, b), dim=2).flatten(1, 2)


def _mxfp4_stack(t: ReaderTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A GGML MXFP4 [E, N, K] tensor -> HF `_blocks` [E,N,K/32,16] and `_scales` [E,N,K/32] (exact)."""
    E, N, K = (int(x) for x in reversed(t.shape))
    q = mxfp4.from_ggml(torch.from_numpy(np.array(t.data, np.uint8).reshape(E * N, -1)), (E * N, K))
    return q["blocks"].view(E, N, K // 32, 16), q["scales"].view(E, N, K // 32)
