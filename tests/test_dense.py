"""Dense weights stored in their run precision, read into owned memory; the growing KV cache; memory()."""
from __future__ import annotations

import json
import math
import shutil

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import hobbit
from hobbit.store import dense
from hobbit.runtime import model as model_mod
from hobbit.store import quant
from hobbit.store.checkpoint import open_checkpoint
from hobbit.store.convert import convert
from hobbit.runtime.experts import DenseExperts
from hobbit.runtime.model import Transformer

from tiny import make_tiny_checkpoint

PROMPT = [3, 17, 42, 99, 7, 128, 64, 5, 200, 11, 31, 77]


@pytest.fixture(scope="module")
def stores(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    return {f: convert(tiny_checkpoint, root / f, precisions="bf16", dense=f, progress=False)
            for f in ("fp32", "int8", "int4")}


def greedy(eng, n: int = 12) -> tuple[torch.Tensor, list[int]]:
    out = eng.generate(PROMPT, max_new_tokens=n, stop_token_ids=[])
    return eng.logits(PROMPT), out.token_ids


def test_stored_int4_loads_without_quantizing_and_equals_load_time_quantization(stores, monkeypatch):
    m = json.loads((stores["int4"] / "manifest.json").read_text())
    assert m["dense_format"] == {"format": "int4", "group_size": 32}
    with safe_open(stores["int4"] / "dense.safetensors", "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.weight.q" in names and "model.layers.0.self_attn.q_proj.weight.sz" in names
    assert "model.layers.0.mlp.gate.weight" in names  # routers stay plain
    ref = hobbit.load(stores["fp32"], policy="resident", dense="int4")  # quantized at load, as before
    ref_logits, ref_ids = greedy(ref)
    ref.close()
    monkeypatch.setattr(quant, "quantize", lambda *a, **k: pytest.fail("loading a stored format quantized"))
    eng = hobbit.load(stores["int4"], policy="resident")
    logits, ids = greedy(eng)
    assert torch.equal(logits, ref_logits) and ids == ref_ids
    assert isinstance(eng.model.layers[0].self_attn.qkv, quant.QuantLinear)
    assert isinstance(eng.model.layers[0].mlp.gate, torch.nn.Linear)
    eng.close()


def test_old_store_without_dense_format_loads(stores, tmp_path):
    old = shutil.copytree(stores["fp32"], tmp_path / "old")
    m = json.loads((old / "manifest.json").read_text())
    del m["dense_format"]
    (old / "manifest.json").write_text(json.dumps(m))
    a, b = hobbit.load(old, policy="resident", dtype="fp32"), hobbit.load(stores["fp32"], policy="resident", dtype="fp32")
    assert torch.equal(a.logits(PROMPT), b.logits(PROMPT))
    a.close(), b.close()


def test_override_of_a_quantized_store(stores):
    with pytest.warns(UserWarning, match="cannot restore"):
        eng = hobbit.load(stores["int4"], policy="resident", dense="int8")  # requantized from the int4 weights
    assert eng.model.layers[0].self_attn.qkv.w.fmt == "int8"
    with pytest.warns(UserWarning, match="cannot restore"):
        hobbit.load(stores["int4"], policy="resident", dense="bf16").close()
    eng.close()


def test_memory_counts_quantized_dense_bytes_and_kv_as_allocated(stores):
    sizes = {}
    for fmt in ("fp32", "int8", "int4"):
        eng = hobbit.load(stores[fmt], policy="resident")
        mem = eng.memory()
        params = sum(p.numel() * p.element_size() for p in eng.model.parameters())
        assert mem["dense_bytes"] == eng.model.dense_nbytes() >= params
        if fmt != "fp32":
            assert mem["dense_bytes"] > params  # the quantized projections count too
        assert mem["kv_cache_bytes"] == eng.model.kv_nbytes() > 0
        assert min(mem["rss_bytes"], mem["baseline_rss_bytes"], mem["peak_rss_bytes"]) > 0
        sizes[fmt] = mem["dense_bytes"]
        eng.close()
    assert sizes["fp32"] > sizes["int8"] > sizes["int4"]


def test_read_is_owned_memory_and_equals_safetensors(stores):
    from safetensors.torch import load_file
    path = stores["int4"] / "dense.safetensors"
    ours, theirs = dense.read(path), load_file(path)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)
    t = ours["model.norm.weight"]
    assert t.untyped_storage().nbytes() == t.numel() * t.element_size()  # its own buffer, not a file map
    fused = dense.read(stores["fp32"] / "dense.safetensors", dense.FUSED)
    parts = [fused[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"]
    qkv = quant.cat0(parts)  # read back to back: fusing is a view
    assert qkv.data_ptr() == parts[0].data_ptr() and torch.equal(qkv, torch.cat(parts))


def test_embedding_stays_file_mapped_when_the_store_has_its_own_lm_head(stores):
    path = stores["int8"] / "dense.safetensors"
    owned = dense.read(path, map_embedding=False)
    assert str(path) not in Path("/proc/self/maps").read_text()
    mapped = dense.read(path)
    emb = mapped[dense.EMBEDDING]
    assert str(path) in Path("/proc/self/maps").read_text()  # rows come from the page cache, not owned RAM
    assert torch.equal(emb, owned[dense.EMBEDDING]) and emb.dtype == owned[dense.EMBEDDING].dtype
    del mapped, emb
    assert dense.embedding_is_lookup(["model.embed_tokens.weight", "lm_head.weight.q"])
    assert not dense.embedding_is_lookup(["model.embed_tokens.weight", "model.norm.weight"])  # tied: it is the head
    eng = hobbit.load(stores["int8"], policy="resident")
    assert eng.memory()["dense_mapped_bytes"] == owned[dense.EMBEDDING].numel() * 2  # bf16 rows
    eng.close()
    eng = hobbit.load(stores["int8"], policy="resident", dense="int8")  # a re-format may tie the head to it
    assert eng.memory()["dense_mapped_bytes"] == 0
    eng.close()


def test_lock_locks_or_warns(stores):
    """All of it locked and no warning, or a warning naming the limit and less than all of it locked."""
    import warnings
    ts = list(dense.read(stores["int4"] / "dense.safetensors").values())[:4]
    total = sum({t.data_ptr(): t.numel() * t.element_size() for t in ts}.values())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        n = dense.lock(ts)
    if caught:
        assert len(caught) == 1 and "mlock refused" in str(caught[0].message) and "RLIMIT_MEMLOCK" in str(caught[0].message)
        assert n < total
    else:
        assert n == total


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_cat_of_stored_parts_is_exact(fmt):
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, 64, generator=g) for n in (64, 32, 48)]  # 32 and 48: not whole B64 blocks
    qs = [(quant.quantize(w, fmt, 32), tuple(w.shape)) for w in parts]
    cat = quant.cat(qs, fmt)
    ref = torch.cat([quant.dequantize(q, fmt, s, 32) for q, s in qs])
    assert torch.equal(quant.dequantize(cat, fmt, (144, 64), 32), ref)


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])  # RoPE on q and k together / after q-k norms
def test_kv_cache_grows_across_chunks(family, tmp_path, monkeypatch):
    """A decode that crosses two growth boundaries equals transformers, and reset shrinks the cache."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.setattr(model_mod, "KV_CHUNK", 8)
    path = make_tiny_checkpoint(family, tmp_path / family)
    ck = open_checkpoint(path)
    ours = Transformer(ck.config, DenseExperts.from_checkpoint(ck), dtype=torch.float32)
    ours.load_dense(ck.dense_state_dict())
    assert ours.k_cache.shape[2] == 8
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    seq = torch.randint(0, 256, (30,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(seq[None]).logits[0]  # [30,V]
    got = [ours(seq[:5], 0)] + [ours(seq[i:i + 1], i) for i in range(5, 30)]
    assert ours.k_cache.shape[2] == 32  # 8 -> 16 -> 32
    assert (torch.cat(got) - ref).abs().max().item() < 1e-4
    ours.reset()
    assert ours.k_cache.shape[2] == 8
    assert (ours(seq, 0) - ref).abs().max().item() < 1e-4  # one prefill past the first chunk


def test_auto_gives_the_parts_of_a_fused_projection_one_format():
    """A Q4_K_M GGUF mixes 4-bit and 6-bit tensors in one layer: q/k/v (and gate/up) must still fuse."""
    g = torch.Generator().manual_seed(0)
    on_grid = quant.dequantize(quant.quantize(torch.randn(64, 64, generator=g), "int4", 32), "int4", (64, 64), 32)
    off_grid = torch.randn(64, 64, generator=g)
    p = "model.layers.0.self_attn."
    state = {p + "q_proj.weight": on_grid, p + "k_proj.weight": off_grid, p + "v_proj.weight": on_grid,
             p + "o_proj.weight": on_grid, "model.layers.0.mlp.gate_proj.weight": on_grid,
             "model.layers.0.mlp.up_proj.weight": on_grid}
    out = dense.quantize_state(state, "auto")
    fmt = {n: "int4" if f"{n}.sz" in out else "int8" for n in state}
    assert [fmt[p + x] for x in ("q_proj.weight", "k_proj.weight", "v_proj.weight")] == ["int8"] * 3
    assert fmt[p + "o_proj.weight"] == "int4"  # alone: int4 where lossless
    assert fmt["model.layers.0.mlp.gate_proj.weight"] == fmt["model.layers.0.mlp.up_proj.weight"] == "int4"


def test_prefill_logits_of_the_last_token_only(stores, monkeypatch):
    """A prefill's [T, V] fp32 logits are T x 0.6 MB for Qwen2's vocab: generate asks for the last row only,
    which is that row exactly (norm and LM head are per row) where one kernel computes both."""
    from hobbit import kernels
    monkeypatch.setattr(kernels, "max_tokens", lambda kind: math.inf)  # else 1 row and T rows may take two kernels
    eng = hobbit.load(stores["int8"], policy="resident")
    ids = torch.tensor(PROMPT)
    with torch.inference_mode():
        full, last = eng.sequence().step(ids), eng.sequence().step(ids, last_only=True)
    assert full.shape == (len(PROMPT), eng.config.vocab_size) and last.shape == (1, eng.config.vocab_size)
    assert torch.equal(last, full[-1:])
    rows, forward = [], eng.model.forward
    monkeypatch.setattr(eng.model, "forward", lambda *a, **k: rows.append(forward(*a, **k).shape[0]) or forward(*a, **k))
    eng.generate(PROMPT, max_new_tokens=3, stop_token_ids=[])
    assert rows == [1, 1, 1]  # the prefill and two decode steps, one row each
    eng.close()


def test_tokenizer_loads_before_the_dense_weights(tiny_store, monkeypatch):
    """Parsing tokenizer.json peaks at ~3x what the tokenizer keeps (+120 MiB for Qwen2's vocab): first, that
    transient stays below the weights' peak, and the freed parse is trimmed before the weights arrive."""
    from hobbit.runtime import engine as engine_mod
    order, from_dir, read = [], engine_mod.Tokenizer.from_dir, engine_mod.read_dense
    monkeypatch.setattr(engine_mod.Tokenizer, "from_dir", staticmethod(lambda p: order.append("tokenizer") or from_dir(p)))
    monkeypatch.setattr(engine_mod, "read_dense", lambda *a, **k: order.append("dense") or read(*a, **k))
    monkeypatch.setattr(engine_mod, "release_free_heap", lambda: order.append("trim"))
    eng = hobbit.load(tiny_store, policy="resident")
    assert eng.tokenizer is not None and order[:3] == ["tokenizer", "trim", "dense"]
    eng.close()


@pytest.mark.parametrize("src,fmt", [("int8", "int4"), ("int8", "bf16"), ("int4", "int8"), ("plain", "int4")])
def test_convert_matrix_in_row_blocks_equals_the_whole(src, fmt, monkeypatch):
    """Converting a stored matrix row block by row block (the LM head: never a whole fp32 copy) equals
    dequantizing and quantizing it whole."""
    w = torch.randn(320, 64, generator=torch.Generator().manual_seed(0))
    stored = w if src == "plain" else dense.Stored(src, quant.quantize(w, src, 32), (320, 64), 32 if src == "int4" else 0)
    ref = quant.quantize(w if src == "plain" else stored.dequantize(), fmt, 32)
    seen, real = [], quant.quantize
    monkeypatch.setattr(quant, "quantize", lambda x, *a, **k: seen.append(x.shape[0]) or real(x, *a, **k))
    got = dense.convert_matrix(stored, fmt, 32, rows=128)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert seen == [128, 128, 64]  # three blocks, the last one short


def test_lm_head_format_of_its_own_keeps_the_embedding_mapped(stores):
    """--dense int4 --lm-head int8 (llama.cpp's Q4_0 export: Q4_0 projections, Q8_0 output): the projections are
    re-quantized, the stored int8 LM head is kept as it is, and the embedding stays file-mapped."""
    base = hobbit.load(stores["int8"], policy="resident")
    eng = hobbit.load(stores["int8"], policy="resident", dense="int4", lm_head="int8")
    assert eng.model.layers[0].self_attn.qkv.w.fmt == "int4" and eng.model.lm_head.w.fmt == "int8"
    assert torch.equal(eng.model.lm_head.w.w, base.model.lm_head.w.w)  # kept, not re-fitted
    assert eng.memory()["dense_mapped_bytes"] == base.memory()["dense_mapped_bytes"] > 0
    assert eng.memory()["dense_bytes"] < base.memory()["dense_bytes"]
    head4 = hobbit.load(stores["int8"], policy="resident", lm_head="int4")  # the LM head alone
    assert head4.model.lm_head.w.fmt == "int4" and head4.model.layers[0].self_attn.qkv.w.fmt == "int8"
    for e in (base, eng, head4):
        e.close()


def test_reformat_consumes_its_input(stores):
    """Each stored matrix is freed as soon as it is converted: reformat owns (and empties) the dict it gets."""
    state = {n.removeprefix("model."): t for n, t in dense.read(stores["int8"] / "dense.safetensors").items()}
    out = dense.reformat(state, "int4", 32, tied=False, head="int8")
    assert state == {} and "lm_head.weight.q" in out and "layers.0.self_attn.q_proj.weight.sz" in out
