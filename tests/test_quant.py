import pytest
import torch

from hobbit.store import quant as Q

torch.set_num_threads(1)
N, K, GS = 256, 512, 64
# relative Frobenius error bounds at gs=64; measured 256x512: gauss / heavy-tail
# int8 0.0075/0.027 (per-channel: outlier columns inflate every row's scale), int4 0.090/0.141,
# int3 0.170/0.232, int2 0.325/0.387 (least-squares fit; min/max RTN: 0.192/0.304, 0.450/0.697)
BOUNDS = {"fp32": 1e-7, "bf16": 0.005, "int8": (0.01, 0.04), "mxfp4": (0.12, 0.15), "int4": (0.11, 0.17),
          "int3": (0.21, 0.28), "int2": (0.4, 0.47)}
QUANT = ("int8", "int4", "int3", "int2")


def _gauss(n=N, k=K, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02


def _heavy(n=N, k=K, seed=1):
    torch.manual_seed(seed)
    w = torch.distributions.StudentT(4.0).sample((n, k)) * 0.01
    w[:, :8] *= 8  # a few outlier input channels, as in real LLM weights
    return w


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _nbytes(q):
    return sum(t.numel() * t.element_size() for t in q.values())


@pytest.fixture(scope="module")
def weights():
    return {"gauss": _gauss(), "heavy": _heavy()}


@pytest.fixture(scope="module")
def stored(weights):
    return {(f, name): Q.quantize(w, f, GS) for f in Q.FORMATS for name, w in weights.items()}


@pytest.mark.parametrize("fmt", Q.FORMATS)
def test_roundtrip_error_and_storage(fmt, weights, stored):
    for i, (name, w) in enumerate(weights.items()):
        q = stored[fmt, name]
        assert all(t.device.type == "cpu" and t.is_contiguous() for t in q.values())
        assert _nbytes(q) == Q.storage_nbytes(fmt, (N, K), GS)
        bound = BOUNDS[fmt] if isinstance(BOUNDS[fmt], float) else BOUNDS[fmt][i]
        assert _rel(Q.dequantize(q, fmt, (N, K), GS), w) < bound, (fmt, name)


@pytest.mark.parametrize("fmt", ("int4", "int3", "int2"))
def test_packed_bits(fmt):
    bits = Q._BITS[fmt]
    q = Q.quantize(_gauss(128, 256), fmt, 64)["q"]
    assert q.dtype == torch.uint8 and q.numel() == 128 * 256 * bits // 8


@pytest.mark.parametrize("fmt", ("int4", "int3", "int2"))
@pytest.mark.parametrize("n", (64, 100))  # 100: padded last block
def test_pack_unpack_roundtrip(fmt, n):
    bits = Q._BITS[fmt]
    codes = torch.randint(0, 2 ** bits, (n, 96), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    packed = Q._pack(codes, bits)
    assert packed.shape == ((n + 63) // 64, 96, 8 * bits)
    assert torch.equal(Q._codes4(Q._to_int4(packed, bits), n), codes + 8 - 2 ** (bits - 1))


def _check_kernel(q, fmt, shape, gs, kind):
    d = Q.dequantize(q, fmt, shape, gs)
    p = Q.prepare(q, fmt, shape, gs, torch.bfloat16)
    assert p.kind == kind and p.shape == tuple(shape) and p.fmt == fmt
    assert p.nbytes == sum(t.numel() * t.element_size() for t in (p.w, p.scales) if t is not None)
    for T in (1, 5):
        x = torch.randn(T, shape[1], generator=torch.Generator().manual_seed(T)).bfloat16()
        y = Q.linear(x, p)
        assert y.shape == (T, shape[0]) and y.dtype == torch.bfloat16
        ref = x.float() @ d.T
        assert _rel(y.float(), ref) < 0.006, (fmt, T)  # bf16 output rounding ~0.002


@pytest.mark.parametrize("fmt", Q.FORMATS)
def test_kernel_matches_reference(fmt, stored):
    kind = {"fp32": "dense", "bf16": "dense", "int8": "int8", "mxfp4": "mxfp4"}.get(fmt, "lowbit")
    for name in ("gauss", "heavy"):
        _check_kernel(stored[fmt, name], fmt, (N, K), GS, kind)


@pytest.mark.parametrize("fmt", ("int4", "int3", "int2"))
@pytest.mark.parametrize("gs", (32, 128))
def test_kernel_other_group_sizes(fmt, gs):
    w = _gauss(128, 256)
    _check_kernel(Q.quantize(w, fmt, gs), fmt, (128, 256), gs, "lowbit")


@pytest.mark.parametrize("fmt", ("int4", "int3", "int2"))
def test_op_packing_path(fmt, monkeypatch):
    """The path taken on CPUs whose kernel layout is not B64 (Arm, or AVX2 without hobbit.kernels): decode + convert op."""
    monkeypatch.setattr(Q, "_fast_layout", lambda: False)
    monkeypatch.setattr(Q.kernels, "available", lambda: False)
    w = _gauss(128, 256)
    _check_kernel(Q.quantize(w, fmt, 64), fmt, (128, 256), 64, "lowbit")


@pytest.mark.parametrize("fmt", ("int4", "int3", "int2"))
def test_fast_expand_equals_op(fmt):
    if not Q._fast_layout():
        pytest.skip("kernel layout is not B64 on this CPU")
    q = Q.quantize(_gauss(128, 256), fmt, 64)
    fast = Q._to_int4(q["q"], Q._BITS[fmt]).view(128, 128)  # what prepare hands torch's kernel
    codes = Q._codes4(fast.view(2, 256, 32), 128)
    assert torch.equal(fast, torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), 1))


@pytest.mark.parametrize("fmt", ("int4", "int2"))
def test_n_not_multiple_of_64_uses_op(fmt):
    w = _gauss(80, 128)  # N % 16 == 0: kernel takes it, packed by the op
    _check_kernel(Q.quantize(w, fmt, 64), fmt, (80, 128), 64, "lowbit")


@pytest.mark.parametrize("fmt", ("int4", "int3", "int2"))
@pytest.mark.parametrize("shape,gs", [((72, 128), 64), ((64, 96), 16)])  # N % 16 != 0; gs not a kernel size
def test_fallback_dense(fmt, shape, gs):
    w = _gauss(*shape)
    q = Q.quantize(w, fmt, gs)
    assert _nbytes(q) == Q.storage_nbytes(fmt, shape, gs)
    assert _rel(Q.dequantize(q, fmt, shape, gs), w) < BOUNDS[fmt][0]
    _check_kernel(q, fmt, shape, gs, "dense")
    assert Q.prepare(q, fmt, shape, gs, torch.bfloat16).w.dtype == torch.bfloat16


@pytest.mark.parametrize("fmt", Q.FORMATS)
def test_fp32_path(fmt, stored):
    q = stored[fmt, "heavy"]
    p = Q.prepare(q, fmt, (N, K), GS, torch.float32)
    if fmt == "mxfp4":  # keeps its codes (dequantized per call), in fp32 as in bf16
        assert p.kind == "mxfp4" and p.nbytes == Q.storage_nbytes(fmt, (N, K), GS)
    else:
        assert p.kind == "dense" and p.w.dtype == torch.float32 and p.nbytes == N * K * 4
    x = torch.randn(3, K)
    y = Q.linear(x, p)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, x @ Q.dequantize(q, fmt, (N, K), GS).T, rtol=1e-5, atol=1e-5)


