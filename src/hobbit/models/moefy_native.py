"""A moefied GGUF model keeps the GGUF's own 4-bit grid for its experts' gate/up rows.

Expert e of layer l holds the dense FFN neurons perm[S + e*I : S + (e+1)*I] of its recipe, so its gate_proj
and up_proj rows are whole rows of the GGUF's `blk.l.ffn_gate` / `ffn_up` (Qwen2.5-Coder Q4_K_M: Q4_K),
unscaled: their codes can be stored as they are (group 32, see gguf_native). down_proj is not: its inputs
are those neurons, scattered rather than aligned runs of 32, its columns are scaled by the recipe, and half
of Q4_K_M's ffn_down tensors are Q6_K; w2 is quantized from the checkpoint as usual.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from gguf import ReaderTensor

from hobbit.store.gguf_native import NATIVE_TYPES, affine_4bit, int4_storage
from hobbit.models.moefy import MoefyConfig


def recipe_native_w13(raw: Mapping[str, ReaderTensor], recipe: dict[str, torch.Tensor],
                      mc: MoefyConfig) -> Callable[[int, int], dict[str, torch.Tensor] | None]:
    """For the dense GGUF's tensors by name (`GGUFModel.raw`) and a moefy recipe: (layer, expert) -> the int4
    storage (group 32) of the expert's w13 = cat(gate rows, up rows) [2I, H] with the GGUF's codes, or None
    where ffn_gate/ffn_up are not Q4_0/Q4_1/Q4_K (quantize the checkpoint's weights instead)."""
    def w13(layer: int, expert: int) -> dict[str, torch.Tensor] | None:
        g, u = raw[f"blk.{layer}.ffn_gate.weight"], raw[f"blk.{layer}.ffn_up.weight"]
        if g.tensor_type not in NATIVE_TYPES or u.tensor_type not in NATIVE_TYPES:
            return None
        perm = recipe[f"layers.{layer}.perm"].long()
        I = (perm.numel() - mc.shared) // mc.experts
        rows = perm[mc.shared + expert * I:mc.shared + (expert + 1) * I].numpy()
        (cg, ag, bg), (cu, au, bu) = (affine_4bit(t.data[rows], t.tensor_type) for t in (g, u))
        return int4_storage(np.concatenate((cg, cu)), np.concatenate((ag, au)), np.concatenate((bg, bu)))
    return w13
