"""MXFP4 (OCP microscaling FP4), the native expert format of gpt-oss, as a store precision.

A weight W [N, K] (K a multiple of 32) is stored as the checkpoint has it, in hobbit's per-expert
[N, K] row order:

* ``blocks`` uint8 [N, K/2]: FP4 (e2m1) codes, two per byte, element 2j in the low nibble and 2j+1 in
  the high one (transformers' / the gpt-oss checkpoint's order; GGUF's MXFP4 puts j and j+16 in one
  byte instead, see ``from_ggml``);
* ``scales`` uint8 [N, K/32]: one e8m0 exponent per 32 consecutive inputs, w = fp4 x 2^(scale - 127).

Every MXFP4 value is exactly a bf16 (at most 2 significant bits, bf16 has fp32's exponent range), so
``dequantize`` to bf16 is lossless. There is no MXFP4 matmul among torch's CPU kernels, and e2m1 is
not an affine grid (no int4 kernel can take it exactly), so ``linear`` dequantizes into a scratch
buffer (one per thread, grown to the largest matrix, never per call) and runs F.linear: the slot holds
4.25 bits per weight, the budget counts only that. Dequantization is, per chunk of 256 rows, one int64
index (scale << 8 | byte) and one gather from a 65536-word table of two scaled values per word
(`python benchmarks/bench_mxfp4.py` compares it with transformers' recipe, a byte-pair table times the
scales, the int4 kernel and bf16).
"""
from __future__ import annotations

import functools
import threading

import torch
import torch.nn.functional as F
from torch import Tensor

BLOCK = 32  # values per scale
# FP4 (e2m1) code -> value: sign bit 3, then 0, 0.5, 1, 1.5, 2, 3, 4, 6
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_scratch = threading.local()


def check_shape(shape: tuple[int, int]) -> None:
    if shape[1] % BLOCK:
        raise ValueError(f"mxfp4: K={shape[1]} input features is not a multiple of {BLOCK}; "
                         f"store this matrix as int8/bf16")


def storage_nbytes(shape: tuple[int, int]) -> int:
    N, K = shape
    return N * K // 2 + N * K // BLOCK


def quantize(w: Tensor) -> dict[str, Tensor]:
    """Round-to-nearest MXFP4 of a float [N, K] (the OCP MX recipe, as gguf's MXFP4 quantizer: shared
    exponent floor(log2(amax)) - 2, codes nearest to w / 2^exponent, ties to the lower code). Sources already
    in MXFP4 keep their own codes instead (gpt-oss: `Checkpoint.expert_mxfp4`)."""
    N, K = w.shape
    check_shape((N, K))
    g = w.detach().to("cpu", torch.float32).reshape(N, K // BLOCK, BLOCK)
    amax = g.abs().amax(-1)  # [N,G]
    e = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 2 + 127, torch.zeros_like(amax)).clamp(0, 254)
    scaled = g / torch.ldexp(torch.ones_like(e), e.long() - 127)[..., None]  # [N,G,32]
    lut = torch.tensor(FP4_VALUES)
    codes = (scaled[..., None] - lut).abs().argmin(-1).to(torch.uint8)  # [N,G,32]; first of equals: +0 before -0
    return {"blocks": pack(codes.view(N, K)), "scales": e.to(torch.uint8).contiguous()}


def pack(codes: Tensor) -> Tensor:
    """codes uint8 [N, K] (0..15) -> [N, K/2], element 2j low nibble, 2j+1 high."""
    return (codes[:, 0::2] | codes[:, 1::2] << 4).contiguous()


def codes(blocks: Tensor) -> Tensor:
    """blocks [N, K/2] -> codes uint8 [N, K]."""
    return torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).flatten(-2)


def from_hf(blocks: Tensor, scales: Tensor) -> dict[str, Tensor]:
    """A gpt-oss checkpoint's `*_blocks` [N, G, 16] + `*_scales` [N, G] (one expert) -> storage form."""
    N, G, _ = blocks.shape
    return {"blocks": blocks.reshape(N, G * 16).contiguous(), "scales": scales.contiguous()}


