"""Plain round-to-nearest encoders for the K-quant blocks gguf-py can read but not write (Q4_K,
Q5_K, Q6_K), so tests can build GGUFs in those types. Block layouts are the inverse of
gguf.quants' dequantizers (the tests check the round trip against them); quality is not the point."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q

QK = 256  # values per super-block


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(len(x), 2)


def _pack_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins per block -> the 12 bytes Q4_K/Q5_K keep them in."""
    lo_s, hi_s, lo_m, hi_m = sc[:, :4], sc[:, 4:], m[:, :4], m[:, 4:]
    d_b = lo_s | ((hi_s >> 4) << 6)  # sub-blocks 4-7 keep their top 2 bits above sub-blocks 0-3
    m_b = lo_m | ((hi_m >> 4) << 6)
    md = (hi_s & 0xF) | ((hi_m & 0xF) << 4)
    return np.concatenate([d_b, m_b, md], axis=1).astype(np.uint8)


def _affine_k(x: np.ndarray, levels: int) -> tuple[np.ndarray, ...]:
    """Super-block scale/min and 6-bit sub-block scales/mins (8 sub-blocks of 32), codes 0..levels-1."""
    sub = x.reshape(len(x), 8, 32)
    lo = np.minimum(sub.min(-1), 0)
    step = (sub.max(-1) - lo) / (levels - 1)
    d = (step.max(-1) / 63).astype(np.float16).astype(np.float32)
    dmin = (-lo.min(-1) / 63).astype(np.float16).astype(np.float32)
    safe = lambda a: np.where(a == 0, 1, a)  # noqa: E731
    sc = np.clip(np.rint(step / safe(d)[:, None]), 1, 63).astype(np.uint8)
    m = np.clip(np.rint(-lo / safe(dmin)[:, None]), 0, 63).astype(np.uint8)
    scale, low = d[:, None] * sc, -dmin[:, None] * m
    q = np.clip(np.rint((sub - low[..., None]) / safe(scale)[..., None]), 0, levels - 1).astype(np.uint8)
    return d, dmin, sc, m, q


def _nibbles(q: np.ndarray) -> np.ndarray:
    """Codes [n, 8, 32] -> 128 bytes: chunk c holds sub-block 2c (low nibble) and 2c+1 (high)."""
    return ((q[:, 0::2] & 0xF) | ((q[:, 1::2] & 0xF) << 4)).reshape(len(q), 128)


def quantize_k(w: np.ndarray, qtype: Q) -> np.ndarray:
    """w [..., K] float32 (K % 256 == 0) -> GGUF bytes [..., K/256 * type size] of qtype."""
    x = w.reshape(-1, QK).astype(np.float32)
    if qtype == Q.Q6_K:
        sub = x.reshape(len(x), 16, 16)
        amax = np.abs(sub).max(-1)
        d = (amax.max(-1) / 31 / 127).astype(np.float16).astype(np.float32)
        sc = np.clip(np.rint(amax / 31 / np.where(d == 0, 1, d)[:, None]), -128, 127).astype(np.int8)
        step = d[:, None] * sc
        q = np.clip(np.rint(sub / np.where(step == 0, 1, step)[..., None]) + 32, 0, 63).astype(np.uint8)
        q = q.reshape(len(x), 2, 128)  # halves of 128 values
        ql = (q[:, :, :64] & 0xF) | ((q[:, :, 64:] & 0xF) << 4)  # [n, 2, 64]
        hi = (q >> 4).reshape(len(x), 2, 4, 32)
        qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)  # [n, 2, 32]
        out = np.concatenate([ql.reshape(len(x), 128), qh.reshape(len(x), 64), sc.view(np.uint8), _f16(d)], 1)
    elif qtype in (Q.Q4_K, Q.Q5_K):
        d, dmin, sc, m, q = _affine_k(x, 16 if qtype == Q.Q4_K else 32)
        parts = [_f16(d), _f16(dmin), _pack_scales(sc, m)]
        if qtype == Q.Q5_K:  # bit 4 of value l of sub-block i is bit i of qh[l]
            parts.append(((q >> 4) << np.arange(8, dtype=np.uint8)[:, None]).sum(1, dtype=np.uint8))
        out = np.concatenate(parts + [_nibbles(q)], axis=1)
    else:
        raise ValueError(f"no test encoder for {qtype.name}")
    return out.reshape(*w.shape[:-1], -1)
