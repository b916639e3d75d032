"""Keep a GGUF's own 4-bit grid: Q4_0 / Q4_1 / Q4_K tensors -> hobbit's int4 storage (group 32).

All three are affine per 32 consecutive inputs of a row, w = a * q + b with codes q in 0..15:

    Q4_0  a = d,          b = -8 d            (one block of 32)
    Q4_1  a = d,          b = m               (one block of 32)
    Q4_K  a = d * sc_j,   b = -dmin * m_j     (sub-block j of 32 in a super-block of 256)

torch's int4 kernel computes w = (q - 8) * scale + zero with a bf16 scale and zero per group, so
scale = a and zero = b + 8 a: the codes are copied as they are and only scale and zero are rounded
to bf16. No re-fit, so no second rounding of the weights. Valid wherever a stored matrix keeps the
GGUF's inputs in their order (rows may be regrouped; columns must stay in aligned runs of 32).

`default_precisions` puts a GGUF's own expert precision on top of the store it converts to: nothing
above it (a bf16 copy of 4-bit experts holds the same values at 3.2-3.6x the bytes, docs/study), and
nothing below it that would re-round it (re-fitting Q5_K / Q6_K / Q8_0 values at int4 g32 moves them
6-7%, more than those types' own rounding; int8 per channel moves any of them ~0.7%: tests).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, ReaderTensor
from gguf.quants import Q4_K

from hobbit.store import quant

GROUP = 32
NATIVE_TYPES = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q4_K)
UNQUANTIZED = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16, GGMLQuantizationType.F64)
_EXPERT_TENSOR = re.compile(r"blk\.(\d+)\.ffn_\w+_exps\.weight")  # stacked routed experts [E, out, in]


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)  # [n, 1]


def affine_4bit(data: np.ndarray, qtype: GGMLQuantizationType) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GGUF rows `data` uint8 [..., bytes per row] of qtype -> (codes uint8 [..., K], a, b float32
    [..., K/32]) with w = a * codes + b: the values gguf.quants.dequantize gives (up to float32
    rounding of the product-sum)."""
    if qtype not in NATIVE_TYPES:
        raise ValueError(f"GGML type {qtype.name} has no 4-bit affine grid of 32 "
                         f"(native types: {', '.join(q.name for q in NATIVE_TYPES)}); quantize it instead")
    block, size = GGML_QUANT_SIZES[qtype]
    lead, K = data.shape[:-1], data.shape[-1] // size * block
    blocks = np.asarray(data).reshape(-1, size)
    n = len(blocks)
    if qtype == GGMLQuantizationType.Q4_K:
        d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
        sc, m = Q4_K.get_scale_min(blocks[:, 4:16])  # 6-bit scale and min of the 8 sub-blocks
        qs = blocks[:, 16:].reshape(n, 4, 1, 32)
        codes = np.concatenate((qs & 15, qs >> 4), axis=2)  # byte chunk c: sub-block 2c low, 2c+1 high nibble
        a, b = d * sc.astype(np.float32), -(dmin * m.astype(np.float32))
    else:
        head = 2 if qtype == GGMLQuantizationType.Q4_0 else 4
        d, qs = _f16(blocks[:, 0:2]), blocks[:, head:]
        codes = np.concatenate((qs & 15, qs >> 4), axis=1)  # values 0-15 low nibbles, 16-31 high
        a, b = d, (-8 * d if qtype == GGMLQuantizationType.Q4_0 else _f16(blocks[:, 2:4]))
    return codes.reshape(*lead, K), a.reshape(*lead, K // GROUP), b.reshape(*lead, K // GROUP)


def int4_storage(codes: np.ndarray, a: np.ndarray, b: np.ndarray) -> dict[str, torch.Tensor]:
    """quant's int4 storage (group 32) of one [N, K] matrix given as w = a * codes + b."""
    a32 = torch.from_numpy(np.ascontiguousarray(a, np.float32))
    zero = a32 * 8 + torch.from_numpy(np.ascontiguousarray(b, np.float32))  # (q - 8) a + zero = a q + b
    return quant.int4_from_codes(torch.from_numpy(np.ascontiguousarray(codes)), a32, zero)


def native_int4(t: ReaderTensor) -> dict[str, torch.Tensor]:
    """A 2-D Q4_0/Q4_1/Q4_K tensor as quant's int4 storage dict with group size 32, codes kept."""
    if len(t.shape) != 2:
        raise ValueError(f"{t.name}: native_int4 takes a 2-D tensor, got {len(t.shape)}-D; "
                         f"use native_expert_int4 for stacked experts")
    return int4_storage(*affine_4bit(t.data, t.tensor_type))


def native_expert_int4(gate: ReaderTensor, up: ReaderTensor, down: ReaderTensor,
                       expert: int) -> dict[str, dict[str, torch.Tensor]]:
    """One expert of stacked `ffn_{gate,up,down}_exps` tensors [E, out, in] as the store's
    {"w13": int4 storage of cat(gate, up) rows, "w2": int4 storage of down}, group size 32."""
    (cg, ag, bg), (cu, au, bu), (cd, ad, bd) = (affine_4bit(t.data[expert], t.tensor_type) for t in (gate, up, down))
    w13 = int4_storage(np.concatenate((cg, cu)), np.concatenate((ag, au)), np.concatenate((bg, bu)))
    return {"w13": w13, "w2": int4_storage(cd, ad, bd)}


def native_experts(raw: Mapping[str, ReaderTensor]) -> Callable[[int, int], dict[str, dict[str, torch.Tensor]] | None]:
    """For a GGUF's tensors by name (`GGUFModel.raw`): (layer, expert) -> the store's int4 parts
    (group 32) from `blk.{layer}.ffn_{gate,up,down}_exps`, or None where those are missing or not
    all Q4_0/Q4_1/Q4_K (the caller then quantizes the dequantized weights as usual)."""
    def parts(layer: int, expert: int) -> dict[str, dict[str, torch.Tensor]] | None:
        t = [raw.get(f"blk.{layer}.ffn_{p}_exps.weight") for p in ("gate", "up", "down")]
        if any(x is None or x.tensor_type not in NATIVE_TYPES for x in t):
            return None
        return native_expert_int4(*t, expert)
    return parts


def expert_types(raw: Mapping[str, ReaderTensor]) -> dict[int, set[GGMLQuantizationType]]:
    """layer -> the GGML types of its stacked routed-expert tensors (`blk.L.ffn_*_exps.weight`)."""
    types: dict[int, set[GGMLQuantizationType]] = {}
    for name, t in raw.items():
        if m := _EXPERT_TENSOR.fullmatch(name):
            types.setdefault(int(m[1]), set()).add(t.tensor_type)
    return types


def has_native_layer(raw: Mapping[str, ReaderTensor]) -> bool:
    """Whether some layer's routed experts are all Q4_0/Q4_1/Q4_K (`native_experts` keeps their codes)."""
    return any(types <= set(NATIVE_TYPES) for types in expert_types(raw).values())


def source_precision(raw: Mapping[str, ReaderTensor]) -> str | None:
    """The store tier that holds this GGUF's routed experts as they shipped: 'int4' when every expert tensor
    is Q4_0/Q4_1/Q4_K (their codes kept), 'mxfp4' when all are MXFP4, 'int8' when any is another quantized
    type (Q5_K/Q6_K in a Q4_K_M file, Q8_0, ...: int8 holds each within ~0.7%); None when any is a float type
    or the model has no routed experts."""
    types = set().union(*expert_types(raw).values())
    if not types or types & set(UNQUANTIZED):
        return None
    if types <= set(NATIVE_TYPES):
        return "int4"
    return "mxfp4" if types == {GGMLQuantizationType.MXFP4} else "int8"


def default_precisions(raw: Mapping[str, ReaderTensor]) -> tuple[str, ...] | None:
    """The tiers a store converted from this GGUF gets when none are asked for: its experts' own precision
    (`source_precision`) on top, int4 and int2 below; None (the caller's default) for float experts and for
    MXFP4 ones (the caller keeps their codes as the mxfp4 tier)."""
    return {"int4": ("int4", "int2"), "int8": ("int8", "int4", "int2")}.get(source_precision(raw))
