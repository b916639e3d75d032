"""Dense (non-expert) weights: their run precision, their names on disk, reading them into RAM.

A store keeps the dense weights in ``dense.safetensors`` under Hugging Face names. Converted with
``--dense int8|int4|auto``, every quantizable projection (attention, dense and shared-expert MLPs,
the LM head) is stored in quant's storage form under derived names, so loading never quantizes:

    <name>.q + <name>.scale   int8, per output channel
    <name>.q + <name>.sz      int4, group-wise (group size = K / sz.shape[0])

Routers (``mlp.gate``) and ``shared_expert_gate`` stay in the source dtype (they decide routing),
norms and biases too; the embedding is stored bf16 (a row lookup). A tied LM head gets its own
quantized copy. The manifest records ``dense_format: {"format", "group_size"}``; a store without
it holds every dense weight as the source had it.

``auto`` (the default) picks per matrix: int4 where int4 is lossless because the source already
lies on a 4-bit group grid (a Q4_0/Q4_1 GGUF: relative error 0.2%, only bf16 rounding), else
int8 (0.8-1.2%; int4 would be 7-8%). Measured on SmolLM2 (Q4_1 GGUF, Q8_0 embedding) and SmolMoE:
int4 everywhere costs +7% / +28% perplexity, auto +0.0% / +1.0% (results/dense_quality.json).
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from hobbit.store import quant

FORMATS = ("fp32", "bf16", "int8", "int4", "auto")
FUSED = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}  # ours: HF parts, row order
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
AUTO_INT4_ERROR = 0.01  # auto: int4 when its relative Frobenius error is below this (a 4-bit source), else int8
# routing decisions (every family's router: gate, gpt_oss router, granitemoe router.layer), and MLA's
# kv_b_proj, which attention_mla splits into per-head matrices at load
_KEEP = re.compile(r"(^|\.)(mlp|block_sparse_moe)\.(gate|router|router\.layer)\.weight$|shared_expert_gate\.weight$"
                   r"|kv_b_proj\.weight$")
_SUFFIXES = {"int8": ("q", "scale"), "int4": ("q", "sz")}
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I8": torch.int8,
              "U8": torch.uint8, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool}


@dataclass
class Stored:
    """One quantized matrix as stored: quant's storage dict, its format, [N, K] shape and group size."""
    fmt: str
    q: dict[str, Tensor]
    shape: tuple[int, int]
    group_size: int

    def dequantize(self) -> Tensor:
        return quant.dequantize(self.q, self.fmt, self.shape, self.group_size)


def quantizable(name: str, t: Tensor) -> bool:
    """A projection matrix whose run precision follows the dense format (HF name)."""
    return t.ndim == 2 and name.endswith(".weight") and "embed_tokens" not in name and not _KEEP.search(name)


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown dense format {fmt!r}; choose one of {', '.join(FORMATS)}")


def quantize_state(state: dict[str, Tensor], fmt: str, group_size: int = 32,
                   tie_word_embeddings: bool = False) -> dict[str, Tensor]:
    """HF-named dense weights -> the same in run precision ``fmt`` (derived names for int8/int4).
    int4 falls back to int8 for a matrix whose K is not a multiple of group_size; auto: see above."""
    check_format(fmt)
    state = dict(state)
    emb = next((n for n in state if n.endswith("embed_tokens.weight")), None)
    if tie_word_embeddings and emb is not None and "lm_head.weight" not in state and fmt not in DTYPES:
        state["lm_head.weight"] = state[emb]  # its own quantized copy; the lookup stays bf16
    out, int4 = {}, {}
    for name, t in state.items():
        if name == emb:
            out[name] = t.to(DTYPES.get(fmt, torch.bfloat16)).contiguous()
        elif not quantizable(name, t):
            out[name] = t.contiguous()
        elif fmt in DTYPES:
            out[name] = t.to(DTYPES[fmt]).contiguous()
        else:
            int4[name] = _int4(t.float(), fmt, group_size)
    for group in _fused_groups(int4):  # the parts of one fused projection share one format: int4 only if all are
        if any(int4[n] is None for n in group):
            for n in group:
                int4[n] = None
    for name, q in int4.items():
        q = q or quant.quantize(state[name].float(), "int8", group_size)
        out.update({f"{name}.{k}": v for k, v in q.items()})
    return out


