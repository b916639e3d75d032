"""Read a Hugging Face model folder lazily: config.json + single or sharded safetensors.

Expert tensors are recognised by per-family name patterns (data below) and served per
(layer, expert) as w13 [2I,H] = cat(gate, up) rows and w2 [H,I]; everything else is a dense
weight under its HF name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from hobbit.store import mxfp4
from hobbit.store.config import ModelConfig, eos_ids

_QWEN_STYLE = r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight"
_QWEN_PROJ = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
# family -> (per-expert tensor name pattern with groups (layer, expert, proj), proj name -> gate/up/down)
_MIXTRAL_STYLE = (r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w3|w2)\.weight",
                  {"w1": "gate", "w3": "up", "w2": "down"})
EXPERT_NAMES: dict[str, tuple[str, dict[str, str]]] = {
    "mixtral": _MIXTRAL_STYLE,
    "phimoe": _MIXTRAL_STYLE,
    "qwen2_moe": (_QWEN_STYLE, _QWEN_PROJ),
    "qwen3_moe": (_QWEN_STYLE, _QWEN_PROJ),
    "olmoe": (_QWEN_STYLE, _QWEN_PROJ),
    "deepseek_v2": (_QWEN_STYLE, _QWEN_PROJ),
    "deepseek_v3": (_QWEN_STYLE, _QWEN_PROJ),
    "glm4_moe": (_QWEN_STYLE, _QWEN_PROJ),
}
# transformers-5 in-memory fused form: gate_up_proj [E,2I,H] (gate rows first), down_proj [E,H,I];
# gpt_oss on disk: gate_up_proj [E,H,2I] (in-features first, gate/up columns interleaved), down_proj [E,I,H],
# and the biases gate_up_proj_bias [E,2I] (interleaved), down_proj_bias [E,H]
# (released gpt-oss: MXFP4 `{proj}_blocks` [E,N,K/32,16] uint8 + `{proj}_scales` [E,N,K/32], out-features first)
FUSED_NAME = re.compile(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\."
                        r"(gate_up_proj|down_proj|gate_up_proj_bias|down_proj_bias|gate_up_proj_blocks|"
                        r"gate_up_proj_scales|down_proj_blocks|down_proj_scales)")
IN_FIRST_INTERLEAVED = ("gpt_oss",)  # families whose fused experts use the gpt_oss layout above
# granitemoe on disk: block_sparse_moe.input_linear.weight [E,2I,H] (gate rows first), output_linear.weight [E,H,I]
GRANITE_FUSED = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.(input_linear|output_linear)\.weight")
_GRANITE_PROJ = {"input_linear": "gate_up_proj", "output_linear": "down_proj"}
_PATTERNS = {arch: re.compile(p) for arch, (p, _) in EXPERT_NAMES.items()}
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def parse_expert_name(arch: str, name: str) -> tuple[int, int, str] | None:
    """HF tensor name -> (layer, expert, 'gate'|'up'|'down') for a per-expert tensor, else None."""
    m = _PATTERNS[arch].fullmatch(name) if arch in _PATTERNS else None
    if m is None:
        return None
    return int(m[1]), int(m[2]), EXPERT_NAMES[arch][1][m[3]]


def parse_fused_name(name: str) -> tuple[int, str] | None:
    """HF tensor name -> (layer, 'gate_up_proj'|'down_proj') for a fused [E,...] expert tensor, else None."""
    if m := FUSED_NAME.fullmatch(name):
        return int(m[1]), m[2]
    m = GRANITE_FUSED.fullmatch(name)
    return (int(m[1]), _GRANITE_PROJ[m[2]]) if m else None


def is_expert_tensor(arch: str, name: str) -> bool:
    return parse_expert_name(arch, name) is not None or parse_fused_name(name) is not None


class Checkpoint:
    """An HF folder, read lazily. `files` maps every tensor name to the safetensors file holding it."""

    def __init__(self, path: Path, raw_config: dict[str, Any], config: ModelConfig, files: dict[str, Path]):
        self.path, self.raw_config, self.config = path, raw_config, config
        self._files = files
        self._handles: dict[Path, Any] = {}
        self._experts: dict[tuple[int, int], dict[str, str]] = {}  # (layer, expert) -> proj -> name
        self._fused: dict[int, dict[str, str]] = {}  # layer -> 'gate_up_proj'|'down_proj' -> name
        self._dense: list[str] = []
        for name in files:
            if (m := _LAYER.match(name)) and int(m[1]) >= config.num_layers:
                continue  # layers past num_hidden_layers (DeepSeek-V3's multi-token-prediction head): unused
            if (hit := parse_expert_name(config.arch, name)) is not None:
                self._experts.setdefault(hit[:2], {})[hit[2]] = name
            elif (fused := parse_fused_name(name)) is not None:
                self._fused.setdefault(fused[0], {})[fused[1]] = name
            else:
                self._dense.append(name)
        self._check_experts()

    def _check_experts(self) -> None:
        cfg, missing = self.config, []
        fused = {"gate_up_proj", "down_proj"} | ({"gate_up_proj_bias", "down_proj_bias"} if cfg.expert_bias else set())
        for layer in cfg.sparse_layers:
            if cfg.expert_bias or layer in self._fused:  # expert biases come only fused (gpt_oss)
                have = {n.removesuffix("_blocks") for n in self._fused.get(layer, {})}  # MXFP4 counts as present
                missing += [f"layer {layer} experts.{p}" for p in sorted(fused - have)]
                continue
            for e in range(cfg.num_experts):
                have = self._experts.get((layer, e), {})
                missing += [f"layer {layer} expert {e} {p}" for p in ("gate", "up", "down") if p not in have]
        if missing:
            shown = ", ".join(missing[:5]) + (f" ... ({len(missing)} in all)" if len(missing) > 5 else "")
            raise ValueError(f"{self.path}: checkpoint lacks expert tensors: {shown}")

    def tensor(self, name: str) -> Tensor:
        """Any tensor by HF name, read from its file (mmap-backed, no copy until used)."""
        if name not in self._files:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        f = self._files[name]
        if f not in self._handles:
            self._handles[f] = safe_open(str(f), framework="pt")
        return self._handles[f].get_tensor(name)

    def dense_names(self) -> list[str]:
        return list(self._dense)

    def dense_tensor(self, name: str) -> Tensor:
        if name not in self._dense:
            raise KeyError(f"{self.path}: {name!r} is not a dense tensor of this checkpoint")
        return self.tensor(name)

    def dense_state_dict(self) -> dict[str, Tensor]:
        return {name: self.tensor(name) for name in self._dense}

    def expert_weights(self, layer: int, expert: int) -> tuple[Tensor, Tensor]:
        """(w13 [2I,H] = cat(gate, up) rows, w2 [H,I]) for one expert."""
        if layer not in self.config.sparse_layers or not 0 <= expert < self.config.num_experts:
            raise KeyError(f"no expert {expert} in layer {layer} (sparse layers {self.config.sparse_layers}, "
                           f"{self.config.num_experts} experts)")
        if layer in self._fused:
            names = self._fused[layer]
            if (native := self.expert_mxfp4(layer, expert)) is not None:  # exact, as transformers dequantizes
                return mxfp4.dequantize(native["w13"]), mxfp4.dequantize(native["w2"])
            w13, w2 = self.tensor(names["gate_up_proj"])[expert], self.tensor(names["down_proj"])[expert]
            if self.config.arch in IN_FIRST_INTERLEAVED:  # [H,2I] interleaved -> [2I,H] gate rows, then up
                return _deinterleave(w13.T), w2.T
            return w13, w2
        names = self._experts[(layer, expert)]
        w13 = torch.cat([self.tensor(names["gate"]), self.tensor(names["up"])])  # [2I,H]
        return w13, self.tensor(names["down"])


    def has_mxfp4_experts(self) -> bool:
        return any("gate_up_proj_blocks" in names for names in self._fused.values())

    def expert_mxfp4(self, layer: int, expert: int) -> dict[str, dict[str, Tensor]] | None:
        """A released gpt-oss checkpoint's own MXFP4 codes for one expert, in mxfp4's storage form: w13 [2I,H]
        (gate rows, then up: the interleaved rows reordered, codes untouched) and w2 [H,I]; None if the
        experts are not stored as MXFP4. On disk `{proj}_blocks` [E,N,K/32,16], `_scales` [E,N,K/32]."""
        names = self._fused.get(layer, {})
        if "gate_up_proj_blocks" not in names:
            return None
        (b13, s13), (b2, s2) = ((self.tensor(names[p + "_blocks"])[expert], self.tensor(names[p + "_scales"])[expert])
                                for p in ("gate_up_proj", "down_proj"))
        return {"w13": mxfp4.from_hf(_deinterleave(b13), _deinterleave(s13)), "w2": mxfp4.from_hf(b2, s2)}

    def expert_biases(self, layer: int, expert: int) -> tuple[Tensor, Tensor]:
        """(b13 [2I] = cat(gate, up), b2 [H]) for one expert of a family with expert biases (gpt_oss)."""
        if not self.config.expert_bias:
            raise KeyError(f"{self.config.arch} experts have no biases")
        names = self._fused[layer]
        b13, b2 = self.tensor(names["gate_up_proj_bias"])[expert], self.tensor(names["down_proj_bias"])[expert]
        return _deinterleave(b13), b2


def _deinterleave(t: Tensor) -> Tensor:
    """Rows g0,u0,g1,u1,.. -> g0,g1,..,u0,u1,.. (t [2I,...])."""
    return torch.cat((t[0::2], t[1::2]))


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open an HF model folder: config.json plus model.safetensors, or shards named by
    model.safetensors.index.json (or, lacking both, every *.safetensors in the folder)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face model folder?)")
    raw = json.loads(cfg_file.read_text())
    config = ModelConfig.from_hf(raw)
    gen_file = path / "generation_config.json"
    if gen_file.is_file():  # chat models often list extra stop ids (e.g. <|eot_id|>) only here
        extra = eos_ids(json.loads(gen_file.read_text()).get("eos_token_id"))
        config.eos_token_ids = tuple(dict.fromkeys(config.eos_token_ids + extra))
    return Checkpoint(path, raw, config, _tensor_files(path))


def _tensor_files(path: Path) -> dict[str, Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            raise FileNotFoundError(f"{path}: shards named in {index.name} are missing: {', '.join(missing)}")
        return {name: path / f for name, f in weight_map.items()}
    single = path / "model.safetensors"
    shards = [single] if single.is_file() else sorted(path.glob("*.safetensors"))
    if not shards:
        found = ", ".join(sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf")))
        raise FileNotFoundError(
            f"{path}: no model.safetensors or model.safetensors.index.json"
            + (f" (found {found}; only safetensors checkpoints are supported)" if found else ""))
    files = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            files.update({name: shard for name in f.keys()})
    return files
