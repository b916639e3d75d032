"""The native VNNI kernels against plain-torch references, and their fallbacks."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from hobbit import kernels
from hobbit.runtime.offload import Expert
from hobbit.store import quant

BUILDS = kernels.builds()


@pytest.fixture(params=BUILDS or [pytest.param(None, marks=pytest.mark.skip(reason="no AVX2 or AVX-512 here"))])
def build(request, monkeypatch):
    """Each build this CPU runs (the AVX2 one too on an AVX-512 machine), chosen as HOBBIT_NATIVE chooses it."""
    monkeypatch.setenv("HOBBIT_NATIVE", request.param)
    kernels._library.cache_clear()
    if kernels.variant() != request.param:
        pytest.skip(f"the {request.param} build did not load (no C compiler?)")
    yield request.param
    kernels._library.cache_clear()  # the next caller chooses again, under the environment restored


native = pytest.mark.usefixtures("build")
# bf16 output rounding ~0.0017 (torch's kernels too); one int8 level of x alone would be ~0.006 per matmul
ACT_ERR = 0.003


def _relerr(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref).norm() / ref.norm()).item()


def _int4(N: int, K: int, gs: int, seed: int = 0, fmt: str = "int4") -> tuple[dict, quant.Prepared, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = quant.quantize(torch.randn(N, K, generator=g) * 0.05, fmt, gs)
    return q, quant.prepare(q, fmt, (N, K), gs, torch.bfloat16), quant.dequantize(q, fmt, (N, K), gs)


@native
@pytest.mark.parametrize("fmt", ["int4", "int2"])
@pytest.mark.parametrize("N,K,gs", [(64, 64, 32), (1088, 1536, 32), (1536, 544, 32), (512, 1536, 128), (192, 256, 64)])
@pytest.mark.parametrize("M", [1, 3])
def test_lowbit_linear_matches_dequantized_weight(fmt, N, K, gs, M):
    q, p, W = _int4(N, K, gs, fmt=fmt)
    assert p.native and p.bits == quant._BITS[fmt]
    assert p.w.data_ptr() == q["q"].data_ptr()  # the stored codes themselves, int2 too: nothing expanded
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1)).bfloat16()
    y = kernels.lowbit_linear(x, p.w, p.scales, (N, K), gs, p.bits)
    assert y.shape == (M, N) and y.dtype == torch.bfloat16
    assert _relerr(y, x.float() @ W.T) < ACT_ERR
    if M <= kernels.max_tokens("lowbit") or fmt == "int2":  # linear dispatches to it
        assert torch.equal(quant.linear(x, p), y)


@native
@pytest.mark.parametrize("fmt", ["int4", "int2"])
def test_where_torch_packs_int4_its_own_way_the_kernels_take_every_size(monkeypatch, fmt):
    """On a CPU whose torch int4 layout is not B64 (AVX2) prepare keeps the B64 bytes for hobbit.kernels, which
    then also take prefill-sized products: torch's kernel could not read those bytes."""
    monkeypatch.setattr(quant, "_fast_layout", lambda: False)
    q, p, W = _int4(128, 256, 32, fmt=fmt)
    assert p.native and torch.equal(p.w.flatten(), q["q"].flatten())  # the stored bytes, not the op's packing
    x = torch.randn(40, 256).bfloat16()  # prefill-sized
    assert torch.equal(quant.linear(x, p), kernels.lowbit_linear(x, p.w, p.scales, (128, 256), 32, p.bits))
    assert _relerr(quant.linear(x, p), x.float() @ W.T) < ACT_ERR


