"""moefy on a tiny random Qwen2 (q/k/v biases, untied head): the Qwen2-MoE checkpoint it writes routes as
llama.cpp's qwen2moe (no top-k renormalization), matches transformers, rebuilds bit for bit from its
recipe, and `hobbit export` accepts it as exact. The CoderMoE texts keep the held-out code file out."""

from __future__ import annotations

import argparse
import hashlib
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hobbit.models import moefy, recipes  # noqa: E402
from hobbit.store.convert import convert  # noqa: E402
from hobbit.store.export import export_gguf  # noqa: E402
from hobbit.models.moefy_text import CODER_CALIB, EVAL_TEXTS, stdlib_file  # noqa: E402
from hobbit.models.moefy_train import moe_layers  # noqa: E402
from test_export import with_bpe_merges  # noqa: E402  (llama.cpp needs BPE merges)
from tiny import make_tiny_checkpoint  # noqa: E402

torch.set_num_threads(1)
H = 64


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qwen2")
    src = with_bpe_merges(make_tiny_checkpoint("qwen2", tmp / "dense", tie_word_embeddings=False))
    calib = tmp / "calib.txt"
    calib.write_text(stdlib_file("argparse").read_text()[:40000])  # byte tokens: 40k characters
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(3))
    return tmp, src, calib, ids


