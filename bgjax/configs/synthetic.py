"""The built-in synthetic dataset (shapes on habitat textures), sized for a 2-core CPU.

    bgjax train --config synthetic.py --workdir runs/syn
    bgjax train --config synthetic.py:arch=vit,strategy=late,size=tiny --workdir runs/t

arch:      convnext | vit | resnet
strategy:  none (baseline) | early | late (masking with ground-truth masks) | mixed_rand
           (train on the Mixed-Rand variant) | attn (ViT: background patches masked in attention)
size:      tiny (tests: 32 px, a few steps) | small (default, the demo's models: 32 px, 400
           steps) | base (64 px, 1500 steps)
frozen:    train only the head (+ what follows a late mask before the last stage / block)
"""

from bgjax import config_utils

# Model widths per size, far below timm's smallest for "small" (the demo's models). ConvNeXt keeps
# its 4x4 patchify stem and the backend's depthwise conv (on the CPU the shifted one: 3x faster per
# step than the grouped conv at 32 px, 3.8x with the late run's stride-2 stem, for ~3 s more
# compilation; BENCHMARKS.md). The ViT uses 8 px patches (a 4x4 token
# grid at 32 px: each token sees a large part of the shape) and a sine-cosine start for its
# position embedding; measured on this data (400 steps, Mixed-Rand training) that took it from
# 0.25 to 0.50 accuracy, where 4 px patches or a GAP head did not help.
# Widths are multiples of 4 so FSDP over up to 4 devices actually shards them.
_CONVNEXT = {
    "small": dict(
        depths=(1, 1, 2, 1),
        dims=(32, 64, 128, 256),
        patch_size=4,
        conv_mlp=False,
    ),
    "base": dict(),  # convnext_atto as in timm
}
# ResNet-18's layout at a quarter of its widths ("base": timm's resnet18); not tuned on this data.
_RESNET = {
    "small": dict(channels=(16, 32, 64, 128), stem_channels=16),
    "base": dict(),
}
_VIT = {
    "small": dict(patch_size=8, embed_dim=128, depth=4, num_heads=4, pos_embed_init="sincos2d"),
    "base": dict(patch_size=8, embed_dim=192, depth=8, num_heads=3, pos_embed_init="sincos2d"),
}
# (image size, classes, batch, steps, eval/checkpoint period, examples per class in train).
# 32 px: the small ConvNeXt learns the shapes far faster than at 64 px (Mixed-Rand training,
# 400 steps: 0.85 vs 0.67 accuracy) and each step is ~3x cheaper.
_RUN = {
    "small": (32, 9, 64, 400, 100, 1000),
    "base": (64, 9, 64, 1500, 250, 1000),
}
STRATEGIES = ("none", "early", "late", "mixed_rand", "attn")


def get_config(arg=None):
    arg = config_utils.parse_arg(arg, arch="convnext", strategy="none", size="small", frozen=False)
    config_utils.choice("arch", arg.arch, ("convnext", "vit", "resnet"))
    config_utils.choice("strategy", arg.strategy, STRATEGIES)
    config_utils.choice("size", arg.size, ("tiny", *_RUN))
    if arg.strategy == "attn" and arg.arch != "vit":
        raise ValueError("strategy=attn (attention masking) needs arch=vit")

    c = config_utils.base_config()
    c.data.name = "synthetic"
    c.data.bg_correlation = 0.9
    c.data.seed = 0  # which images the dataset renders (config.seed: training's randomness)
    c.train_variant = "mixed_rand" if arg.strategy == "mixed_rand" else "original"
    c.model.masking = arg.strategy if arg.strategy in ("early", "late", "attn") else "none"
    c.model.frozen_backbone = arg.frozen
    c.model.update(config_utils.MODEL_OPTIONS[arg.arch])
    # Measured (small, 400 steps, Mixed-Rand training): ConvNeXt 0.60 at 1e-3 vs 0.35 at 2e-3
    # and 0.26 at 3e-3; the ViT fails to take off at 1.5e-3 or above.
    c.optimizer.lr = 1e-3

    if arg.size == "tiny":
        config_utils.set_tiny(c, arg.arch)
        c.data.num_classes, c.data.train_size, c.data.val_size = 4, 64, 32
        return c

    image_size, classes, batch, steps, period, per_class = _RUN[arg.size]
    c.data.image_size = image_size
    c.data.num_classes = classes
    c.data.train_size = per_class * classes
    c.data.val_size = per_class // 5 * classes
    c.augment = dict(flip=True)
    if arg.arch == "convnext":
        c.model.name = "convnext_atto"
        c.model.update(_CONVNEXT[arg.size])
    elif arg.arch == "resnet":
        c.model.name = "resnet18"
        c.model.update(_RESNET[arg.size])
    else:
        c.model.name = "vit_tiny_patch16_224"  # re-sized below; the name picks the family
        c.model.img_size = image_size
        c.model.update(_VIT[arg.size])
    c.batch_size = batch
    c.total_steps = steps
    c.optimizer.warmup_steps = c.get_ref("total_steps") // 10  # follows --config.total_steps
    c.checkpoint.every_steps = period
    c.eval.every_steps = period
    c.eval.batch_size = 2 * batch
    c.eval.variants = ("original", "mixed_rand")
    return c
