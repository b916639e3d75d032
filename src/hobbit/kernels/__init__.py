"""Native CPU kernels, compiled on first use with the system C compiler and cached by source hash.

`int4_linear`, `int8_linear`, `int4_expert` (``vnni.c``): decode-time x @ W.T for int4 weights in
quant.py's B64 layout and int8 weights per row, x rounded per 32 inputs to int8 and its remainder to
int8 again (finer than bf16), multiplied with AVX-512 VNNI, where torch's int4 kernel converts every
code to float (compute-bound at ~15-20 GB/s here) and its int8 kernel runs at ~15 GB/s. Needs
x86-64 with AVX-512 BW/VL/VNNI/VBMI, Linux, and `cc` (or `$CC`); anywhere else, or with `HOBBIT_NATIVE=0`,
`available()` is False and callers keep torch's kernels. A failed build warns once per process.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

from hobbit.paths import cache_dir

_SOURCE = Path(__file__).with_name("vnni.c")
_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512vbmi")
_CFLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl",
           "-mavx512vnni", "-mavx512vbmi"]
QBLOCK = 32  # inputs per activation scale (vnni.c)
MAX_TOKENS = 16  # rows of x up to which the kernels run (results/native_kernels.json: 1.03x torch's at 4, 1.34x at 16)


def _cpu_ok() -> bool:
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return all(f in flags for f in _CPU_FLAGS)


def _build(out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # build beside the target, then rename: atomic
        so = Path(tmp) / out.name
        cmd = [os.environ.get("CC", "cc"), *_CFLAGS, str(_SOURCE), "-o", str(so), "-lm"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if r.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
        os.replace(so, out)


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("HOBBIT_NATIVE", "1") == "0" or not _cpu_ok():
        return None
    key = hashlib.sha256(_SOURCE.read_bytes() + " ".join(_CFLAGS).encode()).hexdigest()[:16]
    out = cache_dir() / "kernels" / f"vnni-{key}.so"
    try:
        if not out.exists():
            _build(out)
        lib = ctypes.CDLL(str(out))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        warnings.warn(f"hobbit: native kernels unavailable, using torch's ({e}); set HOBBIT_NATIVE=0 to "
                      f"silence this", RuntimeWarning, stacklevel=3)
        return None
    i64, p = ctypes.c_int64, ctypes.c_void_p
    lib.int4_linear.argtypes = [p, p, p, p, i64, i64, i64, i64, p, p, ctypes.c_int]
    lib.int8_linear.argtypes = lib.int4_linear.argtypes[:7] + lib.int4_linear.argtypes[8:]
    lib.int4_expert.argtypes = [p, p, p, p, p, p, i64, i64, i64, ctypes.c_float, p, p, ctypes.c_int]
    lib.int4_linear.restype = lib.int8_linear.restype = lib.int4_expert.restype = None
    return lib


def available() -> bool:
    return _library() is not None


def int4_fits(shape: tuple[int, int], group_size: int) -> bool:
    """Whether int4_linear takes an [N, K] weight with this group size (whole 64-row blocks, 32-input blocks)."""
    N, K = shape
    return N % 64 == 0 and K % QBLOCK == 0 and group_size % QBLOCK == 0 and K % group_size == 0


def int4_linear(x: Tensor, q: Tensor, sz: Tensor, shape: tuple[int, int], group_size: int) -> Tensor:
    """x [M, K] bf16 contiguous, q the B64 codes (N*K/2 bytes), sz [K/gs, N, 2] bf16 -> x @ W.T [M, N] bf16.
    Requires available() and int4_fits(shape, group_size)."""
    M, (N, K) = x.shape[0], shape
    y = torch.empty(M, N, dtype=torch.bfloat16)
    scratch = torch.empty(2 * M * K + 8 * M * (K // QBLOCK), dtype=torch.uint8)  # x's two int8 levels, fp32 d and sums
    _library().int4_linear(x.data_ptr(), q.data_ptr(), sz.data_ptr(), y.data_ptr(), M, N, K, group_size,
                           scratch.data_ptr(), scratch.data_ptr() + 2 * M * K, torch.get_num_threads())
    return y


def int4_expert(x: Tensor, q13: Tensor, sz13: Tensor, q2: Tensor, sz2: Tensor, hidden: int, inter: int,
                group_size: int, weight: float) -> Tensor:
    """One SwiGLU expert at one token in one call: x [1, H] bf16 contiguous, W13 = [gate; up] [2I, H] and
    W2 [H, I] int4 (B64 codes, scales as int4_linear) -> weight * W2 (silu(gate x) * (up x)) [1, H] bf16.
    Requires available(), int4_fits for both matrices."""
    H, I = hidden, inter
    y = torch.empty(1, H, dtype=torch.bfloat16)
    scratch = torch.empty(2 * (H + I) + 4 * (2 * I + 4 * (H + I) // QBLOCK), dtype=torch.uint8)  # x, h codes; fp32
    _library().int4_expert(x.data_ptr(), q13.data_ptr(), sz13.data_ptr(), q2.data_ptr(), sz2.data_ptr(), y.data_ptr(),
                           H, I, group_size, weight, scratch.data_ptr(), scratch.data_ptr() + 2 * (H + I),
                           torch.get_num_threads())
    return y


def int8_fits(shape: tuple[int, int]) -> bool:
    """Whether int8_linear takes an [N, K] weight (K in whole 64-input steps)."""
    return shape[1] % 64 == 0


def int8_linear(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """x [M, K] bf16 contiguous, q int8 [N, K], scale bf16 [N] -> x @ (q * scale).T [M, N] bf16.
    Requires available() and int8_fits(q.shape)."""
    M, (N, K) = x.shape[0], q.shape
    y = torch.empty(M, N, dtype=torch.bfloat16)
    scratch = torch.empty(2 * M * K + 40 * M * (K // QBLOCK), dtype=torch.uint8)  # x's codes, fp32 d, sums, d x 8
    _library().int8_linear(x.data_ptr(), q.data_ptr(), scale.data_ptr(), y.data_ptr(), M, N, K,
                           scratch.data_ptr(), scratch.data_ptr() + 2 * M * K, torch.get_num_threads())
    return y