def moefy_args(src, out, *extra: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    recipes.add_moefy_args(p)
    return p.parse_args([str(src), str(out), *extra])


def run_moefy(qwen2, name: str, *extra: str):
    tmp, src, calib, _ = qwen2
    args = moefy_args(src, tmp / name, "--experts", "4", "--top-k", "2", "--shared", "16", "--no-norm-topk", "--tie",
                      "--calib", str(calib), "--calib-tokens", "2048", *extra)
    assert recipes.moefy_main(args) == 0
    return tmp / name


def test_dense_qwen2_forward_matches_transformers(qwen2):
    _, src, _, ids = qwen2
    sd, cfg, _, _ = moefy.load_dense(src)
    assert "model.layers.0.self_attn.q_proj.bias" in sd
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = moefy.dense_model(sd, cfg)
        torch.testing.assert_close(ours.head(ours.windows(ids)), model(ids).logits, atol=1e-4, rtol=1e-4)


def test_moefied_qwen2_matches_transformers_and_exports_exactly(qwen2):
    tmp, src, _, ids = qwen2
    out = run_moefy(qwen2, "moe")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["norm_topk_prob"] is False and cfg["tie_word_embeddings"] is True
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    assert model.model.layers[0].mlp.shared_expert_gate.weight.ne(0).all()  # llama.cpp: sigmoid(z) = silu(z) / z
    sd, dcfg, _, _ = moefy.load_dense(src)
    recipe, mc, prov = moefy.load_recipe(out / "moefy_recipe.safetensors")
    assert (mc.norm, mc.tie, prov["norm_topk"]) == (False, True, False)
    torch.testing.assert_close(model.get_input_embeddings().weight, sd["lm_head.weight"].to(torch.bfloat16).float())
    assert torch.equal(model.model.layers[1].self_attn.k_proj.bias,
                       sd["model.layers.1.self_attn.k_proj.bias"].to(torch.bfloat16).float())
    md = moefy.dense_model(sd, dcfg)  # our reference forward on the bf16 tensors
    layers = moe_layers(md, recipe, mc)
    for p in md.parameters():
        p.data = p.data.to(torch.bfloat16).float()
    layers = [{k: v.to(torch.bfloat16).float() for k, v in m.items()} for m in layers]
    mlp = lambda l, x: moefy.moe_forward(layers[l], x.reshape(-1, H), 2, norm=False).view_as(x)  # noqa: E731
    ours = md.head(md.windows(ids, mlp))
    with torch.no_grad():
        torch.testing.assert_close(ours, model(ids).logits, atol=2e-4, rtol=1e-4)
    store = convert(out, tmp / "store", precisions=["bf16"], progress=False)
    assert export_gguf(store, tmp / "moe.gguf", "bf16", progress=False).is_file()  # no --allow-inexact needed


def test_recipe_rebuild_is_deterministic(qwen2):
    tmp, src, calib, _ = qwen2
    out = run_moefy(qwen2, "a", "--recipe", str(tmp / "a.safetensors"))
    again = run_moefy(qwen2, "b", "--recipe", str(tmp / "b.safetensors"))
    (ra, mca, pa), (rb, mcb, pb) = (moefy.load_recipe(tmp / f"{n}.safetensors") for n in "ab")
    assert (mca, pa) == (mcb, pb) and ra.keys() == rb.keys()  # calibration itself is deterministic
    assert all(torch.equal(ra[k], rb[k]) for k in ra)  # (its bytes are not: safetensors orders metadata freely)
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    rebuilt = tmp / "rebuilt"
    assert recipes.moefy_main(moefy_args(src, rebuilt, "--from-recipe", str(tmp / "a.safetensors"))) == 0
    for name in ("model.safetensors", "config.json"):
        assert digest(out / name) == digest(rebuilt / name) == digest(again / name)


def test_coder_texts_hold_out_the_evaluated_code():
    held_out = {spec for spec, _, _ in EVAL_TEXTS["codermoe"].values()}
    assert held_out == {"stdlib:difflib", "wiki"}
    assert "stdlib:difflib" not in CODER_CALIB and "wiki@train" in CODER_CALIB[-1]  # wiki: train split only
    assert all(stdlib_file(s[7:]).is_file() for s in CODER_CALIB if s.startswith("stdlib:"))


def test_expert_gate_up_rows_keep_the_gguf_grid():
    from types import SimpleNamespace

    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize, quantize

    from hobbit.store import quant
    from hobbit.models.moefy_native import recipe_native_w13
    rng = np.random.default_rng(0)
    mc = moefy.MoefyConfig(experts=4, shared=32)
    perm = torch.randperm(160, generator=torch.Generator().manual_seed(0)).to(torch.int16)  # 32 shared + 4 x 32
    w = {p: (rng.standard_normal((160, 64)) * 0.02).astype(np.float32) for p in ("gate", "up")}
    raw = {f"blk.0.ffn_{p}.weight": SimpleNamespace(data=quantize(w[p], Q.Q4_1), tensor_type=Q.Q4_1) for p in w}
    parts = recipe_native_w13(raw, {"layers.0.perm": perm}, mc)(0, 2)
    rows = perm[32 + 2 * 32:32 + 3 * 32].long().numpy()
    ref = np.concatenate([dequantize(raw[f"blk.0.ffn_{p}.weight"].data, Q.Q4_1)[rows] for p in ("gate", "up")])
    got = quant.dequantize(parts, "int4", (64, 64), 32).numpy()
    assert np.abs(got - ref).max() < 0.004 * np.abs(ref).max()  # bf16 rounding of scale and zero only
    raw["blk.0.ffn_up.weight"].tensor_type = Q.Q6_K
    assert recipe_native_w13(raw, {"layers.0.perm": perm}, mc)(0, 2) is None


def test_committed_codermoe_recipe_has_the_issue_shape():
    from hobbit.models.recipes import ASSETS
    from hobbit.models.moefy import CODERMOE_RECIPE
    assert {"codermoe", "codermoe-store"} <= ASSETS.keys()
    assert CODERMOE_RECIPE.stat().st_size < 4e6
    recipe, mc, prov = moefy.load_recipe(CODERMOE_RECIPE)
    assert (mc.norm, mc.tie, mc.experts, mc.top_k, mc.shared) == (False, True, 16, 8, 256)  # exact in llama.cpp
    assert "stdlib:difflib" not in prov["calib"]
    H, F, L, V = 1536, 8960, 28, 151936
    for l in range(L):
        assert sorted(recipe[f"layers.{l}.perm"].long().tolist()) == list(range(F))
        assert recipe[f"layers.{l}.shared_gate"].ne(0).all()  # llama.cpp's silu(z) / z is NaN at z = 0
    I = (F - mc.shared) // mc.experts
    expert = 3 * H * I * 2                                     # bf16 bytes of one routed expert
    attn = (2 * H * H + 2 * 256 * H + H + 2 * 256 + 2 * H) * 2  # q, k, v, o (+ biases, norms)
    rest = L * (attn + 3 * H * mc.shared * 2 + (mc.experts + 1) * H * 2) + V * H * 2 + H * 2
    assert expert >= 2.5e6 and L * mc.experts * expert / (L * mc.experts * expert + rest) >= 0.70
