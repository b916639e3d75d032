"""The models made from a dense GGUF asset and a committed recipe, and `hobbit moefy`, which makes recipes.

Registers the assets `smolmoe` (SmolLM2-135M + the SmolMoE recipe, a Qwen2-MoE HF folder),
`smolmoe-store` (that folder converted; `hobbit demo` runs it), `codermoe` and `codermoe-store`
(Qwen2.5-Coder-1.5B + the CoderMoE recipe; not part of `hobbit demo`) on top of the fetched ones of
`hobbit.models.assets`; `asset_path` here knows them all. A made asset's cache folder is named by its
recipe's hash, so a new recipe rebuilds it.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import torch

from hobbit.models import moefy
from hobbit.models.assets import ASSETS, Asset, asset_path, register
from hobbit.models.moefy import (CODERMOE_RECIPE, RECIPE, MoefyConfig, apply_recipe, calibrate, dense_model,
                                 load_dense, load_recipe, save_recipe, tie_embeddings, write_checkpoint)
from hobbit.models.moefy_text import SMOL_CALIB, calib_windows, describe
from hobbit.models.moefy_train import distill
from hobbit.store.convert import convert

__all__ = ["ASSETS", "asset_path", "build_from_recipe", "add_moefy_args", "moefy_main"]
SMOLMOE_RECIPE = RECIPE
CODERMOE_PRECISIONS = "bf16,int4,int2"  # expert input widths 1536 and 544: group size 32, Q4_K's own


def recipe_tag(recipe: Path) -> str:
    """The first 12 hex digits of the recipe's sha256 ('norecipe' when it is missing)."""
    if not recipe.is_file():
        return "norecipe"
    return hashlib.sha256(recipe.read_bytes()).hexdigest()[:12]


def build_from_recipe(out_dir: str | Path, source: str, recipe_path: str | Path, progress: bool = True) -> Path:
    """The dense `source` asset (a GGUF) + a recipe, written as a Qwen2-MoE HF folder."""
    sd, cfg, tok, tok_cfg = load_dense(asset_path(source, progress))
    recipe, mc, _ = load_recipe(recipe_path)
    state, config = apply_recipe(sd, cfg, recipe, mc)
    return write_checkpoint(out_dir, state, config, tok, tok_cfg)


def _build(source: str, recipe: Path):
    return lambda dest, progress: build_from_recipe(dest, source, recipe, progress)


def _convert(model: str, precisions: str | None = None):
    kw = {"precisions": precisions} if precisions else {}  # None: convert's default precisions
    return lambda dest, progress: convert(asset_path(model, progress), dest, progress=progress, **kw)


for _asset in (  # store targets end in -qN: bump N when the store format changes
    Asset("smolmoe", "the SmolLM2 GGUF asset + the committed SmolMoE recipe (hobbit.models.moefy)",
          f"smolmoe-{recipe_tag(SMOLMOE_RECIPE)}", _build("smollm2-gguf", SMOLMOE_RECIPE)),
    Asset("smolmoe-store", "the smolmoe asset, converted (experts bf16, int4, int2; dense auto)",
          f"smolmoe-store-{recipe_tag(SMOLMOE_RECIPE)}-q4", _convert("smolmoe")),
    Asset("codermoe", "the qwen-coder-gguf asset + the committed CoderMoE recipe (hobbit.models.moefy)",
          f"codermoe-{recipe_tag(CODERMOE_RECIPE)}", _build("qwen-coder-gguf", CODERMOE_RECIPE)),
    Asset("codermoe-store", f"the codermoe asset, converted (experts {CODERMOE_PRECISIONS}; dense auto)",
          f"codermoe-store-{recipe_tag(CODERMOE_RECIPE)}-q4", _convert("codermoe", CODERMOE_PRECISIONS)),
):
    register(_asset)


# ---------------------------------------------------------------- `hobbit moefy`


