"""GGUF readers for `phimoe`, `granitemoe`, `gpt-oss`, `glm4moe` and `deepseek2`: a tiny HF checkpoint is
written as a GGUF the way llama.cpp's convert_hf_to_gguf.py writes that architecture (Granite's Q/K row
permutation and split input_linear, Phi's LayerNorm biases and LongRoPE factor tensors, gpt-oss's
de-interleaved gate/up and its MXFP4 experts repacked to GGML's nibble order, DeepSeek's kv_b_proj split per
head), converted, and checked against the store converted from the HF folder: same logits, and for MXFP4 the
same codes. When llama.cpp's source is in the cache, its own converter writes the DeepSeek GGUFs too."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from safetensors.torch import load_file

import hobbit
from hobbit.models.assets import cache_dir
from hobbit.store import mxfp4
from hobbit.store.convert import convert
from hobbit.store.format import ExpertStore
from hobbit.store.gguf import UnsupportedGGUF, load_gguf

from test_gguf import llama_cpp_permute
from tiny import BOS, EOS, SPECIALS, make_mxfp4_gpt_oss, make_tiny_checkpoint

torch.set_num_threads(1)
PROMPT = [5, 9, 23, 101, 77, 3, 150, 42, 8, 19, 60, 2]
ATTN = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}


def _tokens(n: int) -> list[str]:
    from tiny import _bytes_to_unicode
    spell = _bytes_to_unicode()
    return [spell[b] for b in range(256)] + SPECIALS + [f"<pad{i}>" for i in range(n - 260)]


def _writer(path, arch: str, cfg: dict, tensors: dict[str, np.ndarray], kv: dict) -> None:
    """GGUF with llama.cpp's common keys + `kv` (`{arch}.` prefixed), our byte-level vocabulary, `tensors`
    (float32 as F32; (uint8 array, qtype) pairs as raw quantized data)."""
    w = GGUFWriter(str(path), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_expert_count(cfg["num_local_experts"])
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    for k, v in kv.items():
        add = w.add_bool if isinstance(v, bool) else w.add_float32 if isinstance(v, float) else \
            w.add_string if isinstance(v, str) else w.add_uint32
        add(f"{arch}.{k}", v)
    tokens = _tokens(cfg["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges([])
    w.add_bos_token_id(BOS)
    w.add_eos_token_id(EOS)
    for name, arr in tensors.items():
        if isinstance(arr, tuple):
            w.add_tensor(name, arr[0], raw_dtype=arr[1])
        else:
            w.add_tensor(name, np.ascontiguousarray(arr, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _attention(state: dict, i: int, heads: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """blk.i.attn_* from HF's q/k/v/o (weights and biases); Q/K rows permuted as LlamaModel does if heads."""
    out = {}
    for hf, part in ATTN.items():
        for kind in ("weight", "bias"):
            t = state.get(f"model.layers.{i}.self_attn.{hf}.{kind}")
            if t is None:
                continue
            t = t.numpy()
            if heads and part in ("attn_q", "attn_k"):
                t = llama_cpp_permute(t, heads[0] if part == "attn_q" else heads[1])
            out[f"blk.{i}.{part}.{kind}"] = t
    return out


def _norms(state: dict, i: int, post: str = "ffn_norm") -> dict[str, np.ndarray]:
    out = {}
    for hf, part in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", post)):
        for kind in ("weight", "bias"):
            if (t := state.get(f"model.layers.{i}.{hf}.{kind}")) is not None:
                out[f"blk.{i}.{part}.{kind}"] = t.numpy()
    return out


def _top(state: dict) -> dict[str, np.ndarray]:
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "model.norm.bias": "output_norm.bias", "lm_head.weight": "output.weight", "lm_head.bias": "output.bias"}
    return {g: state[h].numpy() for h, g in names.items() if h in state}