def _int4(w: Tensor, fmt: str, group_size: int) -> dict[str, Tensor] | None:
    """w in int4 when `fmt` asks for it (int4, or auto where int4 is lossless), else None (int8)."""
    if fmt == "int8" or w.shape[1] % group_size:
        return None
    q = quant.quantize(w, "int4", group_size)
    err = (quant.dequantize(q, "int4", tuple(w.shape), group_size) - w).norm() / w.norm().clamp_min(1e-30)
    return q if fmt == "int4" or err <= AUTO_INT4_ERROR else None


def _fused_groups(names) -> list[list[str]]:
    """HF weight names grouped by the fused projection they become (q/k/v of one layer, gate/up of one MLP)."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name in names:
        parent, _, rest = name.rpartition(".")[0].rpartition(".")
        for ours, parts in FUSED.items():
            if rest in parts:
                groups.setdefault((parent, ours), []).append(name)
    return list(groups.values())


def split_state(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Stored]]:
    """(plain tensors, quantized matrices by weight name) of a dense state dict."""
    plain, parts = {}, {}
    for name, t in state.items():
        base, _, key = name.rpartition(".")
        if base.endswith(".weight") and key in ("q", "scale", "sz"):
            parts.setdefault(base, {})[key] = t
        else:
            plain[name] = t
    stored = {}
    for base, q in parts.items():
        fmt = "int4" if "sz" in q else "int8"
        if set(q) != set(_SUFFIXES[fmt]):
            raise ValueError(f"dense weight {base}: stored parts {sorted(q)}, expected {list(_SUFFIXES[fmt])}")
        if fmt == "int8":
            shape, gs = tuple(q["q"].shape), 0
        else:
            shape = (q["sz"].shape[1], q["q"].shape[1])
            gs = shape[1] // q["sz"].shape[0]
        stored[base] = Stored(fmt, q, shape, gs)
    return plain, stored


def convert_matrix(w: Stored | Tensor, fmt: str, group_size: int, rows: int = 2048) -> dict[str, Tensor]:
    """One matrix (stored, or plain [N, K]) in `fmt`'s storage form, converted `rows` output rows at a time
    into preallocated parts: the transient is a rows x K fp32 block and quantize's temporaries of it
    (~5x; 2048 x 1536: ~60 MiB), not the matrix (Qwen2's LM head in fp32: 890 MiB). Every format
    quantizes per row, so the result equals the whole matrix's. int4 -> int8 where K % group_size."""
    N, K = w.shape
    fmt = "int8" if fmt == "int4" and K % group_size else fmt
    if isinstance(w, Stored) and w.fmt == fmt and w.group_size in (0, group_size):
        return w.q  # already so: kept, not re-fitted
    if isinstance(w, Stored) and w.fmt != "int8":
        w = w.dequantize()  # int4's rows interleave in 64-row blocks: only int8 is sliced as stored
    if fmt == "int4" and N % 64:
        rows = N  # int4 packs rows in 64-row blocks: a partial block is not cut
    out: dict[str, Tensor] = {}
    for r in range(0, N, rows):
        n = min(rows, N - r)
        block = w[r:r + n].float() if isinstance(w, Tensor) else quant.dequantize(  # [n, K]
            {k: v[r:r + n] for k, v in w.q.items()}, "int8", (n, K), 0)
        for key, part in quant.quantize(block, fmt, group_size).items():
            dim = 1 if key == "sz" else 0  # int4's sz is [G, N, 2]; every other part's rows lead
            if key not in out:
                out[key] = part.new_empty([*part.shape[:dim], part.shape[dim] * N // n, *part.shape[dim + 1:]])
            out[key].narrow(dim, part.shape[dim] * r // n, part.shape[dim]).copy_(part)
    return out


def reformat(state: dict[str, Tensor], fmt: str | None, group_size: int, tied: bool,
             head: str | None = None) -> dict[str, Tensor]:
    """Dense weights (our names) brought to `fmt` (None: as they are), the LM head to `head` (None: as the
    rest). Quantized matrices are converted one at a time (no fp32 copy of the model). A tied model's LM
    head in `fmt` is made again from the embedding (a stored copy holds the precision already lost); `head`
    makes it from its own stored copy when there is one, so the embedding is never needed in RAM. `state`
    is consumed (emptied)."""
    plain, stored = split_state(state)
    state.clear()  # consumed: a converted matrix's source is freed at once
    if head is None:
        return _reformat(plain, stored, fmt, group_size, tied)
    check_format(head)
    src = stored.pop("lm_head.weight") if "lm_head.weight" in stored else plain.pop("lm_head.weight", None)
    out = _reformat(plain, stored, fmt, group_size, tied=False)  # the head is made below: no other copy
    q = convert_matrix(src if src is not None else out["embed_tokens.weight"], head, group_size)  # last: the
    return {**out, **_named("lm_head.weight", q, head)}  # projections' sources are freed by now


def _named(name: str, q: dict[str, Tensor], fmt: str) -> dict[str, Tensor]:
    """A matrix's storage form under the state's names: plain `name`, or `name.q` + `.scale`/`.sz`."""
    return {name: q["w"]} if fmt in DTYPES else {f"{name}.{k}": v for k, v in q.items()}


def _reformat(plain: dict[str, Tensor], stored: dict[str, Stored], fmt: str | None, group_size: int,
              tied: bool) -> dict[str, Tensor]:
    if fmt is not None:
        check_format(fmt)
    if fmt is None or stored and (fmt == "auto" or all(s.fmt == fmt and s.group_size in (0, group_size)
                                                       for s in stored.values())):
        return {**plain, **{f"{n}.{k}": v for n, s in stored.items() for k, v in s.q.items()}}  # as stored
    if not stored:
        return quantize_state(plain, fmt, group_size, tied)
    rank = {"fp32": 0, "bf16": 1, "int8": 2, "int4": 3}
    if fmt != "auto" and max(rank[s.fmt] for s in stored.values()) > rank[fmt]:
        warnings.warn(f"dense weights are stored quantized; loading them as {fmt} cannot restore the "
                      f"precision lost (convert with --dense {fmt} for that)")
    if tied:
        stored.pop("lm_head.weight", None)  # made again from the embedding below
        if fmt not in DTYPES and "embed_tokens.weight" in plain:
            stored["lm_head.weight"] = plain["embed_tokens.weight"]
    out = {}
    for name in list(stored):  # one matrix at a time: each fp32 transient is freed before the next
        out.update(_named(name, convert_matrix(stored.pop(name), fmt, group_size), fmt))
    return {**quantize_state(plain, fmt, group_size), **out}  # norms, biases, routers as they are; the embedding


EMBEDDING = "model.embed_tokens.weight"


def embedding_is_lookup(names) -> bool:
    """The file has its own LM head (a tied one stored as a quantized copy), so the embedding is only
    ever looked up by row."""
    return EMBEDDING in names and any(name.startswith("lm_head.weight") for name in names)


def read(path: str | Path, fused: dict[str, tuple[str, ...]] | None = None,
         map_embedding: bool = True) -> dict[str, Tensor]:
    """A safetensors file read into anonymous (owned) memory: nothing stays file-mapped, so the
    kernel cannot evict and re-read dense weights under a RAM limit. fused {ours: HF parts}, e.g.
    {"qkv": ("q_proj", "k_proj", "v_proj")}: the parts of one projection are read back to back
    into one buffer, so fusing them (quant.cat0) copies nothing.
    map_embedding: when the file has its own LM head, the embedding is only ever looked up by row,
    so it stays file-mapped (copy-on-write): a decode step touches one page of it, not V x H bytes
    of RAM (Qwen2.5's 151936 x 1536 bf16 table is 445 MiB). The one exception to owned memory."""
    path = Path(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        n = int.from_bytes(os.pread(fd, 8, 0), "little")
        header = json.loads(os.pread(fd, n, 8))
        header.pop("__metadata__", None)
        out = {}
        if map_embedding and embedding_is_lookup(header):
            h = header.pop(EMBEDDING)
            start, end = h["data_offsets"]
            rows = np.memmap(path, dtype=np.uint8, mode="c", offset=8 + n + start, shape=(end - start,))
            out[EMBEDDING] = torch.from_numpy(rows).view(_ST_DTYPES[h["dtype"]]).view(h["shape"])
        for names in _groups(header, fused or {}):
            hs = [header[x] for x in names]
            rows = sum(h["shape"][0] for h in hs)
            buf = torch.empty([rows, *hs[0]["shape"][1:]], dtype=_ST_DTYPES[hs[0]["dtype"]])
            row = 0
            for name, h in zip(names, hs):
                t = out[name] = buf[row:row + h["shape"][0]] if len(names) > 1 else buf
                row += h["shape"][0]
                start, end = h["data_offsets"]
                if end > start:
                    got = os.preadv(fd, [t.reshape(-1).view(torch.uint8).numpy()], 8 + n + start)
                    if got != end - start:
                        raise OSError(f"{path}: short read for {name} ({got} of {end - start} bytes); "
                                      f"the file is truncated")
        return out
    finally:
        os.close(fd)


def _groups(header: dict, fused: dict[str, tuple[str, ...]]) -> list[list[str]]:
    """Tensor names to read into one buffer each: a fused projection's parts (same dtype and
    trailing shape, concatenated along rows; int4 .sz is concatenated along columns: alone)."""
    part_of = {p: ps for ps in fused.values() for p in ps}
    groups, done = [], set()
    for name, h in header.items():
        if name in done:
            continue
        m = re.match(r"(.*)\.(\w+)\.(weight|bias|weight\.q|weight\.scale)$", name)
        names = [name]
        if m and m[2] in part_of and h["shape"]:
            cand = [f"{m[1]}.{p}.{m[3]}" for p in part_of[m[2]]]
            if all(c in header and header[c]["dtype"] == h["dtype"] and header[c]["shape"][1:] == h["shape"][1:]
                   for c in cand):
                names = cand
        done.update(names)
        groups.append(names)
    return groups


def lock(tensors: list[Tensor]) -> int:
    """mlock each tensor's pages so the kernel never swaps or evicts them; returns bytes locked.
    Warns (and locks nothing more) when RLIMIT_MEMLOCK refuses."""
    libc = ctypes.CDLL(None, use_errno=True)
    done, seen = 0, set()
    for t in tensors:
        ptr, n = t.data_ptr(), t.numel() * t.element_size()
        if not n or ptr in seen:
            continue
        seen.add(ptr)
        if libc.mlock(ctypes.c_void_p(ptr), ctypes.c_size_t(n)) != 0:
            import resource
            soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
            warnings.warn(f"mlock refused after {done / 2**20:.0f} MiB ({os.strerror(ctypes.get_errno())}); "
                          f"RLIMIT_MEMLOCK is {'unlimited' if soft < 0 else f'{soft / 2**20:.0f} MiB'}: "
                          f"raise it (ulimit -l) or run without --mlock")
            break
        done += n
    return done


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def meminfo_bytes(field: str) -> int | None:
    """A /proc/meminfo field (MemTotal, MemAvailable, ...) in bytes; None where unavailable (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith(f"{field}:")), None)
    except (OSError, ValueError):
        return None


def peak_rss_bytes() -> int:
    """Peak RSS of this process: VmHWM (ru_maxrss survives exec, so a child would report its parent's)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc keeps those inside a fragmented heap)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc
