"""Phi-3.5-MoE specifics beyond the shared parity tests: LongRoPE past the original length, and config
handling. (Within the original length, parity with transformers: test_model_parity.py, test_convert.py.)"""
from __future__ import annotations

import json

import pytest
import torch

from hobbit.store.config import ModelConfig, UnsupportedArchitecture

from test_model_parity import TOL, hf_from, ours_from
from tiny import make_tiny_checkpoint

transformers = pytest.importorskip("transformers")
ROPE = dict(rope_type="longrope", rope_theta=1e4, original_max_position_embeddings=8,
            short_factor=[1.0 + 0.15 * i for i in range(8)], long_factor=[1.5 + 0.5 * i for i in range(8)],
            short_mscale=1.2, long_mscale=1.4)


def _long_factors_per_call(monkeypatch):
    """transformers 5.24's PhimoeRotaryEmbedding switches the mscale past the original length but always
    builds the frequencies from the short factors (it calls rope_init_fn without seq_len); transformers 4.x,
    vLLM and Phi-3.5-MoE's own modeling code switch both. Patch it to do the latter, which is what we run."""
    from transformers.models.phimoe import modeling_phimoe as phi

    def forward(self, x, position_ids=None):
        seq_len = int(position_ids.max()) + 1
        p = self.config.rope_parameters
        mscale = p["long_mscale"] if seq_len > p["original_max_position_embeddings"] else p["short_mscale"]
        inv_freq, _ = self.rope_init_fn(self.config, x.device, seq_len=seq_len)
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * mscale).to(x.dtype), (emb.sin() * mscale).to(x.dtype)
    monkeypatch.setattr(phi.PhimoeRotaryEmbedding, "forward", forward)


@pytest.mark.parametrize("n_prompt", [12, 5])  # prefill past the original length; or cross it while decoding
def test_longrope_past_the_original_length(n_prompt, tmp_path, monkeypatch):
    path = make_tiny_checkpoint("phimoe", tmp_path / "hf", rope_parameters=ROPE)
    _long_factors_per_call(monkeypatch)
    ours, hf = ours_from(path), hf_from(path)
    tokens = torch.randint(0, 256, (n_prompt,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = hf(tokens[None], use_cache=True)
        mine = ours(tokens, 0)
        assert (mine - out.logits[0]).abs().max().item() < TOL
        past, pos = out.past_key_values, n_prompt
        for _ in range(8):  # the same token into both: the comparison is per call, K/V cached as they were
            nxt = int(out.logits[0, -1].argmax())
            out = hf(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            past, mine = out.past_key_values, ours(torch.tensor([nxt]), pos)
            pos += 1
            assert (mine[-1] - out.logits[0, -1]).abs().max().item() < TOL


def test_longrope_frequencies_match_transformers():
    """Our short / long frequencies and mscales against transformers' own longrope init function."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from hobbit.runtime.layers import rope_frequencies

    hf_cfg = transformers.PhimoeConfig(hidden_size=64, num_attention_heads=4, head_dim=16, rope_parameters=dict(ROPE),
                                       max_position_embeddings=256)
    cfg = ModelConfig.from_hf({**hf_cfg.to_dict(), "architectures": ["PhimoeForCausalLM"]})
    for seq_len, mscale in ((None, 1.2), (8, 1.2), (9, 1.4)):
        ref, _ = ROPE_INIT_FUNCTIONS["longrope"](hf_cfg, None, seq_len=seq_len)
        inv_freq, scale = rope_frequencies(cfg, seq_len=seq_len)
        assert torch.equal(inv_freq, ref) and scale == pytest.approx(mscale)


def _hf_dict(**change) -> dict:
    cfg = transformers.PhimoeConfig(hidden_size=64, num_attention_heads=4, head_dim=16,
                                    rope_parameters=dict(ROPE)).to_dict()
    return {**cfg, "architectures": ["PhimoeForCausalLM"], **change}


def test_config_fields():
    cfg = ModelConfig.from_hf(_hf_dict(attention_bias=True, lm_head_bias=True, router_jitter_noise=0.05))
    assert (cfg.norm, cfg.routing, cfg.top_k, cfg.router_jitter) == ("layernorm", "sparsemixer", 2, 0.05)
    assert cfg.attention_bias and cfg.o_proj_bias and cfg.lm_head_bias
    assert cfg.rope_scaling["rope_type"] == "longrope" and cfg.rope_scaling["original_max_position_embeddings"] == 8
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    # Phi-3.5-MoE's own config.json: legacy rope_scaling with type 'longrope' (Phi-3's 'su' too), top-level
    # original_max_position_embeddings
    legacy = {k: v for k, v in ROPE.items() if k not in ("rope_type", "rope_theta", "original_max_position_embeddings")}
    d = _hf_dict(rope_parameters=None, rope_scaling={"type": "su", **legacy}, original_max_position_embeddings=4096)
    assert ModelConfig.from_hf(d).rope_scaling["original_max_position_embeddings"] == 4096


@pytest.mark.parametrize("change,message", [
    ({"num_experts_per_tok": 4}, "sparsemixer routes top-2"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8}}, "long_factor"),
])
def test_unsupported_options_are_errors(change, message):
    with pytest.raises(UnsupportedArchitecture, match=message):
        ModelConfig.from_hf(_hf_dict(**change))
