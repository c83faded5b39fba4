"""Where a classifier's foreground masks come from: the dataset ("gt") or a trained segmenter.

    config.mask_source = "gt"             # the batch's annotated masks
    config.mask_source = "runs/seg_cub"   # a `bgjax train --config configs/segmenter.py` workdir

The masking paper (REFERENCE.md §2) predicts masks at test time with a segmentation network;
early masking is only usable on real images that way. A segmenter source runs ON THE
ACCELERATOR INSIDE the classifier's jitted step: its parameters are an extra argument of the
step (frozen: under `jax.lax.stop_gradient`, never updated), the images it sees are the
classifier's already-normalised batch, and the mask is sigmoid(logit) > 0.5. No host round-trip.

    source = masks.load(config.mask_source, image_size=config.data.image_size,
                        mean=info.mean, std=info.std, mesh=mesh)
    def train_step(state, batch, mask_params):
        images = pipeline.normalize(batch["image"], info.mean, info.std)
        masks = source.masks(mask_params, batch, images)   # gt: batch["mask"]
    jax.jit(train_step)(state, batch, source.params)

A segmenter trained with other normalisation statistics than the classifier gets its input
re-normalised exactly (an affine map per channel), so any pair of datasets combines.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from bgjax.models import segmenter as segmenter_lib

GT = "gt"
SEGMENT_TASK = "segment"
# IN-9 variants whose batch mask is the VISIBLE foreground, so a segmenter can be scored on them.
# (only_bg_b / only_bg_t / no_fg remove the object but keep its mask: there it marks where the
# object was, not what is in the picture.)
SEGMENTATION_VARIANTS = ("original", "only_fg", "mixed_same", "mixed_rand", "mixed_next")


def predict_masks(segmenter: nnx.Module, images: jax.Array) -> jax.Array:
    """(B, H, W) uint8 {0, 1} foreground of normalised NHWC `images`: sigmoid(logit) > 0.5.

    Pure and traceable: call it inside a jitted step on a segmenter merged there from its state.
    Gradients stop here (the masks are inputs to the classifier, not something it trains).
    """
    logits = segmenter(jax.lax.stop_gradient(images), train=False)
    return jax.lax.stop_gradient(segmenter_lib.predict_mask(logits))


@dataclasses.dataclass(frozen=True)
class MaskSource:
    """A mask source. `params` is what jitted steps take as their extra argument (None for gt).

    name: "gt" or the segmenter workdir. For a segmenter: `graphdef` + `params` (its whole
    nnx state) rebuild it inside the step; `scale`/`shift` map the classifier's normalised
    pixels to the segmenter's (x * scale + shift, per channel; None when they agree).
    """

    name: str = GT
    graphdef: Any = None
    params: Any = None
    scale: tuple[float, ...] | None = None
    shift: tuple[float, ...] | None = None
    image_size: int | None = None  # the size the segmenter was trained at

    @property
    def is_gt(self) -> bool:
        return self.graphdef is None

    def predict(self, params: Any, images: jax.Array) -> jax.Array:
        """Predicted (B, H, W) uint8 masks of classifier-normalised `images`; pure."""
        if self.is_gt:
            raise ValueError("the 'gt' mask source predicts nothing: read batch['mask']")
        if self.scale is not None:
            images = images * jnp.asarray(self.scale, images.dtype) + jnp.asarray(
                self.shift, images.dtype
            )
        segmenter = nnx.merge(self.graphdef, jax.tree.map(jax.lax.stop_gradient, params))
        return predict_masks(segmenter, images)

    def masks(self, params: Any, batch: Mapping[str, jax.Array], images: jax.Array) -> jax.Array:
        """The masks a step uses: the batch's own ("gt") or the segmenter's prediction."""
        return batch["mask"] if self.is_gt else self.predict(params, images)


def from_model(
    segmenter: nnx.Module,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    segmenter_mean: Sequence[float] | None = None,
    segmenter_std: Sequence[float] | None = None,
    name: str = "segmenter",
    image_size: int | None = None,
) -> MaskSource:
    """A source around an in-memory segmenter. `mean`/`std`: the classifier's normalisation;
    `segmenter_mean`/`segmenter_std`: the segmenter's (default: the same)."""
    graphdef, params = nnx.split(segmenter)
    scale = shift = None
    if segmenter_mean is not None or segmenter_std is not None:
        cm, cs = np.asarray(mean, np.float64), np.asarray(std, np.float64)
        sm = np.asarray(mean if segmenter_mean is None else segmenter_mean, np.float64)
        ss = np.asarray(std if segmenter_std is None else segmenter_std, np.float64)
        if not (np.allclose(cm, sm) and np.allclose(cs, ss)):
            # x_seg = (x * cs + cm - sm) / ss
            scale = tuple(float(v) for v in cs / ss)
            shift = tuple(float(v) for v in (cm - sm) / ss)
    return MaskSource(
        name=name, graphdef=graphdef, params=params, scale=scale, shift=shift,
        image_size=image_size,
    )  # fmt: skip


