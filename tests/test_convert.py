"""hobbit convert → hobbit.load matches transformers for every family (fp32, within 1e-4)."""
from __future__ import annotations

import json

import pytest
import torch

import hobbit
from hobbit.cli import main as cli_main
from hobbit.store.config import UnsupportedArchitecture
from hobbit.store.convert import convert
from hobbit.store.format import ExpertStore

from tiny import make_tiny_checkpoint

FAMILIES = ["llama", "qwen2", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe",
            "gpt_oss", "granitemoe", "phimoe"]
PROMPT = [5, 9, 23, 101, 77, 3, 150, 42, 8, 19, 60, 2]


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_store_matches_transformers(family, tmp_path):
    from transformers import AutoModelForCausalLM
    ckpt = make_tiny_checkpoint(family, tmp_path / "hf")
    assert cli_main(["convert", str(ckpt), str(tmp_path / "store"), "--precisions", "fp32", "--dense", "fp32"]) == 0
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager").eval()
    eng = hobbit.load(tmp_path / "store", dtype="fp32", policy="resident")
    with torch.inference_mode():
        ref = hf(torch.tensor([PROMPT])).logits[0]
    ours = eng.logits(PROMPT)
    assert (ours - ref).abs().max().item() < 1e-4
    # 8 greedy decode steps through the KV cache
    with torch.inference_mode():
        ref_ids = hf.generate(torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
    got = eng.generate(PROMPT, max_new_tokens=8, stop_token_ids=[])
    assert got.token_ids == ref_ids
    with torch.inference_mode():
        seq = PROMPT + ref_ids
        ref_all = hf(torch.tensor([seq])).logits[0]
    seq = eng.sequence()
    with torch.inference_mode():
        seq.step(torch.tensor(PROMPT))
        for i, tok in enumerate(ref_ids[:-1]):
            step = seq.step(torch.tensor([tok]))[-1]
            assert (step - ref_all[len(PROMPT) + i]).abs().max().item() < 1e-4
    eng.close()


def test_store_layout(tiny_store):
    store = ExpertStore(tiny_store)
    m = store.manifest
    assert m["precisions"] == ["bf16", "int8", "int4", "int2"]
    cfg = m["config"]
    assert len(store.blobs) == len(cfg["sparse_layers"]) * cfg["num_experts"] * 4
    for b in store.blobs.values():
        assert b.offset % 4096 == 0 and b.checksum.startswith("xxh3:")
    sizes = {p: store.expert_nbytes(p) for p in m["precisions"]}
    assert sizes["bf16"] > sizes["int8"] > sizes["int4"] > sizes["int2"]
    assert (tiny_store / "tokenizer.json").is_file() and (tiny_store / "dense.safetensors").is_file()
    parts = store.read(cfg["sparse_layers"][0], 0, "bf16")
    assert parts["w13"]["w"].shape == (2 * cfg["moe_intermediate_size"], cfg["hidden_size"])
    store.close()


def test_unsupported_architecture(tmp_path):
    ckpt = make_tiny_checkpoint("llama", tmp_path / "hf")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["FancyMoeForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitecture, match="FancyMoeForCausalLM.*Mixtral"):
        convert(ckpt, tmp_path / "store", progress=False)


def test_bad_precision(tmp_path, tiny_checkpoint):
    with pytest.raises(ValueError, match="unknown precision"):
        convert(tiny_checkpoint, tmp_path / "s", precisions="bf16,int5", progress=False)
