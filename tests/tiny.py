"""Tiny random HF checkpoints (transformers config + save_pretrained) with a byte-level tokenizer.

make_tiny_checkpoint('qwen2_moe', path) writes config.json, safetensors, tokenizer.json and
tokenizer_config.json (chat template, bos/eos), so every command works on a model of ~1 MB.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

FAMILIES = ("llama", "qwen2", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe", "gpt_oss", "granitemoe", "phimoe")
VOCAB = 272  # 256 byte tokens + 4 specials, padded
SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]  # ids 256..259
BOS, EOS, IM_START, IM_END = 256, 257, 258, 259
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=BOS, eos_token_id=EOS,
               tie_word_embeddings=False)
# family -> (transformers config class, model class, config kwargs); variations cover the code paths
_FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_hidden_layers=2, intermediate_size=128, tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64))),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_hidden_layers=2, intermediate_size=128,
                                                      tie_word_embeddings=True, rope_theta=1e6)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        num_hidden_layers=2, intermediate_size=128, num_local_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        num_hidden_layers=3, intermediate_size=128, moe_intermediate_size=64, shared_expert_intermediate_size=128,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[1],
        eos_token_id=[EOS, IM_END])),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        num_hidden_layers=4, intermediate_size=128, moe_intermediate_size=64, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=2, head_dim=32)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(
        num_hidden_layers=2, intermediate_size=64, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False)),
    # DeepSeek-V2-Lite style: no q LoRA; group-limited top-k over 4 groups; one dense layer first
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        num_hidden_layers=3, num_key_value_heads=4, intermediate_size=128, moe_intermediate_size=32,
        n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=2, first_k_dense_replace=1,
        topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=1.5,
        q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)),
    # DeepSeek-V3 style: q LoRA, sigmoid routing with correction bias, groups, renormalized x 2.5
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        num_hidden_layers=3, num_key_value_heads=4, intermediate_size=128, moe_intermediate_size=32,
        n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1, first_k_dense_replace=1,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
        q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)),
    # GLM-4.5-Air style: q/k/v bias, q/k norm, half the head rotated, V3 routing (here with groups)
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", dict(
        num_hidden_layers=3, head_dim=32, intermediate_size=128, moe_intermediate_size=32, n_routed_experts=8,
        num_experts_per_tok=3, n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
        routed_scaling_factor=1.5, norm_topk_prob=True, attention_bias=True, use_qk_norm=True,
        rope_parameters=dict(rope_type="default", rope_theta=1e6, partial_rotary_factor=0.5))),
    # gpt-oss style: sliding / full layers, sinks, biases, YaRN (untruncated), clamped SwiGLU (a low limit
    # so the clamp bites), fused experts on disk
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(
        num_hidden_layers=3, head_dim=16, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
        sliding_window=4, swiglu_limit=1.5, rope_parameters=dict(
            rope_type="yarn", rope_theta=15e4, factor=4.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
            original_max_position_embeddings=64))),
    # Granite-MoE: muP-style multipliers, router = top-k then softmax, fused input/output_linear on disk
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", dict(
        num_hidden_layers=2, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
        embedding_multiplier=6.0, residual_multiplier=0.4, attention_multiplier=0.1, logits_scaling=4.0,
        tie_word_embeddings=True)),
    # Phi-3.5-MoE: sparsemixer top-2 (a wide threshold so the masks keep several experts), LayerNorm with
    # bias, q/k/v/o and lm_head biases, LongRoPE with its mscale (the prompts stay within the original length)
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", dict(
        num_hidden_layers=2, head_dim=16, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
        router_jitter_noise=0.3, attention_bias=True, lm_head_bias=True, rms_norm_eps=1e-5,
        rope_parameters=dict(rope_type="longrope", rope_theta=1e4, original_max_position_embeddings=64,
                             short_factor=[1.0 + 0.15 * i for i in range(8)],
                             long_factor=[1.5 + 0.5 * i for i in range(8)], short_mscale=1.2, long_mscale=1.4))),
}


def make_tiny_checkpoint(family: str, path: str | Path, seed: int = 0, max_shard_size: str | None = None,
                         **overrides: Any) -> Path:
    """Write a tiny random fp32 `family` checkpoint to `path` (config kwargs in `overrides`)."""
    import transformers

    if family not in _FAMILIES:
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")
    cfg_cls, model_cls, kwargs = _FAMILIES[family]
    cfg = getattr(transformers, cfg_cls)(**{**_COMMON, **kwargs, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).to(torch.float32)
    _randomize(model, seed)
    path = Path(path)
    shard = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **shard)
    write_tokenizer(path)
    return path


def make_mxfp4_gpt_oss(path: str | Path, seed: int = 3):
    """A tiny gpt_oss checkpoint as released gpt-oss ships it: experts as MXFP4 `{proj}_blocks` [E,N,K/32,16]
    + `{proj}_scales` [E,N,K/32] (random codes, scales 2^-5..2^0), `quantization_config: mxfp4`. Returns
    (path, transformers model in fp32 holding the same experts dequantized by transformers itself)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    path = make_tiny_checkpoint("gpt_oss", path)
    state, g = load_file(str(path / "model.safetensors")), torch.Generator().manual_seed(seed)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    for layer, block in enumerate(hf.model.layers):
        for proj in ("gate_up_proj", "down_proj"):
            E, K, N = getattr(block.mlp.experts, proj).shape  # in-memory [E, in, out]
            name = f"model.layers.{layer}.mlp.experts.{proj}"
            blocks = torch.randint(0, 256, (E, N, K // 32, 16), generator=g, dtype=torch.uint8)
            scales = torch.randint(122, 128, (E, N, K // 32), generator=g, dtype=torch.uint8)
            del state[name]
            state[name + "_blocks"], state[name + "_scales"] = blocks, scales
            with torch.no_grad():
                getattr(block.mlp.experts, proj).copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    save_file(state, str(path / "model.safetensors"))
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "mxfp4"}}))
    return path, hf


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights with enough contrast that logits are spread out and routing differs across tokens."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "norm" in name and not name.endswith("bias"):
                p.copy_(1.0 + 0.1 * r)
            elif name.endswith("bias"):
                p.copy_(0.1 * r)
            elif name.endswith("mlp.gate.weight") or name.endswith("router.weight"):
                p.copy_(3.0 * r / p.shape[-1] ** 0.5)  # router logits std ~3: top-k varies by token
            elif "embed" in name:
                p.copy_(r)
            else:
                p.copy_(r / p.shape[-1] ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # sigmoid scores are in (0,1): a bias of ~0.1 matters
                b.copy_(0.1 * torch.randn(b.shape, generator=g))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable char map, so token id == byte value."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b if b in keep else next(extra)) for b in range(256)}


def write_tokenizer(path: str | Path) -> None:
    """tokenizer.json (byte-level, ids 0..255 = bytes, then SPECIALS) + tokenizer_config.json with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    path = Path(path)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>",
        "add_bos_token": False, "model_max_length": 256,
        "chat_template": CHAT_TEMPLATE,
    }, indent=2))


def decode_logits(engine, prompt: list[int], steps: int, after_step=None):
    """Prefill, then `steps` greedy decode steps through the engine's real provider:
    (stacked logits [steps, V], greedy tokens). `after_step(engine)` runs after each step."""
    import torch
    seq = engine.sequence()
    out, toks = [], []
    with torch.inference_mode():
        logits = seq.step(torch.tensor(prompt))[-1]
        for i in range(steps):
            out.append(logits.clone())
            toks.append(int(logits.argmax()))
            logits = seq.step(torch.tensor([toks[-1]]))[-1]
            if after_step is not None:
                after_step(engine)
    return torch.stack(out), toks
