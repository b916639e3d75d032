"""Weight-only quantization of expert matrices W [N, K] (N out features, K in features).

Formats (``FORMATS``) and their storage form (what ``quantize`` returns and the store writes):

* ``fp32`` / ``bf16``: ``{"w": W}`` as is.
* ``int8``: symmetric, per output channel (the int8 kernel takes no groups, so ``group_size`` does
  not apply): ``{"q": int8 [N, K], "scale": bf16 [N]}``, ``w = q * scale``.
* ``mxfp4``: OCP MXFP4, gpt-oss's native expert format: ``{"blocks": uint8 [N, K/2], "scales": uint8
  [N, K/32]}`` (see ``mxfp4.py``; a gpt-oss checkpoint's own codes are kept, other sources are rounded).
* ``int4`` / ``int3`` / ``int2``: asymmetric, one (scale, offset) per group of ``group_size``
  consecutive inputs: ``w = (q - c) * scale + offset`` with centre ``c = 2**(bits-1)``.
  ``{"q": uint8 [ceil(N/64), K, 8*bits], "sz": bf16 [K/group_size, N, 2]}``; ``sz[..., 0]`` is
  the scale and ``sz[..., 1]`` the offset, already in the layout and dtype that
  ``_weight_int4pack_mm_for_cpu`` takes (its formula ``(q4 - 8) * scale + zero`` with
  ``q4 = q + 8 - c`` and ``zero = offset``). Codes are stored row-blocked ("B64", fixed and
  machine-independent): rows in blocks of 64 (the last block zero-padded), and for each block
  and input k the block's 64 codes in 8*bits bytes:
    - int4, 32 bytes: byte j = row j | row j+32 << 4,
    - int2, 16 bytes: byte j = row j | row j+16 << 2 | row j+32 << 4 | row j+48 << 6,
    - int3, 24 bytes: the low 2 bits as int2, then 8 bytes where bit t of byte i is bit 2 of row 8t+i.
  B64 int4 equals the AVX512 int4 kernel layout, so there ``prepare`` is free for int4 and a few
  64-bit mask ops for int3 (and int2 without ``hobbit.kernels``). ``hobbit.kernels`` read int4 and int2
  bytes as stored (``linear`` picks them where they beat torch's, and for int2 at every size): an int2
  slot stays 2 bits a weight in RAM. Whether B64 equals the running kernel's layout is checked once
  against ``_convert_weight_to_int4pack_for_cpu``; on other CPUs (AVX2, Arm) prepare decodes the codes
  and lets the op pack them, unless ``hobbit.kernels`` runs there (its AVX2 build): then the B64 bytes
  stay and its kernel takes every product, prefill included.

int4/int3/int2 scale and offset are fitted by least squares (``_fit``: HQQ-style alternation
between codes and parameters; 20-40% lower error than min/max at 2-3 bits, ~6% at 4 bits, for
~20x the quantize time, paid once at convert); int8 is round-to-nearest. Scale and offset are rounded
to bf16 before the codes are chosen, so ``dequantize`` is exactly the weight the kernel uses.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from hobbit import kernels
from hobbit.store import mxfp4

FORMATS = ("fp32", "bf16", "int8", "mxfp4", "int4", "int3", "int2")  # highest precision first
_BITS = {"int4": 4, "int3": 3, "int2": 2}
_KERNEL_GROUPS = (32, 64, 128, 256)  # group sizes _weight_int4pack_mm_for_cpu accepts
_BLOCK = 64  # rows per B64 block
_M33, _M11 = 0x3333333333333333, 0x1111111111111111  # per-byte masks on int64 words
_CENTRE_ADD = {2: 0x6666666666666666, 3: 0x4444444444444444}  # + (8 - c) in every nibble
_FIT_ITERS = 10  # max least-squares iterations (error within 0.1% of 40 iterations; 5 lose ~1%)
_FIT_CHUNK = 1 << 18  # weights per fitting chunk (bounds temporaries; early stop is per chunk)
_HAS_INT4 = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
    torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")
_HAS_INT8 = hasattr(torch.ops.aten, "_weight_int8pack_mm")
_INT8_K = 16  # _weight_int8pack_mm is only right for K a multiple of this (measured: K = 24, 40, 72 fail)


@dataclass(eq=False)
class Prepared:
    """Runtime form of one matrix. kind: 'dense' (F.linear on ``w``), 'int8' (``w`` int8 [N, K],
    ``scales`` [N]), 'lowbit' (``w`` int4-packed, or B64 codes of ``bits`` bits for ``hobbit.kernels``,
    ``scales`` = qScaleAndZeros [K/gs, N, 2]) or 'mxfp4' (``w`` the FP4 codes [N, K/2], ``scales`` e8m0
    [N, K/32]; dequantized per call into a scratch buffer)."""
    fmt: str
    shape: tuple[int, int]
    dtype: torch.dtype
    kind: str
    w: Tensor
    scales: Tensor | None = None
    group_size: int = 0
    native: bool = False  # kernels.lowbit_linear / int8_linear take it (used up to kernels.max_tokens(kind) rows of x)
    bits: int = 4  # lowbit: code width of ``w`` (2 only where native)

    @property
    def nbytes(self) -> int:
        """Bytes of RAM held (what a cache budget counts)."""
        t = [self.w] if self.scales is None else [self.w, self.scales]
        return sum(x.numel() * x.element_size() for x in t)


def check_shape(fmt: str, shape: tuple[int, int], group_size: int) -> None:
    """Raise ValueError if ``fmt`` cannot store a [N, K] matrix with this group size."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if len(shape) != 2 or min(shape) <= 0:
        raise ValueError(f"expected a 2-D weight shape (N out, K in) with positive sizes, got {tuple(shape)}")
    if fmt == "mxfp4":
        return mxfp4.check_shape(tuple(shape))  # fixed blocks of 32; group_size does not apply
    if fmt not in _BITS:
        return  # fp32 / bf16 / int8 take any shape; group_size does not apply
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"{fmt}: group_size must be a positive int, got {group_size!r}")
    K = shape[1]
    if K % group_size:
        fits = [g for g in _KERNEL_GROUPS if K % g == 0]
        hint = f"one of {fits} (kernel-friendly)" if fits else "a divisor of K"
        raise ValueError(f"{fmt}: K={K} input features is not a multiple of group_size={group_size}; "
                         f"use group_size={hint}, or store this matrix as int8/bf16")