def _rtn_error(w, bits):
    g = w.view(w.shape[0], -1, GS)
    s, m = (Q._bf16(t) for t in Q._rtn(g, bits))
    c = 2 ** (bits - 1)
    codes = torch.round((g - m[..., None]) / s[..., None] + c).clamp(0, 2 ** bits - 1)
    return _rel(((codes - c) * s[..., None] + m[..., None]).view(w.shape), w)


@pytest.mark.parametrize("bits", (2, 3))
def test_fit_beats_rtn(bits, weights, stored):
    """The least-squares (HQQ-style) fit clearly beats min/max round-to-nearest at 2 and 3 bits."""
    for name, w in weights.items():
        fit = _rel(Q.dequantize(stored[f"int{bits}", name], f"int{bits}", (N, K), GS), w)
        assert fit < 0.9 * _rtn_error(w, bits), (name, bits)


@pytest.mark.parametrize("fmt", ("int3", "int2"))
def test_fit_scale_equivariant(fmt, weights, stored):
    """Unlike hqq's fixed-beta shrinkage, the fit does not depend on the weights' magnitude."""
    w = weights["heavy"]
    big = Q.dequantize(Q.quantize(w * 64, fmt, GS), fmt, (N, K), GS) / 64  # power of 2: exact scaling
    torch.testing.assert_close(big, Q.dequantize(stored[fmt, "heavy"], fmt, (N, K), GS))


@pytest.mark.parametrize("fmt", Q.FORMATS)
def test_deterministic(fmt, weights, stored):
    again = Q.quantize(weights["heavy"], fmt, GS)
    first = stored[fmt, "heavy"]
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)


def test_input_dtype_and_no_aliasing():
    w = _gauss(64, 128)
    q = Q.quantize(w, "fp32")
    q["w"][0, 0] = 1.0
    assert w[0, 0] != 1.0
    for fmt in Q.FORMATS:  # bf16 input quantizes like its fp32 value
        assert all(torch.equal(a, b) for a, b in zip(Q.quantize(w.bfloat16(), fmt).values(),
                                                      Q.quantize(w.bfloat16().float(), fmt).values()))


def test_zero_and_constant_groups():
    w = torch.zeros(64, 128)
    w[1] = 0.5
    for fmt in Q.FORMATS:
        q = Q.quantize(w, fmt)
        torch.testing.assert_close(Q.dequantize(q, fmt, (64, 128), 64), w, rtol=0.004, atol=1e-6)


def test_errors():
    w = _gauss(64, 96)
    with pytest.raises(ValueError, match="unknown format 'int5'"):
        Q.quantize(w, "int5")
    with pytest.raises(ValueError, match="not a multiple of group_size=64.*32"):
        Q.quantize(w, "int4", 64)
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        Q.storage_nbytes("int2", (64, 96), 64)
    with pytest.raises(ValueError, match="positive int"):
        Q.check_shape("int3", (64, 96), 0)
    with pytest.raises(ValueError, match="2-D"):
        Q.check_shape("bf16", (64,), 64)
    Q.check_shape("int8", (64, 96), 64)  # group_size does not apply to int8
    assert Q.storage_nbytes("int8", (64, 96), 7) == 64 * 96 + 2 * 64


@pytest.mark.parametrize("K", [24, 40, 72])
def test_int8_for_a_width_the_kernel_gets_wrong_falls_back_to_dense(K):
    """torch's int8 kernel returns garbage (then segfaults) unless K is a multiple of 16."""
    w = torch.randn(32, K)
    q = Q.quantize(w, "int8")
    p = Q.prepare(q, "int8", (32, K), 64, torch.bfloat16)
    assert p.kind == "dense"
    x = torch.randn(3, K, dtype=torch.bfloat16)
    ref = x.float() @ Q.dequantize(q, "int8", (32, K), 64).T
    assert torch.allclose(Q.linear(x, p).float(), ref, rtol=0.02, atol=0.05)
