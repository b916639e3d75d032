"""Read a llama.cpp GGUF (`llama` incl. Mixtral, `qwen2`, `qwen2moe`, `phimoe`, `granitemoe`, `gpt-oss`,
`glm4moe`, `deepseek2`) as an HF checkpoint.

`load_gguf(path)` gives the HF `config.json` dict, the weights under HF names (dequantized to
float by gguf.quants: F32/F16/BF16, Q8_0, Q4_0/Q4_1, K-quants; llama.cpp's Q/K row permutation
undone for `llama`), a `tokenizers` tokenizer.json string and a `tokenizer_config.json` dict.
`export_hf(path, out_dir)` writes those as a standard HF folder.
"""

from __future__ import annotations

import functools
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tqdm import tqdm

from hobbit.store import gguf_arch
from hobbit.store.gguf_arch import ARCHS, BLOCK_NAMES, MODEL_TYPES, TOP_NAMES  # noqa: F401 (export.py)

# name maps and per-family steps: gguf_arch.py (re-exported here for export.py)
SUPPORTED_ARCHITECTURES = tuple(ARCHS)

_CONTROL, _USER_DEFINED = 3, 4
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # Qwen2 splits digits one by one
# llama.cpp `tokenizer.ggml.pre` -> how the HF tokenizer splits: (regex or None = GPT-2's, digits
# one by one first, merges ignored for whole-vocabulary words, NFC normalizer)
PRE_TOKENIZERS: dict[str, tuple[str | None, bool, bool, bool]] = {
    "gpt-2": (None, False, False, False),  # llama.cpp's spelling; "gpt2" and "default" are read as it too
    "smollm": (None, True, False, False),
    "llama-bpe": (_LLAMA3_SPLIT, False, True, False),
    "llama3": (_LLAMA3_SPLIT, False, True, False),
    "qwen2": (_QWEN2_SPLIT, False, False, True),
}


class UnsupportedGGUF(ValueError):
    """The GGUF uses an architecture, tensor, tensor type or setting this reader does not handle."""