def storage_nbytes(fmt: str, shape: tuple[int, int], group_size: int) -> int:
    """Exact bytes of the tensors ``quantize(w, fmt, group_size)`` returns for a [N, K] weight."""
    check_shape(fmt, shape, group_size)
    N, K = shape
    if fmt in ("fp32", "bf16"):
        return N * K * (4 if fmt == "fp32" else 2)
    if fmt == "int8":
        return N * K + 2 * N
    if fmt == "mxfp4":
        return mxfp4.storage_nbytes((N, K))
    nb = -(-N // _BLOCK)
    return nb * K * 8 * _BITS[fmt] + (K // group_size) * N * 4


def _bf16(t: Tensor) -> Tensor:
    return t.to(torch.bfloat16).float()  # round to bf16, keep fp32 for the math


def _rtn(g: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Min/max round-to-nearest. g [N, G, gs] -> scale, offset [N, G] (w = (q - c) * s + offset)."""
    mn, mx = g.amin(-1), g.amax(-1)
    s = ((mx - mn) / (2 ** bits - 1)).clamp_min(1e-10)
    return s, mn + 2 ** (bits - 1) * s


def _fit(g: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Least-squares scale and offset per group: g [N, G, gs] -> s, m [N, G].

    HQQ's half-quadratic alternation (codes <-> parameters) without its lp shrinkage step: with
    hqq's beta=10, p=0.7 the shrinkage is zero unless |W - Wr| > 0.17, so it is identically zero
    on LLM weights (~1e-2), and where it does act (weights scaled up) it raises the error. Unlike
    hqq (zero only), the quadratic step refits scale and offset; no iteration increases the
    squared error. Starts from min/max; keeps the best (s, m); stops when the error stops falling.
    """
    qmax, n = 2 ** bits - 1, g.shape[-1]
    scales, offsets = [], []
    for W in g.split(max(1, _FIT_CHUNK // (g.shape[1] * n))):
        sw, sww = W.sum(-1).double(), W.square().sum(-1).double()  # per-group sums, [rows, G]
        s, m = _rtn(W, bits)
        m = m - 2 ** (bits - 1) * s  # uncentred here: w = q * s + m
        best, best_sm = float("inf"), (s, m)
        q, tmp = torch.empty_like(W), torch.empty_like(W)  # reused buffers: no allocations per iteration
        for _ in range(_FIT_ITERS):
            si = (1 / s)[..., None]
            torch.addcmul(-m[..., None] * si, W, si, out=q).round_().clamp_(0, qmax)  # codes for (s, m)
            sq = q.sum(-1).double()
            sqq = torch.mul(q, q, out=tmp).sum(-1).double()
            sqw = torch.mul(q, W, out=tmp).sum(-1).double()
            sd, md = s.double(), m.double()  # squared error from the sums, no residual tensor:
            err = (sww - 2 * sd * sqw - 2 * md * sw + sd * sd * sqq + 2 * sd * md * sq + n * md * md).sum().item()
            if err >= best:
                break
            best, best_sm = err, (s, m)
            var, cov = sqq - sq * sq / n, sqw - sq * sw / n
            s = torch.where((var > 0) & (cov > 0), cov / var.clamp_min(1e-30), sd).float()  # LS slope, kept > 0
            m = ((sw - s.double() * sq) / n).float()
        scales.append(best_sm[0])
        offsets.append(best_sm[1] + 2 ** (bits - 1) * best_sm[0])
    return torch.cat(scales), torch.cat(offsets)


def _pack(codes: Tensor, bits: int) -> Tensor:
    """codes uint8 [N, K] -> B64 bytes [ceil(N/64), K, 8*bits] (see module docstring)."""
    N, K = codes.shape
    nb = -(-N // _BLOCK)
    c = F.pad(codes, (0, 0, 0, nb * _BLOCK - N)).view(nb, _BLOCK, K).transpose(1, 2)  # [nb, K, 64]
    if bits == 4:
        return (c[..., :32] | c[..., 32:] << 4).contiguous()
    low = c & 3
    L = low[..., :16] | low[..., 16:32] << 2 | low[..., 32:48] << 4 | low[..., 48:] << 6
    if bits == 2:
        return L.contiguous()
    hb = (c >> 2).reshape(nb, K, 8, 8)  # [.., t, i]: bit 2 of row 8t+i
    h = (hb << torch.arange(8, dtype=torch.uint8)[:, None]).sum(-2, dtype=torch.uint8)
    return torch.cat((L, h), -1).contiguous()


def _codes4(b: Tensor, N: int) -> Tensor:
    """B64 int4 bytes [nb, K, 32] -> codes uint8 [N, K]."""
    nb, K, _ = b.shape
    return torch.cat((b & 15, b >> 4), -1).transpose(1, 2).reshape(nb * _BLOCK, K)[:N]


def quantize(w: Tensor, fmt: str, group_size: int = 64) -> dict[str, Tensor]:
    """Storage form of ``w`` [N, K] (any float dtype): deterministic, CPU, contiguous.
    ``group_size`` applies to int4/int3/int2 only and must divide K."""
    check_shape(fmt, tuple(w.shape), group_size)
    if fmt in ("fp32", "bf16"):
        return {"w": w.detach().to("cpu", torch.float32 if fmt == "fp32" else torch.bfloat16, copy=True).contiguous()}
    if fmt == "mxfp4":
        return mxfp4.quantize(w)
    w = w.detach().to("cpu", torch.float32).contiguous()  # read only below: no copy needed
    if fmt == "int8":
        amax = torch.maximum(w.amax(1), -w.amin(1))
        s = _bf16(torch.where(amax > 0, amax / 127, 1.0))
        q = (w / s[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        return {"q": q, "scale": s.to(torch.bfloat16)}
    bits = _BITS[fmt]
    N, K = w.shape
    g = w.view(N, K // group_size, group_size)
    s, m = _fit(g, bits)
    s, m = _bf16(s), _bf16(m)
    codes = (g - m[..., None]).div_(s[..., None]).add_(2 ** (bits - 1)).round_().clamp_(0, 2 ** bits - 1)
    sz = torch.stack((s, m), -1).transpose(0, 1).to(torch.bfloat16).contiguous()  # [G, N, 2]
    return {"q": _pack(codes.to(torch.uint8).view(N, K), bits), "sz": sz}


def int4_from_codes(codes: Tensor, scale: Tensor, zero: Tensor) -> dict[str, Tensor]:
    """int4 storage form of a grid chosen elsewhere (e.g. a GGUF's own 4-bit blocks): codes uint8
    [N, K] in 0..15, scale and zero [N, K/group_size] with w = (q - 8) * scale + zero. Codes are kept
    as they are; scale and zero are rounded to bf16 (the kernel's dtype)."""
    N, K = codes.shape
    if scale.shape != zero.shape or scale.shape[0] != N or K % scale.shape[1]:
        raise ValueError(f"int4_from_codes: codes {tuple(codes.shape)} need scale/zero [N, K/group_size], "
                         f"got {tuple(scale.shape)} and {tuple(zero.shape)}")
    sz = torch.stack((scale.float(), zero.float()), -1).transpose(0, 1).to(torch.bfloat16).contiguous()  # [G, N, 2]
    return {"q": _pack(codes.to(torch.uint8).contiguous(), 4), "sz": sz}


def dequantize(q: dict[str, Tensor], fmt: str, shape: tuple[int, int], group_size: int) -> Tensor:
    """Plain-torch fp32 reference: the [N, K] weight the storage form represents."""
    check_shape(fmt, shape, group_size)
    N, K = shape
    if fmt in ("fp32", "bf16"):
        return q["w"].float()
    if fmt == "int8":
        return q["q"].float() * q["scale"].float()[:, None]
    if fmt == "mxfp4":
        return mxfp4.dequantize(q)
    G = K // group_size
    w = _codes4(_to_int4(q["q"], _BITS[fmt]), N).float().view(N, G, group_size)
    s, m = q["sz"].float().permute(2, 1, 0)[..., None]  # each [N, G, 1]
    return w.sub_(8).mul_(s).add_(m).view(N, K)  # (q4 - 8) * s + m, exact product then one rounding


@functools.cache
def _fast_layout() -> bool:
    """True when B64 int4 equals the running int4 kernel's packed layout (AVX512 builds)."""
    codes = torch.randint(0, 16, (2 * _BLOCK, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    ref = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), 1)
    return torch.equal(_pack(codes, 4).view(ref.shape), ref)


def _to_int4(q: Tensor, bits: int) -> Tensor:
    """B64 bytes of int2/int3/int4 codes -> B64 int4 bytes [nb, K, 32] of q4 = q + 8 - c (the kernel's centre).
    int2/int3 use 64-bit word ops; the per-byte masks keep bits from crossing bytes."""
    if bits == 4:
        return q
    nb, K, _ = q.shape
    if q.storage_offset() % 8:
        q = q.clone()  # an int64 view needs an 8-byte aligned offset
    W = q.contiguous().view(torch.int64).view(-1, bits)  # per (block, k): 2 words of low bits (+1 word of high bits)
    out = torch.empty(W.shape[0], 4, dtype=torch.int64)  # 32 bytes: row j | row j+32 << 4, j < 32
    torch.bitwise_and(W[:, :2], _M33, out=out[:, :2])  # rows 0-15 | 32-47
    torch.bitwise_and(W[:, :2] >> 2, _M33, out=out[:, 2:])  # rows 16-31 | 48-63
    if bits == 3:  # high-bit word, shifted by t: bit 0 of byte i = row 8t+i, bit 4 = row 8t+i+32; move to bits 2, 6
        out.add_((W[:, 2:] >> torch.arange(4)) & _M11, alpha=4)
    out += _CENTRE_ADD[bits]  # no carries: nibbles stay <= 11
    return out.view(torch.uint8).view(nb, K, 32)


def prepare(q: dict[str, Tensor], fmt: str, shape: tuple[int, int], group_size: int,
            dtype: torch.dtype) -> Prepared:
    """One-time runtime form for ``linear`` with activations in ``dtype``.

    Quantized formats use torch's weight-only kernels only for ``dtype=torch.bfloat16`` (they are
    30-100x slower with other activation dtypes); for fp32 (or fp16) the weight is dequantized to
    a dense ``dtype`` matrix: correct, but it holds 2-4x the RAM. int4/int3/int2 also fall back
    to a dense weight when the kernel cannot take the shape (N % 16 != 0, group_size not in
    32/64/128/256), and int8 when K % 16 != 0 (torch 2.13's int8 kernel returns garbage, then
    crashes, for K = 8, 24, 40, 72, ...). May return views of ``q``'s tensors (int8, int4 on AVX512, fp32/bf16 already
    in ``dtype``): do not reuse ``q``'s buffers while the result is alive.
    """
    check_shape(fmt, shape, group_size)
    N, K = shape
    if fmt in ("fp32", "bf16"):
        return Prepared(fmt, (N, K), dtype, "dense", q["w"].to(dtype).contiguous())
    if fmt == "mxfp4":  # views of the stored codes: the slot holds 4.25 bits per weight
        return Prepared(fmt, (N, K), dtype, "mxfp4", q["blocks"], q["scales"])
    if fmt == "int8" and dtype == torch.bfloat16 and _HAS_INT8 and K % _INT8_K == 0:
        return Prepared(fmt, (N, K), dtype, "int8", q["q"], q["scale"],
                        native=kernels.available() and kernels.int8_fits((N, K)) and q["q"].is_contiguous()
                        and q["scale"].is_contiguous())
    if fmt == "int8" or dtype != torch.bfloat16 or not _HAS_INT4 or N % 16 or group_size not in _KERNEL_GROUPS:
        return Prepared(fmt, (N, K), dtype, "dense", dequantize(q, fmt, shape, group_size).to(dtype))
    bits = _BITS[fmt]
    native = kernels.available() and kernels.lowbit_fits((N, K), group_size)  # hobbit.kernels read B64 as stored
    if native and bits in kernels.BITS:  # the stored bytes themselves: a view, nothing expanded
        packed = q["q"].view(N, K * bits // 8)
    elif native or (N % _BLOCK == 0 and _fast_layout()):
        packed, bits = _to_int4(q["q"], bits).view(N, K // 2), 4
    else:  # trust the op: decode the codes and let it pack them
        packed, bits = torch.ops.aten._convert_weight_to_int4pack_for_cpu(_codes4(_to_int4(q["q"], bits), N).int(), 1), 4
    return Prepared(fmt, (N, K), dtype, "lowbit", packed, q["sz"].contiguous(), group_size, native, bits)


def linear(x: Tensor, w: Prepared) -> Tensor:
    """x [T, K] -> x @ W.T [T, N], computed in ``w.dtype`` and returned in ``x.dtype``."""
    xc = x.to(w.dtype).contiguous()
    if w.kind == "dense":
        y = F.linear(xc, w.w)
    elif w.kind == "mxfp4":
        y = mxfp4.linear(xc, w.w, w.scales, w.shape)
    else:
        y = _quant_mm(xc, w)
    return y.to(x.dtype)


def _quant_mm(x: Tensor, w: Prepared) -> Tensor:
    """x [T, K] bf16 contiguous, w lowbit/int8 -> [T, N] bf16: hobbit.kernels up to the rows where they beat
    torch's (kernels.max_tokens), else torch's; and at every size where torch's kernel cannot read the bytes
    (2-bit codes, or B64 int4 where it packs int4 its own way: AVX2, say)."""
    rows = x.shape[0]
    if w.kind == "int8":
        if w.native and rows <= kernels.max_tokens("int8"):
            return kernels.int8_linear(x, w.w, w.scales)
        return torch.ops.aten._weight_int8pack_mm(x, w.w, w.scales)
    if w.native and (rows <= kernels.max_tokens("lowbit") or w.bits != 4 or not _fast_layout()):
        return kernels.lowbit_linear(x, w.w, w.scales, w.shape, w.group_size, w.bits)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, w.w, w.group_size, w.scales)


def fusable_swiglu(w13: Prepared, w2: Prepared) -> bool:
    """Whether swiglu_weighted can run the SwiGLU FFN over w13 = [gate; up] [2I, H] and w2 [H, I] in one native call."""
    return (w13.kind == w2.kind == "lowbit" and w13.native and w2.native and w13.group_size == w2.group_size
            and w13.bits == w2.bits and w13.dtype == torch.bfloat16)


def swiglu_weighted(x: Tensor, w13: Prepared, w2: Prepared, weight: float) -> Tensor:
    """weight * w2 (silu(gate x) * (up x)) for one token x [1, H] bf16 contiguous -> [1, H] bf16, in one call
    of kernels.lowbit_expert. Requires fusable_swiglu(w13, w2)."""
    H, inter = w2.shape
    return kernels.lowbit_expert(x, w13.w, w13.scales, w2.w, w2.scales, H, inter, w13.group_size, w13.bits, weight)


def cat0(ts: list[Tensor]) -> Tensor:
    """torch.cat along dim 0; a view, no copy, when the parts lie back to back in one buffer
    (dense.read puts the parts of a fused projection there)."""
    t0, n = ts[0], sum(t.shape[0] for t in ts)
    end = t0.data_ptr()
    for t in ts:
        if not t.is_contiguous() or t.untyped_storage().data_ptr() != t0.untyped_storage().data_ptr() \
                or t.data_ptr() != end or t.dtype != t0.dtype or t.shape[1:] != t0.shape[1:]:
            return torch.cat(ts)
        end += t.numel() * t.element_size()
    return t0.new_empty(0).set_(t0.untyped_storage(), t0.storage_offset(), (n, *t0.shape[1:]))


def cat(parts: list[tuple[dict[str, Tensor], tuple[int, int]]], fmt: str) -> dict[str, Tensor]:
    """Storage form of the row-concatenation of matrices stored in ``fmt`` (same K): exact, no
    re-quantization. parts: (storage dict, [N, K] shape) each."""
    if fmt in ("fp32", "bf16"):
        return {"w": cat0([s["w"] for s, _ in parts])}
    if fmt == "int8":
        return {"q": cat0([s["q"] for s, _ in parts]), "scale": cat0([s["scale"] for s, _ in parts])}
    if fmt == "mxfp4":
        return {k: cat0([s[k] for s, _ in parts]) for k in ("blocks", "scales")}
    bits = _BITS[fmt]
    if all(N % _BLOCK == 0 for _, (N, _) in parts):  # whole B64 blocks: the bytes concatenate
        q = cat0([s["q"] for s, _ in parts])
    else:  # decode the codes and pack them again
        codes = torch.cat([_codes4(_to_int4(s["q"], bits), N) - (8 - 2 ** (bits - 1)) for s, (N, _) in parts])
        q = _pack(codes, bits)
    return {"q": q, "sz": torch.cat([s["sz"] for s, _ in parts], dim=1)}


class QuantLinear(torch.nn.Module):
    """A drop-in for nn.Linear over a weight in quant's storage form (prepared once, never re-quantized)."""

    def __init__(self, q: dict[str, Tensor], fmt: str, shape: tuple[int, int], group_size: int,
                 dtype: torch.dtype, bias: Tensor | None = None):
        super().__init__()
        self.w = prepare(q, fmt, shape, group_size, dtype)
        self.bias = None if bias is None else bias.detach().to(dtype)

    @property
    def nbytes(self) -> int:
        return self.w.nbytes + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())

    def forward(self, x: Tensor) -> Tensor:
        w = self.w
        if x.dtype != w.dtype or not x.is_contiguous() or w.kind == "mxfp4":
            y = linear(x, w)
        elif w.kind in ("lowbit", "int8"):  # the kernel straight away: linear's no-op casts cost 1.7 us a call at batch 1
            y = _quant_mm(x, w)
        else:
            y = F.linear(x, w.w)
        return y if self.bias is None else y + self.bias
