r"""The masking paper's scaling grid (Aniraj et al., ICCVW 2023): train on CUB, test on CUB
(all IN-9 variants) and on Waterbirds (the same 200 species, backgrounds swapped); the paper's
setup and recipes: docs/reference.md#masking-strategies.

    bgjax sweep --config sweeps/masking_scaling.py:cub_root=/data/CUB_200_2011,\
waterbirds_root=/data/waterbird_complete95_forest2water2,weights=/data/timm \
        --workdir /shared/runs/masking_scaling --launch print --cluster slurm > jobs.sh
    bgjax aggregate /shared/runs/masking_scaling

Stage 0 trains the foreground segmenter on CUB (segmenter.py:dataset=cub, a ConvNeXt-T encoder,
224 px; the paper's is a Mask2Former Swin-T) and scores it (foreground IoU) on CUB test and
Waterbirds test. Stage 1, the grid: ConvNeXt T/S/B/L and ViT S/B/L (DINOv2, patch 14, 518 px)
x none / early / late masking x `seeds` seeds, 21 runs per seed, each with the recipe of cub.py
for `mode` (finetune | frozen). Masked runs use the segmenter's predicted masks at training and
test time, as the paper does ("{root}/segmenter"; the 518-px ViTs get its masks resized);
`masks=gt` uses CUB's ground-truth masks instead and skips stage 0 (it overstates early
masking's robustness). With `--launch print --cluster slurm` stage 1 waits for stage 0.
weights: a folder of timm-format `<model name>.safetensors` (from `bgjax convert`) to start
from, as the paper does ("" = random init). Waterbirds is read from its release with the CUB
segmentations for masks (waterbirds_root + cub_root), or generated from CUB + Places
(places_root instead of waterbirds_root).
"""

import os

import ml_collections

from bgjax import config_utils

# (point name, cub.py arguments, timm model name): ConvNeXt-T is not one of cub.py's
# sizes, so it is ConvNeXt-S's recipe with the tiny model.
MODELS = (
    ("convnext_t", dict(arch="convnext", size="small"), "convnext_tiny"),
    ("convnext_s", dict(arch="convnext", size="small"), "convnext_small"),
    ("convnext_b", dict(arch="convnext", size="base"), "convnext_base"),
    ("convnext_l", dict(arch="convnext", size="large"), "convnext_large"),
    ("vit_s", dict(arch="vit", size="small"), "vit_small_patch14_dinov2"),
    ("vit_b", dict(arch="vit", size="base"), "vit_base_patch14_dinov2"),
    ("vit_l", dict(arch="vit", size="large"), "vit_large_patch14_dinov2"),
)
STRATEGIES = ("none", "early", "late")
SEGMENTER = "segmenter"  # stage 0's run folder


def _model_point(name: str, arg: dict, model: str, weights: str) -> dict:
    point = {"name": name, "model.name": model, **{f"arg.{k}": v for k, v in arg.items()}}
    if weights:
        point["model.init"] = os.path.join(weights, f"{model}.safetensors")
    return point


def get_config(arg=None):
    arg = config_utils.parse_arg(
        arg,
        mode="finetune",
        seeds=1,
        cub_root="",
        waterbirds_root="",
        places_root="",
        weights="",
        masks="pred",
    )
    config_utils.choice("mode", arg.mode, ("finetune", "frozen"))
    config_utils.choice("masks", arg.masks, ("pred", "gt"))
    predicted = arg.masks == "pred"
    strategies = [
        {"name": s, "arg.strategy": s}
        | ({"mask_source": f"{{root}}/{SEGMENTER}"} if predicted and s != "none" else {})
        for s in STRATEGIES
    ]
    classifiers = dict(
        base="cub.py",
        base_arg=f"mode={arg.mode}",
        overrides=dict(data=dict(root=arg.cub_root)),
        axes=[
            ("model", [_model_point(*m, arg.weights) for m in MODELS]),
            ("strategy", strategies),
            ("seed", list(range(arg.seeds))),
        ],
    )
    waterbirds = dict(
        name="waterbirds",
        label="species",
        root=arg.waterbirds_root,
        cub_root=arg.cub_root,
        places_root=arg.places_root,
    )
    segmenter = dict(
        name=SEGMENTER,
        base="segmenter.py",
        base_arg="dataset=cub,arch=convnext,size=tiny",
        overrides=dict(data=dict(root=arg.cub_root)),
        evals=[  # foreground IoU of its masks on the test images the classifiers are scored on
            dict(name="cub_masks", split="test", variants=["original"]),
            dict(name="waterbirds_masks", split="test", variants=["original"], data=waterbirds),
        ],
    )
    if arg.weights:
        segmenter["overrides"]["model"] = dict(
            init=os.path.join(arg.weights, "convnext_tiny.safetensors")
        )
    c = ml_collections.ConfigDict()
    c.stages = [segmenter, classifiers] if predicted else [classifiers]
    c.evals = [
        dict(name="cub", split="test", variants="all"),
        dict(name="waterbirds", split="test", variants=["original"], data=waterbirds),
    ]
    return c
