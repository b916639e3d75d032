"""The mxfp4 precision: gpt-oss's native expert format kept as a store tier. The reference dequantization
against transformers' and gguf's, the fast path against the reference, and a gpt-oss checkpoint with MXFP4
experts converted with its codes kept, run against transformers."""
from __future__ import annotations

import pytest
import torch

import hobbit
from hobbit.store import mxfp4, quant
from hobbit.store.convert import convert
from hobbit.store.format import ExpertStore

from test_engine import check_budget
from tiny import decode_logits, make_mxfp4_gpt_oss

PROMPT = [3, 17, 42, 99, 7, 128, 64, 5, 200, 11, 31, 77]


def _codes(N=48, K=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (N, K // 32, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(100, 140, (N, K // 32), generator=g, dtype=torch.uint8)
    scales[0, 0], scales[1, 0] = 0, 254  # the extremes of e8m0 (2^-127, 2^127)
    return blocks, scales


def test_dequantize_matches_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = _codes()
    ref = convert_moe_packed_tensors(blocks[None], scales[None], dtype=torch.float32)[0].T  # [N,K]
    q = mxfp4.from_hf(blocks, scales)
    assert torch.equal(mxfp4.dequantize(q), ref)
    assert torch.equal(quant.dequantize(q, "mxfp4", tuple(ref.shape), 0), ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fast_path_is_exact(dtype):
    """Every MXFP4 value is a bf16: the table path writes exactly the reference, in bf16 as in fp32."""
    q = mxfp4.from_hf(*_codes())
    ref = mxfp4.dequantize(q)
    out = torch.empty(ref.shape, dtype=dtype)
    assert torch.equal(mxfp4.dequantize_into(q["blocks"], q["scales"], out).float(), ref)
    x = torch.randn(3, ref.shape[1]).to(dtype)
    p = quant.prepare(q, "mxfp4", tuple(ref.shape), 0, dtype)
    assert p.kind == "mxfp4" and p.w.data_ptr() == q["blocks"].data_ptr()  # views: no copy, no bf16 matrix held
    assert p.nbytes == quant.storage_nbytes("mxfp4", tuple(ref.shape), 0)
    torch.testing.assert_close(quant.linear(x, p), torch.nn.functional.linear(x, ref.to(dtype)), rtol=0, atol=0,
                               equal_nan=True)  # (2^127 x 6 overflows in bf16 and fp32 alike)


def test_ggml_layout_round_trip():
    """GGUF's MXFP4 (scale byte, then element j | j+16 per byte) <-> ours: gguf.quants reads the same values."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    q = mxfp4.from_hf(*_codes())
    N, K = q["blocks"].shape[0], q["blocks"].shape[1] * 2
    raw = mxfp4.to_ggml(q)
    assert torch.equal(torch.from_numpy(dequantize(raw.numpy(), GGMLQuantizationType.MXFP4).copy()).view(N, K),
                       mxfp4.dequantize(q))
    back = mxfp4.from_ggml(raw, (N, K))
    assert torch.equal(back["blocks"], q["blocks"]) and torch.equal(back["scales"], q["scales"])
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(1))  # our rounding = gguf's quantizer
    theirs = mxfp4.from_ggml(torch.from_numpy(quantize(w.numpy(), GGMLQuantizationType.MXFP4)), (N, K))
    ours = quant.quantize(w, "mxfp4")
    assert torch.equal(ours["scales"], theirs["scales"])
    assert torch.equal(mxfp4.dequantize(ours), mxfp4.dequantize(theirs))  # (+0 and -0 may differ in code)


def test_shape_errors():
    with pytest.raises(ValueError, match="multiple of 32"):
        quant.check_shape("mxfp4", (8, 48), 64)


@pytest.fixture(scope="module")
def mx(tmp_path_factory):
    """(checkpoint, transformers' own model loaded from it with Mxfp4Config(dequantize=True), store)."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    root = tmp_path_factory.mktemp("mxfp4")
    path, manual = make_mxfp4_gpt_oss(root / "hf")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager",
                                              quantization_config=Mxfp4Config(dequantize=True)).eval()
    with torch.inference_mode():  # transformers' CPU loader dequantizes exactly as our reference does
        assert torch.equal(hf(torch.tensor([PROMPT])).logits, manual(torch.tensor([PROMPT])).logits)
    store = convert(path, root / "store", progress=False, dense="fp32")  # default tiers
    return path, hf, store


def test_convert_keeps_the_codes(mx):
    from hobbit.store.checkpoint import open_checkpoint
    from safetensors.torch import load_file

    path, _, store = mx
    s = ExpertStore(store)
    assert s.precisions == ["mxfp4", "int4", "int2"]  # the native format is the top tier
    state = load_file(str(path / "model.safetensors"))
    blocks = state["model.layers.1.mlp.experts.gate_up_proj_blocks"][5]  # [2I, H/32, 16], gate/up rows interleaved
    parts = s.read(1, 5, "mxfp4")
    assert torch.equal(parts["w13"]["blocks"], torch.cat((blocks[0::2], blocks[1::2])).flatten(1))
    assert torch.equal(parts["w2"]["scales"], state["model.layers.1.mlp.experts.down_proj_scales"][5])
    w13, _ = open_checkpoint(path).expert_weights(1, 5)
    assert torch.equal(mxfp4.dequantize(parts["w13"]), w13)
    assert s.expert_nbytes("mxfp4") < s.expert_nbytes("int4") * 1.2
    s.close()


def test_explicit_precisions_are_honoured(mx, tmp_path):
    path, _, _ = mx  # the default keeps mxfp4 on top; asking for bf16 tiers gets bf16 tiers
    s = ExpertStore(convert(path, tmp_path / "store", precisions="bf16,int4,int2", progress=False, dense="fp32"))
    assert s.precisions == ["bf16", "int4", "int2"]
    s.close()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_logits_match_transformers(mx, dtype):
    """fp32: prompt logits and 8 greedy tokens as transformers' (MXFP4 checkpoint, dequantized on load);
    bf16 runs (loosely close)."""
    _, hf, store = mx
    eng = hobbit.load(store, policy="resident", dtype=dtype)
    assert eng.provider.pools["mxfp4"].zero_copy  # the slot is the stored codes; no bf16 copy held
    with torch.inference_mode():
        ref = hf(torch.tensor([PROMPT])).logits[0]
    err = (eng.logits(PROMPT) - ref).abs().max().item()
    assert err < (1e-4 if dtype == "fp32" else 0.5 * ref.abs().max().item())
    if dtype == "fp32":
        with torch.inference_mode():
            want = hf.generate(torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, len(PROMPT):].tolist()
        assert eng.generate(PROMPT, max_new_tokens=8, stop_token_ids=[]).token_ids == want
    eng.close()


def test_offloaded_equals_resident(mx):
    _, _, store = mx
    ref = hobbit.load(store, policy="resident")
    ref_logits, ref_toks = decode_logits(ref, PROMPT, 8)
    minimum = ref.provider.expert_bytes("mxfp4") * ref.config.top_k
    ref.close()
    eng = hobbit.load(store, policy="lru", budget=minimum)
    logits, toks = decode_logits(eng, PROMPT, 8, after_step=check_budget)
    assert toks == ref_toks and torch.equal(logits, ref_logits)
    eng.close()
    eng = hobbit.load(store, policy="hobbit", budget="60%")  # mxfp4 high, int4 low
    assert eng.provider.opt.high == "mxfp4" and eng.provider.opt.low == "int4"
    assert len(eng.generate(PROMPT, max_new_tokens=4, stop_token_ids=[]).token_ids) == 4
    eng.close()


def test_quantized_from_float_runs(tmp_path):
    """Any family can store an mxfp4 tier (rounded from its float weights)."""
    from tiny import make_tiny_checkpoint

    ck = make_tiny_checkpoint("qwen2_moe", tmp_path / "hf")
    store = convert(ck, tmp_path / "store", precisions="bf16,mxfp4", progress=False)
    eng = hobbit.load(store, policy="lru", budget="50%", high="mxfp4")
    assert len(eng.generate(PROMPT, max_new_tokens=4, stop_token_ids=[]).token_ids) == 4
    eng.close()
