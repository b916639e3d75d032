"""The `hobbit chat` terminal chat: `run_chat(ChatSession(engine, ...))`; answers stream through
`hobbit.runtime.tokenizer.TextDeltas`, the one incremental detokenizer."""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Any, Callable, TextIO

from hobbit.runtime.tokenizer import TextDeltas


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
