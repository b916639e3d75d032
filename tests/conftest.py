"""Shared fixtures: tiny random checkpoints converted into expert stores (made once per session)."""
from __future__ import annotations

import pytest
import torch

from hobbit.store.convert import convert

from tiny import make_tiny_checkpoint

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny Qwen2-MoE (8 experts, top-2, shared expert) HF folder with a tokenizer and chat template."""
    return make_tiny_checkpoint("qwen2_moe", tmp_path_factory.mktemp("ckpt") / "qwen2_moe")


@pytest.fixture(scope="session")
def tiny_store(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint converted at bf16, int8, int4 and int2."""
    return convert(tiny_checkpoint, tmp_path_factory.mktemp("store") / "qwen2_moe",
                   precisions="bf16,int8,int4,int2", progress=False)


@pytest.fixture(scope="session")
def tiny_store_fp32(tiny_checkpoint, tmp_path_factory):
    return convert(tiny_checkpoint, tmp_path_factory.mktemp("store") / "qwen2_moe_fp32",
                   precisions="fp32", progress=False)
