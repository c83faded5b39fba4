r"""The field's baselines for group robustness on the built-in synthetic dataset, each method's
hyperparameters chosen by validation worst-group accuracy (`bgjax.selection.Selection`):

    bgjax sweep --config sweeps/baselines.py --workdir runs/baselines
    bgjax aggregate runs/baselines            # aggregate.md ends with the methods table

    erm             plain training (the demo's baseline: small ConvNeXt, 400 steps)
    class_balanced  every class equally often per epoch (`data.sampling`)
    group_balanced  every label x habitat group equally often per epoch
    group_dro       online group weights (Sagawa et al., ICLR 2020) on group-balanced batches,
                    step size eta swept
    jtt             Just Train Twice (Liu et al., ICML 2021): an ERM identification run of T
                    steps (its own stage, not evaluated), then runs whose epochs repeat its
                    misclassified training examples; T and lambda_up swept

Each method is one stage with a `method` axis of one point, its own hyperparameter axes and the
seeds; the validation split is balanced (habitat independent of the class), so its worst group
is defined, and selection never looks at the test splits. quick: one seed, fewer steps.
"""

import ml_collections

from bgjax import config_utils

STEPS, QUICK_STEPS = 400, 200
JTT_IDENTIFY_STEPS, JTT_UPWEIGHTS = (100, 200), (5, 20)  # T (of 400 steps) and lambda_up
VAL_SIZE, TEST_SIZE, IID_SIZE = 810, 1620, 900  # balanced splits: 10 / 20 images per group


def stage(method: dict, *hyperparameters, seeds: int, steps: int) -> dict:
    """One method's runs: synthetic.py's small ConvNeXt with the demo's data and schedule."""
    return dict(
        base="synthetic.py",
        base_arg="size=small",
        overrides=schedule(steps),
        axes=[("method", [method]), *hyperparameters, ("seed", list(range(seeds)))],
    )


def schedule(steps: int) -> dict:
    """Overrides of a run of `steps` steps on the demo's data (one checkpoint half way)."""
    return config_utils.flatten(dict(
        total_steps=steps, log_every_steps=max(1, steps // 10), progress_bar=False,
        optimizer=dict(warmup_steps=steps // 10),
        checkpoint=dict(every_steps=steps // 2, keep=1, keep_best=0),
        eval=dict(every_steps=0),  # `bgjax aggregate` evaluates
        data=dict(train_size=9000, image_size=32),
    ))  # fmt: skip


def get_config(arg=None):
    arg = config_utils.parse_arg(arg, quick=False, seeds=3)
    seeds, steps = (1, QUICK_STEPS) if arg.quick else (arg.seeds, STEPS)
    run = dict(seeds=seeds, steps=steps)
    identify_steps = (QUICK_STEPS // 2,) if arg.quick else JTT_IDENTIFY_STEPS
    identify = dict(  # JTT's first stage: ERM for T steps, one seed; scored by stage 2 only
        base="synthetic.py",
        base_arg="size=small",
        overrides=schedule(steps),
        axes=[("jtt_identify", [{"name": f"jtt_identify-T{t}", "total_steps": t,
                                 "log_every_steps": max(1, t // 10),
                                 "checkpoint.every_steps": t} for t in identify_steps])],
        evals=[],
    )  # fmt: skip
    jtt_points = [
        {"name": f"T{t}", "data.upweight.errors_of": f"{{root}}/jtt_identify-T{t}"}
        for t in identify_steps
    ]
    c = ml_collections.ConfigDict()
    c.stages = [
        stage({"name": "erm", "data.sampling": "natural"}, **run),
        stage({"name": "class_balanced", "data.sampling": "class_balanced"}, **run),
        stage({"name": "group_balanced", "data.sampling": "group_balanced"}, **run),
        stage(
            # group-balanced sampling, as the authors' commands (--reweight_groups --robust)
            {
                "name": "group_dro",
                "data.sampling": "group_balanced",
                "loss.group_dro.adjustment": 0.0,
            },
            ("loss.group_dro.eta", [0.01, 0.1]),
            **run,
        ),
        identify,
        stage(
            {"name": "jtt", "data.sampling": "natural"},
            ("identification", jtt_points),
            ("data.upweight.factor", list(JTT_UPWEIGHTS)),
            **run,
        ),
    ]
    c.evals = [
        dict(name="val", split="val", variants=["original"], data=dict(val_size=VAL_SIZE)),
        dict(name="test", split="test_balanced", variants=["original"],
             data=dict(test_size=TEST_SIZE)),
        dict(name="iid", split="test_iid", variants=["original", "mixed_same", "mixed_rand"],
             data=dict(test_size=IID_SIZE)),
    ]  # fmt: skip
    c.selection = dict(
        metric="val:worst_group_accuracy",
        method_axes=("method",),
        seed_axis="seed",
        report=(
            "test:original",
            "test:average_accuracy",
            "test:worst_group_accuracy",
            "iid:original",
            "iid:bg_gap",
        ),
    )
    return c
