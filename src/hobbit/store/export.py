"""`hobbit export STORE out.gguf --type bf16|q8_0|q4_0`: a store as a GGUF that stock llama.cpp runs.

Qwen2-MoE becomes llama.cpp's `qwen2moe`, dense Qwen2 `qwen2`, dense Llama `llama` (Q/K rows
interleaved for its rotary kernel; qwen2/qwen2moe use the HF order). Experts are dequantized from
the store's highest precision, dense weights come from dense.safetensors. Norms, biases and routers
stay F32; matrices whose rows are not a multiple of 32 fall back to BF16; `q4_0` keeps token_embd
and output at Q8_0 (llama.cpp's own Q4_0 files keep the output matrix higher too). llama.cpp's
qwen2moe needs `output.weight` and a shared expert: tied embeddings are written twice, a model
without a shared expert gets an all-zero one (exact: it adds 0). The tokenizer (byte-level BPE:
tokens, types, merges, bos/eos, chat template, pre-tokenizer name) comes from the store's files.

A model llama.cpp would run differently is refused with the reason (ExportRefused): dense layers
between MoE layers, rope scaling other than linear, sliding windows; and `norm_topk_prob = true`
(llama.cpp's qwen2moe never renormalizes the top-k routing weights) unless allow_inexact, in which
case the GGUF records `qwen2moe.expert_weights_norm = true` (hobbit's reader honours it, llama.cpp
ignores it).
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter, LlamaFileType, RopeScalingType, TokenType
from gguf.constants import GGML_QUANT_VERSION
from gguf.quants import quantize
from safetensors import safe_open
from tqdm import tqdm

from hobbit.store import quant
from hobbit.store.config import ModelConfig
from hobbit.store.dense import Stored, split_state
from hobbit.store.dense import read as read_dense
from hobbit.store.gguf import ARCHS, BLOCK_NAMES, PRE_TOKENIZERS, TOP_NAMES, pre_tokenizer_name
from hobbit.store.format import ExpertStore

EXPORT_TYPES = {"bf16": (Q.BF16, LlamaFileType.MOSTLY_BF16), "q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0),
                "q4_0": (Q.Q4_0, LlamaFileType.MOSTLY_Q4_0)}
LLAMA_CPP_ARCH = {"qwen2_moe": "qwen2moe", "qwen2": "qwen2", "llama": "llama"}  # hobbit family -> llama.cpp
_F32_PARTS = ("ffn_gate_inp", "ffn_gate_inp_shexp")  # routers: routing decisions need full precision
_Q8_IN_Q4 = ("token_embd", "output")
_NULL_SHEXP = 32  # width of the all-zero shared expert for a Qwen2-MoE that has none


class ExportRefused(ValueError):
    """The store cannot be written as a GGUF llama.cpp runs the way hobbit does; says why and what to do."""


def export_gguf(store: str | Path, out: str | Path, gguf_type: str = "bf16", allow_inexact: bool = False,
                progress: bool = True) -> Path:
    """Write `store` as a GGUF of `gguf_type` (bf16 | q8_0 | q4_0) at `out` (replaced atomically); returns out."""
    if gguf_type not in EXPORT_TYPES:
        raise ValueError(f"unknown GGUF type {gguf_type!r}; choose from {', '.join(EXPORT_TYPES)}")
    store, out = Path(store), Path(out)
    experts = ExpertStore(store, direct_io=False)
    try:
        cfg = ModelConfig.from_dict(experts.manifest["config"])
        check_exportable(cfg, allow_inexact, store)
        arch = LLAMA_CPP_ARCH[cfg.arch]
        qtype, ftype = EXPORT_TYPES[gguf_type]
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        w = GGUFWriter(str(tmp), arch, use_temp_file=True)  # tensors spill to a temp file, not RAM
        try:
            _metadata(w, cfg, experts.manifest, ftype, store)
            _tokenizer_metadata(w, store, cfg)
            per_layer = 3 if cfg.shared_expert_intermediate_size else 7  # + the null shared expert's 4
            total = _dense_count(store) + per_layer * len(cfg.sparse_layers)
            for name, t in tqdm(_tensors(store, experts, cfg, arch), total=total, disable=not progress,
                                desc=f"exporting {gguf_type}", unit="tensor"):
                tt = _tensor_type(name.split(".")[-2], t, qtype)
                w.add_tensor(name, t if tt == Q.F32 else quantize(t, tt), raw_dtype=None if tt == Q.F32 else tt)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file(progress=False)
        finally:
            w.close()
        tmp.replace(out)
    finally:
        experts.close()
    return out


def check_exportable(cfg: ModelConfig, allow_inexact: bool = False, where: str | Path = "") -> None:
    """Raise ExportRefused if llama.cpp cannot load this model or would compute something else."""
    label = f"{where}: " if where else ""
    if cfg.arch not in LLAMA_CPP_ARCH:
        raise ExportRefused(f"{label}hobbit export writes {', '.join(LLAMA_CPP_ARCH)} models; {cfg.arch} is "
                            f"not one of them")
    arch, problems = LLAMA_CPP_ARCH[cfg.arch], []
    if cfg.num_experts and set(cfg.sparse_layers) != set(range(cfg.num_layers)):
        dense = sorted(set(range(cfg.num_layers)) - set(cfg.sparse_layers))
        problems.append(f"layers {dense} are dense, but llama.cpp's {arch} makes every layer an MoE layer")
    kind = (cfg.rope_scaling or {}).get("rope_type")
    if kind not in (None, "linear"):
        problems.append(f"rope scaling {kind!r} is not written by this exporter (plain or linear RoPE only)")
    if cfg.sliding_window:
        problems.append(f"sliding-window attention ({cfg.sliding_window}) is not expressed in llama.cpp's {arch}")
    if problems:
        raise ExportRefused(f"{label}llama.cpp cannot run this {cfg.arch} model as hobbit does: {'; '.join(problems)}")
    if cfg.norm_topk_prob and not allow_inexact:
        raise ExportRefused(
            f"{label}this model renormalizes each token's top-{cfg.top_k} routing weights to sum 1 "
            f"(norm_topk_prob = true), and llama.cpp's {arch} never does: llama.cpp would run a different model "
            f"(every MoE output scaled by the share of routing mass the top-{cfg.top_k} hold). Export a model "
            f"routed without renormalization, or pass --allow-inexact to write it anyway (llama.cpp then runs it "
            f"differently; the GGUF records {arch}.expert_weights_norm = true, which hobbit's reader honours)")


# ---------------------------------------------------------------- tensors

def _dense(store: Path) -> tuple[dict[str, torch.Tensor], dict[str, Stored]]:
    """(plain tensors, quantized matrices) of the store's dense weights, by HF name."""
    return split_state(read_dense(store / "dense.safetensors"))


