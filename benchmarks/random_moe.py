"""Write a random-weight Qwen3-MoE-shaped HF checkpoint (for speed measurements, not quality).

    python benchmarks/random_moe.py OUT [--layers 4 --experts 32 --top-k 4 --hidden 2048 --inter 768]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm


def write_random_qwen3_moe(out: Path, layers: int, experts: int, top_k: int, hidden: int, inter: int,
                           vocab: int = 32000, heads: int = 16, kv_heads: int = 4, seed: int = 0) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    D = hidden // heads

    def rnd(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    dense = {"model.embed_tokens.weight": rnd(vocab, hidden), "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
             "lm_head.weight": rnd(vocab, hidden)}
    index = {}
    for i in tqdm(range(layers), desc="random layers"):
        p = f"model.layers.{i}."
        t = {p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
             p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
             p + "self_attn.q_proj.weight": rnd(heads * D, hidden), p + "self_attn.k_proj.weight": rnd(kv_heads * D, hidden),
             p + "self_attn.v_proj.weight": rnd(kv_heads * D, hidden), p + "self_attn.o_proj.weight": rnd(hidden, heads * D),
             p + "self_attn.q_norm.weight": torch.ones(D, dtype=torch.bfloat16),
             p + "self_attn.k_norm.weight": torch.ones(D, dtype=torch.bfloat16),
             p + "mlp.gate.weight": rnd(experts, hidden, std=0.5)}
        for e in range(experts):
            q = f"{p}mlp.experts.{e}."
            t[q + "gate_proj.weight"], t[q + "up_proj.weight"] = rnd(inter, hidden), rnd(inter, hidden)
            t[q + "down_proj.weight"] = rnd(hidden, inter)
        name = f"model-{i:05d}.safetensors"
        save_file(t, str(out / name), metadata={"format": "pt"})
        index.update({k: name for k in t})
    save_file(dense, str(out / "model-dense.safetensors"), metadata={"format": "pt"})
    index.update({k: "model-dense.safetensors" for k in dense})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    (out / "config.json").write_text(json.dumps(dict(
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=vocab, hidden_size=hidden,
        intermediate_size=inter * 4, moe_intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=D, num_experts=experts,
        num_experts_per_tok=top_k, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=4096, tie_word_embeddings=False,
        torch_dtype="bfloat16", bos_token_id=None, eos_token_id=None), indent=1))
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=768)
    a = ap.parse_args()
    write_random_qwen3_moe(a.out, a.layers, a.experts, a.top_k, a.hidden, a.inter)
