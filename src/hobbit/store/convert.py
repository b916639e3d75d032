"""Convert a Hugging Face model folder (or a GGUF file) into an expert store, once.

Every expert is written at every requested precision as one aligned blob, so the runtime never
re-quantizes or re-packs on the hot path.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from safetensors.torch import save_file
from tqdm import tqdm

from hobbit.store import dense as dense_weights

from hobbit.store import quant
from hobbit.store.checkpoint import open_checkpoint
from hobbit.store.format import StoreWriter

DEFAULT_PRECISIONS = ("bf16", "int4", "int2")
NATIVE_MXFP4_PRECISIONS = ("mxfp4", "int4", "int2")  # the default for a checkpoint whose experts are MXFP4
NativeParts = Callable[[int, int], "dict | None"]  # (layer, expert) -> int4 storage parts kept from a GGUF, or None
DEFAULT_DENSE = "auto"  # per matrix int4 where lossless (4-bit sources), else int8: quality holds (dense.py, README)
DENSE_GROUP_SIZE = 32
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja")


def parse_precisions(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    items = [p.strip() for p in spec.split(",")] if isinstance(spec, str) else list(spec)
    bad = [p for p in items if p not in quant.FORMATS]
    if bad or not items:
        raise ValueError(f"unknown precision(s) {bad or spec!r}; choose from {', '.join(quant.FORMATS)}")
    # highest precision first: the order the runtime uses for 'high' and 'low'
    return sorted(dict.fromkeys(items), key=quant.FORMATS.index)


def convert(src: str | Path, dst: str | Path, precisions: str | list[str] | None = None, group_size: int | None = None,
            progress: bool = True, dense: str | None = None, dense_group_size: int = DENSE_GROUP_SIZE) -> Path:
    """Write the expert store for `src` (HF folder or .gguf file) into `dst`; returns dst.
    precisions: the tiers to store; None = DEFAULT_PRECISIONS, except that a source's quantized experts set
    the top tier: MXFP4 ones (gpt-oss) get NATIVE_MXFP4_PRECISIONS, their own codes on top and int4/int2
    re-quantized from them; a GGUF's Q4_0/Q4_1/Q4_K ones int4,int2 and other quantized types int8,int4,int2
    (gguf_native.default_precisions).
    group_size None picks 32 where a GGUF's 4-bit grid is kept, else 64, or the largest of 128/64/32
    dividing every expert's input width.
    dense: the run precision of the dense projections, stored as such (fp32 | bf16 | int8 | int4 |
    auto; None = DEFAULT_DENSE)."""
    src, dst = Path(src), Path(dst)
    dense = dense or DEFAULT_DENSE
    dense_weights.check_format(dense)
    dense_format = {"format": dense, "group_size": dense_group_size}
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist: give a Hugging Face model folder or a .gguf file")
    if src.suffix == ".gguf":
        from hobbit.store.gguf import export_hf, load_gguf
        from hobbit.store.gguf_native import (GROUP, default_precisions, has_native_layer, native_experts,
                                              source_precision)
        raw = load_gguf(src).raw
        native = native_experts(raw)
        precisions = precisions or default_precisions(raw)  # the experts' own precision on top
        if group_size is None and has_native_layer(raw):
            group_size = GROUP  # 4-bit experts keep their own grid as int4 (group 32), no re-fit
        with tempfile.TemporaryDirectory(prefix="hobbit-gguf-") as tmp:
            export_hf(src, tmp)
            return _convert_hf(Path(tmp), dst, precisions, group_size, progress,
                               source={"path": str(src.resolve()), "format": "gguf",
                                       "precision": source_precision(raw)}, dense_format=dense_format,
                               native=native if group_size == GROUP else None)
    return _convert_hf(src, dst, precisions, group_size, progress,
                       source={"path": str(src.resolve()), "format": "hf"}, dense_format=dense_format)


def _convert_hf(src: Path, dst: Path, precisions: str | list[str] | None, group_size: int | None, progress: bool,
                source: dict, dense_format: dict, native: NativeParts | None = None) -> Path:
    """native(layer, expert) -> int4 storage parts (group 32) that keep a GGUF's own 4-bit codes, or
    None: used instead of re-fitting int4 wherever it gives them."""
    ckpt = open_checkpoint(src)
    cfg = ckpt.config
    if ckpt.has_mxfp4_experts():
        source = {**source, "precision": "mxfp4"}
    if precisions is None:  # the default: a native MXFP4 tier is kept as the top tier
        precisions = NATIVE_MXFP4_PRECISIONS if ckpt.has_mxfp4_experts() else DEFAULT_PRECISIONS
    precisions = parse_precisions(precisions)
    if cfg.num_experts:
        shapes = {"w13": (2 * cfg.moe_intermediate_size, cfg.hidden_size),
                  "w2": (cfg.hidden_size, cfg.moe_intermediate_size)}
        if group_size is None:
            ks = [k for _, k in shapes.values()]
            group_size = next((g for g in (64, 128, 32) if all(k % g == 0 for k in ks)), 64)
        for fmt in precisions:  # fail before writing anything
            for shape in shapes.values():
                quant.check_shape(fmt, shape, group_size)
    else:
        shapes, group_size = {}, group_size or 64
    dst.mkdir(parents=True, exist_ok=True)
    for stale in ("manifest.json", "experts.bin"):
        (dst / stale).unlink(missing_ok=True)
    dense = {name: ckpt.dense_tensor(name) for name in ckpt.dense_names()}
    dense = dense_weights.quantize_state(dense, dense_format["format"], dense_format["group_size"],
                                         cfg.tie_word_embeddings)  # stored in run precision: loading never quantizes
    save_file(dense, str(dst / "dense.safetensors"), metadata={"format": "pt"})
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    header = dict(config=cfg.to_dict(), hf_config=ckpt.raw_config, source=source, precisions=precisions,
                  group_size=group_size, expert_shapes={k: list(v) for k, v in shapes.items()},
                  dense_file="dense.safetensors", dense_format=dense_format,
                  dense_bytes=sum(t.numel() * t.element_size() for t in dense.values()))
    writer = StoreWriter(dst, header)
    jobs = [(layer, e) for layer in cfg.sparse_layers for e in range(cfg.num_experts)]
    native_mx = ckpt.has_mxfp4_experts()
    for layer, e in tqdm(jobs, desc=f"converting experts ({','.join(precisions)})", unit="expert",
                         disable=not progress):
        w13, w2 = ckpt.expert_weights(layer, e)
        w13, w2 = w13.float(), w2.float()
        # expert biases (gpt_oss) ride along unquantized in every precision's blob
        biases = dict(zip(("b13", "b2"), ({"b": b.float()} for b in ckpt.expert_biases(layer, e)))) \
            if cfg.expert_bias else {}
        kept = native(layer, e) if native is not None and "int4" in precisions else None
        mx = ckpt.expert_mxfp4(layer, e) if native_mx and "mxfp4" in precisions else None  # codes kept as shipped
        for fmt in precisions:
            parts = kept if fmt == "int4" and kept is not None else mx if fmt == "mxfp4" and mx is not None else \
                {"w13": quant.quantize(w13, fmt, group_size), "w2": quant.quantize(w2, fmt, group_size)}
            writer.add(layer, e, fmt, {**parts, **biases})
    writer.close()
    return dst


def describe(dst: str | Path) -> str:
    m = json.loads((Path(dst) / "manifest.json").read_text())
    sizes = {}
    for key, b in m["blobs"].items():
        prec = key.split("/")[2]
        sizes[prec] = sizes.get(prec, 0) + b["nbytes"]
    parts = ", ".join(f"{p} {sizes.get(p, 0) / 2**20:.1f} MiB" for p in m["precisions"])
    fmt = m.get("dense_format", {}).get("format", "as the source")
    return (f"{dst}: {m['config']['arch']}, {len(m['blobs'])} expert blobs ({parts}), "
            f"dense {m['dense_bytes'] / 2**20:.1f} MiB ({fmt})")