def _dense_count(store: Path) -> int:
    """How many dense tensors `_tensors` writes, from the file's header alone (for the progress bar)."""
    with safe_open(str(store / "dense.safetensors"), framework="pt") as f:
        names = {re.sub(r"\.weight\.(q|sz|scale)$", ".weight", k) for k in f.keys()}
    return len(names) + ("lm_head.weight" not in names)


def _dense_names(plain: dict, stored: dict) -> list[str]:
    names = [*plain, *stored]
    return names + ([] if "lm_head.weight" in names else ["lm_head.weight"])  # tied: the embedding, written twice


def gguf_name(arch: str, hf_name: str) -> str:
    """HF tensor name -> llama.cpp tensor name for `arch` (the inverse of hobbit.store.gguf's maps)."""
    per_layer = {hf: part for part, hf in {**BLOCK_NAMES, **ARCHS[arch].block}.items()}
    top = {hf: part for part, hf in TOP_NAMES.items()}
    module, _, kind = hf_name.rpartition(".")
    if (m := re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module)) and m[2] in per_layer:
        return f"blk.{m[1]}.{per_layer[m[2]]}.{kind}"
    if module in top:
        return f"{top[module]}.{kind}"
    raise ExportRefused(f"tensor {hf_name!r} has no name in llama.cpp's {arch}; it cannot be exported")


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotary halves -> llama.cpp `llama` interleaved pairs, per head (rows only; biases too)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(store: Path, experts: ExpertStore, cfg: ModelConfig, arch: str) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array in numpy order [out, in]) for every tensor to write."""
    plain, stored = _dense(store)
    for hf_name in _dense_names(plain, stored):
        if hf_name in stored:  # kept quantized by `hobbit convert --dense`: back to float, once
            t = stored.pop(hf_name).dequantize()
        else:
            t = plain.get(hf_name, plain["model.embed_tokens.weight"])
        name = gguf_name(arch, hf_name)
        w = t.float().numpy()
        part = name.split(".")[-2]
        if ARCHS[arch].permute_qk and part in ("attn_q", "attn_k"):
            w = _permute(w, cfg.num_heads if part == "attn_q" else cfg.num_kv_heads)
        yield name, (w.reshape(-1) if part == "ffn_gate_inp_shexp" else w)  # llama.cpp wants the gate [H]
    if not cfg.num_experts:
        return
    prec, shapes, gs = experts.precisions[0], experts.shapes(), experts.group_size
    inter = shapes["w2"][1]
    for layer in cfg.sparse_layers:
        w13, w2 = [], []
        for e in range(cfg.num_experts):
            parts = experts.read(layer, e, prec)
            w13.append(quant.dequantize(parts["w13"], prec, shapes["w13"], gs))
            w2.append(quant.dequantize(parts["w2"], prec, shapes["w2"], gs))
        gate_up = torch.stack(w13).numpy()  # [E, 2I, H]: gate rows, then up rows
        yield f"blk.{layer}.ffn_gate_exps.weight", np.ascontiguousarray(gate_up[:, :inter])
        yield f"blk.{layer}.ffn_up_exps.weight", np.ascontiguousarray(gate_up[:, inter:])
        yield f"blk.{layer}.ffn_down_exps.weight", torch.stack(w2).numpy()
        if cfg.shared_expert_intermediate_size == 0:  # llama.cpp's qwen2moe requires one: zero adds nothing
            H = cfg.hidden_size
            yield f"blk.{layer}.ffn_gate_inp_shexp.weight", np.zeros(H, np.float32)
            for part, shape in (("gate", (_NULL_SHEXP, H)), ("up", (_NULL_SHEXP, H)), ("down", (H, _NULL_SHEXP))):
                yield f"blk.{layer}.ffn_{part}_shexp.weight", np.zeros(shape, np.float32)


def _tensor_type(part: str, w: np.ndarray, qtype: Q) -> Q:
    if w.ndim == 1 or part in _F32_PARTS:
        return Q.F32
    if qtype == Q.Q4_0 and part in _Q8_IN_Q4:
        qtype = Q.Q8_0
    return Q.BF16 if qtype != Q.BF16 and w.shape[-1] % 32 else qtype  # block quants need rows of 32


# ---------------------------------------------------------------- metadata

def _metadata(w: GGUFWriter, cfg: ModelConfig, manifest: dict, ftype: LlamaFileType, store: Path) -> None:
    hf = manifest.get("hf_config", {})
    w.add_name(str(hf.get("_name_or_path") or store.resolve().name))
    w.add_file_type(int(ftype))
    w.add_quantization_version(GGML_QUANT_VERSION)
    w.add_vocab_size(cfg.vocab_size)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    if cfg.rope_scaling:
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
    if cfg.num_experts:
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.top_k)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size or _NULL_SHEXP)
        if cfg.norm_topk_prob:
            w.add_expert_weights_norm(True)


def _token_id(spec, ids: dict[str, int]) -> int | None:
    """tokenizer_config's bos/eos/pad entry (a string or an AddedToken dict) -> its id."""
    text = spec.get("content") if isinstance(spec, dict) else spec
    return ids.get(text) if text is not None else None


