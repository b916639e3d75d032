"""Native 4-bit grid: Q4_0 / Q4_1 / Q4_K blocks become hobbit's int4 storage with their codes kept,
within bf16 rounding of the GGUF's own dequantization (a re-fit of Q4_0 is ~30x worse), in the
exact layout quant.quantize writes, and usable by the int4 kernel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize

from hobbit.store import quant
from hobbit.store.gguf_native import affine_4bit, int4_storage, native_expert_int4, native_experts, native_int4
from kquants import quantize_k

torch.set_num_threads(1)
TYPES = [Q.Q4_0, Q.Q4_1, Q.Q4_K]


def blocks(w: np.ndarray, qtype: Q) -> np.ndarray:
    return quantize_k(w, qtype) if qtype == Q.Q4_K else quantize(w, qtype)


def weights(*shape: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)  # rows with different offsets, so Q4_1/Q4_K mins matter
    return (rng.standard_normal(shape) * 0.02 + rng.standard_normal((*shape[:-1], 1)) * 0.01).astype(np.float32)


def rel(w, ref) -> float:
    return float(np.linalg.norm(np.asarray(w) - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("qtype", TYPES)
def test_affine_grid_is_exactly_the_gguf_dequantization(qtype):
    w = weights(3, 64, 512)  # stacked like ffn_*_exps [E, out, in]
    data = blocks(w, qtype)
    ref = dequantize(data, qtype).reshape(w.shape)
    codes, a, b = affine_4bit(data, qtype)
    assert codes.shape == w.shape and a.shape == b.shape == (3, 64, 16) and codes.max() <= 15
    rebuilt = (codes.reshape(3, 64, 16, 32) * a[..., None] + b[..., None]).reshape(w.shape)
    np.testing.assert_allclose(rebuilt, ref, rtol=0, atol=1e-7)


@pytest.mark.parametrize("qtype", TYPES)
def test_native_storage_keeps_the_grid(qtype):
    w = weights(128, 512, seed=1)
    data = blocks(w, qtype)
    ref = dequantize(data, qtype).reshape(w.shape)
    native = int4_storage(*affine_4bit(data, qtype))
    refit = quant.quantize(torch.from_numpy(ref), "int4", 32)
    assert {k: (v.dtype, v.shape) for k, v in native.items()} == {k: (v.dtype, v.shape) for k, v in refit.items()}
    err = rel(quant.dequantize(native, "int4", w.shape, 32), ref)
    assert err < 0.004  # bf16 rounding of scale and zero only
    refit_err = rel(quant.dequantize(refit, "int4", w.shape, 32), ref)
    assert err <= refit_err * 1.001
    if qtype == Q.Q4_0:  # symmetric grid: a min/max re-fit cannot land on it
        assert refit_err > 10 * err
    codes = affine_4bit(data, qtype)[0]
    assert torch.equal(quant._codes4(native["q"], 128), torch.from_numpy(codes))  # codes kept bit for bit


def test_native_weights_run_through_the_int4_kernel():
    w = weights(128, 256, seed=2)
    data = quantize(w, Q.Q4_1)
    st = int4_storage(*affine_4bit(data, Q.Q4_1))
    ref = quant.dequantize(st, "int4", w.shape, 32)
    x = torch.randn(3, 256)
    prepared = quant.prepare(st, "int4", w.shape, 32, torch.bfloat16)
    y = quant.linear(x.bfloat16(), prepared).float()
    assert (y - x @ ref.T).abs().max() < 0.05 * (x @ ref.T).abs().max()


def test_gguf_tensors_and_stacked_experts(tmp_path):
    E, I, H = 4, 64, 256
    gate, up, down = weights(E, I, H, seed=3), weights(E, I, H, seed=4), weights(E, H, I, seed=5)
    path = tmp_path / "t.gguf"
    w = GGUFWriter(str(path), "qwen2moe")
    for name, arr, qtype in [("blk.0.ffn_gate_exps.weight", gate, Q.Q4_K), ("blk.0.ffn_up_exps.weight", up, Q.Q4_0),
                             ("blk.0.ffn_down_exps.weight", down, Q.Q4_1), ("blk.0.attn_q.weight", gate[0], Q.Q4_K),
                             ("blk.0.attn_k.weight", gate[0], Q.Q8_0)]:
        w.add_tensor(name, blocks(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    t = {x.name.split(".")[2]: x for x in GGUFReader(path).tensors}
    ref = lambda x: dequantize(x.data, x.tensor_type).reshape([int(n) for n in reversed(x.shape)])  # noqa: E731
    expert = native_expert_int4(t["ffn_gate_exps"], t["ffn_up_exps"], t["ffn_down_exps"], 2)
    w13 = quant.dequantize(expert["w13"], "int4", (2 * I, H), 32).numpy()
    assert rel(w13, np.concatenate([ref(t["ffn_gate_exps"])[2], ref(t["ffn_up_exps"])[2]])) < 0.004
    assert rel(quant.dequantize(expert["w2"], "int4", (H, I), 32), ref(t["ffn_down_exps"])[2]) < 0.004
    assert rel(quant.dequantize(native_int4(t["attn_q"]), "int4", (I, H), 32), ref(t["attn_q"])) < 0.004
    by_name = {x.name: x for x in GGUFReader(path).tensors}
    assert torch.equal(native_experts(by_name)(0, 2)["w2"]["q"], expert["w2"]["q"])
    assert native_experts(by_name)(1, 0) is None  # no such layer: the caller quantizes as usual
    with pytest.raises(ValueError, match="Q8_0 has no 4-bit affine grid.*Q4_0, Q4_1, Q4_K"):
        native_int4(t["attn_k"])
    with pytest.raises(ValueError, match="2-D tensor.*native_expert_int4"):
        native_int4(t["ffn_gate_exps"])
