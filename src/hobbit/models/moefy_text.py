"""The texts moefy calibrates and evaluates on, as token windows. Held-out texts are never calibrated on.

A text spec is an asset text name (`austen:<novel>`, `wiki`), `stdlib:<module>` (a file of the running
Python's standard library, e.g. `stdlib:email.message`), or a path; optionally `@split` (train/test/all)
and, for calibration mixes, `*weight` (its share of the tokens).
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from pathlib import Path

import torch
from torch import Tensor

# SmolMoE: half Austen (all but Pride and Prejudice), half Wikipedia (train split)
SMOL_CALIB = ["austen:emma", "austen:mansfield_park", "austen:northanger_abbey", "austen:persuasion",
              "austen:sense_and_sensibility", "wiki@train*5"]
# CoderMoE: half CPython stdlib code (never difflib, the code held out), half Wikipedia (train split)
CODE_CALIB_FILES = ["argparse", "typing", "subprocess", "inspect", "tarfile", "dataclasses", "pathlib", "shutil",
                    "threading", "zipfile", "logging.__init__", "collections.__init__", "functools", "ast",
                    "configparser", "enum"]
CODER_CALIB = [f"stdlib:{m}" for m in CODE_CALIB_FILES] + [f"wiki@train*{len(CODE_CALIB_FILES)}"]
# name -> (spec, split, first character): the held-out texts perplexity is reported on
EVAL_TEXTS = {
    "smolmoe": {"pride_and_prejudice": ("austen:pride_and_prejudice", "all", 3000), "wiki_test": ("wiki", "test", 0)},
    "codermoe": {"code_difflib": ("stdlib:difflib", "all", 0), "wiki_test": ("wiki", "test", 0)},
}


def stdlib_file(module: str) -> Path:
    """The source file of a standard-library module of the running Python ('logging.__init__' for packages)."""
    path = Path(sysconfig.get_paths()["stdlib"]) / (module.replace(".", "/") + ".py")
    if not path.is_file():
        raise FileNotFoundError(f"stdlib:{module}: no {path} in Python {sys.version.split()[0]}'s standard library")
    return path


def text_path(spec: str, split: str = "all") -> Path:
    """A text spec without '@split' / '*weight' -> the UTF-8 file of that split."""
    from hobbit.models.assets import text_file
    return text_file(stdlib_file(spec[7:]) if spec.startswith("stdlib:") else spec, split, progress=False)


def describe(specs: list[str]) -> dict[str, str]:
    """Provenance of the texts: spec -> sha256 of its file (the stdlib differs between Python versions)."""
    out = {}
    for s in specs:
        name, _, split = s.partition("*")[0].partition("@")
        out[s] = hashlib.sha256(text_path(name, split or "all").read_bytes()).hexdigest()
    return out


def calib_windows(tokenizer_json: str, specs: list[str], tokens: int, window: int = 512) -> Tensor:
    """Token windows [B,window] spread evenly over each text of the mix `specs`."""
    from tokenizers import Tokenizer
    tok, n_win = Tokenizer.from_str(tokenizer_json), max(1, tokens // window)
    parsed = [(s.partition("*")[0], float(s.partition("*")[2] or 1)) for s in specs]
    total, out, done = sum(w for _, w in parsed), [], 0.0
    for spec, weight in parsed:
        n = round((done + weight) / total * n_win) - round(done / total * n_win)
        done += weight
        name, _, split = spec.partition("@")
        ids = tok.encode(text_path(name, split or "all").read_text(encoding="utf-8")).ids
        step = max(1, (len(ids) - window) // max(n, 1))
        out += [torch.tensor(ids[i * step:i * step + window]) for i in range(n) if i * step + window <= len(ids)]
    return torch.stack(out)


def eval_windows(tokenizer_json: str, texts: str = "smolmoe", n: int = 8, window: int = 512) -> dict[str, Tensor]:
    """The first n windows [n,window] of each held-out text of EVAL_TEXTS[texts]."""
    from tokenizers import Tokenizer
    tok, out = Tokenizer.from_str(tokenizer_json), {}
    for name, (spec, split, start) in EVAL_TEXTS[texts].items():
        ids = tok.encode(text_path(spec, split).read_text(encoding="utf-8")[start:]).ids
        if len(ids) < n * window:
            raise ValueError(f"{spec}@{split} has {len(ids)} tokens, fewer than {n} windows of {window}")
        out[name] = torch.tensor(ids[:n * window]).view(n, window)
    return out
