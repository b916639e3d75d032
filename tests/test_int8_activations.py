"""benchmarks/int8_activations.py's int8 x int8 products: close to exact, and each row independent of the others."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

spec = importlib.util.spec_from_file_location(
    "int8_activations", Path(__file__).resolve().parents[1] / "benchmarks" / "int8_activations.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


@pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines, reason="no fbgemm in this torch")
def test_int8_products_match_exact_and_keep_rows_apart():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (96, 64), dtype=torch.int8, generator=g)
    scale = torch.rand(96, generator=g).add_(0.5).mul_(1e-2).bfloat16()
    x = torch.randn(5, 64, generator=g)
    x[2] *= 100  # a loud row: with one scale for the whole call it would drown the others
    exact = x @ (q.float() * scale.float()[:, None]).T  # [5,96]
    packed = bench._fbgemm_pack(q, scale)
    for y in (bench._int_mm(x, q, scale), bench._fbgemm(x, packed)):
        assert y.shape == (5, 96) and y.dtype == torch.float32
        rel = (y - exact).norm(dim=1) / exact.norm(dim=1)  # per row
        assert rel.max() < 0.03, rel
    assert torch.equal(bench._int_mm(x, q, scale)[:1], bench._int_mm(x[:1], q, scale))
    assert torch.equal(bench._fbgemm(x, packed)[:1], bench._fbgemm(x[:1], packed))
