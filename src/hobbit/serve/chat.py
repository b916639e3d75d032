"""Incremental detokenization with stop strings, and the `hobbit chat` terminal chat.

`hobbit chat` = `run_chat(ChatSession(engine, ...))`.

`TextDeltas` turns generated token ids into text deltas: it decodes only a short window of
ids (prefix/read offsets), holds back incomplete UTF-8 and any tail that could still become a
stop string, and cuts the text at the first stop string. `hobbit serve` uses it too.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Any, Callable, Protocol, Sequence, TextIO


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


def stats_line(stats: dict[str, Any], seconds: float) -> str:
    """One line from a Generation's stats (engine.generate) plus the wall time we measured."""
    by_prec = " ".join(f"{p} {h}/{stats.get('misses_by_precision', {}).get(p, 0)}"
                       for p, h in stats.get("hits_by_precision", {}).items())
    n = stats.get("generated_tokens", 0)
    return (f"[{n} tokens in {seconds:.2f} s, {stats.get('decode_tok_s', 0.0):.1f} tok/s decode, "
            f"prefill {stats.get('prefill_s', 0.0):.2f} s, expert hit rate {stats.get('hit_rate', 0.0):.1%}"
            + (f" (hits/misses {by_prec})" if by_prec else "")
            + f", read {stats.get('bytes_read', 0) / 2**20:.1f} MiB, "
            f"loader wait {stats.get('loader_wait_s', 0.0):.2f} s]")


class ChatSession:
    """History plus one streamed answer at a time; the terminal loop is in `run_chat`."""

    def __init__(self, engine: Any, system: str | None = None, max_tokens: int = 512,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None):
        if engine.tokenizer is None:
            raise ValueError("this store has no tokenizer; chat needs one")
        self.engine = engine
        self.system = system
        self.history: list[dict[str, str]] = []
        self.options = dict(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
        self.reset()

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def ask(self, text: str, on_text: Callable[[str], None],
            cancelled: Callable[[], bool] = lambda: False) -> tuple[str, str]:
        """Stream the answer to `text` through `on_text`; returns (answer, stats line)."""
        tok = self.engine.tokenizer
        messages = self.history + [{"role": "user", "content": text}]
        prompt = tok.encode_chat(messages)
        room = self.engine.max_context - len(prompt)
        if room <= 0:
            raise ValueError(f"the conversation ({len(prompt)} tokens) fills the context "
                             f"({self.engine.max_context}); /reset to start over")
        stream = TextDeltas(tok)

        def callback(token_id: int) -> bool:
            on_text(stream.push(token_id))
            return not cancelled()

        t0 = time.perf_counter()
        options = dict(self.options, max_new_tokens=min(self.options["max_new_tokens"], room))
        gen = self.engine.generate(prompt, callback=callback, **options)
        on_text(stream.flush())
        seconds = time.perf_counter() - t0
        self.history = messages + [{"role": "assistant", "content": stream.text}]
        return stream.text, stats_line(gen.stats, seconds)


def run_chat(session: ChatSession, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
    """Read-eval loop: /reset clears history, /exit or EOF quits, Ctrl-C stops an answer."""
    def write(s: str) -> None:
        stdout.write(s)
        stdout.flush()

    interrupted = threading.Event()
    write(f"hobbit chat with {session.engine.model_name} — /reset clears history, /exit quits\n")
    while True:
        write("> ")
        line = stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            session.reset()
            write("(history cleared)\n")
            continue
        interrupted.clear()
        previous = _on_sigint(lambda *_: interrupted.set())
        try:
            _, stats = session.ask(text, write, cancelled=interrupted.is_set)
            write(("\n(interrupted)" if interrupted.is_set() else "") + f"\n{stats}\n")
        except ValueError as e:
            write(f"error: {e}\n")
        finally:
            _on_sigint(previous)


def _on_sigint(handler: Any) -> Any:
    """Swap the SIGINT handler (only possible on the main thread; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        return handler
    return signal.signal(signal.SIGINT, handler)
