"""Our lean decoder: GQA attention with RoPE and a growing KV cache, RMSNorm, SwiGLU MLP, and a
MoE block that routes exactly like transformers and hands the expert sum to an ExpertProvider.
`Transformer.windows` runs the same modules cache-free over a batch of token windows, each from
position 0, with autograd: moefy calibrates and distills on it (one model in the codebase).

T = tokens in this call, S = positions attended, H = hidden, D = head_dim, E = experts,
k = experts per token, V = vocab, B = windows. Module names follow HF (minus the `model.` prefix),
except that q/k/v and gate/up projections are held fused (`qkv`, `gate_up`: batch-1 decode pays per
call), so `model.layers[i].mlp.gate.weight` is layer i's router and dense weights load by HF name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from hobbit.runtime import attention_mla, attention_sinks
from hobbit.runtime.experts import SILU, ExpertProvider
from hobbit.runtime.layers import RMSNorm, apply_partial_rope, norm, rope_frequencies
from hobbit.runtime.routing import FP32_BUFFERS, Router, softmax_topk
from hobbit.store import dense, quant
from hobbit.store.config import ModelConfig
from hobbit.store.quant import QuantLinear

DEFAULT_MAX_SEQ_LEN = 4096  # KV cache length when none is given (capped by max_position_embeddings)
KV_CHUNK = 256  # KV positions allocated at a time; capacity then doubles, up to max_seq_len
FUSED = dense.FUSED
WINDOW_CHUNK = 8  # windows attended at a time by `Transformer.windows`: bounds the [B,heads,T,T] scores


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_up = nn.Linear(hidden, 2 * inter, bias=False)  # cat(gate, up) rows
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def act(self, x: Tensor) -> Tensor:
        """x [..,H] -> the gated activations silu(gate x) * up x [..,I] (moefy reads them per neuron)."""
        return SILU(*self.gate_up(x).chunk(2, dim=-1))

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(x))

    def weighted(self, x: Tensor, weight: Tensor) -> Tensor:
        """weight [T,1] * self(x); one native call for one token when both projections are native int4."""
        gu, down = self.gate_up, self.down_proj
        if (x.shape[0] == 1 and x.dtype == torch.bfloat16 and x.is_contiguous() and isinstance(gu, QuantLinear)
                and isinstance(down, QuantLinear) and gu.bias is None and down.bias is None
                and quant.fusable_swiglu(gu.w, down.w)):
            return quant.swiglu_weighted(x, gu.w, down.w, float(weight))
        return weight * self(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        H, D, nh, nkv = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        self.head_dim, self.nh, self.nkv, self.window, self.qk_norm = D, nh, nkv, cfg.sliding_window, cfg.qk_norm
        self.scale = cfg.attention_multiplier or D**-0.5  # granitemoe sets its own
        self.qkv = nn.Linear(H, (nh + 2 * nkv) * D, bias=cfg.attention_bias)  # cat(q, k, v) rows
        self.o_proj = nn.Linear(nh * D, H, bias=cfg.o_proj_bias)
        self.layer_window = cfg.layer_windows[layer] if cfg.layer_windows else 0  # gpt_oss: 0 = full
        if cfg.attention_sinks:
            self.sinks = nn.Parameter(torch.empty(nh))  # [nh]
        if cfg.qk_norm == "head":  # qwen3: per head, over D
            self.q_norm, self.k_norm = RMSNorm(D, cfg.rms_norm_eps), RMSNorm(D, cfg.rms_norm_eps)
        elif cfg.qk_norm == "full":  # olmoe: over the whole q / k projection
            self.q_norm, self.k_norm = RMSNorm(nh * D, cfg.rms_norm_eps), RMSNorm(nkv * D, cfg.rms_norm_eps)

    def _qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [..,T,H] -> q [..,T,nh,D], k and v [..,T,nkv,D]; q and k rotated by cos, sin [T,1,D]."""
        D, nh, nkv, lead = self.head_dim, self.nh, self.nkv, x.shape[:-1]
        qkv = self.qkv(x)  # [..,T,(nh+2nkv)*D]
        v = qkv[..., (nh + nkv) * D:].view(*lead, nkv, D)
        if self.qk_norm == "none":  # q and k heads are adjacent in qkv: one RoPE for both
            qk = apply_partial_rope(qkv[..., :(nh + nkv) * D].view(*lead, nh + nkv, D), cos, sin)  # [..,T,nh+nkv,D]
            return qk[..., :nh, :], qk[..., nh:, :], v
        q, k = qkv[..., :nh * D], qkv[..., nh * D:(nh + nkv) * D]
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.view(*lead, nh, D), k.view(*lead, nkv, D)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin), v

    def causal(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Cache-free causal attention over windows x [B,T,H] at positions 0..T-1 -> [B,T,H]."""
        if self.window or self.layer_window or hasattr(self, "sinks"):
            raise ValueError("windows: only plain causal attention (no sliding window, no sinks)")
        q, k, v = (t.transpose(1, 2) for t in self._qkv(x, cos, sin))  # [B,heads,T,D]
        y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, scale=self.scale,
                                           enable_gqa=True)  # [B,nh,T,D] fp32, as the cached path
        return self.o_proj(y.transpose(1, 2).flatten(2).to(x.dtype))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, start_pos: int,
                k_cache: Tensor, v_cache: Tensor) -> Tensor:
        T, D, nh, nkv = x.shape[0], self.head_dim, self.nh, self.nkv
        q, k, v = self._qkv(x, cos, sin)  # [T,nh,D], [T,nkv,D], [T,nkv,D]
        end = start_pos + T
        k_cache[:, start_pos:end] = k.transpose(0, 1)  # caches [nkv,S_cap,D] fp32 (exact copies of k, v)
        v_cache[:, start_pos:end] = v.transpose(0, 1)
        q = q.float()  # fp32 attention: bf16 bmm is 2-3x slower at S < 1000 and oneDNN keeps ~1 MB per new S
        if self.layer_window:
            mask = attention_sinks.window_mask(start_pos, end, self.layer_window, x.device)
        if hasattr(self, "sinks"):
            y = attention_sinks.sink_attention(q.transpose(0, 1), k_cache[:, :end], v_cache[:, :end], mask,
                                               self.sinks, self.scale).transpose(0, 1)  # [T,nh,D]
        elif mask is None:  # one token attends to every cached position (or the window's): no mask
            lo = 0 if self.window is None else max(0, end - self.window)
            keys, values = k_cache[:, lo:end], v_cache[:, lo:end]  # [nkv,S,D]
            s = torch.bmm(q.reshape(nkv, nh // nkv, D) * self.scale, keys.transpose(1, 2))  # [nkv,nh/nkv,S]
            y = torch.bmm(torch.softmax(s, dim=-1), values)  # [nkv,nh/nkv,D]: query heads grouped by kv head
        else:
            y = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k_cache[None, :, :end],
                                               v_cache[None, :, :end], attn_mask=mask, scale=self.scale,
                                               enable_gqa=True)[0].transpose(0, 1)  # [T,nh,D]
        return self.o_proj(y.reshape(T, nh * D).to(x.dtype))


class MoE(nn.Module):
    """Router (+ qwen2 shared expert) here; the routed experts are the provider's business."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.top_k, self.norm_topk_prob = layer, cfg.top_k, cfg.norm_topk_prob
        # qwen2/qwen3/olmoe routers hand the experts weights cast to the activation dtype; mixtral keeps fp32
        self.round_weights = cfg.arch != "mixtral"
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False) if cfg.routing == "softmax" else Router(cfg)
        if cfg.shared_experts_intermediate_size:  # deepseek / glm4_moe: always on, no gate
            self.shared_experts = MLP(cfg.hidden_size, cfg.shared_experts_intermediate_size)
        self.has_shared = bool(cfg.shared_expert_intermediate_size)
        if self.has_shared:
            self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [T,H] -> logits [T,E] fp32, ids [T,k] (weight desc), weights [T,k] fp32."""
        if isinstance(self.gate, Router):
            return self.gate(x)
        logits = self.gate(x)  # [T,E] in x.dtype
        ids, weights = softmax_topk(logits, self.top_k, self.norm_topk_prob)  # [T,k], sorted descending
        if self.round_weights:
            weights = weights.to(x.dtype).float()
        return logits.float(), ids, weights

    def forward(self, x: Tensor, provider: ExpertProvider) -> Tensor:
        logits, ids, weights = self.route(x)
        out = provider.experts(self.layer, x, logits, ids, weights)  # [T,H]
        if self.has_shared:
            out = out + self.shared_expert.weighted(x, torch.sigmoid(self.shared_expert_gate(x)))  # [T,1] gate
        if hasattr(self, "shared_experts"):
            out = out + self.shared_experts(x)
        return out


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.sparse = layer in cfg.sparse_layers
        self.residual_multiplier = cfg.residual_multiplier  # granitemoe scales each branch; 1 elsewhere
        self.input_layernorm = norm(cfg, cfg.hidden_size)
        self.self_attn = attention_mla.MLAttention(cfg) if cfg.kv_lora_rank else Attention(cfg, layer)
        self.post_attention_layernorm = norm(cfg, cfg.hidden_size)
        self.mlp = MoE(cfg, layer) if self.sparse else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, start_pos: int,
                k_cache: Tensor, v_cache: Tensor, provider: ExpertProvider) -> Tensor:
        m = self.residual_multiplier
        a = self.self_attn(self.input_layernorm(x), cos, sin, mask, start_pos, k_cache, v_cache)
        h = x + (a if m == 1.0 else a * m)
        y = self.post_attention_layernorm(h)
        f = self.mlp(y, provider) if self.sparse else self.mlp(y)
        return h + (f if m == 1.0 else f * m)

    def attend(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Windows x [B,T,H] -> the residual stream after this layer's (cache-free, causal) attention."""
        return x + self.self_attn.causal(self.input_layernorm(x), cos, sin) * self.residual_multiplier


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, provider: ExpertProvider, dtype: torch.dtype = torch.bfloat16,
                 max_seq_len: int | None = None):
        super().__init__()
        self.cfg, self.provider, self.dtype = cfg, provider, dtype
        self.max_seq_len = max_seq_len or min(cfg.max_position_embeddings, DEFAULT_MAX_SEQ_LEN)
        with torch.device("meta"):  # no memory until load_dense assigns the real weights
            # given a weight, Embedding skips init.normal_, which costs ~70 MB of RSS even on meta
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
            self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
            self.norm = norm(cfg, cfg.hidden_size)
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=cfg.lm_head_bias)
        inv_freq, self.rope_scale = rope_frequencies(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [D/2] fp32
        self._allocate(0)

    def load_dense(self, state_dict: dict[str, Tensor], fmt: str | None = None, group_size: int = 32,
                   head: str | None = None) -> None:
        """Every non-expert weight by HF name, plain or in a stored dense format (see dense.py);
        missing or unexpected names are errors. fmt None keeps the stored precision; else the
        projections are brought to fmt ('fp32' | 'bf16' | 'int8' | 'int4' | 'auto', group_size for
        int4); head: the LM head's own format (dense.reformat). state_dict is consumed (emptied): each
        part's memory goes as soon as it is fused or converted, so loading peaks at the weights plus one
        matrix, not twice the weights."""
        state = {_our_name(n): t for n, t in state_dict.items()}
        state_dict.clear()
        if fmt is not None or head is not None:
            state = dense.reformat(state, fmt, group_size, self.cfg.tie_word_embeddings, head)
        plain, stored = dense.split_state(state)
        if self.cfg.tie_word_embeddings and "lm_head.weight" not in stored:
            plain.pop("lm_head.weight", None)
        tied = self.cfg.tie_word_embeddings and "lm_head.weight" not in stored
        expected = {hf for n in self.state_dict() for hf in _unfused(n) if not (tied and n == "lm_head.weight")}
        given = plain.keys() | stored.keys()
        missing, unexpected = sorted(expected - given), sorted(given - expected)
        if missing or unexpected:
            raise ValueError(f"{self.cfg.arch} dense weights do not match the model: missing {missing[:8]}"
                             f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                             f"{' ...' if len(unexpected) > 8 else ''} (our names, HF minus 'model.')")
        del state
        _fuse(plain, stored)
        for n, t in plain.items():  # one tensor at a time: the old one is freed at once
            plain[n] = t.to(torch.float32 if n.endswith(FP32_BUFFERS) else self.dtype)
        self.load_state_dict(plain, strict=False, assign=True)
        for name, s in stored.items():  # quantized projections: prepared once, never re-quantized
            parent, _, child = name.removesuffix(".weight").rpartition(".")
            module = self.get_submodule(parent)
            bias = getattr(module, child).bias
            setattr(module, child, QuantLinear(s.q, s.fmt, s.shape, s.group_size, self.dtype, bias))
        if tied:
            self.lm_head.weight = self.embed_tokens.weight
        for m in self.modules():
            if isinstance(m, attention_mla.MLAttention):
                m.absorb()

    def dense_tensors(self) -> list[Tensor]:
        """Every tensor the dense weights hold, each once (quantized projections included)."""
        out = list(self.parameters())
        for m in self.modules():
            if isinstance(m, QuantLinear):
                out += [t for t in (m.w.w, m.w.scales, m.bias) if t is not None]
        return out

    def dense_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.dense_tensors())

    def kv_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k_cache, self.v_cache))

    def reset(self) -> None:
        """A new sequence: the KV cache shrinks back to its first chunk."""
        if self.k_cache.shape[2] > KV_CHUNK:
            self._allocate(0)

    def _allocate(self, end: int) -> None:
        """Make room for positions [0, end): KV caches [layers, kv_heads, capacity, D] fp32, grown
        in chunks (doubling) and copied over; the RoPE tables follow the capacity."""
        cap = 0 if end == 0 else self.k_cache.shape[2]
        if end and end <= cap:
            return
        new = min(self.max_seq_len, max(2 * cap, -(-max(end, 1) // KV_CHUNK) * KV_CHUNK))
        # MLA caches the latent [.., 1, cap, r] and the rope key [.., 1, cap, R] instead of K and V
        kv = attention_mla.cache_dims(self.cfg) if self.cfg.kv_lora_rank else [(self.cfg.num_kv_heads, self.cfg.head_dim)] * 2
        for name, (heads, dim) in zip(("k_cache", "v_cache"), kv):
            t = torch.empty(self.cfg.num_layers, heads, new, dim, device=self.inv_freq.device)  # only [:end] is read
            if cap:
                t[:, :, :cap] = getattr(self, name)[:, :, :cap]
            self.register_buffer(name, t, persistent=False)
        cos, sin = self._rope_table(self.inv_freq, self.rope_scale, 0, new)
        self.register_buffer("rope_cos", cos, persistent=False)  # [S_cap,1,D]
        self.register_buffer("rope_sin", sin, persistent=False)  # [S_cap,1,D], rotate-half sign folded in

    @torch.inference_mode()
    def forward(self, tokens: Tensor, start_pos: int, last_only: bool = False) -> Tensor:
        """tokens [T] int64 at positions start_pos.. -> logits [T,V] fp32 ([1,V] when last_only: the LM head
        runs on the last position only); appends to the KV cache."""
        T = tokens.shape[0]
        end = start_pos + T
        if end > self.max_seq_len:
            raise ValueError(f"sequence length {end} (start_pos {start_pos} + {T} tokens) exceeds the "
                             f"model's max_seq_len {self.max_seq_len}")
        if end > self.k_cache.shape[2]:
            self._allocate(end)
        cos, sin = self._rope(start_pos, end)
        mask = self._mask(start_pos, end)
        x = self.embed(tokens)  # [T,H]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, start_pos, self.k_cache[i], self.v_cache[i], self.provider)
        return self.head(x[-1:] if last_only else x)  # norm and LM head are per row: last_only = the last row's

    def windows(self, tokens: Tensor, mlp: Callable[[int, Tensor], Tensor] | None = None) -> Tensor:
        """Token windows [B,T], each at positions 0..T-1, no KV cache -> the last residual stream [B,T,H]
        (`head` makes logits). mlp(l, x) replaces layer l's FFN on its input x [B,T,H] (moefy: a MoE being
        calibrated or distilled). Autograd flows unless the caller turns it off; plain causal attention only."""
        cos, sin = self._rope(0, tokens.shape[1])
        h = self.embed(tokens)  # [B,T,H]
        for l, block in enumerate(self.layers):
            h = torch.cat([block.attend(w, cos, sin) for w in h.split(WINDOW_CHUNK)])
            x = block.post_attention_layernorm(h)
            if mlp is not None:
                f = mlp(l, x)
            else:  # a MoE block and its provider take tokens [N,H]
                f = block.mlp(x.flatten(0, 1), self.provider).view_as(x) if block.sparse else block.mlp(x)
            h = h + f * block.residual_multiplier
        return h

    def embed(self, tokens: Tensor) -> Tensor:
        """tokens [..] int64 -> embeddings [..,H]."""
        x = self.embed_tokens(tokens)
        return x if self.cfg.embedding_multiplier == 1.0 else x * self.cfg.embedding_multiplier

    def head(self, x: Tensor) -> Tensor:
        """The last residual stream [..,H] -> logits [..,V] fp32 (final norm, LM head)."""
        logits = self.lm_head(self.norm(x))
        return (logits if self.cfg.logits_scaling == 1.0 else logits / self.cfg.logits_scaling).float()

    def _rope(self, start_pos: int, end: int) -> tuple[Tensor, Tensor]:
        """RoPE tables [T,1,D] (cos, sin) of positions start_pos..end-1."""
        s = self.cfg.rope_scaling or {"rope_type": "default"}
        past = {"dynamic": self.cfg.max_position_embeddings, "longrope": s.get("original_max_position_embeddings")}
        # NTK: the base depends on the length; LongRoPE: a call reaching past the original length uses the
        # long factors and mscale for all its positions (as transformers 4.x, vLLM, Phi-3.5's own code)
        if s["rope_type"] in past and end > past[s["rope_type"]]:
            inv_freq, scale = rope_frequencies(self.cfg, seq_len=end)
            return self._rope_table(inv_freq.to(self.inv_freq.device), scale, start_pos, end)
        if end > self.rope_cos.shape[0]:  # windows past the KV capacity (no cache, no max_seq_len)
            return self._rope_table(self.inv_freq, self.rope_scale, start_pos, end)
        return self.rope_cos[start_pos:end], self.rope_sin[start_pos:end]

    def _rope_table(self, inv_freq: Tensor, scale: float, start: int, end: int) -> tuple[Tensor, Tensor]:
        pos = torch.arange(start, end, device=inv_freq.device, dtype=torch.float32)
        freqs = pos[:, None] * inv_freq[None, :]  # [T,D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T,1,D]
        sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1)[:, None, :]  # [T,1,D]
        return (emb.cos() * scale).to(self.dtype), (sin * scale).to(self.dtype)

    def _mask(self, start_pos: int, end: int) -> Tensor | None:
        """[T,S] bool, True = may attend; None for a single token (attention slices the window)."""
        if end - start_pos == 1:
            return None
        q_pos = torch.arange(start_pos, end, device=self.k_cache.device)[:, None]  # [T,1]
        k_pos = torch.arange(end, device=self.k_cache.device)[None, :]  # [1,S]
        mask = k_pos <= q_pos
        if self.cfg.sliding_window is not None:
            mask &= k_pos > q_pos - self.cfg.sliding_window
        return mask


def _unfused(name: str) -> list[str]:
    """Our name -> the HF-minus-'model.' names it is made of ('...qkv.weight' -> q/k/v_proj.weight)."""
    path, _, leaf = name.rpartition(".")
    parent, _, child = path.rpartition(".")
    return [f"{parent}.{p}.{leaf}" for p in FUSED[child]] if child in FUSED else [name]


def _fuse(plain: dict[str, Tensor], stored: dict[str, dense.Stored]) -> None:
    """In place: HF q/k/v and gate/up parts -> our fused qkv / gate_up, plain (torch.cat) or
    stored (quant.cat)."""
    bases = {n.rpartition(".")[0].rpartition(".")[0] for n in (*plain, *stored)}  # '...self_attn'
    for base in bases:
        for ours, parts in FUSED.items():
            for leaf in ("weight", "bias"):
                names = [f"{base}.{p}.{leaf}" for p in parts]
                if all(n in plain for n in names):
                    plain[f"{base}.{ours}.{leaf}"] = quant.cat0([plain.pop(n) for n in names])
                elif all(n in stored for n in names):
                    ss = [stored.pop(n) for n in names]
                    fmts = {s.fmt for s in ss}
                    if len(fmts) > 1:
                        raise ValueError(f"{base}: {'/'.join(parts)} are stored in different formats {sorted(fmts)}")
                    N, K = sum(s.shape[0] for s in ss), ss[0].shape[1]
                    stored[f"{base}.{ours}.{leaf}"] = dense.Stored(
                        ss[0].fmt, quant.cat([(s.q, s.shape) for s in ss], ss[0].fmt), (N, K), ss[0].group_size)
                elif all(n in plain or n in stored for n in names):  # (MLA's lone q_proj is no q/k/v set)
                    raise ValueError(f"{base}: {'/'.join(parts)} are partly quantized; convert the store again")


# HF module names -> ours: every family's router is `mlp.gate`
_RENAMES = ((".block_sparse_moe.", ".mlp."), (".mlp.router.layer.", ".mlp.gate."), (".mlp.router.", ".mlp.gate."))


def _our_name(hf_name: str) -> str:
    """'model.layers.0.block_sparse_moe.gate.weight' -> 'layers.0.mlp.gate.weight'."""
    name = hf_name.removeprefix("model.")
    for old, new in _RENAMES:
        name = name.replace(old, new)
    return name
