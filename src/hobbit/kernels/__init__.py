"""Native CPU kernels, compiled on first use with the system C compiler and cached by source hash.

`lowbit_linear`, `int8_linear`, `lowbit_expert`: x @ W.T for int4 and int2 weights in quant.py's B64 layout
(read as stored: an int2 slot is 2 bits a weight in RAM too) and int8 weights per row, x rounded per 32
inputs to int8 and its remainder to int8 again (finer than bf16), where torch's int4 kernel converts every
code to float (compute-bound at ~15-20 GB/s here) and its int8 kernel runs at ~15 GB/s. `max_tokens(kind)`
says up to how many rows of x they beat torch's, as measured. Two builds: ``vnni.c`` (AVX-512 BW/VL/VNNI/VBMI)
and ``avx2.c`` (AVX2 + FMA, the same results); `HOBBIT_NATIVE=avx512|avx2` picks one, `0` none.
Needs x86-64 Linux and `cc` (or `$CC`); anywhere else `available()` is False and callers keep
torch's kernels. A failed build warns once per process.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

from hobbit.paths import cache_dir

_VARIANTS = {  # name: (source, CPU flags it needs, compiler flags, {kind: rows of x up to which it beats torch's}),
    # fastest first; results/native_kernels.json. avx512: lowbit 1.18-1.58x torch's int4 kernel from 1 to 512 rows
    # (every size), int8 2.25x at 1 row, 1.19x at 3, 0.97x at 4 (it re-reads the weight per row; torch's does not).
    # avx2: lowbit 1.09-1.28x at one row, 0.55x from 4 (its byte unpacks bound it), int8 1.13x at 3, 0.94x at 4.
    # Where torch cannot read the bytes (int2, or int4 where it packs its own way) quant uses these at every size.
    "avx512": ("vnni.c", ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512vbmi"),
               ["-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx512vbmi"],
               {"lowbit": math.inf, "int8": 3}),
    "avx2": ("avx2.c", ("avx2", "fma"), ["-mavx2", "-mfma"], {"lowbit": 1, "int8": 3}),
}
_CFLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp"]
QBLOCK = 32  # inputs per activation scale (both builds)


def _cpu_flags() -> set[str]:
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))


def _build(source: Path, flags: list[str], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # build beside the target, then rename: atomic
        so = Path(tmp) / out.name
        cmd = [os.environ.get("CC", "cc"), *_CFLAGS, *flags, str(source), "-o", str(so), "-lm"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if r.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
        os.replace(so, out)


def builds() -> list[str]:
    """The builds this CPU can run, fastest first."""
    have = _cpu_flags()
    return [name for name, (_, needs, _, _) in _VARIANTS.items() if set(needs) <= have]


def _choose() -> str | None:
    """HOBBIT_NATIVE: 0 = off, avx512 / avx2 = that build (where the CPU has it), else the fastest it has."""
    want, fits = os.environ.get("HOBBIT_NATIVE", "1"), builds()
    if want == "0":
        return None
    return want if want in fits else (fits[0] if fits and want not in _VARIANTS else None)


@functools.cache
def _library() -> tuple[str, ctypes.CDLL] | None:
    name = _choose()
    if name is None:
        return None
    source, _, flags, _ = _VARIANTS[name]
    path = Path(__file__).with_name(source)
    shared = path.with_name("expert.h").read_bytes()  # included by both sources
    key = hashlib.sha256(path.read_bytes() + shared + " ".join(_CFLAGS + flags).encode()).hexdigest()[:16]
    out = cache_dir() / "kernels" / f"{name}-{key}.so"
    try:
        if not out.exists():
            _build(path, flags, out)
        lib = ctypes.CDLL(str(out))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        warnings.warn(f"hobbit: native kernels unavailable, using torch's ({e}); set HOBBIT_NATIVE=0 to "
                      f"silence this", RuntimeWarning, stacklevel=3)
        return None
    i64, p = ctypes.c_int64, ctypes.c_void_p
    lib.lowbit_linear.argtypes = [p, p, p, p, i64, i64, i64, i64, i64, p, p, ctypes.c_int]
    lib.int8_linear.argtypes = [p, p, p, p, i64, i64, i64, p, p, ctypes.c_int]
    lib.lowbit_expert.argtypes = [p, p, p, p, p, p, i64, i64, i64, i64, ctypes.c_float, p, p, ctypes.c_int]
    lib.lowbit_linear.restype = lib.int8_linear.restype = lib.lowbit_expert.restype = None
    return name, lib


def variant() -> str | None:
    """The build in use ('avx512' or 'avx2'), or None when torch's kernels run."""
    lib = _library()
    return None if lib is None else lib[0]