def from_ggml(raw: Tensor, shape: tuple[int, int]) -> dict[str, Tensor]:
    """GGML MXFP4 blocks of one [N, K] matrix (uint8, 17 bytes per 32 values: e8m0 exponent, then byte j =
    element j | element j+16 << 4) -> storage form. Exact: only the nibbles move."""
    N, K = shape
    b = raw.reshape(N, K // BLOCK, 17)
    q = b[..., 1:]  # [N,G,16]
    c = torch.cat((q & 0x0F, q >> 4), dim=-1)  # [N,G,32] in element order
    return {"blocks": pack(c.reshape(N, K)), "scales": b[..., 0].contiguous()}


def to_ggml(q: dict[str, Tensor]) -> Tensor:
    """Storage form -> GGML MXFP4 bytes [N, K/32 * 17] (the inverse of from_ggml)."""
    N = q["blocks"].shape[0]
    c = codes(q["blocks"]).view(N, -1, BLOCK)  # [N,G,32]
    return torch.cat((q["scales"][..., None], c[..., :16] | c[..., 16:] << 4), dim=-1).reshape(N, -1)


def dequantize(q: dict[str, Tensor]) -> Tensor:
    """Plain-torch fp32 reference, as transformers' convert_moe_packed_tensors: lut[code] x 2^(scale-127)."""
    c = codes(q["blocks"]).long()  # [N,K]
    N, K = c.shape
    v = torch.tensor(FP4_VALUES)[c].view(N, K // BLOCK, BLOCK)
    return torch.ldexp(v, q["scales"].long()[..., None] - 127).view(N, K)


_ROWS = 256  # rows per chunk of the fast path: its int64 index (R x K/2) stays in cache
_PAIR_VIEW = {torch.bfloat16: torch.int32, torch.float32: torch.int64}  # two values as one gatherable word


@functools.cache
def _table(dtype: torch.dtype) -> Tensor:
    """(scale byte << 8 | code byte) -> the byte's two values x 2^(scale-127) in dtype, as one word [65536]
    (256 KiB for bf16). Exact: an MXFP4 value times a power of two is representable (inf past the range,
    as the reference)."""
    lut = torch.tensor(FP4_VALUES)
    b = torch.arange(256)
    pair = torch.stack((lut[b & 15], lut[b >> 4]), dim=-1)  # [256,2]: low nibble first
    scale = torch.ldexp(torch.ones(256), torch.arange(256) - 127)  # e = 255 (NaN in e8m0): inf
    return (scale[:, None, None] * pair[None]).to(dtype).contiguous().view(_PAIR_VIEW[dtype]).reshape(-1)


def dequantize_into(blocks: Tensor, scales: Tensor, out: Tensor) -> Tensor:
    """The fast path: blocks [N, K/2], scales [N, K/32] -> out [N, K] (bf16 / fp32), in place, by chunks
    of rows: index = scale << 8 | byte (int64, this thread's buffer), then one gather from `_table`."""
    N, K = out.shape
    G, table = K // BLOCK, _table(out.dtype)
    words = out.view(_PAIR_VIEW[out.dtype]).view(N, K // 2)
    idx = _buffer("idx", min(N, _ROWS) * K // 2, torch.int64)
    for r0 in range(0, N, _ROWS):
        r1 = min(N, r0 + _ROWS)
        i = idx[:(r1 - r0) * K // 2]
        i.copy_(blocks[r0:r1].reshape(-1))
        i.view(r1 - r0, G, 16).add_(scales[r0:r1, :, None].long() << 8)
        torch.gather(table, 0, i, out=words[r0:r1].reshape(-1))
    return out


def _buffer(name: str, n: int, dtype: torch.dtype) -> Tensor:
    """This thread's own 1-D buffer `name` of at least n elements, reused across calls (grown, never shrunk)."""
    buf = getattr(_scratch, name, None)
    if buf is None or buf.dtype != dtype or buf.numel() < n:
        buf = torch.empty(n, dtype=dtype)
        setattr(_scratch, name, buf)
    return buf[:n]


def scratch(shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """A [N, K] dtype buffer, this thread's own, reused across calls (grown, never shrunk)."""
    return _buffer("w", shape[0] * shape[1], dtype).view(shape)


def linear(x: Tensor, blocks: Tensor, scales: Tensor, shape: tuple[int, int]) -> Tensor:
    """x [T, K] (bf16 / fp32) -> x @ W.T [T, N], W dequantized into this thread's scratch buffer."""
    return F.linear(x, dequantize_into(blocks, scales, scratch(shape, x.dtype)))