def add_moefy_args(p: argparse.ArgumentParser) -> None:
    d = MoefyConfig()
    p.add_argument("src", help="dense Llama or Qwen2: GGUF file or HF folder")
    p.add_argument("out", help="output folder (Qwen2-MoE HF checkpoint)")
    p.add_argument("--experts", type=int, default=d.experts, help="routed experts per layer")
    p.add_argument("--top-k", type=int, default=d.top_k)
    p.add_argument("--shared", type=int, default=d.shared, help="neurons in the always-on shared expert")
    p.add_argument("--tau", type=float, default=d.tau, help="router temperature")
    p.add_argument("--norm-topk", action=argparse.BooleanOptionalAction, default=d.norm,
                   help="renormalize the top-k weights (norm_topk_prob); --no-norm-topk routes as llama.cpp's qwen2moe")
    p.add_argument("--tie", action="store_true", help="tie the embedding to lm_head (see tie_embeddings)")
    p.add_argument("--calib", nargs="+", default=SMOL_CALIB,
                   help="calibration texts: austen:<novel>, wiki, stdlib:<module> or a file, each with optional "
                        "@split and *weight (hobbit.models.moefy_text)")
    p.add_argument("--calib-tokens", type=int, default=32768)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--distill-steps", type=int, default=0, help="end-to-end KL distillation steps (1 window each)")
    p.add_argument("--distill-tokens", type=int, default=65536, help="distillation windows (same texts as --calib)")
    p.add_argument("--lora-rank", type=int, default=0, help="rank of the distilled shared-expert down_proj delta")
    p.add_argument("--lr", type=float, default=1e-3, help="distillation learning rate")
    p.add_argument("--recipe", help="where to write the recipe (default OUT/moefy_recipe.safetensors)")
    p.add_argument("--from-recipe", help="skip calibration: apply this recipe (and distill it further "
                   "with --distill-steps, writing the result to --recipe)")


def moefy_main(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    sd, cfg, tok, tok_cfg = load_dense(args.src)
    stage = dict(src=Path(args.src).name, calib=args.calib, seed=args.seed)
    if args.from_recipe:  # apply it, or distill it further with --distill-steps
        recipe, mc, prov = load_recipe(args.from_recipe)
        history = prov.pop("history", []) + [prov] if args.distill_steps else []
    else:
        if tok is None:
            raise SystemExit("moefy: the source has no tokenizer to read the calibration text with")
        mc = MoefyConfig(experts=args.experts, top_k=args.top_k, shared=args.shared, tau=args.tau,
                         norm=args.norm_topk, tie=args.tie, seed=args.seed)
    if mc.tie:  # the MoE's own embeddings (apply_recipe would tie them too)
        sd, cfg = tie_embeddings(sd, cfg)
    base = dense_model(sd, cfg)  # shares sd's weights
    if not args.from_recipe:
        torch.manual_seed(mc.seed)
        ids = calib_windows(tok, args.calib, args.calib_tokens)
        print(f"moefy: {ids.numel()} calibration tokens from {', '.join(args.calib)}", flush=True)
        recipe, history = calibrate(base, ids, mc), []
        stage.update(calib_tokens=int(ids.numel()), calib_sha256=describe(args.calib), python=sys.version.split()[0],
                     experts=mc.experts, top_k=mc.top_k, shared=mc.shared, tau=mc.tau, norm_topk=mc.norm, tie=mc.tie)
    if args.distill_steps:
        train_ids = calib_windows(tok, args.calib, args.distill_tokens)
        recipe = distill(base, recipe, mc, train_ids, args.distill_steps, args.lr, rank=args.lora_rank, seed=args.seed)
        stage.update(distill_steps=args.distill_steps, distill_tokens=int(train_ids.numel()),
                     lora_rank=args.lora_rank, lr=args.lr)
    if history or not args.from_recipe:
        save_recipe(args.recipe or Path(args.out) / "moefy_recipe.safetensors", recipe, mc,
                    dict(stage, history=history) if history else stage)
    state, config = apply_recipe(sd, cfg, recipe, mc)
    write_checkpoint(args.out, state, config, tok, tok_cfg)
    print(f"moefy: wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":  # python -m hobbit.models.recipes SRC OUT ... (the same as `hobbit moefy`)
    parser = argparse.ArgumentParser(prog="hobbit moefy", description=moefy.__doc__.split("\n")[0])
    add_moefy_args(parser)
    raise SystemExit(moefy_main(parser.parse_args()))
