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

baselines: the ConvNeXt half without the segmenter (as quick, but the full IID set unless quick
is also given) plus the field's group-robustness baselines next to `baseline` (ERM), at the
demo's settings and with the literature's default hyperparameters, not tuned on this data:

    group_balanced  every label x habitat group equally often per epoch (`data.sampling`)
    group_dro       Group DRO (Sagawa et al., ICLR 2020) as the authors' published commands
                    run it (kohpangwei/group_DRO: `--reweight_groups --robust`): group-balanced
                    sampling, step size eta 0.01, no generalisation adjustment
    jtt             Just Train Twice (Liu et al., ICML 2021): the training images that an ERM
                    run of T = 200 steps (half the demo's; stage 0, "convnext-jtt_identify",
                    not evaluated) gets wrong, repeated lambda_up = 20 times per epoch
    dfr             Deep Feature Reweighting (Kirichenko et al., ICLR 2023) of the ERM run:
                    `dfr` below, done by `bgjax demo` after training (`bgjax.dfr`, its C grid
                    tuned on half of the balanced validation split); `bgjax sweep` trains the
                    other runs only

The baselines comparison is `bgjax demo --baselines`; `bgjax.findings` reports each against ERM.
"""

import ml_collections

from bgjax import config_utils

IMAGE_SIZE, NUM_CLASSES, BG_CORRELATION, PER_CLASS, BATCH = 32, 9, 0.9, 1000, 64
# Classifier steps per arch: the ViT's steps are cheaper (16 tokens) and it needs more of them
# to learn the shapes; the segmenter needs few.
STEPS = {"convnext": 400, "vit": 800}
SEGMENTER_STEPS = 200
IID_SIZE, OOD_SIZE = 900, 1620  # test images (IID: each under 8 variants; OOD: 81 groups)
# JTT: identification steps T and upweight lambda_up (the paper's lambda_up range is 5..100;
# 20 is the middle of bgjax/configs/sweeps/baselines.py's grid).
JTT_IDENTIFY_STEPS, JTT_UPWEIGHT = 200, 20
GROUP_DRO_ETA = 0.01  # github.com/kohpangwei/group_DRO's default --robust_step_size


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


def baseline_methods(arch: str) -> dict[str, dict]:
    """The group-robustness baselines (demo name -> overrides); JTT reads the errors of the
    arch's identification run."""
    return {
        "group_balanced": {"data.sampling": "group_balanced"},
        "group_dro": {
            "data.sampling": "group_balanced",  # the authors' commands: --reweight_groups
            "loss.group_dro.eta": GROUP_DRO_ETA,
            "loss.group_dro.adjustment": 0.0,
        },
        "jtt": {
            "data.upweight.errors_of": f"{{root}}/{jtt_identification_name(arch)}",
            "data.upweight.factor": JTT_UPWEIGHT,
        },
    }


def jtt_identification_name(arch: str) -> str:
    return f"{arch}-jtt_identify"


# Late masking needs a feature grid that can outline the object: at 32 px the small ConvNeXt's
# stage-3 map is 2x2 with its stride-4 stem, so its late run uses a stride-2 stem (4x4 after
# stage 3, like the ViT's 4x4 token grid). (A stride-2 stem costs ~4x the FLOPs; only this run.)
ARCH_STRATEGY_OVERRIDES = {("convnext", "late"): {"model.patch_size": 2}}


def classifier_stage(arch: str, strategies) -> dict:
    """One arch's runs: synthetic.py's small model under each strategy."""
    methods = {**STRATEGIES, **baseline_methods(arch)}
    points = [
        {"name": s, **methods[s], **ARCH_STRATEGY_OVERRIDES.get((arch, s), {})} for s in strategies
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


def jtt_identification_stage(arch: str) -> dict:
    """JTT's first stage: ERM for JTT_IDENTIFY_STEPS steps, scored only through the JTT run."""
    return dict(
        name=jtt_identification_name(arch),
        base="synthetic.py",
        base_arg=f"size=small,arch={arch}",
        overrides=config_utils.apply_overrides(
            common_overrides(), schedule(JTT_IDENTIFY_STEPS), allow_new=True
        ),
        evals=[],
    )


def get_config(arg=None):
    arg = config_utils.parse_arg(arg, quick=False, baselines=False)
    convnext_only = arg.quick or arg.baselines
    archs = ("convnext",) if convnext_only else tuple(STEPS)
    strategies = [s for s in STRATEGIES if not (convnext_only and s == "early_pred")]
    if arg.baselines:
        strategies += list(baseline_methods("convnext"))
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
    if arg.baselines:
        first = [jtt_identification_stage(a) for a in archs]
    else:
        first = [] if arg.quick else [segmenter]
    c.stages = first + [classifier_stage(a, strategies) for a in archs]
    c.evals = [
        dict(name="iid", split="test_iid", variants="all",
             data=dict(test_size=IID_SIZE // 2 if arg.quick else IID_SIZE)),
        dict(name="ood", split="test_balanced", variants=["original"],
             data=dict(test_size=OOD_SIZE)),
    ]  # fmt: skip
    if arg.baselines:  # runs made from a trained run after training (`bgjax demo`)
        c.dfr = [
            dict(name=f"{a}-dfr", run=f"{a}-baseline", split="val",
                 points=dict(arch=a, strategy="dfr"))
            for a in archs
        ]  # fmt: skip
    return c
