r"""`bgjax demo`'s runs: both papers' strategies for a small ConvNeXt and a small ViT on the
built-in synthetic dataset (synthetic.py's `size=small` models), sized for a 2-core CPU.

    bgjax demo                                                  # runs this sweep, then checks
    bgjax sweep --config sweeps/demo.py:quick=True --workdir runs/demo_quick   # the runs only

Stage 0 trains a tiny segmenter (segmenter.py); then one stage per arch trains

    baseline     plain training on the original images
    mixed_rand   training on MIXED_RAND (the foreground on a random image's background; paper 1)
    early        background pixels black before the network, ground-truth masks  (paper 2)
    early_pred   the same with the segmenter's masks ("{root}/segmenter")
    late         features masked after ConvNeXt stage 3 / the ViT's last block   (paper 2);
                 on a 4x4 grid for both (the ConvNeXt's late run: a stride-2 stem)

and evaluates them on the IID test split under all eight variants and on the balanced split
(habitat independent of the class). quick: the ConvNeXt half, no segmenter, half the IID images
(~5 min; CI's end-to-end test).
"""

import ml_collections

from bgjax import config_utils

IMAGE_SIZE, NUM_CLASSES, BG_CORRELATION, PER_CLASS, BATCH = 32, 9, 0.9, 1000, 64
# Classifier steps per arch: the ViT's steps are cheaper (16 tokens) and it needs more of them
# to learn the shapes; the segmenter needs few.
STEPS = {"convnext": 400, "vit": 800}
SEGMENTER_STEPS = 200
IID_SIZE, OOD_SIZE = 900, 1620  # test images (IID: each under 8 variants; OOD: 81 groups)


def schedule(steps: int) -> dict:
    """Overrides for a run of `steps` steps: warm-up 10%, one checkpoint half way (an interrupted
    run resumes) and one at the end, logs every 10%."""
    return {
        "total_steps": steps,
        "optimizer.warmup_steps": max(1, steps // 10),
        "checkpoint.every_steps": max(1, steps // 2),
        "log_every_steps": max(1, steps // 10),
    }


def common_overrides() -> ml_collections.ConfigDict:
    """Data, batch and checkpointing shared by every demo run; no evaluation during training
    (the demo evaluates after)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = dict(
        image_size=IMAGE_SIZE,
        num_classes=NUM_CLASSES,
        bg_correlation=BG_CORRELATION,
        train_size=PER_CLASS * NUM_CLASSES,
        seed=0,
    )
    c.batch_size = BATCH
    c.checkpoint = dict(keep=1, keep_best=0)
    c.eval = dict(every_steps=0, batch_size=2 * BATCH)
    return c


STRATEGIES = {  # demo name -> synthetic.py's strategy (+ masks from the segmenter)
    "baseline": {"arg.strategy": "none"},
    "mixed_rand": {"arg.strategy": "mixed_rand"},
    "early": {"arg.strategy": "early"},
    "early_pred": {"arg.strategy": "early", "mask_source": "{root}/segmenter"},
    "late": {"arg.strategy": "late"},
}


# Late masking needs a feature grid that can outline the object: at 32 px the small ConvNeXt's
# stage-3 map is 2x2 with its stride-4 stem, so its late run uses a stride-2 stem (4x4 after
# stage 3, like the ViT's 4x4 token grid). (A stride-2 stem costs ~4x the FLOPs; only this run.)
ARCH_STRATEGY_OVERRIDES = {("convnext", "late"): {"model.patch_size": 2}}


def classifier_stage(arch: str, strategies) -> dict:
    """One arch's runs: synthetic.py's small model under each strategy."""
    points = [
        {"name": s, **STRATEGIES[s], **ARCH_STRATEGY_OVERRIDES.get((arch, s), {})}
        for s in strategies
    ]
    return dict(
        base="synthetic.py",
        base_arg="size=small",
        overrides=common_overrides(),
        axes=[
            ("arch", [{"name": arch, "arg.arch": arch, **schedule(STEPS[arch])}]),
            ("strategy", points),
        ],
    )


def get_config(arg=None):
    arg = config_utils.parse_arg(arg, quick=False)
    archs = ("convnext",) if arg.quick else tuple(STEPS)
    strategies = [s for s in STRATEGIES if not (arg.quick and s == "early_pred")]
    segmenter = dict(  # the smallest encoder: saturated objects on muted textures are easy
        name="segmenter",
        base="segmenter.py",
        base_arg="arch=convnext,size=tiny",
        overrides=config_utils.apply_overrides(
            common_overrides(), schedule(SEGMENTER_STEPS), allow_new=True
        ),
        evals=[],
    )
    c = ml_collections.ConfigDict()
    c.stages = ([] if arg.quick else [segmenter]) + [classifier_stage(a, strategies) for a in archs]
    c.evals = [
        dict(name="iid", split="test_iid", variants="all",
             data=dict(test_size=IID_SIZE // 2 if arg.quick else IID_SIZE)),
        dict(name="ood", split="test_balanced", variants=["original"],
             data=dict(test_size=OOD_SIZE)),
    ]  # fmt: skip
    return c
