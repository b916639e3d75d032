"""The families added beside the original five, end to end through a store: offloaded under a budget
below one token's working set equals resident bit for bit, the MLA cache holds the latent only,
and config errors are clear. (Parity with transformers: test_model_parity.py, test_convert.py.)"""
from __future__ import annotations

import json

import pytest
import torch

import hobbit
from hobbit.store.config import ModelConfig, UnsupportedArchitecture
from hobbit.store.convert import convert

from test_engine import check_budget
from tiny import decode_logits, make_mxfp4_gpt_oss, make_tiny_checkpoint

NEW_FAMILIES = ["deepseek_v2", "deepseek_v3", "glm4_moe", "gpt_oss", "granitemoe", "phimoe"]
PROMPT = [3, 17, 42, 99, 7, 128, 64, 5, 200, 11, 31, 77]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root, made = tmp_path_factory.mktemp("families"), {}

    def get(family: str):
        if family not in made:
            ckpt = make_tiny_checkpoint(family, root / f"{family}-hf")
            made[family] = convert(ckpt, root / family, precisions="bf16,int4", progress=False)
        return made[family]
    return get


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_offloaded_equals_resident(family, store):
    ref = hobbit.load(store(family), policy="resident")
    ref_logits, ref_toks = decode_logits(ref, PROMPT, 12)
    minimum = ref.provider.expert_bytes("bf16") * ref.config.top_k  # one layer's active experts
    ref.close()
    eng = hobbit.load(store(family), policy="lru", budget=minimum)
    logits, toks = decode_logits(eng, PROMPT, 12, after_step=check_budget)
    assert toks == ref_toks and torch.equal(logits, ref_logits)
    assert eng.provider.stats.evictions > 12
    eng.close()


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_hobbit_policy_runs(family, store):
    eng = hobbit.load(store(family), policy="hobbit", budget="50%")
    out = eng.generate(PROMPT, max_new_tokens=8, stop_token_ids=[])
    assert len(out.token_ids) == 8 and out.stats["misses"] > 0
    eng.close()


def test_mla_cache_holds_the_latent(store):
    eng = hobbit.load(store("deepseek_v3"), policy="resident", max_seq_len=32)
    cfg = eng.config
    assert eng.model.k_cache.shape == (cfg.num_layers, 1, 32, cfg.kv_lora_rank)  # [layers, 1, capacity, r]
    assert eng.model.v_cache.shape == (cfg.num_layers, 1, 32, cfg.rope_dim)
    per_pos = cfg.num_heads * (cfg.qk_nope_head_dim + cfg.rope_dim + cfg.v_head_dim)  # expanded K and V
    assert cfg.kv_lora_rank + cfg.rope_dim < per_pos / 4
    eng.close()


def test_deepseek_config_fields(store):
    cfg = ModelConfig.from_dict(json.loads((store("deepseek_v3") / "manifest.json").read_text())["config"])
    assert cfg.sparse_layers == (1, 2) and cfg.routing == "sigmoid_group" and cfg.routed_scaling_factor == 2.5
    assert cfg.shared_experts_intermediate_size == cfg.moe_intermediate_size and cfg.norm_topk_prob
    v2 = json.loads((store("deepseek_v2") / "manifest.json").read_text())
    assert not ModelConfig.from_dict(v2["config"]).norm_topk_prob  # transformers' V2 never renormalizes
    assert ModelConfig.from_dict(v2["config"]).topk_method == "group_limited_greedy"


@pytest.mark.parametrize("family,change,message", [
    ("deepseek_v3", {"quantization_config": {"quant_method": "fp8"}}, "fp8.*bf16"),
    ("deepseek_v2", {"topk_method": "noaux_tc"}, "topk_method"),
    ("deepseek_v2", {"moe_layer_freq": 2}, "moe_layer_freq"),
])
def test_unsupported_options_are_errors(family, change, message, store):
    hf = json.loads((store(family) / "manifest.json").read_text())["hf_config"]
    with pytest.raises(UnsupportedArchitecture, match=message):
        ModelConfig.from_hf({**hf, **change})


