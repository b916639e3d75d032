"""Our tokenizer wrapper against transformers: same ids, same chat-template rendering."""
from __future__ import annotations

import pytest

from hobbit.runtime.tokenizer import TextDeltas, Tokenizer

MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi there! ünïcödé ✓"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"}]


def test_matches_transformers_tiny(tiny_checkpoint):
    from transformers import AutoTokenizer
    ref = AutoTokenizer.from_pretrained(tiny_checkpoint)
    ours = Tokenizer.from_dir(tiny_checkpoint)
    text = "Mixture of experts, ünïcödé ✓ 123"
    assert ours.encode(text) == ref(text)["input_ids"]
    assert ours.apply_chat_template(MESSAGES) == ref.apply_chat_template(MESSAGES, tokenize=False,
                                                                         add_generation_prompt=True)
    assert ours.decode(ours.encode(text)) == text


def test_matches_transformers_smollm2(tmp_path):
    from hobbit.models.assets import AssetError, asset_path
    from hobbit.store.gguf import export_hf
    try:
        gguf = asset_path("smollm2-gguf", progress=False)
    except AssetError as e:
        pytest.skip(f"SmolLM2 GGUF not reachable: {e}")
    from transformers import AutoTokenizer
    out = tmp_path / "hf"
    export_hf(gguf, out, progress=False)
    ours, ref = Tokenizer.from_dir(out), AutoTokenizer.from_pretrained(out)
    assert ours.apply_chat_template(MESSAGES) == ref.apply_chat_template(MESSAGES, tokenize=False,
                                                                         add_generation_prompt=True)
    assert ours.encode_chat(MESSAGES) == ref.apply_chat_template(MESSAGES, add_generation_prompt=True,
                                                                 tokenize=True, return_dict=False)


def test_stream_never_splits_a_character(tiny_checkpoint):
    tok = Tokenizer.from_dir(tiny_checkpoint)
    ids = tok.encode("é✓ ok")
    stream = TextDeltas(tok)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == "é✓ ok"
    assert all("\ufffd" not in p for p in pieces)


def test_missing_template_is_a_clear_error(tiny_checkpoint, tmp_path):
    tok = Tokenizer(tiny_checkpoint / "tokenizer.json", {})
    with pytest.raises(ValueError, match="no chat_template"):
        tok.apply_chat_template(MESSAGES)