@native
def test_each_kind_runs_where_it_beats_torch_and_int2_everywhere():
    """linear takes hobbit.kernels up to max_tokens(kind) rows, torch's kernel above; an int2 matrix (2-bit codes
    in RAM, which torch's kernel cannot read) runs native at every size; int3 has no kernel of its own: prepare
    expands it once and the int4 kernel reads it."""
    q, p, W = _int4(128, 256, 32)
    q8 = quant.quantize(torch.randn(128, 256) * 0.05, "int8")
    p8 = quant.prepare(q8, "int8", (128, 256), 32, torch.bfloat16)
    for rows in (1, 3, 4, 40):
        x = torch.randn(rows, 256).bfloat16()
        ours = kernels.lowbit_linear(x, p.w, p.scales, (128, 256), 32, 4)
        if rows <= kernels.max_tokens("lowbit") or not quant._fast_layout():  # torch's could not read B64 there
            assert torch.equal(quant.linear(x, p), ours)
        else:
            assert torch.equal(quant.linear(x, p), torch.ops.aten._weight_int4pack_mm_for_cpu(x, p.w, 32, p.scales))
        ours8, theirs8 = kernels.int8_linear(x, p8.w, p8.scales), torch.ops.aten._weight_int8pack_mm(x, p8.w, p8.scales)
        assert torch.equal(quant.linear(x, p8), ours8 if rows <= kernels.max_tokens("int8") else theirs8)
    assert kernels.max_tokens("int8") >= 1 and kernels.max_tokens("lowbit") >= 1
    q, p, W = _int4(128, 256, 32, fmt="int2")
    x = torch.randn(40, 256).bfloat16()
    y = quant.linear(x, p)
    assert p.bits == 2 and torch.equal(y, kernels.lowbit_linear(x, p.w, p.scales, (128, 256), 32, 2))
    assert _relerr(y, x.float() @ W.T) < ACT_ERR
    q3, p3, W3 = _int4(128, 256, 32, fmt="int3")
    assert p3.native and p3.bits == 4 and p3.w.data_ptr() != q3["q"].data_ptr()
    x1 = torch.randn(1, 256).bfloat16()
    assert _relerr(quant.linear(x1, p3), x1.float() @ W3.T) < ACT_ERR


@native
@pytest.mark.parametrize("N,K", [(5, 64), (2048, 1536), (301, 128)])
@pytest.mark.parametrize("M", [1, 2])
def test_int8_linear_matches_dequantized_weight(N, K, M):
    q = quant.quantize(torch.randn(N, K) * 0.05, "int8")
    p = quant.prepare(q, "int8", (N, K), 32, torch.bfloat16)
    x = torch.randn(M, K).bfloat16()
    assert p.native
    y = quant.linear(x, p)
    assert y.shape == (M, N) and _relerr(y, x.float() @ quant.dequantize(q, "int8", (N, K), 32).T) < ACT_ERR


@native
def test_zero_and_large_activations():
    _, p, W = _int4(128, 256, 32)
    assert not kernels.lowbit_linear(torch.zeros(1, 256, dtype=torch.bfloat16), p.w, p.scales, (128, 256), 32, 4).any()
    x = torch.randn(1, 256).bfloat16() * 1e4  # a scale per 32 inputs: no overflow of the int8 codes
    x[0, :32] = 0  # one all-zero block among others
    x[0, 40] = 3e6  # an outlier: its block's other inputs live on in the second level
    assert _relerr(kernels.lowbit_linear(x, p.w, p.scales, (128, 256), 32, 4), x.float() @ W.T) < ACT_ERR


@native
@pytest.mark.parametrize("fmt", ["int4", "int2"])
def test_fused_expert_is_the_weighted_swiglu(fmt):
    H, inter = 256, 96  # 2I = 192: three 64-row blocks; I = 96: three 32-input blocks
    _, w13, W13 = _int4(2 * inter, H, 32, seed=2, fmt=fmt)
    _, w2, W2 = _int4(H, inter, 32, seed=3, fmt=fmt)
    expert = Expert(w13, w2)
    assert expert.fused
    x = torch.randn(1, H, generator=torch.Generator().manual_seed(4)).bfloat16()
    gate, up = (x.float() @ W13.T).chunk(2, -1)
    ref = 0.3 * (F.silu(gate) * up) @ W2.T
    y = expert.weighted(x, 0.3)
    assert y.shape == (1, H) and y.dtype == torch.bfloat16
    assert _relerr(y, ref) < ACT_ERR  # the activation stays fp32 between the matrices
    assert _relerr(expert(x) * 0.3, ref) < 2 * ACT_ERR  # the unfused path rounds it to bf16 there