def read_segmenter_config(workdir: str | epath.PathLike) -> tuple[Any, dict]:
    """(config, dataset_info dict) of a segmenter workdir, with clear errors when it is not one."""
    workdir = epath.Path(workdir)
    if not workdir.is_dir():
        raise FileNotFoundError(
            f"mask source {str(workdir)!r} is neither 'gt' nor an existing segmenter workdir"
        )
    files = {}
    for name in ("config.json", "dataset_info.json"):
        path = workdir / name
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: is {workdir} a segmenter training workdir?")
        files[name] = json.loads(path.read_text())
    config = ml_collections.ConfigDict(files["config.json"])
    task = config.get("task", "classify")
    if task != SEGMENT_TASK:
        raise ValueError(
            f"mask source {str(workdir)!r} is a {task!r} run, not a segmenter "
            f"(its config.json has task={task!r}; expected {SEGMENT_TASK!r})"
        )
    return config, files["dataset_info.json"]


def check_image_size(workdir: str | epath.PathLike, segmenter_size: int, image_size: int) -> None:
    if int(segmenter_size) != int(image_size):
        raise ValueError(
            f"segmenter {str(workdir)!r} was trained at image size {segmenter_size} px, but the "
            f"classifier's config.data.image_size is {image_size} px: train a segmenter at "
            f"{image_size} px or set the classifier's image size to {segmenter_size}"
        )


def load_segmenter(
    workdir: str | epath.PathLike,
    *,
    image_size: int | None = None,
    step: int | str | None = None,
    mesh: jax.sharding.Mesh | None = None,
):
    """(model, config, info) of a trained segmenter workdir, its latest checkpoint by default.

    Checks, before restoring anything: the workdir holds a segmenter run, its image size equals
    `image_size` (when given) and it has a checkpoint; each failure names the path or sizes.
    """
    from bgjax import run  # imported when used: bgjax.run imports this module

    workdir = epath.Path(workdir)
    config, _ = read_segmenter_config(workdir)
    if image_size is not None:
        check_image_size(workdir, config.data.image_size, image_size)
    ckpt_dir = workdir / "checkpoints"
    steps = [p for p in ckpt_dir.iterdir() if p.name.isdigit()] if ckpt_dir.is_dir() else []
    if not steps:
        raise FileNotFoundError(
            f"segmenter workdir {workdir} has no checkpoint in {ckpt_dir}: train it first "
            f"(bgjax train --config configs/segmenter.py --workdir {workdir})"
        )
    return run.restore_model(str(workdir), step=step, mesh=mesh)


def load(
    mask_source: str,
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    mesh: jax.sharding.Mesh | None = None,
) -> MaskSource:
    """`config.mask_source` -> a MaskSource. "gt": the batch's masks; otherwise the path of a
    segmenter workdir, checked against the classifier's `image_size` and restored onto `mesh`
    (its latest checkpoint). `mean`/`std` are the classifier's normalisation."""
    if mask_source == GT:
        return MaskSource()
    if not mask_source:
        raise ValueError("config.mask_source is empty: use 'gt' or a segmenter workdir")
    model, config, info = load_segmenter(mask_source, image_size=image_size, mesh=mesh)
    return from_model(
        model,
        mean=mean,
        std=std,
        segmenter_mean=info.mean,
        segmenter_std=info.std,
        name=str(mask_source),
        image_size=int(config.data.image_size),
    )
