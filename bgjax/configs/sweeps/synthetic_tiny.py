"""A seconds-long sweep on the synthetic dataset, for tests and for trying the sweep tools:
two tiny ViT widths x {no masking, early masking}, 6 steps each, 32 px.

    bgjax sweep --config sweeps/synthetic_tiny.py --workdir runs/tiny
    bgjax aggregate runs/tiny
"""

import ml_collections

from bgjax import config_utils

# Both sizes keep synthetic.py's tiny ViT (32 px, patch 8, one block) and change the width.
WIDTHS = (16, 32)


def get_config(arg=None):
    arg = config_utils.parse_arg(arg, seeds=1, eval_size=64)
    c = ml_collections.ConfigDict()
    c.base = "synthetic.py"
    c.base_arg = "arch=vit,size=tiny"
    c.overrides = ml_collections.ConfigDict()
    c.overrides.eval = dict(every_steps=0)  # `bgjax aggregate` evaluates
    c.overrides.checkpoint = dict(every_steps=6)  # the final step only
    c.overrides.progress_bar = False
    c.axes = [
        ("model.embed_dim", list(WIDTHS)),
        ("arg.strategy", ["none", "early"]),
        ("seed", list(range(arg.seeds))),
    ]
    small = dict(test_size=arg.eval_size)  # a few batches per variant
    c.evals = [
        dict(name="iid", split="test_iid", variants="all", data=small),
        dict(name="ood", split="test_balanced", variants=["original"], data=small),
    ]
    return c
