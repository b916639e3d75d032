"""Our Transformer + checkpoint reader vs transformers, on tiny random checkpoints of every family."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from hobbit.store.checkpoint import open_checkpoint
from hobbit.store.config import ModelConfig, UnsupportedArchitecture
from hobbit.runtime.experts import DenseExperts
from hobbit.runtime.layers import rope_frequencies
from hobbit.runtime.model import Transformer

from tiny import FAMILIES, make_tiny_checkpoint

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)
TOL = 1e-4


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root, made = tmp_path_factory.mktemp("parity"), {}

    def get(family: str, **overrides):
        key = family + "".join(f"-{k}{v}" for k, v in overrides.items())
        if key not in made:
            made[key] = make_tiny_checkpoint(family, root / key, **overrides)
        return made[key]
    return get


def ours_from(path, max_seq_len=None) -> Transformer:
    ck = open_checkpoint(path)
    model = Transformer(ck.config, DenseExperts.from_checkpoint(ck), dtype=torch.float32, max_seq_len=max_seq_len)
    model.load_dense(ck.dense_state_dict())
    return model


def hf_from(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")


def prompt(n: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


DEEPSEEK_YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64, mscale=1.0, mscale_all_dim=1.0)


@pytest.mark.parametrize("family,overrides", [(f, {}) for f in FAMILIES] + [
    ("mixtral", {"sliding_window": 5}),
    ("deepseek_v3", {"rope_interleave": False, "rope_scaling": DEEPSEEK_YARN}),  # halves RoPE; YaRN softmax mscale
    ("deepseek_v2", {"topk_method": "greedy", "q_lora_rank": 32}),
    ("glm4_moe", {"use_qk_norm": False, "n_group": 1, "topk_group": 1}),
])
def test_prefill_and_greedy_decode_match_transformers(family, overrides, tiny_dir):
    path = tiny_dir(family, **overrides)
    ours, hf = ours_from(path), hf_from(path)
    tokens = prompt()
    with torch.no_grad():
        out = hf(tokens[None], use_cache=True)
        mine = ours(tokens, 0)
        assert (mine - out.logits[0]).abs().max().item() < TOL
        pos, ours_ids, hf_ids = len(tokens), [], []
        theirs, past = out.logits[0, -1], out.past_key_values
        for _ in range(8):
            hf_next, our_next = int(theirs.argmax()), int(mine[-1].argmax())
            hf_ids.append(hf_next), ours_ids.append(our_next)
            out = hf(torch.tensor([[hf_next]]), past_key_values=past, use_cache=True)
            theirs, past = out.logits[0, -1], out.past_key_values
            mine = ours(torch.tensor([our_next]), pos)
            pos += 1
            assert (mine[-1] - theirs).abs().max().item() < TOL
    assert ours_ids == hf_ids


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe"])
def test_chunked_prefill_equals_full_prefill(family, tiny_dir):
    model, tokens = ours_from(tiny_dir(family)), prompt(16)
    full = model(tokens, 0)
    model.reset()
    parts = [model(tokens[:5], 0), model(tokens[5:6], 5), model(tokens[6:], 6)]
    assert (torch.cat(parts) - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe"])
def test_windows_equal_fresh_prefills_and_carry_gradients(family, tiny_dir):
    """The cache-free path moefy calibrates and distills on: each window of tokens [B,T] gives the logits of
    its own cached prefill from position 0, and gradients reach what an FFN replaced through `mlp` holds."""
    model, tokens = ours_from(tiny_dir(family)), torch.stack([prompt(16, seed) for seed in (1, 2, 3)])
    with torch.no_grad():
        logits = model.head(model.windows(tokens))  # [3,16,V]
    for window, got in zip(tokens, logits):
        model.reset()
        assert (got - model(window, 0)).abs().max().item() < 1e-5
    gain = torch.ones(model.cfg.hidden_size, requires_grad=True)
    model.head(model.windows(tokens[:1], lambda l, x: x * gain)).logsumexp(-1).sum().backward()
    assert gain.grad is not None and gain.grad.abs().sum() > 0


def test_router_and_norm_weights_are_exposed(tiny_dir):
    ck = open_checkpoint(tiny_dir("mixtral"))
    model = ours_from(tiny_dir("mixtral"))
    router = ck.dense_tensor("model.layers.1.block_sparse_moe.gate.weight")
    assert torch.equal(model.layers[1].mlp.gate.weight, router)
    assert model.layers[1].post_attention_layernorm.weight.shape == (64,)


def test_sharded_checkpoint_loads(tiny_dir, tmp_path):
    path = make_tiny_checkpoint("mixtral", tmp_path / "sharded", max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("*.safetensors"))) > 1
    tokens = prompt()
    assert torch.equal(ours_from(path)(tokens, 0), ours_from(tiny_dir("mixtral"))(tokens, 0))


def test_missing_shard_and_config_are_clear_errors(tmp_path):
    path = make_tiny_checkpoint("olmoe", tmp_path / "m", max_shard_size="100KB")
    next(path.glob("model-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        open_checkpoint(path)
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        open_checkpoint(path)


def test_fused_expert_checkpoint_loads(tiny_dir, tmp_path):
    """A checkpoint holding transformers-5 in-memory names (mlp.experts.gate_up_proj [E,2I,H])."""
    src = tiny_dir("qwen3_moe")
    hf = hf_from(src)
    state = {n: t.contiguous() for n, t in hf.state_dict().items()}
    assert "model.layers.1.mlp.experts.gate_up_proj" in state
    dst = tmp_path / "fused"
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    save_file(state, str(dst / "model.safetensors"))
    tokens = prompt()
    with torch.no_grad():
        assert (ours_from(dst)(tokens, 0) - hf(tokens[None]).logits[0]).abs().max().item() < TOL


def test_load_dense_is_strict(tiny_dir):
    ck = open_checkpoint(tiny_dir("qwen2_moe"))
    model = Transformer(ck.config, DenseExperts({}), dtype=torch.float32)
    state = ck.dense_state_dict()
    del state["model.layers.0.mlp.shared_expert_gate.weight"]
    state["model.layers.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"shared_expert_gate.*extra"):
        model.load_dense(state)


def test_unsupported_architecture_lists_supported(tiny_dir, tmp_path):
    with pytest.raises(UnsupportedArchitecture, match="GPT2LMHeadModel") as err:
        ModelConfig.from_hf({"architectures": ["GPT2LMHeadModel"]})
    for name in ("LlamaForCausalLM", "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM",
                 "OlmoeForCausalLM"):
        assert name in str(err.value)
    dst = shutil.copytree(tiny_dir("llama"), tmp_path / "gpt2")
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="supported"):
        open_checkpoint(dst)


def test_prompt_longer_than_max_seq_len(tiny_dir):
    model = ours_from(tiny_dir("olmoe"), max_seq_len=16)
    with pytest.raises(ValueError, match=r"17.*16"):
        model(prompt(17), 0)
    model(prompt(10), 0)
    with pytest.raises(ValueError, match=r"18.*16"):
        model(prompt(8), 10)


def test_config_round_trip_and_eos_from_generation_config(tiny_dir):
    ck = open_checkpoint(tiny_dir("qwen2_moe"))
    assert ck.config.eos_token_ids == (257, 259) and ck.config.sparse_layers == (0, 2)
    assert ModelConfig.from_dict(json.loads(json.dumps(ck.config.to_dict()))) == ck.config


@pytest.mark.parametrize("scaling", [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096, "mscale": 1.0,
     "mscale_all_dim": 0.5, "beta_fast": 16},
])
@pytest.mark.parametrize("legacy", [False, True])
def test_rope_frequencies_match_transformers(scaling, legacy):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    d = dict(architectures=["LlamaForCausalLM"], vocab_size=32, hidden_size=512, num_hidden_layers=1,
             num_attention_heads=4, intermediate_size=64, max_position_embeddings=32768)
    if legacy:  # transformers 4 layout: rope_theta + rope_scaling with 'type'
        d.update(rope_theta=500000.0, rope_scaling=scaling and {"type" if k == "rope_type" else k: v
                                                                  for k, v in scaling.items()})
    else:
        d["rope_parameters"] = {"rope_theta": 500000.0, "rope_type": "default", **(scaling or {})}
    cfg = ModelConfig.from_hf(d)
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in d.items() if k != "architectures"})
    kind = hf_cfg.rope_parameters["rope_type"]
    for seq_len in (None, 40000):
        mine = rope_frequencies(cfg, seq_len)
        theirs = (ROPE_INIT_FUNCTIONS[kind](hf_cfg, "cpu", seq_len=seq_len) if kind != "default"
                  else (1.0 / 500000.0 ** (torch.arange(0, 128, 2).float() / 128), 1.0))
        torch.testing.assert_close(mine[0], theirs[0], rtol=1e-6, atol=0)
        assert mine[1] == pytest.approx(theirs[1])
