"""GGUF reader: tiny Llama / Mixtral GGUFs written here the way llama.cpp's converter writes them
(Q/K row permutation, Q8_0/Q4_0/Q4_1/F16/BF16/F32 tensors, a byte-level BPE tokenizer with merges
and a chat template) are read back and checked against the weights they came from, transformers'
own GGUF loader and our engine. The real SmolLM2 GGUF is checked too when it can be fetched."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.quants import dequantize, quantize
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from hobbit.models.assets import AssetError, asset_path
from hobbit.store.gguf import UnsupportedGGUF, export_hf, load_gguf
from hobbit.store.convert import convert

torch.set_num_threads(1)

H, LAYERS, HEADS, KV, INTER, CTX, EXPERTS = 64, 2, 4, 2, 128, 128, 4
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["It is a truth universally acknowledged, that a single man in possession of a good fortune, "
          "must be in want of a wife.", "Anarchism is a political philosophy that advocates self-governed "
          "societies.", "The year 2018 had 365 days; the price was $12.50 (about 11 euros)."] * 3
TEXTS = ["a single man in possession", "  spaces\tand\nnewlines\n\n", "Unseen wörds: naïve café 日本 🙂",
         "<|im_start|>user\nhello<|im_end|>\n", "prices: 12,345.67 in 2024"]
# source GGUF type per llama.cpp tensor kind; norms stay F32
QTYPES = {"token_embd": Q.Q8_0, "output": Q.Q8_0, "attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.F16,
          "attn_output": Q.BF16, "ffn_gate": Q.Q8_0, "ffn_up": Q.Q4_0, "ffn_down": Q.Q4_1, "ffn_gate_inp": Q.F32,
          "ffn_gate_exps": Q.Q4_1, "ffn_up_exps": Q.Q8_0, "ffn_down_exps": Q.Q4_0}
HF_NAME = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
           "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
           "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
           "ffn_gate_inp": "block_sparse_moe.gate"}


def train_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=352, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return tok


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute: interleave the two rotary halves of every head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def roundtrip(w: np.ndarray, qtype: Q) -> torch.Tensor:
    """What a GGUF reader must give back for w stored as qtype (quant blocks lie within rows, so the
    Q/K row permutation commutes with this)."""
    return torch.from_numpy(np.array(dequantize(quantize(w, qtype), qtype), np.float32).reshape(w.shape))


def random_tensors(tok: Tokenizer, seed: int, experts: int = 0, qkv_bias: bool = False,
                   dims: tuple[int, int, int, int, int] = (H, LAYERS, HEADS, KV, INTER)
                   ) -> tuple[dict[str, int], list[str], list[str], dict[str, np.ndarray]]:
    """(vocab, tokens by id, merges, random fp32 weights under llama.cpp's names) of a tiny GGUF;
    dims = (hidden, layers, heads, kv heads, FFN width)."""
    H, LAYERS, HEADS, KV, INTER = dims  # noqa: N806 (the module's names, overridable)
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = [" ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    rng = np.random.default_rng(seed)
    rand = lambda *shape, scale=1.0: (rng.standard_normal(shape) * scale).astype(np.float32)  # noqa: E731
    hd = H // HEADS
    tensors = {"token_embd.weight": rand(len(tokens), H), "output_norm.weight": 1 + rand(H, scale=0.1),
               "output.weight": rand(len(tokens), H, scale=H ** -0.5)}
    for i in range(LAYERS):
        b = f"blk.{i}."
        tensors |= {b + "attn_norm.weight": 1 + rand(H, scale=0.1), b + "ffn_norm.weight": 1 + rand(H, scale=0.1),
                    b + "attn_q.weight": rand(HEADS * hd, H, scale=H ** -0.5),
                    b + "attn_k.weight": rand(KV * hd, H, scale=H ** -0.5),
                    b + "attn_v.weight": rand(KV * hd, H, scale=H ** -0.5),
                    b + "attn_output.weight": rand(H, HEADS * hd, scale=H ** -0.5)}
        if qkv_bias:  # qwen2
            tensors |= {b + "attn_q.bias": rand(HEADS * hd), b + "attn_k.bias": rand(KV * hd),
                        b + "attn_v.bias": rand(KV * hd)}
        if experts:
            tensors |= {b + "ffn_gate_inp.weight": rand(experts, H, scale=3 * H ** -0.5),
                        b + "ffn_gate_exps.weight": rand(experts, INTER, H, scale=H ** -0.5),
                        b + "ffn_up_exps.weight": rand(experts, INTER, H, scale=H ** -0.5),
                        b + "ffn_down_exps.weight": rand(experts, H, INTER, scale=INTER ** -0.5)}
        else:
            tensors |= {b + "ffn_gate.weight": rand(INTER, H, scale=H ** -0.5),
                        b + "ffn_up.weight": rand(INTER, H, scale=H ** -0.5),
                        b + "ffn_down.weight": rand(H, INTER, scale=INTER ** -0.5)}
    return vocab, tokens, merges, tensors


def add_bpe_tokenizer(w: GGUFWriter, vocab: dict, tokens: list, merges: list, pre: str, bos: str,
                      add_bos: bool) -> None:
    """The tokenizer metadata llama.cpp writes for a byte-level BPE vocabulary (SPECIALS are control tokens)."""
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab[bos])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_add_bos_token(add_bos)
    w.add_chat_template(TEMPLATE)


def write_gguf(path, tok: Tokenizer, experts: int = 0, seed: int = 0, add_bos: bool = False, pre: str = "gpt2",
               arch: str = "llama", extra: dict | None = None) -> dict[str, torch.Tensor]:
    """A tiny GGUF as llama.cpp writes it; returns the HF state dict a reader must recover."""
    vocab, tokens, merges, tensors = random_tensors(tok, seed, experts)
    hd = H // HEADS
    tensors |= extra or {}

    w = GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(CTX)
    w.add_embedding_length(H)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(hd)
    w.add_vocab_size(len(tokens))
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(2)
    add_bpe_tokenizer(w, vocab, tokens, merges, pre, bos="<|im_start|>", add_bos=add_bos)
    expected = {}
    for name, arr in tensors.items():
        part = name.split(".")[-2]
        qtype = QTYPES.get(part, Q.F32) if arr.dtype == np.float32 else None
        stored = llama_cpp_permute(arr, HEADS if part == "attn_q" else KV) if part in ("attn_q", "attn_k") else arr
        w.add_tensor(name, stored if qtype is None else quantize(stored, qtype), raw_dtype=qtype)
        if qtype is not None and name not in (extra or {}):
            expected |= hf_names(name, roundtrip(arr, qtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def hf_names(gguf_name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    if gguf_name in top:
        return {top[gguf_name]: w}
    _, i, part, kind = gguf_name.split(".")
    if part.endswith("_exps"):
        proj = {"ffn_gate_exps": "w1", "ffn_down_exps": "w2", "ffn_up_exps": "w3"}[part]
        return {f"model.layers.{i}.block_sparse_moe.experts.{e}.{proj}.{kind}": w[e] for e in range(len(w))}
    return {f"model.layers.{i}.{HF_NAME[part]}.{kind}": w}


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_bpe()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, bpe):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    return path, write_gguf(path, bpe)


def test_names_shapes_types_and_dequantized_values(tiny_llama, bpe):
    path, expected = tiny_llama
    m = load_gguf(path)
    assert m.config["architectures"] == ["LlamaForCausalLM"] and m.config["model_type"] == "llama"
    assert {k: m.config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                     "num_key_value_heads", "head_dim", "max_position_embeddings", "vocab_size")} \
        == dict(hidden_size=H, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                num_key_value_heads=KV, head_dim=H // HEADS, max_position_embeddings=CTX, vocab_size=bpe.get_vocab_size())
    assert m.config["rms_norm_eps"] == pytest.approx(1e-6) and m.config["rope_theta"] == 10000.0
    assert m.config["tie_word_embeddings"] is False
    assert (m.config["bos_token_id"], m.config["eos_token_id"]) == (bpe.token_to_id("<|im_start|>"),
                                                                      bpe.token_to_id("<|im_end|>"))
    assert m.shapes == {k: tuple(v.shape) for k, v in expected.items()}
    assert m.tensor_types["model.layers.0.self_attn.k_proj.weight"] == "Q4_1"
    assert m.tensor_types["model.layers.1.self_attn.o_proj.weight"] == "BF16"
    sd = m.state_dict()
    for name, want in expected.items():
        assert torch.equal(sd[name], want), name  # Q/K unpermuted back to HF row order, exact dequantization
    assert all(t.dtype == torch.bfloat16 for _, t in m.tensors(torch.bfloat16))


def test_tokenizer_round_trip(tiny_llama, bpe, tmp_path):
    m = load_gguf(tiny_llama[0])
    ours = Tokenizer.from_str(m.tokenizer_json)
    for text in TEXTS + CORPUS[:3]:
        assert ours.encode(text).ids == bpe.encode(text).ids, text
        assert ours.decode(ours.encode(text).ids, skip_special_tokens=False) == text
    assert ours.encode("<|im_start|>user").ids[0] == bpe.token_to_id("<|im_start|>")  # specials stay whole
    cfg = m.tokenizer_config
    assert (cfg["bos_token"], cfg["eos_token"], cfg["chat_template"]) == ("<|im_start|>", "<|im_end|>", TEMPLATE)
    assert cfg["add_bos_token"] is False

    with_bos = tmp_path / "bos.gguf"
    write_gguf(with_bos, bpe, add_bos=True)
    ids = Tokenizer.from_str(load_gguf(with_bos).tokenizer_json).encode("hello").ids
    assert ids == [bpe.token_to_id("<|im_start|>")] + bpe.encode("hello").ids


@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe"])
def test_tokenizer_matches_transformers_gguf_tokenizer(tmp_path, bpe, pre):
    transformers = pytest.importorskip("transformers")
    path = tmp_path / f"{pre}.gguf"
    write_gguf(path, bpe, pre=pre)
    ours = Tokenizer.from_str(load_gguf(path).tokenizer_json)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS + CORPUS[:3]:
        assert ours.encode(text).ids == theirs(text).input_ids, text


def test_export_matches_transformers_gguf_load_and_our_engine(tiny_llama, bpe, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF")
    from hobbit.store.checkpoint import open_checkpoint
    from hobbit.runtime.experts import DenseExperts
    from hobbit.runtime.model import Transformer

    path, _ = tiny_llama
    out = export_hf(path, tmp_path / "hf32", dtype=torch.float32, progress=False)
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json",
                                               "tokenizer_config.json"}
    load = transformers.AutoModelForCausalLM.from_pretrained
    theirs = load(path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager")
    exported = load(out, dtype=torch.float32, attn_implementation="eager")
    ck = open_checkpoint(out)
    engine = Transformer(ck.config, DenseExperts.from_checkpoint(ck), dtype=torch.float32)
    engine.load_dense(ck.dense_state_dict())
    tokens = torch.tensor(bpe.encode(CORPUS[0]).ids)
    with torch.no_grad():
        ref = theirs(tokens[None]).logits[0]
        assert (exported(tokens[None]).logits[0] - ref).abs().max() < 1e-4
        assert (engine(tokens, 0) - ref).abs().max() < 1e-4

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert hf_tok(text).input_ids == bpe.encode(text).ids
    chat = hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"

    bf16 = export_hf(path, tmp_path / "hf16", progress=False)  # default dtype
    assert json.loads((bf16 / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load(bf16).model.embed_tokens.weight.dtype == torch.bfloat16


def test_mixtral_gguf_experts(tmp_path, bpe):
    from hobbit.store.checkpoint import open_checkpoint

    path = tmp_path / "tiny-mixtral.gguf"
    expected = write_gguf(path, bpe, experts=EXPERTS, seed=1)
    m = load_gguf(path)
    assert m.config["architectures"] == ["MixtralForCausalLM"]
    assert (m.config["num_local_experts"], m.config["num_experts_per_tok"]) == (EXPERTS, 2)
    sd = m.state_dict()
    assert sd.keys() == expected.keys()
    assert all(torch.equal(sd[k], v) for k, v in expected.items())
    ck = open_checkpoint(export_hf(path, tmp_path / "hf", dtype=torch.float32, progress=False))
    assert (ck.config.arch, ck.config.num_experts, ck.config.top_k) == ("mixtral", EXPERTS, 2)
    w13, w2 = ck.expert_weights(1, 3)
    p = "model.layers.1.block_sparse_moe.experts.3."
    assert torch.equal(w13, torch.cat([expected[p + "w1.weight"], expected[p + "w3.weight"]]))
    assert torch.equal(w2, expected[p + "w2.weight"])


def test_unsupported_inputs_are_named(tmp_path, bpe):
    write_gguf(tmp_path / "gemma.gguf", bpe, arch="gemma")
    with pytest.raises(UnsupportedGGUF, match="architecture 'gemma'.*supported: llama, qwen2, qwen2moe"):
        load_gguf(tmp_path / "gemma.gguf")
    write_gguf(tmp_path / "int.gguf", bpe, extra={"blk.0.attn_scale.weight": np.ones(4, np.int8)})
    with pytest.raises(UnsupportedGGUF, match="'blk.0.attn_scale.weight' has GGML type I8"):
        load_gguf(tmp_path / "int.gguf")
    write_gguf(tmp_path / "odd.gguf", bpe, extra={"rope_freqs.weight": np.ones(8, np.float32)})
    with pytest.raises(UnsupportedGGUF, match="odd.gguf: unsupported GGUF tensor 'rope_freqs.weight'"):
        load_gguf(tmp_path / "odd.gguf")


# ---------------------------------------------------------------- the real SmolLM2-135M-Instruct GGUF

SENTENCES = ["The capital of France is", "It is a truth universally acknowledged, that a single man",
             "In 2018, prices rose 12.5% to $1,234.", "  indented\n\tcode = f(x)  # comment",
             "<|im_start|>user\nWhat is 2+2?<|im_end|>\n", "Ünïcödé and 日本語 🙂"]


def real_gguf(asset: str):
    """(path, GGUFModel) of a GGUF asset; skips the test, with the reason, when it cannot be fetched."""
    try:
        path = asset_path(asset)
    except AssetError as e:
        pytest.skip(f"{asset} not available: {e}")
    return path, load_gguf(path)


@pytest.fixture(scope="module")
def smollm2():
    return real_gguf("smollm2-gguf")


def test_smollm2_tokenizer_matches_transformers(smollm2):
    transformers = pytest.importorskip("transformers")
    path, m = smollm2
    want = dict(architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=576, intermediate_size=1536,
                num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=1e5,
                max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    assert {k: m.config[k] for k in want} == want
    ours = Tokenizer.from_str(m.tokenizer_json)
    theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in SENTENCES:
        assert ours.encode(text).ids == theirs(text).input_ids, text
    assert [ours.id_to_token(i) for i in ours.encode("2018").ids] == list("2018")  # SmolLM2 splits digits


def test_smollm2_export_greedy_matches_transformers(smollm2, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF")
    path, m = smollm2
    load = transformers.AutoModelForCausalLM.from_pretrained
    theirs = load(path.parent, gguf_file=path.name, dtype=torch.float32)
    ref = theirs.state_dict()
    for n, (name, w) in enumerate(m.tensors()):  # exact dequantization and Q/K unpermutation, first layers
        assert torch.equal(w, ref[name]), name
        if n == 12:
            break
    ours = load(m.save_hf(tmp_path / "hf", progress=False), dtype=torch.float32)
    ids = torch.tensor([Tokenizer.from_str(m.tokenizer_json).encode(SENTENCES[0]).ids])
    with torch.no_grad():
        assert (ours(ids).logits - theirs(ids).logits).abs().max() < 0.5  # bf16 weight rounding
        kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=2)
        assert torch.equal(ours.generate(ids, **kw), theirs.generate(ids, **kw))


def test_convert_keeps_a_gguf_4bit_expert_grid(tmp_path, bpe, monkeypatch):
    """Experts stored as Q4_0/Q4_1 become the store's int4 (group 32) with their own codes, not re-fitted,
    and by default its top tier: no bf16 copy of 4-bit values."""
    from hobbit.store.gguf_native import native_experts
    from hobbit.store.format import ExpertStore
    monkeypatch.setitem(QTYPES, "ffn_up_exps", Q.Q4_0)  # gate Q4_1, up Q4_0, down Q4_0: all on a 4-bit grid
    path = tmp_path / "tiny-moe-q4.gguf"
    write_gguf(path, bpe, experts=EXPERTS, seed=2)
    store = convert(path, tmp_path / "store", progress=False, dense="bf16")
    s = ExpertStore(store)
    assert (s.group_size, s.precisions, s.source_precision) == (32, ["int4", "int2"], "int4")
    kept = native_experts(load_gguf(path).raw)(1, 3)
    got = s.read(1, 3, "int4")
    for proj in ("w13", "w2"):
        for key in ("q", "sz"):
            assert torch.equal(got[proj][key], kept[proj][key]), (proj, key)
    s.close()


def test_convert_defaults_to_int8_on_top_of_wider_gguf_experts(tmp_path, bpe):
    """Q8_0 among the experts (the module's QTYPES: gate Q4_1, up Q8_0, down Q4_0): int8 holds them on top,
    with int4 and int2 below; explicit precisions still win."""
    from hobbit.store.format import ExpertStore
    path = tmp_path / "tiny-moe-mixed.gguf"
    write_gguf(path, bpe, experts=EXPERTS, seed=3)
    s = ExpertStore(convert(path, tmp_path / "store", progress=False, dense="bf16"))
    assert s.precisions == ["int8", "int4", "int2"] and s.group_size != 32  # no layer keeps a 4-bit grid
    s.close()
    s = ExpertStore(convert(path, tmp_path / "asked", precisions="bf16,int4", progress=False, dense="bf16"))
    assert s.precisions == ["bf16", "int4"] and s.source_precision == "int8"  # a fact of the source
    s.close()


def test_untuned_hobbit_keeps_a_4bit_gguf_at_4_bits(tmp_path, bpe, monkeypatch):
    """Run from a Q4 GGUF's store, untuned policy hobbit loads nothing at int2 (a warning says why), and a
    trace carries the source precision, so `hobbit simulate` resolves the same."""
    import hobbit
    from hobbit.lab.simulate import load_trace, resolve_for
    from hobbit.runtime.config import RunConfig
    monkeypatch.setitem(QTYPES, "ffn_up_exps", Q.Q4_0)
    path = tmp_path / "tiny-moe-q4.gguf"
    write_gguf(path, bpe, experts=EXPERTS, seed=2)
    store = convert(path, tmp_path / "store", progress=False, dense="bf16")
    with pytest.warns(UserWarning, match="came as int4.*t1 = t2 = 1"):
        engine = hobbit.load(store, budget="50%", policy="hobbit", trace=tmp_path / "t.gz")
    try:
        engine.generate(engine.tokenizer.encode("prices rose"), max_new_tokens=3)
        stats = engine.stats()
    finally:
        engine.close()
    assert stats["skipped"] == 0 and set(stats["hits_by_precision"]) | set(stats["misses_by_precision"]) == {"int4"}
    header, _ = load_trace(tmp_path / "t.gz")
    opt = resolve_for(header, RunConfig(policy="hobbit", budget="50%")).options
    assert header["source_precision"] == "int4" and (opt.t1, opt.t2) == (1.0, 1.0)
