"""CUB-200-2011, the masking paper's recipes (Aniraj et al., "Masking Strategies for Background
Bias Removal in Computer Vision Models", ICCVW 2023; docs/reference.md#masking-strategies).

    bgjax convert vit_base_patch14_dinov2 ...     # timm weights -> .safetensors, once
    bgjax train --config cub.py:arch=vit,size=base,strategy=early,mode=frozen \
        --workdir runs/cub_vitb_early_frozen --config.data.root=/data/CUB_200_2011 \
        --config.model.init=weights/vit_base_patch14_dinov2.safetensors

arch:      convnext (ConvNeXt S/B/L, 224 px) | vit (DINOv2 ViT-S/B/L patch 14, 518 px)
size:      tiny (tests) | small | base | large
strategy:  none | early (background pixels black before the network, and before mixup /
           cutmix) | late (features masked after ConvNeXt stage 3 / the last ViT block; set
           model.late_stage=4 / model.late_block=-2 for the other position) | attn (ViT:
           background keys masked)
mode:      finetune | frozen (linear head; masked before the last ConvNeXt stage / ViT block,
           that stage / block and the norms after the mask train too, as in the paper's code)

The paper's released code (timm training-script conventions), for every strategy alike: AdamW
with weight decay on every parameter, cosine schedule, no gradient clipping, label smoothing 0.1
(frozen runs too), ViT head linear on [CLS ‖ mean of patch tokens]; the head, and what a late
mask before the last stage / block makes retrain, learn at the boosted rate. ViT fine-tune: lr
4e-6 with head x1000, wd 0.05, 300 epochs (20 warm-up), cosine to 1e-8, drop-path 0.1, mixup 0.8
/ cutmix 1.0. Frozen: lr 1e-3, wd 1e-2, 90 epochs, cosine to 1e-6. ConvNeXt fine-tune (the
script's defaults): 224 px, lr 1e-3, wd 0.01, 28 epochs, head x100, cosine to 1e-6, no warm-up,
no drop-path. Epochs are the unit: total_steps = epochs x 5,994 / batch_size and warmup_steps
(optimizer.warmup_epochs) follow --config.epochs / --config.batch_size overrides; checkpoints and
evaluations come 30 times a run; an explicit --config.total_steps wins. The paper starts from
ImageNet / DINOv2 weights: set config.model.init (random init otherwise). Masks: the CUB ground
truth (mask_source="gt"); the paper uses a segmenter's.
Augmentation (timm's create_transform, mask-aware): PAPER_AUGMENT below; evaluation at 224 px
resizes the shorter side to 256 (bicubic) and centre-crops 224, at 518 px resizes the whole image.
README ("the paper's recipe vs configs/cub.py") lists what differs and why.
"""

from bgjax import config_utils

CUB_TRAIN_IMAGES = 5_994
# The paper's training augmentation, timm's create_transform (bgjax.data.augment, mask-aware).
# Colour jitter is off because timm turns it off when RandAugment is on.
PAPER_AUGMENT = dict(
    random_resized_crop=dict(scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation="bicubic"),
    flip=True,
    rand_augment="rand-m9-mstd0.5-inc1",
    random_erasing=dict(prob=0.25, mode="pixel"),
)
_SIZES = ("small", "base", "large")


def _recipe(arch: str, frozen: bool) -> dict:
    """(lr, wd, epochs, warm-up epochs, head lr multiplier, final lr, drop-path) of the paper."""
    if frozen:
        return dict(lr=1e-3, wd=1e-2, epochs=90, warmup=0, head_lr_mult=1.0, min_lr=1e-6, dp=0.0)
    if arch == "vit":
        return dict(
            lr=4e-6, wd=0.05, epochs=300, warmup=20, head_lr_mult=1000.0, min_lr=1e-8, dp=0.1
        )
    return dict(lr=1e-3, wd=0.01, epochs=28, warmup=0, head_lr_mult=100.0, min_lr=1e-6, dp=0.0)


def get_config(arg=None):
    arg = config_utils.parse_arg(
        arg, arch="vit", size="base", strategy="none", mode="finetune", batch_size=64
    )
    config_utils.choice("arch", arg.arch, ("convnext", "vit"))
    config_utils.choice("size", arg.size, ("tiny", *_SIZES))
    config_utils.choice("mode", arg.mode, ("finetune", "frozen"))
    strategies = (
        ("none", "early", "late", "attn") if arg.arch == "vit" else ("none", "early", "late")
    )
    config_utils.choice("strategy", arg.strategy, strategies)
    frozen = arg.mode == "frozen"

    c = config_utils.base_config()
    c.data.name = "cub"
    c.data.root = ""  # CUB_200_2011/ (or its parent)
    c.data.segmentations = ""  # default: <root>/segmentations or next to CUB_200_2011/
    c.data.image_size = 518 if arg.arch == "vit" else 224
    c.data_workers = 8
    c.augment = PAPER_AUGMENT
    # timm's eval transform: 256 + centre crop 224 for ConvNeXt; a plain resize at 518 (ViT).
    c.data.eval_resize = "resize_crop" if c.data.image_size == 224 else "warp"
    c.data.interpolation = "bicubic"
    c.eval.split = "test"  # CUB has no validation split
    c.data.skip_corrupt = False
    c.model.masking = arg.strategy
    c.model.frozen_backbone = frozen
    c.model.update(config_utils.MODEL_OPTIONS[arg.arch])
    if arg.arch == "vit":
        c.model.head_pool = "cls+gap"  # the paper's head for every strategy
    c.optimizer.update(wd_params="all", clip_norm=0.0)
    c.loss.label_smoothing = 0.1

    if arg.size == "tiny":
        config_utils.set_tiny(c, arg.arch)
        return c

    if arg.arch == "vit":
        c.model.name = f"vit_{arg.size}_patch14_dinov2"
        c.model.img_size = c.data.image_size
    else:
        c.model.name = f"convnext_{arg.size}"
    recipe = _recipe(arg.arch, frozen)
    # The recipe is in epochs: the steps follow --config.batch_size / epochs given later.
    c.batch_size = arg.batch_size
    c.epochs = float(recipe["epochs"])
    c.optimizer.warmup_epochs = float(recipe["warmup"])
    batch_size = c.get_ref("batch_size")
    c.total_steps = config_utils.epochs_to_steps(c.get_ref("epochs"), CUB_TRAIN_IMAGES, batch_size)
    c.optimizer.warmup_steps = config_utils.epochs_to_steps(
        c.optimizer.get_ref("warmup_epochs"), CUB_TRAIN_IMAGES, batch_size
    )
    c.optimizer.update(
        lr=recipe["lr"],
        wd=recipe["wd"],
        head_lr_mult=recipe["head_lr_mult"],
        min_lr_ratio=recipe["min_lr"] / recipe["lr"],
    )
    c.model.drop_path_rate = recipe["dp"]
    if not frozen and arg.arch == "vit":
        c.loss.mixup_alpha, c.loss.cutmix_alpha = 0.8, 1.0
    c.checkpoint.every_steps = config_utils.every_nth(c.get_ref("total_steps"), 30)
    c.eval.every_steps = config_utils.every_nth(c.get_ref("total_steps"), 30)
    c.checkpoint.best_metric = "eval/original/accuracy"
    return c
