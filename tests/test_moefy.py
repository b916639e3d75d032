"""moefy on a tiny dense Llama made by transformers: shapes, determinism, parity with transformers."""

import argparse

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hobbit.models import moefy, recipes  # noqa: E402
from hobbit.models.moefy_train import distill, moe_layers, oracle_forward  # noqa: E402

MC = moefy.MoefyConfig(experts=4, top_k=2, shared=16, tau=0.5, router_epochs=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-5, rope_theta=1e4, tie_word_embeddings=True)
    d = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    sd, hf_cfg, _, _ = moefy.load_dense(d)
    ids = torch.randint(0, 96, (6, 32), generator=torch.Generator().manual_seed(1))
    return d, sd, hf_cfg, ids


def test_recipe_shapes_and_determinism(tiny):
    _, sd, cfg, ids = tiny
    r1 = moefy.calibrate(moefy.dense_model(sd, cfg), ids, MC, log=lambda s: None)
    r2 = moefy.calibrate(moefy.dense_model(sd, cfg), ids, MC, log=lambda s: None)
    assert r1.keys() == r2.keys() and all(torch.equal(r1[k], r2[k]) for k in r1)
    for l in range(2):
        perm = r1[f"layers.{l}.perm"].long()
        assert sorted(perm.tolist()) == list(range(64))  # a partition of the neurons
        assert r1[f"layers.{l}.router"].shape == (4, 32) and r1[f"layers.{l}.scale"].shape == (5,)
    mlp = moefy.dense_model(sd, cfg).layers[0].mlp
    m = moefy.moe_layer(*moefy.mlp_weights(mlp), moefy.layer_recipe(r1, 0), MC.shared)
    assert m["gate_proj"].shape == (4, 12, 32) and m["down_proj"].shape == (4, 32, 12)
    assert m["shared_up_proj"].shape == (16, 32)


def test_oracle_forward_with_every_expert_is_the_dense_mlp(tiny):
    _, sd, cfg, ids = tiny
    dense = moefy.dense_model(sd, cfg)
    recipe = moefy.calibrate(dense, ids, MC, log=lambda s: None)
    r = moefy.layer_recipe(recipe, 1)
    mlp = dense.layers[1].mlp
    m = moefy.moe_layer(*moefy.mlp_weights(mlp), r, MC.shared)
    x = torch.randn(8, 32)
    torch.testing.assert_close(oracle_forward(m, r["scale"], x, MC.experts), mlp(x), atol=1e-5, rtol=1e-4)
    drop = (oracle_forward(m, r["scale"], x, 2) - mlp(x)).norm()
    assert 0 < drop < (oracle_forward(m, r["scale"], x, 1) - mlp(x)).norm()


def test_checkpoint_matches_transformers(tiny, tmp_path):
    d, sd, cfg, ids = tiny
    out = tmp_path / "moe"
    parser = argparse.ArgumentParser()
    recipes.add_moefy_args(parser)
    args = parser.parse_args([str(d), str(out), "--recipe", str(tmp_path / "r.safetensors")])
    recipe = moefy.calibrate(moefy.dense_model(sd, cfg), ids, MC, log=lambda s: None)
    recipe = distill(moefy.dense_model(sd, cfg), recipe, MC, ids, steps=3, rank=2, log=lambda s: None)
    assert {"layers.0.ffn_norm", "layers.0.lora_a", "layers.1.lora_b"} <= recipe.keys()
    moefy.save_recipe(args.recipe, recipe, MC, {"test": True})
    args.from_recipe = args.recipe
    assert recipes.moefy_main(args) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    # our reference forward on the checkpoint's bf16 tensors
    state, _ = moefy.apply_recipe(sd, cfg, recipe, MC)
    md = moefy.dense_model(sd, cfg)
    layers = moe_layers(md, recipe, MC)
    for p in md.parameters():
        p.data = p.data.to(torch.bfloat16).float()  # a new tensor: sd's, which md shares, stay as they are
    layers = [{k: v.to(torch.bfloat16).float() for k, v in m.items()} for m in layers]
    shared_down = state["model.layers.1.mlp.shared_expert.down_proj.weight"].float()
    assert torch.equal(shared_down, layers[1]["shared_down_proj"])
    mlp = lambda l, x: moefy.moe_forward(layers[l], x.reshape(-1, 32), MC.top_k).view_as(x)  # noqa: E731
    ours = md.head(md.windows(ids[:2], mlp))
    with torch.no_grad():
        theirs = model(ids[:2]).logits
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-4)


def test_routing_stats_refuse_top1_before_loading_anything(capsys):
    from hobbit.models.moefy_train import main
    with pytest.raises(SystemExit) as e:
        main(["--src", "/nonexistent.gguf", "--top-k", "4", "1"])
    assert e.value.code == 2 and "need k >= 2" in capsys.readouterr().err