def _tokenizer_metadata(w: GGUFWriter, store: Path, cfg: ModelConfig) -> None:
    if not (store / "tokenizer.json").is_file():
        raise ExportRefused(f"{store} has no tokenizer.json; llama.cpp needs the tokenizer inside the GGUF "
                            f"(convert from a model folder that has one)")
    tj = json.loads((store / "tokenizer.json").read_text())
    tc_file = store / "tokenizer_config.json"
    tc = json.loads(tc_file.read_text()) if tc_file.is_file() else {}
    if tj["model"].get("type") != "BPE":
        raise ExportRefused(f"{store}: tokenizer model {tj['model'].get('type')!r} is not exported "
                            f"(only byte-level BPE, llama.cpp's 'gpt2')")
    tokens = [f"[PAD{i}]" for i in range(cfg.vocab_size)]  # rows past the tokenizer: unused, as llama.cpp pads
    types = [int(TokenType.UNUSED)] * cfg.vocab_size
    entries = [(tok, i, TokenType.NORMAL) for tok, i in tj["model"]["vocab"].items()]
    entries += [(a["content"], a["id"], TokenType.CONTROL if a["special"] else TokenType.USER_DEFINED)
                for a in tj.get("added_tokens", [])]
    for tok, i, kind in entries:
        if i >= cfg.vocab_size:
            raise ExportRefused(f"{store}: token {tok!r} has id {i}, past the embedding's {cfg.vocab_size} rows")
        tokens[i], types[i] = tok, int(kind)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
    if not merges:
        raise ExportRefused(f"{store}: the tokenizer has no merges, and llama.cpp refuses a BPE vocabulary "
                            f"without them")
    pre = pre_tokenizer_name(tj)
    if pre is None:
        raise ExportRefused(f"{store}: the tokenizer's pre-tokenizer matches none llama.cpp names here "
                            f"(known: {', '.join(PRE_TOKENIZERS)}); llama.cpp would split text differently")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    ids = {tok: i for tok, i, _ in entries}
    bos = _token_id(tc.get("bos_token"), ids) if "bos_token" in tc else cfg.bos_token_id
    eos = [_token_id(tc.get("eos_token"), ids)] if tc.get("eos_token") else []
    eos = list(dict.fromkeys([i for i in eos if i is not None] + list(cfg.eos_token_ids)))
    if bos is not None:
        w.add_bos_token_id(bos)
    if eos:
        w.add_eos_token_id(eos[0])
    if len(eos) > 1:
        w.add_eot_token_id(eos[1])  # llama.cpp stops on eos and eot
    if (pad := _token_id(tc.get("pad_token"), ids)) is not None:
        w.add_pad_token_id(pad)
    w.add_add_bos_token(bool(tc.get("add_bos_token", False)))
    w.add_add_eos_token(bool(tc.get("add_eos_token", False)))
    template = tc.get("chat_template")
    if template is None and (store / "chat_template.jinja").is_file():
        template = (store / "chat_template.jinja").read_text()
    if template:
        w.add_chat_template(template)