def available() -> bool:
    return _library() is not None


def max_tokens(kind: str) -> float:
    """Rows of x up to which callers use these kernels for a 'lowbit' or 'int8' weight where torch's kernel could
    take it too (math.inf: every size; 0 when there are no kernels)."""
    lib = _library()
    return 0 if lib is None else _VARIANTS[lib[0]][3][kind]


BITS = (4, 2)  # code widths the kernels read as stored (int3 is expanded to int4 by quant.prepare)


def lowbit_fits(shape: tuple[int, int], group_size: int) -> bool:
    """Whether lowbit_linear takes an [N, K] weight with this group size (whole 64-row blocks, 32-input blocks)."""
    N, K = shape
    return N % 64 == 0 and K % QBLOCK == 0 and group_size % QBLOCK == 0 and K % group_size == 0


def lowbit_linear(x: Tensor, q: Tensor, sz: Tensor, shape: tuple[int, int], group_size: int, bits: int) -> Tensor:
    """x [M, K] bf16 contiguous, q the B64 codes of ``bits`` (4 or 2) bits (N*K*bits/8 bytes), sz [K/gs, N, 2]
    bf16 -> x @ W.T [M, N] bf16. Requires available() and lowbit_fits(shape, group_size)."""
    M, (N, K) = x.shape[0], shape
    y = torch.empty(M, N, dtype=torch.bfloat16)
    scratch = torch.empty(2 * M * K + 8 * M * (K // QBLOCK), dtype=torch.uint8)  # x's two int8 levels, fp32 d and sums
    _library()[1].lowbit_linear(x.data_ptr(), q.data_ptr(), sz.data_ptr(), y.data_ptr(), M, N, K, group_size, bits,
                                scratch.data_ptr(), scratch.data_ptr() + 2 * M * K, torch.get_num_threads())
    return y


def lowbit_expert(x: Tensor, q13: Tensor, sz13: Tensor, q2: Tensor, sz2: Tensor, hidden: int, inter: int,
                  group_size: int, bits: int, weight: float) -> Tensor:
    """One SwiGLU expert at one token in one call: x [1, H] bf16 contiguous, W13 = [gate; up] [2I, H] and
    W2 [H, I] with ``bits``-bit codes (B64, scales as lowbit_linear) -> weight * W2 (silu(gate x) * (up x))
    [1, H] bf16. Requires available(), lowbit_fits for both matrices."""
    H, I = hidden, inter
    y = torch.empty(1, H, dtype=torch.bfloat16)
    scratch = torch.empty(2 * (H + I) + 4 * (2 * I + 4 * (H + I) // QBLOCK), dtype=torch.uint8)  # x, h codes; fp32
    _library()[1].lowbit_expert(x.data_ptr(), q13.data_ptr(), sz13.data_ptr(), q2.data_ptr(), sz2.data_ptr(),
                                y.data_ptr(), H, I, group_size, bits, weight, scratch.data_ptr(),
                                scratch.data_ptr() + 2 * (H + I), torch.get_num_threads())
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
    _library()[1].int8_linear(x.data_ptr(), q.data_ptr(), scale.data_ptr(), y.data_ptr(), M, N, K,
                           scratch.data_ptr(), scratch.data_ptr() + 2 * M * K, torch.get_num_threads())
    return y
