"""Tokenizer: Hugging Face `tokenizers` plus the model's own jinja2 chat template.

The template is rendered the way transformers renders it (trim_blocks, lstrip_blocks,
raise_exception, tojson, strftime_now), so prompts match what the model was trained on.

`TextDeltas`, the incremental detokenizer (`hobbit run`, `chat` and `serve`), turns generated token
ids into text deltas: it decodes only a short window of ids (prefix/read offsets), holds back
incomplete UTF-8 and any tail that could still become a stop string, and cuts the text at the
first stop string.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Protocol, Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer


class TokenizerMissing(RuntimeError):
    pass


def _token_str(tok) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


class Tokenizer:
    def __init__(self, tokenizer_json: str | Path, tokenizer_config: dict | None = None):
        self.tok = HFTokenizer.from_file(str(tokenizer_json))
        self.config = tokenizer_config or {}
        self.chat_template: str | None = self.config.get("chat_template")
        self.bos_token = _token_str(self.config.get("bos_token"))
        self.eos_token = _token_str(self.config.get("eos_token"))
        self.add_bos = bool(self.config.get("add_bos_token", False)) and self.bos_token is not None
        self.eos_token_ids: set[int] = set()
        if self.eos_token is not None and self.tok.token_to_id(self.eos_token) is not None:
            self.eos_token_ids.add(self.tok.token_to_id(self.eos_token))

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer | None":
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            return None
        cfg = {}
        if (path / "tokenizer_config.json").is_file():
            cfg = json.loads((path / "tokenizer_config.json").read_text())
        if "chat_template" not in cfg and (path / "chat_template.jinja").is_file():
            cfg["chat_template"] = (path / "chat_template.jinja").read_text()
        return cls(path / "tokenizer.json", cfg)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and (not ids or ids[0] != self.tok.token_to_id(self.bos_token)):
            ids = [self.tok.token_to_id(self.bos_token)] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ValueError("this model's tokenizer_config.json has no chat_template; use a plain prompt "
                             "(without --chat) or add a template")
        return _compile(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def encode_chat(self, messages: list[dict]) -> list[int]:
        # the template already contains the BOS token where the model wants one
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


_TEMPLATES: dict[str, jinja2.Template] = {}


def _compile(source: str) -> jinja2.Template:
    if source not in _TEMPLATES:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _TEMPLATES[source] = env.from_string(source)
    return _TEMPLATES[source]


class TokenizerLike(Protocol):
    def decode(self, ids: Sequence[int]) -> str: ...


class TextDeltas:
    """Feed token ids with `push`; each call returns the text that is now safe to show."""

    def __init__(self, tokenizer: TokenizerLike, stop: Sequence[str] = ()):
        self._decode = tokenizer.decode
        self._stop = [s for s in stop if s]
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        self._ids: list[int] = []
        self._prefix = 0      # ids[prefix:read] decode to the context of the next window
        self._read = 0        # ids before this are already part of `text`
        self._text = ""       # decoded text so far (cut at a stop string once one is seen)
        self._sent = 0        # chars of `_text` handed out
        self.stopped = False  # a stop string was found; the text ends before it

    @property
    def text(self) -> str:
        """Everything handed out so far (the whole answer once `flush` was called)."""
        return self._text[: self._sent]

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # incomplete UTF-8 sequence, or nothing visible yet
        self._text += after[len(before) :]
        self._prefix, self._read = self._read, len(self._ids)
        return self._release(final=False)

    def flush(self) -> str:
        """The held-back rest, at the end of generation (incomplete bytes included)."""
        if self.stopped:
            return ""
        tail = self._decode(self._ids[self._prefix :])[len(self._decode(self._ids[self._prefix : self._read])) :]
        self._text += tail
        self._prefix = self._read = len(self._ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        text, start = self._text, self._sent
        if self._stop:
            lo = max(0, start - self._longest_stop)
            hits = [i for i in (text.find(s, lo) for s in self._stop) if i >= 0]
            if hits:
                cut = max(min(hits), start)
                self._text, self._sent, self.stopped = text[:cut], cut, True
                return text[start:cut]
        end = len(text) if final else len(text) - self._stop_prefix_len(text, start)
        self._sent = end
        return text[start:end]

    def _stop_prefix_len(self, text: str, start: int) -> int:
        """Length of the longest tail of `text` (after `start`) that begins some stop string."""
        for k in range(min(self._longest_stop - 1, len(text) - start), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self._stop):
                return k
        return 0