def test_layers_past_num_hidden_layers_are_ignored(tmp_path):
    """DeepSeek-V3 checkpoints carry a multi-token-prediction layer at index num_hidden_layers."""
    from safetensors.torch import load_file, save_file
    from hobbit.store.checkpoint import open_checkpoint

    path = make_tiny_checkpoint("deepseek_v3", tmp_path / "hf")
    state = load_file(str(path / "model.safetensors"))
    extra = {n.replace("layers.2.", "layers.3."): t.clone() for n, t in state.items() if n.startswith("model.layers.2.")}
    save_file({**state, **extra}, str(path / "model.safetensors"))
    ck = open_checkpoint(path)
    assert not any(".layers.3." in n for n in ck.dense_names())


def test_clamped_swiglu_matches_transformers():
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    from hobbit.runtime.experts import Act

    hf_cfg = transformers_config("GptOssConfig", intermediate_size=16, num_local_experts=1, swiglu_limit=1.5)
    gate_up = 4 * torch.randn(5, 32, generator=torch.Generator().manual_seed(0))  # [T,2I], gate/up interleaved
    assert (gate_up.abs() > 1.5).any()  # the clamp bites
    ours = Act("swiglu_clamp", hf_cfg.swiglu_alpha, 1.5)(gate_up[:, 0::2], gate_up[:, 1::2])
    assert torch.equal(ours, GptOssExperts(hf_cfg)._apply_gate(gate_up))


def test_expert_biases_ride_in_every_blob(store):
    from hobbit.store.format import ExpertStore

    s = ExpertStore(store("gpt_oss"))
    H, I = s.manifest["config"]["hidden_size"], s.manifest["config"]["moe_intermediate_size"]
    for prec in s.precisions:
        parts = s.read(0, 3, prec)
        assert parts["b13"]["b"].shape == (2 * I,) and parts["b2"]["b"].shape == (H,)
        assert parts["b13"]["b"].dtype == torch.float32
    s.close()
    eng = hobbit.load(store("gpt_oss"), policy="lru", budget="50%", high="int4")  # a re-quantized tier runs
    assert len(eng.generate(PROMPT, max_new_tokens=4, stop_token_ids=[]).token_ids) == 4
    eng.close()


def transformers_config(name: str, **kw):
    import transformers
    return getattr(transformers, name)(hidden_size=8, num_attention_heads=2, num_key_value_heads=1, head_dim=4, **kw)


def test_gpt_oss_mxfp4_checkpoint_matches_transformers_dequantized(tmp_path):
    """Released gpt-oss ships MXFP4 experts (`*_blocks`, `*_scales`): read, dequantized as transformers
    does, split per expert; logits equal transformers' model holding the same dequantized experts."""
    path, hf = make_mxfp4_gpt_oss(tmp_path / "hf")
    convert(path, tmp_path / "store", precisions="fp32", progress=False, dense="fp32")
    eng = hobbit.load(tmp_path / "store", policy="resident", dtype="fp32")
    with torch.inference_mode():
        ref = hf(torch.tensor([PROMPT])).logits[0]
    assert (eng.logits(PROMPT) - ref).abs().max().item() < 1e-4
    eng.close()


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_bench_runs(family, store, tmp_path):
    import argparse

    from hobbit.lab.bench import add_bench_args, cmd_bench

    text = tmp_path / "text.txt"
    text.write_text("It is a truth universally acknowledged, that a single man must be in want of a wife.\n" * 4)
    parser = argparse.ArgumentParser()
    add_bench_args(parser.add_subparsers())
    args = parser.parse_args(["bench", str(store(family)), "--budget", "30%", "--policies", "resident,lru,hobbit",
                              "--text", str(text), "--split", "all", "--prompt-tokens", "8", "--max-new-tokens", "4",
                              "--window", "32", "--max-tokens", "64", "--json", str(tmp_path / "out.json")])
    assert cmd_bench(args) == 0
    runs = json.loads((tmp_path / "out.json").read_text())["runs"]
    assert {r["policy"] for r in runs} == {"resident", "lru", "hobbit"}
    assert all(r["ppl"] > 0 for r in runs)