@dataclass
class GGUFModel:
    """A GGUF seen as an HF checkpoint. Weights are dequantized lazily by `tensors()`."""

    path: Path
    arch: str                           # llama.cpp architecture ('llama', 'qwen2', 'qwen2moe', 'gpt-oss', ...)
    config: dict                        # HF config.json
    tokenizer_json: str | None          # tokenizers.Tokenizer JSON; None if the GGUF has no usable one
    tokenizer_config: dict              # HF tokenizer_config.json
    shapes: dict[str, tuple[int, ...]]  # HF name -> shape
    tensor_types: dict[str, str]        # HF name -> GGML type of its source ('Q4_1', 'F32', ...)
    _reader: GGUFReader = field(repr=False)

    def tensors(self, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, tensor) for every weight, dequantized one GGUF tensor at a time; the tensors HF joins
        last (granitemoe / gpt-oss experts fused as HF has them, gpt-oss MXFP4 experts as their own uint8
        codes; deepseek2's kv_b_proj from attn_k_b + attn_v_b)."""
        heads = (self.config["num_attention_heads"], self.config["num_key_value_heads"])
        spec, held = ARCHS[self.arch], {}
        for t in self._reader.tensors:
            names = _hf_shapes(t, self.arch)
            if names and split_name(t.name)[1] in spec.held:
                held[names[0][0]] = t
                continue
            for name, w in _convert(t, self.arch, *heads):
                yield name, torch.from_numpy(np.ascontiguousarray(w)).to(dtype)
        for name, w in gguf_arch.finalize(self.arch, held, dequantize_tensor):
            yield name, w if w.dtype == torch.uint8 else w.to(dtype)

    @functools.cached_property
    def raw(self) -> dict[str, ReaderTensor]:
        """Every tensor as stored (quantized blocks and all, mmap-backed), by its GGUF name."""
        return {t.name: t for t in self._reader.tensors}

    def raw_tensor(self, gguf_name: str) -> ReaderTensor:
        if gguf_name not in self.raw:
            raise KeyError(f"{self.path.name}: no GGUF tensor named {gguf_name!r}")
        return self.raw[gguf_name]

    def state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        return dict(self.tensors(dtype))

    def save_hf(self, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16, progress: bool = True) -> Path:
        """Write config.json, model.safetensors and, if there is a tokenizer, tokenizer.json and
        tokenizer_config.json to out_dir (created); returns out_dir."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = dict(tqdm(self.tensors(dtype), desc=f"dequantizing {self.path.name}",
                          unit="tensor", disable=not progress))
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        config = dict(self.config, torch_dtype=str(dtype).removeprefix("torch."))
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if self.tokenizer_json is not None:
            (out / "tokenizer.json").write_text(self.tokenizer_json)
            (out / "tokenizer_config.json").write_text(json.dumps(self.tokenizer_config, indent=2) + "\n")
        return out


def load_gguf(path: str | Path) -> GGUFModel:
    """Open a GGUF; raises UnsupportedGGUF naming what it cannot handle."""
    path = Path(path)
    reader = GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    arch = meta.get("general.architecture")
    if arch not in ARCHS:
        raise UnsupportedGGUF(f"{path.name}: GGUF architecture {arch!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    shapes, types = {}, {}
    for t in reader.tensors:
        if not _can_dequantize(t.tensor_type):
            raise UnsupportedGGUF(f"{path.name}: tensor {t.name!r} has GGML type {t.tensor_type.name}, "
                                  f"which gguf.quants cannot dequantize")
        try:
            hf = _hf_shapes(t, arch)
        except UnsupportedGGUF as e:
            raise UnsupportedGGUF(f"{path.name}: {e}") from None
        for name, shape in hf:
            shapes[name], types[name] = shape, t.tensor_type.name
    tokens = _field(reader, "tokenizer.ggml.tokens")
    eos = [_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot")]
    config = _hf_config(meta, arch, shapes, _field(reader, "tokenizer.ggml.bos_token_id"),
                        list(dict.fromkeys(i for i in eos if i is not None)))
    if arch in ("phimoe", "granitemoe", "gpt-oss", "glm4moe", "deepseek2"):
        gguf_arch.config(arch, meta, shapes, {t.name: t for t in reader.tensors}, config, UnsupportedGGUF)
    tokenizer_json, tokenizer_config = _tokenizer(reader, tokens, config["max_position_embeddings"])
    return GGUFModel(path, arch, config, tokenizer_json, tokenizer_config, shapes, types, reader)


def export_hf(path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16,
              progress: bool = True) -> Path:
    """Write a GGUF as a standard HF folder (see `GGUFModel.save_hf`); returns out_dir."""
    return load_gguf(path).save_hf(out_dir, dtype, progress)


# ---------------------------------------------------------------- weights

@functools.cache
def _can_dequantize(qtype: GGMLQuantizationType) -> bool:
    """Whether gguf.quants can dequantize this type (probed on one zero block)."""
    try:
        dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def split_name(name: str) -> tuple[int | None, str, str]:
    """'blk.3.attn_q.weight' -> (3, 'attn_q', 'weight'); 'output.weight' -> (None, 'output', 'weight')."""
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit():
        return int(parts[1]), parts[2], parts[3]
    if len(parts) == 2:
        return None, parts[0], parts[1]
    raise UnsupportedGGUF(f"unsupported GGUF tensor {name!r}")


def _hf_shapes(t: ReaderTensor, arch: str) -> list[tuple[str, tuple[int, ...]]]:
    if ".nextn." in t.name:  # glm4moe / deepseek2 multi-token-prediction heads: not run
        return []
    shape = tuple(int(x) for x in reversed(t.shape))
    layer, part, kind = split_name(t.name)
    spec = ARCHS[arch]
    if part in spec.skip:
        return []
    if layer is None and part in TOP_NAMES:
        return [(f"{TOP_NAMES[part]}.{kind}", shape)]
    prefix = f"model.layers.{layer}"
    if layer is not None and part == "ffn_gate_inp_shexp":
        return [(f"{prefix}.{spec.block[part]}.{kind}", (1, shape[-1]))]  # HF's [1, H] gate; llama.cpp: [H]
    if layer is not None and (module := spec.block.get(part) or BLOCK_NAMES.get(part)):
        return [(f"{prefix}.{module}" + ("" if part in spec.bare else f".{kind}"), shape)]
    if layer is not None and part in spec.expert_proj and spec.stacked:  # fused later (gguf_arch.finalize)
        return [(f"{prefix}.{spec.experts}.{spec.expert_proj[part]}.{kind}", shape)]
    if layer is not None and part in spec.expert_proj:
        return [(f"{prefix}.{spec.experts.format(e=e)}.{spec.expert_proj[part]}.{kind}", shape[1:])
                for e in range(shape[0])]
    raise UnsupportedGGUF(f"unsupported GGUF tensor {t.name!r} for architecture {arch!r}")


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp convert_hf_to_gguf's rotary row interleave of Q/K (rows per head: halves -> pairs)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize_tensor(t: ReaderTensor) -> np.ndarray:
    """A GGUF tensor as float32 [rows, ..., cols] (numpy order: the reverse of GGUF's ne)."""
    w = dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)])
    return np.require(w, np.float32, ["C", "W"])  # F32 tensors come back as read-only views of the mmap


