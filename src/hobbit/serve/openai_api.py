"""The OpenAI request schema as `hobbit serve` accepts it: validation of sampling parameters,
chat messages and prompts, and OpenAI-style error bodies. No I/O here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MAX_STOP = 4
ROLES = {"system", "developer", "user", "assistant", "tool"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---------------------------------------------------------------- request parsing

def get_param(body: dict, name: str, kinds: tuple[type, ...], what: str, default: Any = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise APIError(400, f"Invalid type for '{name}': expected {what}, but got {type(value).__name__}.",
                       name, "invalid_type")
    return value


def invalid_param(name: str, message: str) -> APIError:
    return APIError(400, f"Invalid '{name}': {message}", name, "invalid_value")


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    value = float(get_param(body, name, (int, float), "a number", default))
    if not (lo < value <= hi if lo_open else lo <= value <= hi):
        raise invalid_param(name, f"{value} is not in {'(' if lo_open else '['}{lo}, {hi}].")
    return value


@dataclass
class Params:
    """The sampling part of a request, validated."""
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool


def parse_params(body: dict, max_tokens_keys: tuple[str, ...]) -> Params:
    max_tokens = None
    for key in max_tokens_keys:
        if (value := get_param(body, key, (int,), "an integer")) is not None:
            if value < 1:
                raise invalid_param(key, f"expected a value >= 1, but got {value} instead.")
            max_tokens = value
    stop = get_param(body, "stop", (str, list), "a string or an array of strings", [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > MAX_STOP or not all(isinstance(s, str) for s in stop):
        raise invalid_param("stop", f"expected at most {MAX_STOP} strings.")
    if get_param(body, "n", (int,), "an integer", 1) != 1:
        raise invalid_param("n", "only n=1 is supported.")
    options = get_param(body, "stream_options", (dict,), "an object", {})
    return Params(max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                  top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
                  seed=get_param(body, "seed", (int,), "an integer"), stop=stop,
                  stream=get_param(body, "stream", (bool,), "a boolean", False),
                  include_usage=get_param(options, "include_usage", (bool,), "a boolean", False))


def parse_messages(body: dict) -> list[dict[str, str]]:
    messages = get_param(body, "messages", (list,), "an array")
    if not messages:
        raise APIError(400, "Missing required parameter: 'messages'.", "messages", "missing_required_parameter")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise invalid_param(f"messages[{i}]", f"expected an object with a role in {sorted(ROLES)}.")
        content = m.get("content") or ""
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise invalid_param(f"messages[{i}].content", "expected a string or an array of text parts.")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


def parse_prompt(body: dict, tokenizer: Any, vocab_size: int) -> list[int]:
    prompt = get_param(body, "prompt", (str, list), "a string or an array of token ids")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        prompt = tokenizer.encode(prompt)
    elif not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in prompt or [None]):
        raise invalid_param("prompt", f"expected a string, one string in an array, or token ids in [0, {vocab_size}).")
    if not prompt:
        raise invalid_param("prompt", "it encodes to no tokens.")
    return list(prompt)
