"""Waterbirds (Sagawa et al.): train on its spurious 95%-correlated split, track worst groups.

    bgjax train --config waterbirds.py:arch=convnext,strategy=early \
        --workdir runs/wb_early --config.data.root=/data/waterbird_complete95_forest2water2

Data: the released folder (`data.root`, metadata.csv) or made on the fly from CUB + Places
(`data.cub_root` + `data.places_root`, see bgjax/data/waterbirds.py); the masks need CUB's
segmentations (`data.cub_root` / `data.segmentations`): without them `bgjax train` / `bgjax eval`
refuse masking with mask_source="gt" and every variant but "original".

arch:      convnext | vit           size: tiny (tests) | small | base
strategy:  none | early | late | attn (ViT)
label:     waterbird (2 classes, the group-DRO task) | species (CUB's 200 classes)
mode:      finetune | frozen

Recipe: the group-DRO ERM baseline fine-tunes an ImageNet ResNet-50 for 300 epochs; here AdamW,
warm-up + cosine, 100 epochs at batch 64, ImageNet weights via config.model.init. total_steps
follows --config.epochs / --config.batch_size (an explicit --config.total_steps wins); warm-up,
checkpoints and evaluations follow total_steps.
Augmentation and evaluation resize are the masking paper's timm recipe (configs/cub.py
PAPER_AUGMENT; 256 + centre crop 224), so CUB- and Waterbirds-trained runs see the same inputs;
group DRO's own scripts used a crop of scale (0.7, 1) and a flip, and evaluated a 256 x 256 warp
then a centre crop 224.
Checkpoints are selected by validation worst-group accuracy, group DRO's protocol: validation
(like test) is balanced within each class only (released counts [467, 466, 133, 133] for
landbird/land, landbird/water, waterbird/land, waterbird/water), so its average accuracy is
dominated by landbirds. Training's periodic evaluation also logs each group's accuracy and the
train-proportion-weighted average; `bgjax eval` reports them on test.
"""

from bgjax import config_utils
from bgjax.configs import cub

WATERBIRDS_TRAIN_IMAGES = 4_795
_MODELS = {
    ("convnext", "small"): "convnext_tiny",
    ("convnext", "base"): "convnext_base",
    ("vit", "small"): "vit_small_patch14_dinov2",
    ("vit", "base"): "vit_base_patch14_dinov2",
}


def get_config(arg=None):
    arg = config_utils.parse_arg(
        arg, arch="convnext", size="small", strategy="none", label="waterbird", mode="finetune"
    )
    config_utils.choice("arch", arg.arch, ("convnext", "vit"))
    config_utils.choice("size", arg.size, ("tiny", "small", "base"))
    strategies = (
        ("none", "early", "late", "attn") if arg.arch == "vit" else ("none", "early", "late")
    )
    config_utils.choice("strategy", arg.strategy, strategies)
    config_utils.choice("label", arg.label, ("waterbird", "species"))
    config_utils.choice("mode", arg.mode, ("finetune", "frozen"))
    frozen = arg.mode == "frozen"

    c = config_utils.base_config()
    c.data.name = "waterbirds"
    c.data.root = ""  # the released folder; or cub_root + places_root to generate
    c.data.cub_root = ""
    c.data.places_root = ""
    c.data.segmentations = ""
    c.data.jpeg_quality = 75  # generated images only: the release's PIL default (0: lossless)
    c.data.label = arg.label
    c.data.image_size = 224
    c.data_workers = 8
    c.augment = cub.PAPER_AUGMENT  # the masking paper's timm recipe (see configs/cub.py)
    c.data.eval_resize = "resize_crop"  # 256 + centre crop 224, as the paper's evaluation
    c.data.interpolation = "bicubic"
    c.eval.split = "val"
    c.data.skip_corrupt = False
    c.model.masking = arg.strategy
    c.model.frozen_backbone = frozen
    c.model.update(config_utils.MODEL_OPTIONS[arg.arch])
    if arg.arch == "vit":
        c.model.head_pool = "cls+gap"  # the masking paper's head, for every strategy
    # Both references (group DRO's ERM, the masking paper's code) decay every parameter and
    # clip no gradients; group DRO's ERM, whose protocol this follows, smooths no labels.
    c.optimizer.update(wd_params="all", clip_norm=0.0)
    c.checkpoint.best_metric = "eval/worst_group_accuracy"  # on c.eval.split, "val"

    if arg.size == "tiny":
        config_utils.set_tiny(c, arg.arch)
        return c

    c.model.name = _MODELS[(arg.arch, arg.size)]
    if arg.arch == "vit":
        c.model.img_size = c.data.image_size  # DINOv2 weights: pos_embed resampled to 224
    c.batch_size = 64
    c.epochs = 30.0 if frozen else 100.0  # the unit: total_steps follows epochs and batch_size
    c.total_steps = config_utils.epochs_to_steps(
        c.get_ref("epochs"), WATERBIRDS_TRAIN_IMAGES, c.get_ref("batch_size")
    )
    total_steps = c.get_ref("total_steps")
    c.optimizer.update(
        lr=1e-3 if frozen else 1e-4,
        wd=1e-2 if frozen else 0.05,
        head_lr_mult=1.0 if frozen else 10.0,
    )
    c.optimizer.warmup_steps = total_steps // 20
    c.checkpoint.every_steps = config_utils.every_nth(total_steps, 20)
    c.eval.every_steps = config_utils.every_nth(total_steps, 20)
    return c
