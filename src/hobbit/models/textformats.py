"""Parsers of the text formats the text assets come in: Debian packages (ar + tar), R lazy-load
databases (janeaustenr's novels) and MediaWiki XML dumps (plain text of their articles)."""

from __future__ import annotations

import bz2
import html
import io
import re
import struct
import tarfile
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path


def deb_member(deb: Path, suffix: str) -> bytes:
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


def wiki_articles(xml_bz2: io.BufferedIOBase) -> Iterator[tuple[str, str]]:
    """(title, wikitext) of main-namespace, non-redirect pages of a MediaWiki XML dump."""
    for _, elem in ET.iterparse(bz2.open(xml_bz2)):
        if elem.tag.rsplit("}", 1)[-1] != "page":
            continue
        fields = {child.tag.rsplit("}", 1)[-1]: child for child in elem.iter()}
        text = (fields["text"].text or "") if "text" in fields else ""
        if fields["ns"].text == "0" and "redirect" not in fields and not text.lstrip().upper().startswith("#REDIRECT"):
            yield fields["title"].text, text
        elem.clear()
