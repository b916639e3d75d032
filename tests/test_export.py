"""hobbit export: a tiny Qwen2-MoE store (and dense Qwen2 / Llama) written as a GGUF with the names
and metadata llama.cpp needs, read back by hobbit's own GGUF reader into a store whose logits match
the original (bf16 exactly but for dense rounding, q8_0/q4_0 looser); models llama.cpp would run
differently are refused. When a llama.cpp build is in the cache ($HOBBIT_CACHE/peers, see
benchmarks/peer_llamacpp.py), stock llama.cpp runs an exported SmolMoE and its greedy text equals hobbit's."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from gguf import GGUFReader

import hobbit
from hobbit.models.assets import AssetError, cache_dir
from hobbit.models.recipes import asset_path
from hobbit.cli import main as cli_main
from hobbit.store.convert import convert
from hobbit.store.export import ExportRefused, export_gguf
from hobbit.store.gguf import load_gguf
from tiny import IM_END, make_tiny_checkpoint

torch.set_num_threads(1)
PROMPT = [5, 9, 23, 101, 77, 3, 150, 42, 8, 19, 60, 2]
MERGES = [("t", "h"), ("h", "e"), ("i", "n"), ("e", "r"), ("a", "n"), ("Ġ", "t"), ("Ġ", "a"), ("r", "e"),
          ("o", "n"), ("a", "t"), ("e", "n"), ("n", "d")]  # 12 merges: ids 260..271 fill the tiny vocab
LLAMA_SIMPLE = cache_dir() / "peers" / "llama-cpp-python-0.3.36" / "build" / "bin" / "llama-simple"


def with_bpe_merges(path):
    """tests/tiny's byte tokenizer plus 12 merges and GPT-2's split (llama.cpp needs merges)."""
    tj = json.loads((path / "tokenizer.json").read_text())
    for i, (a, b) in enumerate(MERGES):
        tj["model"]["vocab"][a + b] = 260 + i
    tj["model"]["merges"] = [[a, b] for a, b in MERGES]
    tj["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    (path / "tokenizer.json").write_text(json.dumps(tj))
    return path


def tiny_store(tmp_path, family="qwen2_moe", precisions=("bf16", "int4"), **overrides):
    if family == "qwen2_moe":
        overrides = {"mlp_only_layers": [], **overrides}  # llama.cpp's qwen2moe: every layer MoE
    if family == "llama":
        overrides = {"rope_scaling": None, **overrides}
    hf = with_bpe_merges(make_tiny_checkpoint(family, tmp_path / f"hf-{family}", **overrides))
    return convert(hf, tmp_path / f"store-{family}", precisions=list(precisions), progress=False)


def logits(store) -> torch.Tensor:
    eng = hobbit.load(store, dtype="fp32", policy="resident")
    try:
        return eng.logits(PROMPT)
    finally:
        eng.close()


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    store = tiny_store(tmp)
    return tmp, store, logits(store)


def test_metadata_and_names_llama_cpp_needs(moe):
    tmp, store, _ = moe
    out = export_gguf(store, tmp / "moe-bf16.gguf", "bf16", progress=False)
    r = GGUFReader(out)
    kv = {k: f.contents() for k, f in r.fields.items()}
    assert kv["general.architecture"] == "qwen2moe" and kv["general.file_type"] == 32
    want = {"block_count": 3, "embedding_length": 64, "attention.head_count": 4, "attention.head_count_kv": 2,
            "expert_count": 8, "expert_used_count": 2, "expert_feed_forward_length": 64,
            "expert_shared_feed_forward_length": 128, "context_length": 256}
    assert {k: kv[f"qwen2moe.{k}"] for k in want} == want
    assert "qwen2moe.expert_weights_norm" not in kv and kv["qwen2moe.rope.freq_base"] == 10000.0
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gpt-2"
    assert len(kv["tokenizer.ggml.tokens"]) == len(kv["tokenizer.ggml.token_type"]) == 272
    assert kv["tokenizer.ggml.merges"][0] == "t h" and kv["tokenizer.ggml.token_type"][259] == 3  # control
    assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"], kv["tokenizer.ggml.eot_token_id"]) \
        == (256, 257, IM_END)
    assert "<|im_start|>" in kv["tokenizer.chat_template"]
    t = {x.name: (x.tensor_type.name, [int(n) for n in x.shape]) for x in r.tensors}
    assert t["output.weight"] == ("BF16", [64, 272]) and t["token_embd.weight"] == ("BF16", [64, 272])
    assert t["blk.2.ffn_gate_exps.weight"] == ("BF16", [64, 64, 8])   # GGUF ne: [in, out, experts]
    assert t["blk.2.ffn_down_exps.weight"] == ("BF16", [64, 64, 8])
    assert t["blk.0.ffn_gate_inp.weight"] == ("F32", [64, 8]) and t["blk.0.ffn_gate_inp_shexp.weight"] == ("F32", [64])
    assert t["blk.1.attn_q.bias"][0] == "F32" and t["blk.1.ffn_up_shexp.weight"] == ("BF16", [64, 128])


@pytest.mark.parametrize("kind,bound", [("bf16", 0.05), ("q8_0", 0.8), ("q4_0", 2.0)])
def test_round_trip_through_hobbits_reader(moe, kind, bound):
    tmp, store, ref = moe
    out = export_gguf(store, tmp / f"moe-{kind}.gguf", kind, progress=False)
    back = convert(out, tmp / f"back-{kind}", precisions=["fp32"], progress=False)
    m = load_gguf(out)
    assert m.config["architectures"] == ["Qwen2MoeForCausalLM"] and m.config["norm_topk_prob"] is False
    got = logits(back)
    err = (got - ref).abs()
    assert err.max() < bound and err.mean() < bound / 8, (err.max(), err.mean())
    if kind != "q4_0":  # q4_0 flips a few top-k choices on a random model
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_bf16_experts_are_copied_exactly(moe):
    tmp, store, _ = moe
    m = load_gguf(export_gguf(store, tmp / "exact.gguf", "bf16", progress=False))
    sd = m.state_dict()
    from hobbit.store import quant
    from hobbit.store.format import ExpertStore
    s = ExpertStore(store, direct_io=False)
    w13 = quant.dequantize(s.read(0, 5, "bf16")["w13"], "bf16", s.shapes()["w13"], s.group_size)
    assert torch.equal(torch.cat([sd["model.layers.0.mlp.experts.5.gate_proj.weight"],
                                  sd["model.layers.0.mlp.experts.5.up_proj.weight"]]), w13)
    s.close()


def test_norm_topk_prob_is_refused_unless_allowed(tmp_path):
    store = tiny_store(tmp_path, norm_topk_prob=True, precisions=("bf16",))
    with pytest.raises(ExportRefused, match=r"norm_topk_prob = true.*never does.*--allow-inexact"):
        export_gguf(store, tmp_path / "x.gguf", progress=False)
    assert not (tmp_path / "x.gguf").exists()
    assert cli_main(["export", str(store), str(tmp_path / "x.gguf")]) == 2
    assert cli_main(["export", str(store), str(tmp_path / "x.gguf"), "--allow-inexact"]) == 0
    kv = {k: f.contents() for k, f in GGUFReader(tmp_path / "x.gguf").fields.items()}
    assert kv["qwen2moe.expert_weights_norm"] is True  # hobbit's reader renormalizes again
    assert load_gguf(tmp_path / "x.gguf").config["norm_topk_prob"] is True
    back = convert(tmp_path / "x.gguf", tmp_path / "back", precisions=["fp32"], progress=False)
    assert (logits(back) - logits(store)).abs().mean() < 0.02  # bf16 dense rounding (may flip a top-2 choice)


def test_models_llama_cpp_cannot_run_are_refused(tmp_path):
    store = tiny_store(tmp_path, mlp_only_layers=[1], precisions=("bf16",))
    with pytest.raises(ExportRefused, match=r"layers \[1\] are dense.*every layer an MoE layer"):
        export_gguf(store, tmp_path / "x.gguf", progress=False)
    mixtral = convert(make_tiny_checkpoint("mixtral", tmp_path / "mx"), tmp_path / "mxs", precisions=["bf16"],
                      progress=False)
    with pytest.raises(ExportRefused, match="writes qwen2_moe, qwen2, llama models; mixtral is not"):
        export_gguf(mixtral, tmp_path / "m.gguf", progress=False)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_dense_families_round_trip(tmp_path, family):
    store = tiny_store(tmp_path, family, precisions=("bf16",))
    out = export_gguf(store, tmp_path / f"{family}.gguf", "bf16", progress=False)
    names = {t.name for t in GGUFReader(out).tensors}
    assert "output.weight" in names and ("blk.0.attn_q.bias" in names) == (family == "qwen2")
    back = convert(out, tmp_path / "back", precisions=["fp32"], progress=False)  # llama: Q/K permuted and back
    ref = logits(store)
    err = (logits(back) - ref).abs()
    assert err.max() < 0.03 * ref.abs().max() and err.mean() < 0.005 * ref.abs().max()  # bf16 dense rounding


@pytest.mark.skipif(not LLAMA_SIMPLE.is_file(), reason=f"no llama.cpp build at {LLAMA_SIMPLE} "
                    "(benchmarks/peer_llamacpp.py builds it)")
def test_stock_llama_cpp_runs_smolmoe_as_hobbit_does(tmp_path):
    """Real weights: SmolMoE routed without renormalization (llama.cpp's qwen2moe rule), bf16. Each token llama.cpp
    chose greedily is hobbit's argmax on the same text (teacher-forced): comparing two free-running greedy texts
    instead turns one near-tie rounded differently (one kernel for a prefill, another for a decode row) into two
    different continuations."""
    try:
        src = asset_path("smolmoe", progress=False)
    except AssetError as e:
        pytest.skip(f"SmolMoE not available: {e}")
    store = convert(src, tmp_path / "store", precisions=["bf16"], progress=False)
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["config"]["norm_topk_prob"] = False  # SmolMoE renormalizes; this variant is what llama.cpp can run
    (store / "manifest.json").write_text(json.dumps(manifest))
    out = export_gguf(store, tmp_path / "smolmoe.gguf", "bf16", progress=False)
    prompt, n = "The capital of France is", 24
    done = subprocess.run([str(LLAMA_SIMPLE), "-m", str(out), "-n", str(n), prompt], capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    eng = hobbit.load(store, dtype="bf16", policy="resident")
    ids = eng.tokenizer.encode(prompt)
    theirs = eng.tokenizer.encode(done.stdout.decode(errors="replace").strip())
    with torch.inference_mode():
        logits = eng.logits(theirs).float()  # [T, V], teacher-forced on llama.cpp's text
    eng.close()
    assert theirs[:len(ids)] == ids and len(theirs) >= len(ids) + n - 2
    steps = range(len(ids) - 1, len(theirs) - 1)
    gaps = [float(logits[i].max() - logits[i, theirs[i + 1]]) for i in steps]  # 0 where hobbit agrees
    assert max(gaps) < 0.25 and sum(g > 0 for g in gaps) <= 2  # at most a near-tie or two rounded the other way
