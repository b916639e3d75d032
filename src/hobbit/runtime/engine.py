"""The engine: a store on disk, dense weights in RAM, experts through a budgeted cache.

    engine = hobbit.load("store/", budget="25%", policy="lru")
    out = engine.generate(engine.tokenizer.encode("Hello"), max_new_tokens=32)
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from hobbit.store.config import ModelConfig
from hobbit.store.dense import (EMBEDDING, FUSED, embedding_is_lookup, lock as lock_dense, peak_rss_bytes,
                                read as read_dense, release_free_heap, rss_bytes)
from hobbit.runtime.model import Transformer
from hobbit.runtime.loader import DEMAND, PREFETCH
from hobbit.runtime.offload import OffloadedExperts, Predictor
from hobbit.policies.prefetch import PredictionStats
from hobbit.runtime.config import RunConfig, StoreFacts, read_tuned, resolve
from hobbit.runtime.trace import TraceWriter
from hobbit.store.format import ExpertStore
from hobbit.runtime.tokenizer import Tokenizer

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}


class Sequence:
    """One sequence: owns the position and the step clock. `pos` counts positions; the clock counts
    forward passes, so the expert schedule sees exactly one step per pass (prefill counts one, and a
    MoBiLE fallback is a second pass at the same position)."""

    def __init__(self, engine: "Engine"):
        self.model, self.provider = engine.model, engine.provider
        self.model.reset()
        self.provider.begin_sequence()
        opt = self.provider.opt
        self.gamma = opt.gamma if opt.mobile else None
        self.pos = 0
        self.accepted_little: list[Tensor] = []  # MoBiLE: tokens [1] accepted little since the last big pass

    def step(self, tokens: Tensor, last_only: bool = False) -> Tensor:
        """tokens [T] int64 at the next positions -> logits [T, V] fp32 ([1, V], the last token's, when
        last_only). Under MoBiLE a single token is decoded little first and redone big when the little
        pass's top next-token probability is below gamma; the logits returned are the accepted pass's."""
        if self.gamma is None or tokens.shape[0] != 1:
            return self.big(tokens, last_only)
        logits = self.forward(tokens, little=True)
        if float(torch.softmax(logits[-1], dim=-1).max()) < self.gamma:
            self.pos -= 1  # the fallback: this token again, at the same position
            return self.big(tokens)
        self.accepted_little.append(tokens)
        return logits

    def big(self, tokens: Tensor, last_only: bool = False) -> Tensor:
        """A big pass of `tokens` at `pos`, led by the tokens accepted little since the last big pass, as in
        BiLD: their positions are recomputed in the same pass and their KV entries overwritten, so the state
        is what a big-only decode of the accepted tokens leaves. Returns `tokens`' logits, as `step`."""
        n = len(self.accepted_little)
        if n:
            tokens, self.pos = torch.cat([*self.accepted_little, tokens]), self.pos - n
            self.accepted_little.clear()
        logits = self.forward(tokens, last_only=last_only)
        return logits if last_only else logits[n:]

    def forward(self, tokens: Tensor, little: bool = False, last_only: bool = False) -> Tensor:
        """One forward pass (little: each token runs the first ceil(k/2) of its top-k experts)."""
        self.provider.begin_pass(little, tokens.shape[0])
        logits = self.model.forward(tokens, self.pos, last_only)
        self.pos += tokens.shape[0]
        self.provider.end_step()
        return logits


@dataclass
class Generation:
    token_ids: list[int]
    finish_reason: str  # 'stop' | 'length' | 'cancelled'
    stats: dict = field(default_factory=dict)