def test_shapes_the_kernels_refuse_keep_torch():
    assert not kernels.lowbit_fits((96, 64), 32)  # not whole 64-row blocks
    assert not kernels.lowbit_fits((64, 48), 16)  # activation blocks of 32
    assert not kernels.int8_fits((64, 96))
    q = quant.quantize(torch.randn(80, 64), "int4", 32)  # N % 64 != 0: torch packs it its own way
    assert not quant.prepare(q, "int4", (80, 64), 32, torch.bfloat16).native


def _probe(env: dict, code: str = "from hobbit import kernels; print(kernels.available())") -> subprocess.CompletedProcess:
    import os
    return subprocess.run([sys.executable, "-W", "always", "-c", code], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)


def test_hobbit_native_0_turns_the_kernels_off():
    r = _probe({"HOBBIT_NATIVE": "0"})
    assert r.returncode == 0 and r.stdout.strip() == "False"


@native
def test_a_failed_build_warns_and_falls_back(tmp_path):
    r = _probe({"HOBBIT_CACHE": str(tmp_path), "CC": "false"})  # a compiler that always fails
    assert r.returncode == 0 and r.stdout.strip() == "False"
    assert "native kernels unavailable" in r.stderr and "HOBBIT_NATIVE=0" in r.stderr
    assert not list((tmp_path / "kernels").glob("*.so"))  # nothing half-built left behind


@native
def test_shared_expert_mlp_fuses_one_token_and_keeps_batches():
    from hobbit.runtime.model import MLP
    H, inter = 128, 64
    mlp = MLP(H, inter)
    for name, (N, K) in (("gate_up", (2 * inter, H)), ("down_proj", (H, inter))):
        q = quant.quantize(torch.randn(N, K) * 0.05, "int4", 32)
        setattr(mlp, name, quant.QuantLinear(q, "int4", (N, K), 32, torch.bfloat16))
    x = torch.randn(1, H).bfloat16()
    gate = torch.sigmoid(torch.randn(1, 1))
    ref = gate * mlp(x).float()  # two native calls, torch's SwiGLU in between
    assert _relerr(mlp.weighted(x, gate), ref) < 2 * ACT_ERR
    xs = torch.randn(3, H).bfloat16()  # several tokens: a per-token gate [T,1], torch's path
    gates = torch.rand(3, 1)
    assert torch.equal(mlp.weighted(xs, gates), gates * mlp(xs))


@native
def test_threads_split_rows_and_change_no_bit():
    """torch's thread count becomes the kernels' OpenMP threads: each 64-row block is one thread's, so the
    result is the same to the bit."""
    _, p, _ = _int4(1088, 1536, 32)
    q8 = quant.quantize(torch.randn(300, 1536) * 0.05, "int8")
    p8 = quant.prepare(q8, "int8", (300, 1536), 32, torch.bfloat16)
    _, w13, _ = _int4(192, 256, 32, seed=2)
    _, w2, _ = _int4(256, 96, 32, seed=3)
    x, xe = torch.randn(2, 1536).bfloat16(), torch.randn(1, 256).bfloat16()
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append((quant.linear(x, p), quant.linear(x, p8), quant.swiglu_weighted(xe, w13, w2, 0.7)))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_the_build_follows_the_cpu_and_hobbit_native(monkeypatch):
    full = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512vbmi"}
    for flags, env, want in [(full, "1", "avx512"), ({"avx2", "fma"}, "1", "avx2"), (full, "avx2", "avx2"),
                             ({"avx2", "fma"}, "avx512", None), (full, "0", None), (set(), "1", None)]:
        monkeypatch.setattr(kernels, "_cpu_flags", lambda flags=flags: flags)
        monkeypatch.setenv("HOBBIT_NATIVE", env)
        assert kernels._choose() == want, (sorted(flags), env)
