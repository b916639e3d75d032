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
from hobbit.store.gguf_native import (affine_4bit, default_precisions, expert_types, has_native_layer, int4_storage,
                                      native_expert_int4, native_experts, native_int4, source_precision)
from kquants import quantize_k

torch.set_num_threads(1)
TYPES = [Q.Q4_0, Q.Q4_1, Q.Q4_K]


def blocks(w: np.ndarray, qtype: Q) -> np.ndarray:
    return quantize_k(w, qtype) if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K) else quantize(w, qtype)


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


class _Tensor:  # what default_precisions reads of a ReaderTensor
    def __init__(self, qtype: Q):
        self.tensor_type = qtype


def raw_of(layers: list[tuple[Q, Q, Q]], **extra: Q) -> dict:
    names = {f"blk.{i}.ffn_{p}_exps.weight": _Tensor(t) for i, ts in enumerate(layers)
             for p, t in zip(("gate", "up", "down"), ts)}
    return names | {"blk.0.attn_q.weight": _Tensor(Q.Q8_0)} | {k: _Tensor(t) for k, t in extra.items()}


def test_default_precisions_put_the_experts_own_precision_on_top():
    q4 = (Q.Q4_K, Q.Q4_K, Q.Q4_K)
    assert default_precisions(raw_of([q4, (Q.Q4_0, Q.Q4_1, Q.Q4_0)])) == ("int4", "int2")  # attention types do not count
    k_m = raw_of([(Q.Q4_K, Q.Q4_K, Q.Q6_K), q4])  # Q4_K_M: more bits for some layers' down_proj
    assert default_precisions(k_m) == ("int8", "int4", "int2")
    assert expert_types(k_m) == {0: {Q.Q4_K, Q.Q6_K}, 1: {Q.Q4_K}} and has_native_layer(k_m)
    assert default_precisions(raw_of([(Q.Q8_0,) * 3])) == ("int8", "int4", "int2")
    assert not has_native_layer(raw_of([(Q.Q8_0,) * 3]))
    assert [source_precision(raw_of(x)) for x in ([q4], [(Q.Q4_K, Q.Q4_K, Q.Q6_K)], [(Q.MXFP4,) * 3])] \
        == ["int4", "int8", "mxfp4"]
    for floats in (Q.F16, Q.BF16, Q.F32):  # the caller's default
        assert default_precisions(raw_of([q4, (floats,) * 3])) is source_precision(raw_of([q4, (floats,) * 3])) is None
    assert default_precisions(raw_of([(Q.MXFP4,) * 3])) is None  # the caller keeps MXFP4 codes as their own tier
    assert default_precisions({"blk.0.ffn_gate.weight": _Tensor(Q.Q4_0)}) is None  # dense: no experts


@pytest.mark.parametrize("qtype", [Q.Q5_K, Q.Q6_K, Q.Q8_0])
def test_int8_holds_wider_types_where_an_int4_refit_would_not(qtype):
    """Why a Q5_K / Q6_K / Q8_0 expert gets an int8 top tier: int8 per channel stays within 1% of the
    GGUF's values, while re-fitting them at int4 g32 moves them more than the type's own rounding did."""
    w = weights(128, 512, seed=6)
    ref = dequantize(blocks(w, qtype), qtype).reshape(w.shape)
    own = rel(ref, w)  # the GGUF type's own rounding of the weights
    int8 = rel(quant.dequantize(quant.quantize(torch.from_numpy(ref), "int8"), "int8", w.shape, 32), ref)
    int4 = rel(quant.dequantize(quant.quantize(torch.from_numpy(ref), "int4", 32), "int4", w.shape, 32), ref)
    assert int8 < 0.01 and int4 > max(own, 5 * int8)
