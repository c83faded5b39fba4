"""Train on ImageNet-9 / IN-9L, or on any of its background variants ("Noise or Signal").

    bgjax prepare in9l ...            # once: GrabCut masks + crops as a TFDS dataset
    bgjax train --config in9.py:variant=mixed_rand --workdir runs/in9_mixed_rand \
        --config.data.data_dir=/data/tfds --config.eval.data.root=/data/bg_challenge

arch:     convnext | vit | resnet   (resnet: small ResNet-50, the paper's model; base WRN-50-2)
size:     tiny (tests) | small | base
subset:   in9l (every qualifying image) | in9 (the class-balanced subset)
variant:  the training variant, composited on the fly from (image, mask): original, only_bg_t,
          only_fg, mixed_rand, ... (bgjax.variants.VARIANTS)
masking:  none | early | late   (with the GrabCut masks)

Evaluation: the released IN-9 test set (`bg_challenge/`, data "in9", split "val") under
original / mixed_same / mixed_rand (the BG-gap) during training; `bgjax eval` does the rest.
Recipe: the paper trains ResNet-50 from scratch on IN-9L; here AdamW + warm-up + cosine, the
usual ImageNet augmentation and label smoothing, 30k steps at batch 256 (scale total_steps to
the number of images `bgjax prepare` kept).
"""

from bgjax import config_utils, variants

# IN-9 normalisation (docs/reference.md#in9-normalisation) comes with the source's DatasetInfo.
_MODELS = {
    ("convnext", "small"): dict(name="convnext_tiny", drop_path_rate=0.1),
    ("convnext", "base"): dict(name="convnext_small", drop_path_rate=0.2),
    ("resnet", "small"): dict(name="resnet50"),
    ("resnet", "base"): dict(name="wide_resnet50_2"),
    ("vit", "small"): dict(name="vit_small_patch16_224", drop_path_rate=0.1),
    ("vit", "base"): dict(name="vit_base_patch16_224", drop_path_rate=0.2),
}


def get_config(arg=None):
    arg = config_utils.parse_arg(
        arg, arch="convnext", size="small", subset="in9l", variant="original", masking="none"
    )
    config_utils.choice("arch", arg.arch, ("convnext", "vit", "resnet"))
    config_utils.choice("size", arg.size, ("tiny", "small", "base"))
    config_utils.choice("subset", arg.subset, ("in9l", "in9"))
    config_utils.choice("variant", arg.variant, variants.VARIANTS)
    config_utils.choice("masking", arg.masking, ("none", "early", "late"))

    c = config_utils.base_config()
    c.data.name = "in9l"
    c.data.data_dir = ""  # where `bgjax prepare in9l` wrote the TFDS dataset
    c.data.subset = arg.subset
    c.data.image_size = 224
    c.data_workers = 8
    c.train_variant = arg.variant
    c.augment = dict(random_resized_crop=dict(scale=(0.35, 1.0)), flip=True, color_jitter=0.4)
    c.eval.data = dict(name="in9", root="", skip_corrupt=False)  # the bg_challenge release
    c.eval.split = "val"
    c.eval.variants = ("original", "mixed_same", "mixed_rand")
    c.checkpoint.best_metric = "eval/original/accuracy"

    if arg.size == "tiny":
        config_utils.set_tiny(c, arg.arch)
    else:
        c.model.update(_MODELS[(arg.arch, arg.size)])
        c.batch_size = 256
        c.total_steps = 30_000
        c.optimizer.update(lr=1e-3, wd=0.05)
        c.optimizer.warmup_steps = c.get_ref("total_steps") // 20  # follows --config.total_steps
        c.loss.label_smoothing = 0.1
        c.checkpoint.every_steps = 1000
        c.eval.every_steps = 1000
    c.model.masking = arg.masking
    c.model.update(config_utils.MODEL_OPTIONS[arg.arch])
    return c
