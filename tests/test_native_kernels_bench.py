"""benchmarks/native_kernels.py: its exact reference is the stored weight, and its timing helper."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from hobbit.store import quant as Q

spec = importlib.util.spec_from_file_location(
    "native_kernels", Path(__file__).resolve().parents[1] / "benchmarks" / "native_kernels.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


@pytest.mark.parametrize("fmt,shape,gs", [("int4", (128, 64), 32), ("int2", (64, 96), 32), ("int8", (48, 64), 32)])
def test_exact_reference_rebuilds_the_stored_weight(fmt, shape, gs, monkeypatch):
    """The 'exact' decode multiplies every int4/int8 matrix in fp32 by the weight rebuilt from its prepared
    form: that weight must be quant.dequantize's, or the comparison measures the wrong thing."""
    scope: dict = {}
    monkeypatch.setattr(Q, "_quant_mm", Q._quant_mm)  # the snippet replaces it; undone after the test
    exec(bench._EXACT, scope)
    q = Q.quantize(torch.randn(*shape) * 0.05, fmt, gs)
    p = Q.prepare(q, fmt, shape, gs, torch.bfloat16)
    assert torch.equal(scope["_dense"](p), Q.dequantize(q, fmt, shape, gs))
    x = torch.randn(2, shape[1]).bfloat16()
    assert torch.equal(Q._quant_mm(x, p), (x.float() @ Q.dequantize(q, fmt, shape, gs).T).bfloat16())


def test_best_of_keeps_the_fastest_pass():
    calls = []
    t = bench.best_of(lambda i: calls.append(i), 3, 4)
    assert calls == [0, 1, 2] * 4 and 0 < t < 0.01
