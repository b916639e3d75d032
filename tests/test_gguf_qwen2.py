"""GGUF K-quants and the dense `qwen2` architecture: a tiny Qwen2 GGUF written here in Q4_K, Q5_K,
Q6_K and Q8_0 (biases and norms F32, no Q/K permutation, `qwen2` pre-tokenizer, chat template) is
read back exactly as gguf.quants dequantizes it, and converts into a store whose logits and
greedy tokens match transformers' own GGUF load. The real Qwen2.5-Coder GGUF is checked too when
it can be fetched."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.quants import dequantize, quantize
from tokenizers import Tokenizer

import hobbit
from hobbit.store.checkpoint import open_checkpoint
from hobbit.store.convert import convert
from hobbit.runtime.experts import DenseExperts
from hobbit.store.gguf import export_hf, load_gguf
from hobbit.runtime.model import Transformer
from kquants import quantize_k
from test_gguf import CORPUS, TEMPLATE, TEXTS, add_bpe_tokenizer, random_tensors, real_gguf, train_bpe

torch.set_num_threads(1)

H, LAYERS, HEADS, KV, INTER, CTX = 256, 2, 4, 2, 512, 128  # K-quant rows need multiples of 256
QTYPES = {"token_embd": Q.Q4_K, "output": Q.Q6_K, "attn_q": Q.Q4_K, "attn_k": Q.Q5_K, "attn_v": Q.Q6_K,
          "attn_output": Q.Q8_0, "ffn_gate": Q.Q4_K, "ffn_up": Q.Q5_K, "ffn_down": Q.Q6_K}
HF = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
      "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
      "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
       "output.weight": "lm_head.weight"}


def encode(w: np.ndarray, qtype: Q) -> np.ndarray:
    return quantize_k(w, qtype) if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K) else quantize(w, qtype)


def write_qwen2_gguf(path, tok: Tokenizer, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny qwen2 GGUF as llama.cpp writes one; returns the HF state dict a reader must recover."""
    vocab, tokens, merges, tensors = random_tensors(tok, seed, qkv_bias=True, dims=(H, LAYERS, HEADS, KV, INTER))
    w = GGUFWriter(str(path), "qwen2")
    w.add_block_count(LAYERS)
    w.add_context_length(CTX)
    w.add_embedding_length(H)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e6)
    w.add_file_type(15)
    add_bpe_tokenizer(w, vocab, tokens, merges, "qwen2", bos="<|endoftext|>", add_bos=False)
    expected = {}
    for name, arr in tensors.items():
        parts = name.split(".")
        part, kind = parts[-2], parts[-1]
        qtype = QTYPES.get(part, Q.F32) if kind == "weight" else Q.F32
        blocks = encode(arr, qtype)
        w.add_tensor(name, blocks, raw_dtype=qtype)
        back = torch.from_numpy(np.array(dequantize(blocks, qtype), np.float32).reshape(arr.shape))
        expected[TOP.get(name) or f"model.layers.{parts[1]}.{HF[part]}.{kind}"] = back
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_bpe()


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory, bpe):
    path = tmp_path_factory.mktemp("qwen2") / "tiny-qwen2.gguf"
    return path, write_qwen2_gguf(path, bpe)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_test_encoders_are_valid_k_quant_blocks(qtype):
    w = np.random.default_rng(1).standard_normal((4, 512)).astype(np.float32)
    err = np.linalg.norm(dequantize(quantize_k(w, qtype), qtype) - w) / np.linalg.norm(w)
    assert err < {Q.Q4_K: 0.12, Q.Q5_K: 0.06, Q.Q6_K: 0.03}[qtype]  # plain RTN at 4/5/6 bits


def test_qwen2_config_weights_and_tokenizer(tiny_qwen2, bpe):
    path, expected = tiny_qwen2
    m = load_gguf(path)
    assert m.arch == "qwen2" and m.config["architectures"] == ["Qwen2ForCausalLM"]
    want = dict(model_type="qwen2", hidden_size=H, intermediate_size=INTER, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=KV, rope_theta=1e6, attention_bias=True,
                tie_word_embeddings=False, use_sliding_window=False, eos_token_id=bpe.token_to_id("<|im_end|>"))
    assert {k: m.config[k] for k in want} == want
    assert m.tensor_types["model.layers.1.self_attn.k_proj.weight"] == "Q5_K"
    sd = m.state_dict()
    assert sd.keys() == expected.keys()
    for name, want_w in expected.items():  # exact, and no Q/K un-permutation for qwen2
        assert torch.equal(sd[name], want_w), name
    ours = Tokenizer.from_str(m.tokenizer_json)
    for text in TEXTS + CORPUS[:3]:  # the test BPE learned GPT-2's split, which differs only on digits
        if not any(c.isdigit() for c in text):
            assert ours.encode(text).ids == bpe.encode(text).ids, text
    assert [ours.id_to_token(i) for i in ours.encode("2018").ids] == list("2018")  # qwen2: one digit a token
    assert m.tokenizer_config["chat_template"] == TEMPLATE and m.tokenizer_config["add_bos_token"] is False


def test_qwen2_store_matches_transformers_gguf_load(tiny_qwen2, bpe, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF")
    path, _ = tiny_qwen2
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager").eval()
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:
        assert Tokenizer.from_str(load_gguf(path).tokenizer_json).encode(text).ids == tok(text).input_ids, text
    hf_dir = export_hf(path, tmp_path / "hf32", dtype=torch.float32, progress=False)
    ck = open_checkpoint(hf_dir)
    model = Transformer(ck.config, DenseExperts.from_checkpoint(ck), dtype=torch.float32)
    model.load_dense(ck.dense_state_dict())
    prompt = bpe.encode(CORPUS[0]).ids[:24]
    with torch.inference_mode():
        ref = theirs(torch.tensor([prompt])).logits[0]
        ref_ids = theirs.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert (model(torch.tensor(prompt), 0) - ref).abs().max().item() < 1e-4
    # `hobbit convert x.gguf` goes through a bf16 HF folder: bf16-close logits, the same greedy tokens
    convert(path, tmp_path / "store", precisions=["bf16"], progress=False, dense="bf16")
    eng = hobbit.load(tmp_path / "store", dtype="fp32", policy="resident")
    assert (eng.logits(prompt) - ref).abs().max().item() < 0.1
    assert eng.generate(prompt, max_new_tokens=8, stop_token_ids=[]).token_ids == ref_ids
    chat = eng.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    eng.close()


# ---------------------------------------------------------------- the real Qwen2.5-Coder-1.5B-Instruct GGUF

@pytest.fixture(scope="module")
def coder():
    return real_gguf("qwen-coder-gguf")


def test_qwen_coder_config_and_tokenizer(coder):
    transformers = pytest.importorskip("transformers")
    path, m = coder
    want = dict(architectures=["Qwen2ForCausalLM"], vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, head_dim=128,
                rope_theta=1e6, max_position_embeddings=32768, attention_bias=True, tie_word_embeddings=False,
                bos_token_id=151643, eos_token_id=151645)
    assert {k: m.config[k] for k in want} == want
    assert {m.tensor_types["model.layers.0.mlp.gate_proj.weight"], m.tensor_types["lm_head.weight"]} == {"Q4_K", "Q6_K"}
    ours = Tokenizer.from_str(m.tokenizer_json)
    theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    code = "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # 12345\n"
    for text in TEXTS + [code]:
        assert ours.encode(text).ids == theirs(text).input_ids, text
    assert "<|im_start|>" in m.tokenizer_config["chat_template"]