def _convert(t: ReaderTensor, arch: str, n_head: int, n_kv: int) -> list[tuple[str, np.ndarray]]:
    spec, names = ARCHS[arch], _hf_shapes(t, arch)
    if not names:
        return []
    w = dequantize_tensor(t)
    part = split_name(t.name)[1]
    if spec.permute_qk and part in ("attn_q", "attn_k"):
        w = _unpermute(w, n_head if part == "attn_q" else n_kv)  # also right for the biases (rows only)
    if part in spec.expert_proj:
        return [(name, w[e]) for e, (name, _) in enumerate(names)]
    return [(names[0][0], w.reshape(names[0][1]))]


# ---------------------------------------------------------------- config

def _field(reader: GGUFReader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def _hf_config(meta: dict, arch: str, shapes: dict[str, tuple[int, ...]], bos: int | None,
               eos: list[int]) -> dict:
    g = lambda key, default=None: meta.get(f"{arch}.{key}", default)  # noqa: E731
    hidden, n_head = g("embedding_length"), g("attention.head_count")
    experts, spec = g("expert_count", 0), ARCHS[arch]
    if experts and spec.moe is None:
        raise UnsupportedGGUF(f"GGUF architecture {arch!r} with {experts} experts is not supported")
    hf_arch = spec.moe if experts else spec.dense
    sparse = sorted({int(n.split(".")[2]) for n in shapes if ".experts." in n})
    config = {
        "architectures": [hf_arch],
        "model_type": MODEL_TYPES[hf_arch],
        "vocab_size": shapes["model.embed_tokens.weight"][0],
        "hidden_size": hidden,
        "intermediate_size": g("feed_forward_length"),
        "num_hidden_layers": g("block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": g("attention.head_count_kv", n_head),
        "head_dim": g("attention.key_length", hidden // n_head),
        "hidden_act": "silu",
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(g("rope.freq_base", 10000.0)),
        "rope_scaling": gguf_arch.rope_scaling(meta, arch, UnsupportedGGUF),
        "max_position_embeddings": g("context_length"),
        "tie_word_embeddings": "lm_head.weight" not in shapes,
        "attention_bias": "model.layers.0.self_attn.q_proj.bias" in shapes,
        "bos_token_id": bos,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
    }
    if hf_arch == "MixtralForCausalLM":
        config.update(num_local_experts=experts, num_experts_per_tok=g("expert_used_count"),
                      intermediate_size=g("expert_feed_forward_length") or g("feed_forward_length"))
    elif hf_arch == "Qwen2MoeForCausalLM":
        shexp = shapes.get(f"model.layers.{sparse[0] if sparse else 0}.mlp.shared_expert.up_proj.weight", (0,))[0]
        config.update(num_experts=experts, num_experts_per_tok=g("expert_used_count"),
                      moe_intermediate_size=g("expert_feed_forward_length"),
                      intermediate_size=g("feed_forward_length") or shexp,
                      shared_expert_intermediate_size=shexp,
                      # llama.cpp's qwen2moe never renormalizes; `hobbit export --allow-inexact` records it here
                      norm_topk_prob=bool(g("expert_weights_norm", False)),
                      qkv_bias=config["attention_bias"], use_sliding_window=False, decoder_sparse_step=1,
                      mlp_only_layers=[i for i in range(g("block_count")) if i not in sparse])
    elif hf_arch == "Qwen2ForCausalLM":
        config.update(use_sliding_window=False)
    return config


# ---------------------------------------------------------------- tokenizer

def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of the 256 byte values."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def pre_tokenizer(pre: str | None) -> tuple[pre_tokenizers.PreTokenizer, bool, normalizers.Normalizer | None]:
    """(pre-tokenizer, ignore_merges, normalizer) of the HF tokenizer llama.cpp's `tokenizer.ggml.pre` names."""
    if pre not in PRE_TOKENIZERS and pre not in (None, "default", "gpt2"):
        warnings.warn(f"GGUF pre-tokenizer {pre!r} is not known here; using GPT-2's byte-level split")
    split, digits, ignore_merges, nfc = PRE_TOKENIZERS.get(pre, PRE_TOKENIZERS["gpt-2"])
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if split is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps += [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    return (steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)), ignore_merges, \
        (normalizers.NFC() if nfc else None)


def _signature(pre: dict | None) -> tuple:
    """What decides how a tokenizer.json pre-tokenizer splits text (not offsets or prefix spaces)."""
    steps = (pre or {}).get("pretokenizers", [pre]) if (pre or {}).get("type") == "Sequence" else [pre]
    return tuple((s["type"], (s.get("pattern") or {}).get("Regex"), s.get("individual_digits"), s.get("use_regex"))
                 for s in steps if s)


def pre_tokenizer_name(tokenizer_json: dict) -> str | None:
    """The llama.cpp `tokenizer.ggml.pre` whose split a tokenizer.json uses, None if none of PRE_TOKENIZERS."""
    want = _signature(tokenizer_json.get("pre_tokenizer"))
    for name in PRE_TOKENIZERS:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizer(name)[0]
        if _signature(json.loads(tok.to_str())["pre_tokenizer"]) == want:
            return name
    return None


def _tokenizer(reader: GGUFReader, tokens: list[str] | None, context: int) -> tuple[str | None, dict]:
    model = _field(reader, "tokenizer.ggml.model")
    if tokens is None:
        return None, {}
    if model != "gpt2":
        warnings.warn(f"GGUF tokenizer model {model!r} is not supported (only 'gpt2' byte-level BPE); "
                      "no tokenizer exported")
        return None, {}
    spell = _byte_to_unicode()
    alphabet = set(spell.values())
    vocab = {tok if set(tok) <= alphabet else "".join(spell[b] for b in tok.encode()): i
             for i, tok in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges") or []]
    pre, ignore_merges, normalizer = pre_tokenizer(_field(reader, "tokenizer.ggml.pre"))
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False, ignore_merges=ignore_merges))
    tok.pre_tokenizer, tok.decoder = pre, decoders.ByteLevel()
    if normalizer is not None:
        tok.normalizer = normalizer

    ids = {k: _field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")}
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    marked = {i for i in ids.values() if i is not None}
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for i, (t, ty) in enumerate(zip(tokens, types)) if ty == _CONTROL or i in marked])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == _USER_DEFINED])

    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token"))
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token"))
    pre_ids = [ids["bos"]] if add_bos and ids["bos"] is not None else []
    post_ids = [ids["eos"]] if add_eos and ids["eos"] is not None else []
    wrap = lambda seq: " ".join([*(tokens[i] for i in pre_ids), seq, *(tokens[i] for i in post_ids)])  # noqa: E731
    tok.post_processor = processors.TemplateProcessing(
        single=wrap("$A:0"), pair=f"{wrap('$A:0')} {wrap('$B:1')}",
        special_tokens=[(tokens[i], i) for i in sorted(set(pre_ids + post_ids))])

    name = lambda i: None if i is None else tokens[i]  # noqa: E731
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name(ids["bos"]),
        "eos_token": name(ids["eos"]),
        "unk_token": name(ids["unknown"]),
        "pad_token": name(ids["padding"]),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": context,
    }
    template = _field(reader, "tokenizer.chat_template")
    if template is not None:
        config["chat_template"] = template
    return tok.to_str(), config
