"""The binary foreground segmenter whose masks drive predicted-mask early / late masking.

    bgjax train --config segmenter.py --workdir runs/seg
    bgjax train --config segmenter.py:dataset=cub,arch=convnext,size=tiny \
        --config.data.root=/data/CUB_200_2011 --config.model.init=convnext_tiny.safetensors \
        --workdir runs/seg_cub
    # then a classifier at the same image size uses its masks:
    bgjax train --config synthetic.py:strategy=early --config.mask_source=runs/seg ...

dataset: synthetic (default) | cub (segmentations binarised at > 0, as for the masking paper's
         segmenter, docs/reference.md#masking-strategies) | in9 (trains on the IN-9 subset of
         `bgjax prepare in9l`'s GrabCut masks, evaluates on the released IN-9 masks; set
         data.data_dir and eval.data.root)
arch:    convnext | vit (the encoder family; the decoder is `bgjax.models.segmenter.Decoder`)
size:    synthetic: tiny (tests: 32 px, ~150 steps) | small (64 px, default) | base.
         cub / in9 (224 px): tiny | small | base | large, the timm model of that size.
encoder: any `bgjax.models` name, overriding arch/size's choice (with config.model.init, a
         timm-format .safetensors of that encoder, e.g. from `bgjax convert`).
frozen:  train only the decoder.
"""

from bgjax import config_utils

# Synthetic: encoder overrides per size (small widths: a 2-core CPU; widths divisible by 4 so
# FSDP over up to 4 devices shards them) and (image size, batch, steps, lr, decoder widths).
_SYNTHETIC_ENCODERS = {
    "convnext": {
        "tiny": dict(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64)),
        "small": dict(depths=(1, 1, 2, 1), dims=(32, 64, 128, 256)),
        "base": dict(),  # convnext_atto as in timm
    },
    "vit": {
        "tiny": dict(patch_size=4, embed_dim=48, depth=2, num_heads=3),
        "small": dict(patch_size=4, embed_dim=128, depth=4, num_heads=4),
        "base": dict(patch_size=8, embed_dim=192, depth=8, num_heads=3),
    },
}
_SYNTHETIC_RUN = {
    "tiny": dict(image_size=32, batch=32, steps=150, lr=4e-3, decoder=(32, 16)),
    "small": dict(image_size=64, batch=64, steps=400, lr=2e-3, decoder=(64, 16)),
    "base": dict(image_size=64, batch=64, steps=1500, lr=1e-3, decoder=(96, 24)),
}
_REAL_ENCODERS = {
    "convnext": {s: f"convnext_{s}" for s in ("tiny", "small", "base", "large")},
    "vit": {s: f"vit_{s}_patch16_224" for s in ("tiny", "small", "base", "large")},
}
DATASETS = ("synthetic", "cub", "in9")


def _synthetic(c, arg):
    run = _SYNTHETIC_RUN[config_utils.choice("size", arg.size, tuple(_SYNTHETIC_RUN))]
    c.data.name = "synthetic"
    c.data.bg_correlation, c.data.seed = 0.9, 0  # the data's defaults, as synthetic.py says
    c.data.image_size = run["image_size"]
    c.data.num_classes = 4 if arg.size == "tiny" else 9
    c.data.train_size = 500 * c.data.num_classes
    c.data.val_size = 32 * c.data.num_classes
    c.augment = None if arg.size == "tiny" else dict(flip=True)
    c.model.name = "convnext_atto" if arg.arch == "convnext" else "vit_tiny_patch16_224"
    if not arg.encoder:  # a named encoder keeps its own architecture
        c.model.update(_SYNTHETIC_ENCODERS[arg.arch][arg.size])
    c.model.decoder_dim, c.model.refine_dim = run["decoder"]
    c.batch_size = run["batch"]
    c.total_steps = run["steps"]
    c.optimizer.lr = run["lr"]
    c.checkpoint.every_steps = c.eval.every_steps = run["steps"] if arg.size == "tiny" else 100
    c.eval.variants = ("original",) if arg.size == "tiny" else ("original", "mixed_rand")


def _real(c, arg):
    encoders = _REAL_ENCODERS[arg.arch]
    c.model.name = encoders[config_utils.choice("size", arg.size, tuple(encoders))]
    if arg.dataset == "cub":
        # The CUB source binarises the segmentation at > 0 (mask_from="segmentation").
        c.data.update(name="cub", root="", mask_from="segmentation", skip_corrupt=False)
        c.eval.split = "test"
    else:
        c.data.update(name="in9l", data_dir="", subset="in9")
        c.eval.split = "val"
        # the released IN-9 masks
        c.eval.data = dict(name="in9", root="", variant="original", skip_corrupt=False)
    c.data.image_size = 224
    c.augment = dict(flip=True)
    c.model.decoder_dim, c.model.refine_dim = 128, 32
    c.batch_size = 32
    c.total_steps = 6000
    c.optimizer.lr = 1e-4
    c.optimizer.head_keys = ("decoder",)  # a fresh decoder on a pretrained encoder learns faster
    c.optimizer.head_lr_mult = 10.0
    c.optimizer.warmup_steps = 300
    c.checkpoint.every_steps = c.eval.every_steps = 1000


def get_config(arg=None):
    arg = config_utils.parse_arg(
        arg, dataset="synthetic", arch="convnext", size="", encoder="", frozen=False
    )
    config_utils.choice("dataset", arg.dataset, DATASETS)
    config_utils.choice("arch", arg.arch, ("convnext", "vit"))
    arg.size = arg.size or ("small" if arg.dataset == "synthetic" else "tiny")

    c = config_utils.base_config()
    c.task = "segment"
    (_synthetic if arg.dataset == "synthetic" else _real)(c, arg)
    if arg.encoder:
        c.model.name = arg.encoder
    if c.model.name.startswith("vit"):
        c.model.img_size = c.data.image_size
    c.model.masking = "none"  # the segmenter's encoder sees whole images
    c.model.frozen_backbone = arg.frozen
    c.mask_source = "gt"  # a segmenter learns from the annotated masks

    c.loss.dice_weight = 0.5  # BCE + 0.5 * soft Dice
    c.optimizer.warmup_steps = max(1, min(c.optimizer.warmup_steps, c.total_steps // 10))
    c.checkpoint.best_metric = "eval/original/fg_iou"
    c.eval.batch_size = 2 * c.batch_size
    c.log_every_steps = 10
    return c