def sample(logits: Tensor, temperature: float, top_p: float, top_k: int, gen: torch.Generator | None) -> int:
    """logits [V] fp32 -> token id. temperature 0 is greedy."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        p, idx = probs.sort(descending=True)
        keep = p.cumsum(0) - p < top_p  # smallest prefix whose mass reaches top_p (always keeps the first)
        probs = torch.zeros_like(probs).scatter_(0, idx[keep], p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


IO_PARALLEL_BYTES = 1 << 20  # experts this large are read 4 at a time by default (Engine._io_threads)


class Engine:
    def __init__(self, store: str | Path, budget=None, policy: str = "lru", dtype: str = "bf16",
                 max_seq_len: int | None = None, trace: str | Path | None = None, dense_group_size: int = 32,
                 config: RunConfig | None = None, **knobs):
        """`config` (a RunConfig) or the knobs as keywords (RunConfig's fields: high, low, t1, ..., threads)."""
        if config is None:
            config = RunConfig(budget=budget, policy=policy, dtype=dtype, **knobs)
        elif knobs:
            raise TypeError(f"pass the knobs in config or as keywords, not both ({', '.join(knobs)})")
        self.run_config = config
        self.baseline_rss_bytes = rss_bytes()  # before any weight: what the process costs by itself
        self.path = Path(store)
        # first, while little else is resident: parsing tokenizer.json peaks ~3x what the tokenizer keeps (Qwen2's
        # 151k vocab: +120 MiB, then 42 MiB once the parse's freed heap is trimmed, instead of 100 MiB kept)
        self.tokenizer = Tokenizer.from_dir(self.path)
        release_free_heap()
        torch.set_num_threads(config.threads)  # one compute thread; the loader thread takes the other core
        self.store = ExpertStore(self.path, direct_io=config.direct_io)
        self.config = ModelConfig.from_dict(self.store.manifest["config"])
        self.dtype = DTYPES[config.dtype]
        precs = self.store.precisions
        facts = StoreFacts(tuple(precs), self.store.total_nbytes(precs[0]) if self.store.blobs else 0,
                           self.config.num_experts, self.config.norm_topk_prob, self.store.source_precision)
        run = resolve(config, facts, read_tuned(self.path) if config.reads_tuned else None)
        if run.note:  # a `hobbit tune` result is hobbit's defaults only for the precisions and budget it was tuned at
            warnings.warn(f"{self.path}/{run.note}")
        opts = run.options
        self.budget_bytes, self.policy, self.tuned = run.budget_bytes, opts.name, run.tuned
        io_threads = self._io_threads(config, opts)
        if config.prefetch_threads is not None and io_threads and not 1 <= config.prefetch_threads <= io_threads:
            raise ValueError(f"--prefetch-threads {config.prefetch_threads} must be between 1 and the loader's "
                             f"{io_threads} thread(s) (--io-threads)")
        self.provider = OffloadedExperts(self.store, self.config.num_layers, self.config.top_k, self.dtype,
                                         self.budget_bytes, opts, io_threads=io_threads,
                                         sparse_layers=len(self.config.sparse_layers),
                                         prefetch_threads=config.prefetch_threads or 1)
        self.model = Transformer(self.config, self.provider, dtype=self.dtype, max_seq_len=max_seq_len)
        # dense weights in owned memory, as stored (convert --dense) unless `dense` / `lm_head` override: int4 is 2.5x
        # bf16 at batch 1; the embedding stays file-mapped when the store has its own LM head (a row lookup; not
        # after a re-format without --lm-head, which makes the LM head again from the embedding)
        map_embedding = config.dense is None or config.lm_head is not None
        dense = read_dense(self.path / self.store.manifest["dense_file"], FUSED, map_embedding=map_embedding)
        emb = dense[EMBEDDING] if map_embedding and embedding_is_lookup(dense) else None
        self.model.load_dense(dense, config.dense, dense_group_size, config.lm_head)
        mapped = emb is not None and self.model.embed_tokens.weight.data_ptr() == emb.data_ptr()  # still the file map
        self.mapped_bytes = emb.numel() * emb.element_size() if mapped else 0
        release_free_heap()  # load-time temporaries (re-packing, quantizing an old store)
        if config.mlock:
            lock_dense(self.model.dense_tensors())
        depth = max(opts.depth, 3 if trace else 0)  # traces record 3 layers of predictions for simulate
        if depth and self.config.num_experts:
            sparse = self.config.sparse_layers
            self.provider.predictor = Predictor(
                {i: self.model.layers[i].mlp.gate.weight for i in sparse},
                {i: self.model.layers[i].post_attention_layernorm.weight for i in sparse},
                depth, self.config.top_k, self.config.norm_topk_prob)
        if trace:
            self.provider.trace = TraceWriter(trace, self.trace_header())
        self.max_context = self.model.max_seq_len
        self.model_name = self.path.resolve().name
        self.tokens_generated = 0
        self.decode_s = 0.0

    # -- public API -------------------------------------------------------------------------------
    def sequence(self) -> Sequence:
        """Start a fresh sequence (KV cache and expert-schedule clock reset)."""
        return Sequence(self)

    def logits(self, token_ids: list[int] | Tensor, stepwise: bool = False) -> Tensor:
        """[T, V] fp32 logits of a fresh sequence. stepwise feeds one token per forward pass, as
        decoding does, so each token picks its own experts' precisions (HOBBIT, MoBiLE); otherwise
        the whole sequence is one prefill pass."""
        ids = self._check_prompt(token_ids)
        seq = self.sequence()
        with torch.inference_mode():
            if not stepwise:
                return seq.step(ids)
            return torch.cat([seq.step(ids[i:i + 1]) for i in range(ids.numel())])  # [T, V]

    def generate(self, prompt_ids: list[int] | Tensor, max_new_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 stop_token_ids: set[int] | list[int] | None = None,
                 callback: Callable[[int], bool | None] | None = None) -> Generation:
        ids = self._check_prompt(prompt_ids)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        stop = set(stop_token_ids) if stop_token_ids is not None else self._default_stops()
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        before = self._counters()
        seq = self.sequence()
        out: list[int] = []
        finish = "length"
        t0 = time.perf_counter()
        prefill_s = decode_s = 0.0
        with torch.inference_mode():
            logits = seq.step(ids, last_only=True)[-1]  # a prefill's [T, V] fp32 logits: T x 0.6 MB (Qwen2)
            prefill_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            while len(out) < max_new_tokens:
                tok = sample(logits, temperature, top_p, top_k, gen)
                out.append(tok)
                if callback is not None and callback(tok) is False:
                    finish = "cancelled"
                    break
                if tok in stop:
                    finish = "stop"
                    break
                if len(out) == max_new_tokens or seq.pos >= self.max_context:
                    break
                logits = seq.step(torch.tensor([tok]))[-1]
            decode_s = time.perf_counter() - t1
        self.tokens_generated += len(out)
        self.decode_s += decode_s
        stats = self._delta(before, self._counters())
        # the first token comes from the prefill logits; decode speed counts the forward passes after it
        stats.update(prompt_tokens=len(ids), generated_tokens=len(out), prefill_s=prefill_s, decode_s=decode_s,
                     decode_tok_s=(len(out) - 1) / decode_s if len(out) > 1 and decode_s > 0 else 0.0,
                     **self.memory())
        return Generation(out, finish, stats)

    def trace_header(self) -> dict:
        c = self.config
        precs = self.store.precisions
        return dict(store=str(self.path), arch=c.arch, num_layers=c.num_layers, sparse_layers=list(c.sparse_layers),
                    num_experts=c.num_experts, top_k=c.top_k, norm_topk_prob=c.norm_topk_prob, precisions=precs,
                    source_precision=self.store.source_precision,
                    expert_ram_bytes={p: self.provider.expert_bytes(p) for p in precs},
                    expert_disk_bytes={p: self.store.expert_nbytes(p) for p in precs})

    def stats(self) -> dict:
        s = self._counters()
        return dict(s, policy=self.policy, tokens_generated=self.tokens_generated,
                    decode_tok_s=self.tokens_generated / self.decode_s if self.decode_s else 0.0, **self.memory())

    def memory(self) -> dict:
        """Bytes: dense weights (every precision; dense_mapped_bytes of them file-mapped), KV cache as allocated, cached experts, and RSS now,
        at its peak and before the engine loaded anything (baseline: interpreter, torch, libraries)."""
        return dict(budget_bytes=self.budget_bytes, cached_expert_bytes=self.provider.cached_bytes(),
                    dense_bytes=self.model.dense_nbytes(), dense_mapped_bytes=self.mapped_bytes, kv_cache_bytes=self.model.kv_nbytes(),
                    peak_rss_bytes=peak_rss_bytes(), rss_bytes=rss_bytes(), baseline_rss_bytes=self.baseline_rss_bytes)

    def close(self) -> None:
        self.provider.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------------
    def _io_threads(self, config: RunConfig, opts) -> int:
        """--io-threads, else 4 for MiB-sized experts (CoderMoE's 1.5 MiB int4 blobs: 1.4x decode at a 25%
        budget, reads at queue depth 4 run ~1.7x QD1 here) and 1 for small ones (SmolMoE's 216 KiB: the thread
        hand-offs cost what parallel reads save). Of them, --prefetch-threads (default 1) read prefetches."""
        if config.io_threads is not None:
            return config.io_threads
        stored = self.store.blobs and opts.high in self.store.precisions  # else OffloadedExperts says what is wrong
        big = stored and self.store.expert_nbytes(opts.high) >= IO_PARALLEL_BYTES
        return 4 if big else 1

    def _check_prompt(self, token_ids) -> Tensor:
        ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
        if ids.numel() == 0:
            raise ValueError("the prompt is empty: give at least one token")
        if ids.numel() > self.max_context:
            raise ValueError(f"the prompt has {ids.numel()} tokens but the context holds {self.max_context}; "
                             f"shorten the prompt or load with a larger max_seq_len")
        if int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size})")
        return ids

    def _default_stops(self) -> set[int]:
        stops = set(self.config.eos_token_ids)
        if self.tokenizer is not None:
            stops |= self.tokenizer.eos_token_ids
        return stops

    def _counters(self) -> dict:
        s = self.provider.stats.as_dict()
        s["bytes_read"] = self.store.bytes_read
        s["loads"] = {"demand": self.provider.loader.loads[DEMAND], "prefetch": self.provider.loader.loads[PREFETCH]}
        return s

    @staticmethod
    def _delta(a: dict, b: dict) -> dict:
        def minus(new, old):  # counts, or per-rank lists of counts (the older one may be shorter)
            if isinstance(new, list):
                old = old or []
                return [x - (old[i] if i < len(old) else 0) for i, x in enumerate(new)]
            return new - (old or 0)

        out = {}
        for k, v in b.items():
            if isinstance(v, dict):
                out[k] = {kk: minus(vv, a.get(k, {}).get(kk)) for kk, vv in v.items()}
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and k != "hit_rate":
                out[k] = v - a.get(k, 0)
        if "prediction" in out:  # ratios of the differences, not differences of ratios
            out["prediction"] = PredictionStats.from_counts(out["prediction"]).as_dict()
        hits, misses = out.get("hits", 0), out.get("misses", 0)
        out["hit_rate"] = hits / (hits + misses) if hits + misses else 0.0
        return out


def load(store: str | Path, budget=None, policy: str = "lru", dtype: str = "bf16", **options) -> Engine:
    """Open a converted expert store (`config=RunConfig(...)` instead of the keywords: `hobbit.runtime.config`). budget: bytes, "2GiB" or "25%" of all expert bytes at the
    highest stored precision (ignored by resident and ondemand); policy: resident | ondemand | lru | lfu |
    slru | lru+prefetch | belady (needs eviction_options={"trace": ...}) | hobbit | mobile | hobbit+mobile
    (MoBiLE decoding over lru / hobbit; `gamma=` its confidence threshold)."""
    return Engine(store, budget=budget, policy=policy, dtype=dtype, **options)