def write_phimoe(ckpt, path) -> None:
    cfg, state = json.loads((ckpt / "config.json").read_text()), load_file(str(ckpt / "model.safetensors"))
    rope = cfg["rope_parameters"]
    scale = cfg["max_position_embeddings"] / rope["original_max_position_embeddings"]
    t = _top(state) | {"rope_factors_long.weight": np.array(rope["long_factor"], np.float32),
                       "rope_factors_short.weight": np.array(rope["short_factor"], np.float32)}
    E = cfg["num_local_experts"]
    for i in range(cfg["num_hidden_layers"]):
        t |= _attention(state, i) | _norms(state, i)
        t[f"blk.{i}.ffn_gate_inp.weight"] = state[f"model.layers.{i}.block_sparse_moe.gate.weight"].numpy()
        for w, part in (("w1", "ffn_gate_exps"), ("w2", "ffn_down_exps"), ("w3", "ffn_up_exps")):
            t[f"blk.{i}.{part}.weight"] = torch.stack(
                [state[f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"] for e in range(E)]).numpy()
    _writer(path, "phimoe", cfg, t, {
        "rope.scaling.original_context_length": rope["original_max_position_embeddings"],
        "rope.dimension_count": cfg["head_dim"], "rope.freq_base": float(rope["rope_theta"]),
        "attention.sliding_window": 0,
        "rope.scaling.attn_factor": math.sqrt(1 + math.log(scale) / math.log(rope["original_max_position_embeddings"]))})


def write_granitemoe(ckpt, path) -> None:
    cfg, state = json.loads((ckpt / "config.json").read_text()), load_file(str(ckpt / "model.safetensors"))
    t, I = _top(state), cfg["intermediate_size"]  # noqa: E741
    for i in range(cfg["num_hidden_layers"]):
        t |= _attention(state, i, (cfg["num_attention_heads"], cfg["num_key_value_heads"])) | _norms(state, i)
        p = f"model.layers.{i}.block_sparse_moe."
        t[f"blk.{i}.ffn_gate_inp.weight"] = state[p + "router.layer.weight"].numpy()
        gate, up = state[p + "input_linear.weight"].split(I, dim=-2)
        t |= {f"blk.{i}.ffn_gate_exps.weight": gate.numpy(), f"blk.{i}.ffn_up_exps.weight": up.numpy(),
              f"blk.{i}.ffn_down_exps.weight": state[p + "output_linear.weight"].numpy()}
    _writer(path, "granitemoe", cfg, t, {
        "rope.dimension_count": cfg["hidden_size"] // cfg["num_attention_heads"],
        "rope.freq_base": float(cfg["rope_parameters"]["rope_theta"]),
        "attention.scale": float(cfg["attention_multiplier"]), "embedding_scale": float(cfg["embedding_multiplier"]),
        "residual_scale": float(cfg["residual_multiplier"]), "logit_scale": float(cfg["logits_scaling"])})


def write_gpt_oss(ckpt, path, experts_qtype: Q = Q.MXFP4) -> None:
    cfg, state = json.loads((ckpt / "config.json").read_text()), load_file(str(ckpt / "model.safetensors"))
    rope = cfg["rope_parameters"]
    t = _top(state)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t |= _attention(state, i) | _norms(state, i, post="post_attention_norm")
        t[f"blk.{i}.attn_sinks.weight"] = state[p + "self_attn.sinks"].numpy()
        t[f"blk.{i}.ffn_gate_inp.weight"] = state[p + "mlp.router.weight"].numpy()
        t[f"blk.{i}.ffn_gate_inp.bias"] = state[p + "mlp.router.bias"].numpy()
        bias = state[p + "mlp.experts.gate_up_proj_bias"]
        t |= {f"blk.{i}.ffn_gate_exps.bias": bias[:, ::2].numpy(), f"blk.{i}.ffn_up_exps.bias": bias[:, 1::2].numpy(),
              f"blk.{i}.ffn_down_exps.bias": state[p + "mlp.experts.down_proj_bias"].numpy()}
        if experts_qtype == Q.MXFP4:  # GptOssModel.repack_mxfp4: rows split ::2 / 1::2, nibbles to GGML order
            for part, rows, proj in (("ffn_gate_exps", slice(0, None, 2), "gate_up_proj"),
                                     ("ffn_up_exps", slice(1, None, 2), "gate_up_proj"),
                                     ("ffn_down_exps", slice(None), "down_proj")):
                b, s = state[p + f"mlp.experts.{proj}_blocks"][:, rows], state[p + f"mlp.experts.{proj}_scales"][:, rows]
                E, N, G, _ = b.shape
                raw = mxfp4.to_ggml(mxfp4.from_hf(b.reshape(E * N, G, 16), s.reshape(E * N, G))).view(E, N, G * 17)
                t[f"blk.{i}.{part}.weight"] = (raw.numpy(), Q.MXFP4)
        else:  # plain weights: on disk in-features first
            gu, down = state[p + "mlp.experts.gate_up_proj"].transpose(1, 2), state[p + "mlp.experts.down_proj"]
            t |= {f"blk.{i}.ffn_gate_exps.weight": gu[:, ::2].numpy(), f"blk.{i}.ffn_up_exps.weight": gu[:, 1::2].numpy(),
                  f"blk.{i}.ffn_down_exps.weight": down.transpose(1, 2).numpy()}
    _writer(path, "gpt-oss", cfg, t, {
        "rope.dimension_count": cfg["head_dim"], "rope.freq_base": float(rope["rope_theta"]),
        "attention.key_length": cfg["head_dim"], "attention.value_length": cfg["head_dim"],
        "attention.sliding_window": cfg["sliding_window"], "expert_feed_forward_length": cfg["intermediate_size"],
        "rope.scaling.type": "yarn", "rope.scaling.factor": float(rope["factor"]),
        "rope.scaling.original_context_length": rope["original_max_position_embeddings"],
        **({} if cfg["swiglu_limit"] == 7.0 else {"swiglu_clamp_exp": float(cfg["swiglu_limit"])})})


def write_glm4moe(ckpt, path) -> None:
    """Glm4MoeModel; plus one multi-token-prediction block (nextn.*) after the last layer, as the real
    GGUFs carry, which the reader must skip."""
    cfg, state = json.loads((ckpt / "config.json").read_text()), load_file(str(ckpt / "model.safetensors"))
    n, E, dense = cfg["num_hidden_layers"], cfg["n_routed_experts"], cfg["first_k_dense_replace"]
    t = _top(state)
    for i in range(n):
        p = f"model.layers.{i}."
        t |= _attention(state, i) | _norms(state, i, post="post_attention_norm")
        t |= {f"blk.{i}.attn_{x}_norm.weight": state[p + f"self_attn.{x}_norm.weight"].numpy() for x in "qk"
              if p + f"self_attn.{x}_norm.weight" in state}
        if i < dense:
            t |= {f"blk.{i}.ffn_{x}.weight": state[p + f"mlp.{x}_proj.weight"].numpy() for x in ("gate", "up", "down")}
            continue
        t[f"blk.{i}.ffn_gate_inp.weight"] = state[p + "mlp.gate.weight"].numpy()
        t[f"blk.{i}.exp_probs_b.bias"] = state[p + "mlp.gate.e_score_correction_bias"].numpy()
        for x in ("gate", "up", "down"):
            t[f"blk.{i}.ffn_{x}_exps.weight"] = torch.stack(
                [state[p + f"mlp.experts.{e}.{x}_proj.weight"] for e in range(E)]).numpy()
            t[f"blk.{i}.ffn_{x}_shexp.weight"] = state[p + f"mlp.shared_experts.{x}_proj.weight"].numpy()
    t |= {f"blk.{n}.nextn.eh_proj.weight": np.ones((64, 128), np.float32),
          f"blk.{n}.attn_norm.weight": np.ones(64, np.float32)}
    _writer(path, "glm4moe", {**cfg, "num_hidden_layers": n + 1, "num_local_experts": E}, t, {
        "rope.dimension_count": int(cfg["head_dim"] * cfg["rope_parameters"]["partial_rotary_factor"]),
        "rope.freq_base": float(cfg["rope_parameters"]["rope_theta"]), "attention.key_length": cfg["head_dim"],
        "attention.value_length": cfg["head_dim"], "expert_feed_forward_length": cfg["moe_intermediate_size"],
        "expert_shared_count": cfg["n_shared_experts"], "leading_dense_block_count": dense,
        "expert_gating_func": 2, "expert_weights_scale": float(cfg["routed_scaling_factor"]),
        "expert_weights_norm": cfg["norm_topk_prob"], "nextn_predict_layers": 1,
        **({} if cfg["n_group"] == 1 else {"expert_group_count": cfg["n_group"], "expert_group_used_count": cfg["topk_group"]})})


def write_deepseek2(ckpt, path, split: bool = True, groups: bool = True, drop: tuple[str, ...] = ()) -> None:
    """DeepseekV2Model: experts stacked, no Q/K permutation, e_score_correction_bias as exp_probs_b.bias. `split`:
    today's MLA layout (kv_b_proj as attn_k_b [n,r,Dn] transposed per head + attn_v_b [n,Dv,r], one KV head,
    key/value_length of the latent and the *_mla keys), else the older one (attn_kv_b whole, key/value_length
    of a head); `groups`: the expert_group keys a current converter writes; `drop`: keys left out."""
    cfg, state = json.loads((ckpt / "config.json").read_text()), load_file(str(ckpt / "model.safetensors"))
    n, E, dense, H = cfg["num_hidden_layers"], cfg["n_routed_experts"], cfg["first_k_dense_replace"], cfg["num_attention_heads"]
    r, R, Dn, Dv = cfg["kv_lora_rank"], cfg["qk_rope_head_dim"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    mla = {"q_proj": "attn_q", "q_a_proj": "attn_q_a", "q_a_layernorm": "attn_q_a_norm", "q_b_proj": "attn_q_b",
           "kv_a_proj_with_mqa": "attn_kv_a_mqa", "kv_a_layernorm": "attn_kv_a_norm", "o_proj": "attn_output"}
    t = _top(state)
    for i in range(n):
        p = f"model.layers.{i}."
        t |= _norms(state, i) | {f"blk.{i}.{g}.weight": state[p + f"self_attn.{h}.weight"].numpy()
                                 for h, g in mla.items() if p + f"self_attn.{h}.weight" in state}
        kv_b = state[p + "self_attn.kv_b_proj.weight"]
        if split:  # DeepseekV2Model.modify_tensors
            k_b, v_b = kv_b.view(H, Dn + Dv, r).split([Dn, Dv], dim=1)
            t |= {f"blk.{i}.attn_k_b.weight": k_b.transpose(1, 2).numpy(), f"blk.{i}.attn_v_b.weight": v_b.numpy()}
        else:
            t[f"blk.{i}.attn_kv_b.weight"] = kv_b.numpy()
        if i < dense:
            t |= {f"blk.{i}.ffn_{x}.weight": state[p + f"mlp.{x}_proj.weight"].numpy() for x in ("gate", "up", "down")}
            continue
        t[f"blk.{i}.ffn_gate_inp.weight"] = state[p + "mlp.gate.weight"].numpy()
        if p + "mlp.gate.e_score_correction_bias" in state:
            t[f"blk.{i}.exp_probs_b.bias"] = state[p + "mlp.gate.e_score_correction_bias"].numpy()
        for x in ("gate", "up", "down"):
            t[f"blk.{i}.ffn_{x}_exps.weight"] = torch.stack(
                [state[p + f"mlp.experts.{e}.{x}_proj.weight"] for e in range(E)]).numpy()
            t[f"blk.{i}.ffn_{x}_shexp.weight"] = state[p + f"mlp.shared_experts.{x}_proj.weight"].numpy()
    rope = cfg["rope_parameters"]
    kv = {"leading_dense_block_count": dense, "vocab_size": cfg["vocab_size"], "attention.kv_lora_rank": r,
          "attention.key_length": r + R if split else Dn + R, "attention.value_length": r if split else Dv,
          "expert_feed_forward_length": cfg["moe_intermediate_size"], "expert_shared_count": cfg["n_shared_experts"],
          "expert_weights_scale": float(cfg["routed_scaling_factor"]), "rope.dimension_count": R,
          "rope.freq_base": float(rope["rope_theta"])}
    kv |= {"attention.key_length_mla": Dn + R, "attention.value_length_mla": Dv} if split else {}
    kv |= {"attention.q_lora_rank": cfg["q_lora_rank"]} if cfg["q_lora_rank"] else {}
    kv |= {"expert_weights_norm": True} if cfg["norm_topk_prob"] else {}
    kv |= {"expert_gating_func": 2} if cfg["model_type"] == "deepseek_v3" else {}  # V3's scoring_func: sigmoid
    kv |= {"expert_group_count": cfg["n_group"], "expert_group_used_count": cfg["topk_group"]} if groups else {}
    if rope["rope_type"] == "yarn":
        kv |= {"rope.scaling.type": "yarn", "rope.scaling.factor": float(rope["factor"]),
               "rope.scaling.original_context_length": rope["original_max_position_embeddings"],
               "rope.scaling.yarn_beta_fast": float(rope["beta_fast"]), "rope.scaling.yarn_beta_slow": float(rope["beta_slow"]),
               "rope.scaling.yarn_log_multiplier": 0.1 * rope["mscale_all_dim"]}
    heads = {"num_key_value_heads": 1 if split else H, "num_local_experts": E}
    _writer(path, "deepseek2", {**cfg, **heads}, t, {k: v for k, v in kv.items() if k not in drop})


PHI_MSCALE = math.sqrt(1 + math.log(256 / 64) / math.log(64))  # llama.cpp's attn_factor for the tiny config
PHI_ROPE = dict(rope_type="longrope", rope_theta=1e4, original_max_position_embeddings=64, short_mscale=PHI_MSCALE,
                long_mscale=PHI_MSCALE, short_factor=[1.0 + 0.15 * i for i in range(8)],
                long_factor=[1.5 + 0.5 * i for i in range(8)])


def _round_to_bf16(ckpt) -> None:
    from safetensors.torch import save_file
    state = load_file(str(ckpt / "model.safetensors"))
    save_file({n: t.bfloat16().float() if t.is_floating_point() else t for n, t in state.items()},
              str(ckpt / "model.safetensors"), metadata={"format": "pt"})


def _same(a, b) -> bool:
    """Equal configs, numbers up to GGUF's float32 metadata."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return b is not None and math.isclose(a, b, rel_tol=1e-6)
    return a == b


def _same_stores(ckpt, gguf, tmp_path, precisions: str = "fp32"):
    """Stores converted from the HF folder and from the GGUF: same model config, logits within 1e-5."""
    a = convert(ckpt, tmp_path / "hf-store", precisions=precisions, dense="fp32", progress=False)
    b = convert(gguf, tmp_path / "gguf-store", precisions=precisions, dense="fp32", progress=False)
    ca, cb = (ExpertStore(s).manifest["config"] for s in (a, b))
    assert _same({k: v for k, v in ca.items() if k != "eos_token_ids"}, {k: v for k, v in cb.items() if k != "eos_token_ids"})
    assert (_logits(a) - _logits(b)).abs().max().item() < 1e-5
    return a, b


def _logits(store, dtype="fp32"):
    eng = hobbit.load(store, policy="resident", dtype=dtype)
    out = eng.logits(PROMPT)
    eng.close()
    return out


@pytest.mark.parametrize("family", ["phimoe", "granitemoe", "gpt_oss", "gpt_oss-mxfp4", "glm4_moe"])
def test_gguf_store_matches_hf_store(family, tmp_path):
    if family == "gpt_oss-mxfp4":
        ckpt, _ = make_mxfp4_gpt_oss(tmp_path / "hf")
    else:
        implied = {"phimoe": {"rope_parameters": PHI_ROPE, "router_jitter_noise": 0.01},  # what the GGUF implies
                   "gpt_oss": {"swiglu_limit": 7.0}}
        ckpt = make_tiny_checkpoint(family, tmp_path / "hf", **implied.get(family, {}))
    _round_to_bf16(ckpt)  # GGUF -> store goes through a bf16 HF folder: start from values bf16 holds
    gguf = tmp_path / "model.gguf"
    writers = {"phimoe": write_phimoe, "granitemoe": write_granitemoe, "gpt_oss-mxfp4": write_gpt_oss,
               "gpt_oss": lambda c, g: write_gpt_oss(c, g, Q.F32), "glm4_moe": write_glm4moe}
    writers[family](ckpt, gguf)
    m = load_gguf(gguf)
    ours = m.config
    theirs = json.loads((ckpt / "config.json").read_text())
    assert ours["architectures"] == theirs["architectures"]
    a, b = _same_stores(ckpt, gguf, tmp_path, "mxfp4,int4" if family.endswith("mxfp4") else "fp32")
    if family.endswith("mxfp4"):  # the GGUF's MXFP4 codes land in the store as the HF checkpoint's do
        sa, sb = ExpertStore(a), ExpertStore(b)
        for key in ("w13", "w2"):
            for t in ("blocks", "scales"):
                assert torch.equal(sa.read(1, 3, "mxfp4")[key][t], sb.read(1, 3, "mxfp4")[key][t])
        assert ours["quantization_config"] == {"quant_method": "mxfp4"}


_MLA = dict(kv_lora_rank=24)  # latent width != qk head width: a key_length read as the wrong one shows
_YARN = dict(rope_type="yarn", rope_theta=1e4, factor=4.0, original_max_position_embeddings=64, beta_fast=32.0,
             beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707)  # DeepSeek-V2's YaRN
# case -> (tiny family, config overrides, write_deepseek2 kwargs)
DEEPSEEK2 = {
    "v2-groups-yarn": ("deepseek_v2", dict(rope_parameters=_YARN), {}),
    "v2-lite-kv_b": ("deepseek_v2", dict(topk_method="greedy", n_group=1, topk_group=1), dict(split=False, groups=False)),
    "v2-qlora": ("deepseek_v2", dict(q_lora_rank=32, topk_method="greedy", n_group=1, topk_group=1), {}),
    "v3-groups": ("deepseek_v3", {}, {}),
    "v3-nogroups-kv_b": ("deepseek_v3", dict(n_group=1, topk_group=1), dict(split=False, groups=False)),
}


@pytest.mark.parametrize("case", list(DEEPSEEK2))
def test_deepseek2_gguf_store_matches_hf_store(case, tmp_path):
    """V2 / V2-Lite / V3 written as llama.cpp's converter writes them, both kv_b layouts: the HF config comes
    back (routing included), and the store's logits equal the HF folder's."""
    family, overrides, kwargs = DEEPSEEK2[case]
    ckpt = make_tiny_checkpoint(family, tmp_path / "hf", **_MLA, **overrides)
    _round_to_bf16(ckpt)
    write_deepseek2(ckpt, tmp_path / "model.gguf", **kwargs)
    ours, theirs = load_gguf(tmp_path / "model.gguf").config, json.loads((ckpt / "config.json").read_text())
    keys = ["architectures", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
            "n_routed_experts", "n_shared_experts", "first_k_dense_replace", "moe_intermediate_size", "n_group",
            "topk_group", "norm_topk_prob", "routed_scaling_factor", "num_attention_heads", "num_key_value_heads"]
    assert _same({k: ours[k] for k in keys}, {k: theirs[k] for k in keys})
    assert ours.get("topk_method") == theirs.get("topk_method")
    _same_stores(ckpt, tmp_path / "model.gguf", tmp_path)


LLAMA_CPP = cache_dir() / "peers" / "llama-cpp-python-0.3.36" / "src" / "vendor" / "llama.cpp"
# llama.cpp's own convert_hf_to_gguf.py with its own gguf-py; our tiny tokenizer's pre-tokenizer hash is not
# in its table, so it is told 'gpt-2' (the split the tiny byte-level tokenizer uses)
_CONVERT = """import runpy, sys
src = sys.argv[1]
sys.path[:0] = [src + "/gguf-py", src]
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = [src + "/convert_hf_to_gguf.py", *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.skipif(not (LLAMA_CPP / "convert_hf_to_gguf.py").is_file(), reason=f"no llama.cpp source at {LLAMA_CPP}")
@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_deepseek2_from_llama_cpp_converter(family, tmp_path):
    """The GGUF llama.cpp's converter writes (split kv_b, group keys, YaRN's log multiplier) converts to a
    store with the HF folder's logits. V3 gets the `scoring_func` its real config.json has: without it the
    converter writes no gating key and llama.cpp would route a V3 file by softmax (we refuse that file)."""
    ckpt = make_tiny_checkpoint(family, tmp_path / "hf", **_MLA, rope_parameters=_YARN)
    _round_to_bf16(ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "scoring_func": "sigmoid"} if family == "deepseek_v3" else cfg))
    gguf = tmp_path / "model.gguf"
    done = subprocess.run([sys.executable, "-c", _CONVERT, str(LLAMA_CPP), str(ckpt), "--outfile", str(gguf),
                           "--outtype", "f32"], capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    assert "blk.1.attn_k_b.weight" in load_gguf(gguf).raw
    _same_stores(ckpt, gguf, tmp_path)


@pytest.mark.parametrize("drop,family,match", [
    ("attention.kv_lora_rank", "deepseek_v2", "deepseek2.attention.kv_lora_rank"),
    ("expert_shared_count", "deepseek_v2", "deepseek2.expert_shared_count"),
    ("rope.dimension_count", "deepseek_v2", "deepseek2.rope.dimension_count"),
    ("attention.q_lora_rank", "deepseek_v3", "deepseek2.attention.q_lora_rank"),
    ("expert_group_used_count", "deepseek_v3", "deepseek2.expert_group_used_count"),
    ("attention.value_length_mla", "deepseek_v3", "deepseek2.attention.value_length_mla"),
    ("expert_gating_func", "deepseek_v3", "exp_probs_b but softmax routing"),  # a V3 file read as V2 would be wrong
    ("rope.scaling.yarn_log_multiplier", "deepseek_v2", "yarn_log_multiplier"),
])
def test_deepseek2_missing_keys_are_clear_errors(drop, family, match, tmp_path):
    ckpt = make_tiny_checkpoint(family, tmp_path / "hf", rope_parameters=_YARN)
    write_deepseek2(ckpt, tmp_path / "x.gguf", drop=(drop,))
    with pytest.raises(UnsupportedGGUF, match=re.escape(match)):
        load_gguf(tmp_path / "x.gguf")
