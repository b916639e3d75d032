"""The expert store: a manifest, one file of 4 KiB-aligned expert blobs, and the dense weights.

    STORE/manifest.json      config, source, precisions, and per blob: offset, size, checksum, tensors
    STORE/experts.bin        blob (layer, expert, precision) = w13 tensors then w2 tensors, 4 KiB aligned
    STORE/dense.safetensors  every non-expert weight under its Hugging Face name

Blobs are read with O_DIRECT into a page-aligned staging buffer (the page cache is bypassed, so
what we measure is the slow tier); where the filesystem refuses O_DIRECT (tmpfs, some overlays)
we fall back to a buffered read followed by posix_fadvise(DONTNEED). `read_into` reads a blob
straight into caller-owned memory (a cache slot), so the hot path never allocates.

Checksums are xxh3-64 (~80 GB/s here, so verifying costs a few % of a ~1.5 GB/s disk read;
sha256 ran at 1.5 GB/s, as slow as the read itself). Stores written before that carry sha256,
which is still verified.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

ALIGN = 4096  # blob alignment: O_DIRECT needs offset, size and buffer aligned to the block size
TENSOR_ALIGN = 64  # tensors inside a blob
FORMAT_VERSION = 1
PROJS = ("w13", "w2", "b13", "b2")  # w13 = cat(gate, up) [2I, H]; w2 = down [H, I]; optional biases [2I], [H]

DTYPES = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    "int8": torch.int8, "uint8": torch.uint8, "int32": torch.int32, "int64": torch.int64,
}


class StoreError(RuntimeError):
    """A store that is missing, corrupt or truncated; the message names the blob and the fix."""


def _round_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def blob_key(layer: int, expert: int, precision: str) -> str:
    return f"{layer}/{expert}/{precision}"


@dataclass(frozen=True)
class TensorSpec:
    proj: str  # 'w13' | 'w2'
    key: str  # name inside quant's storage dict
    dtype: str
    shape: tuple[int, ...]
    offset: int  # within the blob
    nbytes: int


@dataclass(frozen=True)
class BlobSpec:
    layer: int
    expert: int
    precision: str
    offset: int
    nbytes: int
    checksum: str  # "xxh3:<hex>" or "sha256:<hex>"
    tensors: tuple[TensorSpec, ...]

    @property
    def layout(self) -> tuple[int, tuple[TensorSpec, ...]]:
        """What a slot must match to hold this blob: size and tensor layout."""
        return self.nbytes, self.tensors


def checksum(data) -> str:
    return "xxh3:" + xxhash.xxh3_64_hexdigest(data)


def _verify(data, expected: str) -> bool:
    kind, _, digest = expected.partition(":")
    if kind == "xxh3":
        return xxhash.xxh3_64_hexdigest(data) == digest
    return hashlib.sha256(data).hexdigest() == digest


def blob_tensors(raw: torch.Tensor, specs: tuple[TensorSpec, ...]) -> dict[str, dict[str, torch.Tensor]]:
    """Views {proj: {key: tensor}} into `raw` (uint8, one blob's bytes) at the layout's offsets."""
    out: dict[str, dict[str, torch.Tensor]] = {p: {} for p in PROJS}
    for t in specs:
        dt = DTYPES[t.dtype]
        out[t.proj][t.key] = raw[t.offset:t.offset + t.nbytes].view(dt).view(t.shape)
    return out


def pack_blob(parts: dict[str, dict[str, torch.Tensor]]) -> tuple[bytes, list[dict]]:
    """Lay out {proj: {key: tensor}} as one byte string; returns (bytes, tensor specs)."""
    chunks, specs, pos = [], [], 0
    for proj in PROJS:
        for key, t in parts.get(proj, {}).items():
            t = t.contiguous()
            raw = t.view(torch.uint8).reshape(-1).numpy().tobytes() if t.numel() else b""
            pad = _round_up(pos, TENSOR_ALIGN) - pos
            chunks.append(b"\0" * pad)
            pos += pad
            specs.append(dict(proj=proj, key=key, dtype=str(t.dtype).removeprefix("torch."),
                              shape=list(t.shape), offset=pos, nbytes=len(raw)))
            chunks.append(raw)
            pos += len(raw)
    return b"".join(chunks), specs


class StoreWriter:
    """Appends blobs to experts.bin and writes the manifest at close()."""

    def __init__(self, path: str | Path, header: dict):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.header = dict(header)
        self.blobs: dict[str, dict] = {}
        self.f = open(self.path / "experts.bin", "wb")
        self.pos = 0

    def add(self, layer: int, expert: int, precision: str, parts: dict[str, dict[str, torch.Tensor]]) -> None:
        data, specs = pack_blob(parts)
        self.f.write(data)
        pad = _round_up(len(data), ALIGN) - len(data)
        self.f.write(b"\0" * pad)
        self.blobs[blob_key(layer, expert, precision)] = dict(
            offset=self.pos, nbytes=len(data), checksum=checksum(data), tensors=specs)
        self.pos += len(data) + pad

    def close(self) -> None:
        self.f.close()
        manifest = dict(self.header, format="hobbit-expert-store", version=FORMAT_VERSION,
                        alignment=ALIGN, blob_file="experts.bin", blob_file_bytes=self.pos, blobs=self.blobs)
        tmp = self.path / "manifest.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=1))
        tmp.replace(self.path / "manifest.json")  # the manifest appears last: a half-written store has none


class ExpertStore:
    """Read side of a store. `read(layer, expert, precision)` is called from the loader thread."""

    def __init__(self, path: str | Path, direct_io: bool = True, verify: str = "once"):
        self.path = Path(path)
        mpath = self.path / "manifest.json"
        if not mpath.is_file():
            hint = " (it looks like a Hugging Face model folder: convert it first with `hobbit convert SRC DST`)" \
                if (self.path / "config.json").is_file() else ""
            raise StoreError(f"no expert store at {self.path}: manifest.json is missing{hint}")
        try:
            self.manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise StoreError(f"{mpath} is not valid JSON ({e}); re-run `hobbit convert`") from e
        if self.manifest.get("format") != "hobbit-expert-store":
            raise StoreError(f"{mpath} is not a hobbit expert store manifest")
        if self.manifest.get("version") != FORMAT_VERSION:
            raise StoreError(f"{mpath} has store format version {self.manifest.get('version')}, this hobbit "
                             f"reads version {FORMAT_VERSION}; re-run `hobbit convert`")
        self.precisions: list[str] = self.manifest["precisions"]
        self.source_precision: str | None = self.manifest.get("source", {}).get("precision")  # quantized sources
        self.group_size: int = self.manifest["group_size"]
        self.blobs = {k: BlobSpec(*map(int, k.split("/")[:2]), k.split("/")[2], v["offset"], v["nbytes"],
                                  v.get("checksum") or "sha256:" + v["sha256"], tuple(TensorSpec(t["proj"], t["key"], t["dtype"], tuple(t["shape"]),
                                                                t["offset"], t["nbytes"]) for t in v["tensors"]))
                      for k, v in self.manifest["blobs"].items()}
        self.blob_path = self.path / self.manifest["blob_file"]
        if not self.blob_path.is_file():
            raise StoreError(f"{self.blob_path} is missing; re-run `hobbit convert`")
        size = self.blob_path.stat().st_size
        if size < self.manifest["blob_file_bytes"]:
            first = min((b for b in self.blobs.values() if b.offset + b.nbytes > size), key=lambda b: b.offset)
            raise StoreError(f"{self.blob_path} is truncated ({size} of {self.manifest['blob_file_bytes']} bytes): "
                             f"blob layer {first.layer} expert {first.expert} precision {first.precision} and "
                             f"later ones are cut off; re-run `hobbit convert`")
        self.verify = verify  # 'once' (first read of each blob), 'always', 'never'
        self._verified: set[str] = set()
        self.direct = False
        self.fd = -1
        if direct_io and hasattr(os, "O_DIRECT"):
            try:
                self.fd = os.open(self.blob_path, os.O_RDONLY | os.O_DIRECT)
                self.direct = True
            except OSError:
                self.fd = -1
        if self.fd < 0:
            self.fd = os.open(self.blob_path, os.O_RDONLY)
        self.bytes_read = 0
        self._count_lock = threading.Lock()

    # -- metadata ---------------------------------------------------------------------------
    def blob(self, layer: int, expert: int, precision: str) -> BlobSpec:
        try:
            return self.blobs[blob_key(layer, expert, precision)]
        except KeyError:
            raise StoreError(f"the store has no blob for layer {layer} expert {expert} precision {precision!r} "
                             f"(stored precisions: {', '.join(self.precisions)}); convert with "
                             f"`--precisions` including it") from None

    def expert_nbytes(self, precision: str) -> int:
        """Largest on-disk size of one expert at this precision."""
        return max(b.nbytes for b in self.blobs.values() if b.precision == precision)

    def total_nbytes(self, precision: str) -> int:
        return sum(b.nbytes for b in self.blobs.values() if b.precision == precision)

    def layout(self, precision: str) -> tuple[int, tuple[TensorSpec, ...]]:
        """The one blob layout (size, tensors) every expert at this precision shares; slots are cut to it."""
        layouts = {b.layout for b in self.blobs.values() if b.precision == precision}
        if len(layouts) != 1:
            raise StoreError(f"{self.path}: experts at {precision} have {len(layouts)} different blob layouts; "
                             f"hobbit needs one expert shape per store (re-run `hobbit convert`)")
        return layouts.pop()

    # -- I/O --------------------------------------------------------------------------------
    def read_into(self, layer: int, expert: int, precision: str, dst: memoryview) -> None:
        """Read one blob into `dst` (page aligned, at least the blob's size rounded up to ALIGN bytes;
        a cache slot): no allocation, no copy. Raises StoreError naming the blob on any failure."""
        b = self.blob(layer, expert, precision)
        n = _round_up(b.nbytes, ALIGN)
        if len(dst) < n:
            raise ValueError(f"destination of {len(dst)} bytes is smaller than blob {blob_key(layer, expert, precision)} "
                             f"({n} bytes with alignment)")
        view = dst[:n]
        try:
            got = os.preadv(self.fd, [view], b.offset)
        except OSError as e:
            raise StoreError(f"reading blob layer {layer} expert {expert} precision {precision} from "
                             f"{self.blob_path} failed: {e}") from e
        if got < b.nbytes:
            raise StoreError(f"short read for blob layer {layer} expert {expert} precision {precision}: "
                             f"{got} of {b.nbytes} bytes; the store file is truncated, re-run `hobbit convert`")
        if not self.direct:
            os.posix_fadvise(self.fd, b.offset, n, os.POSIX_FADV_DONTNEED)
        with self._count_lock:
            self.bytes_read += b.nbytes
        k = blob_key(layer, expert, precision)
        if self.verify == "always" or (self.verify == "once" and k not in self._verified):
            if not _verify(dst[:b.nbytes], b.checksum):
                raise StoreError(f"checksum mismatch for blob layer {layer} expert {expert} precision "
                                 f"{precision} in {self.blob_path}: the store is corrupt, re-run `hobbit convert`")
            self._verified.add(k)

    def read(self, layer: int, expert: int, precision: str) -> dict[str, dict[str, torch.Tensor]]:
        """One blob as fresh tensors {proj: {key: tensor}} (tools and tests; the engine uses read_into)."""
        b = self.blob(layer, expert, precision)
        buf = mmap.mmap(-1, _round_up(b.nbytes, ALIGN))  # anonymous mmap: page aligned, as O_DIRECT needs
        self.read_into(layer, expert, precision, memoryview(buf))
        return blob_tensors(torch.frombuffer(buf, dtype=torch.uint8), b.tensors)

    def read_bandwidth(self, precision: str, count: int = 64, seed: int = 0) -> float:
        """Bytes/s of this store's own reads: `count` random blobs at `precision`, one at a time, page
        cache dropped first, into one reused buffer, checksums off: the raw cost of an expert load."""
        import random
        blobs = [b for b in self.blobs.values() if b.precision == precision]
        picked = random.Random(seed).sample(blobs, min(count, len(blobs)))
        buf = mmap.mmap(-1, _round_up(max(b.nbytes for b in picked), ALIGN))
        self.drop_page_cache()
        verify, self.verify = self.verify, "never"
        t0, n = time.perf_counter(), self.bytes_read
        try:
            for b in picked:
                self.read_into(b.layer, b.expert, precision, memoryview(buf))
        finally:
            self.verify = verify
        return (self.bytes_read - n) / (time.perf_counter() - t0)

    def shapes(self) -> dict[str, tuple[int, int]]:
        return {k: tuple(v) for k, v in self.manifest["expert_shapes"].items()}

    def __enter__(self) -> "ExpertStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def drop_page_cache(self) -> None:
        """Evict the blob file from the page cache (benchmarks call this between runs)."""
        fd = os.open(self.blob_path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
