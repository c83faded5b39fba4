"""Group DRO (Sagawa et al., ICLR 2020): minimise the loss of the worst label x habitat group.

    config.loss.group_dro = dict(eta=0.01, adjustment=0.0)      # eta 0: off (plain ERM)

The train state carries group weights q (`STATE_KEY`, uniform at the start, checkpointed with
the rest). Every (micro-)batch, as in the authors' `LossComputer` (github.com/kohpangwei/
group_DRO, loss.py): the mean loss of each group in the batch L_g (0 for a group without
examples in it), then

    q_g <- q_g * exp(eta * (L_g + C / sqrt(n_g)))   and q normalised to sum 1,
    loss = sum_g q_g L_g                              with the updated q,

where n_g counts group g's training examples and C is the generalisation adjustment (0: none).
q is updated with the losses' values only (no gradient flows through it). Groups are
g = label * num_habitats + habitat (`bgjax.data.sampling.example_groups`); the batch's label
and habitat give them on the device.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bgjax.data import sampling

STATE_KEY = "group_dro_q"


def enabled(config) -> bool:
    return float((config.get("loss") or {}).get("group_dro", {}).get("eta", 0.0)) > 0


def initial_state(config, info) -> dict[str, jax.Array]:
    """{STATE_KEY: uniform q} when group DRO is on, else {} (the train state's extra entry)."""
    if not enabled(config):
        return {}
    num_groups = _num_groups(config, info)
    return {STATE_KEY: jnp.full((num_groups,), 1.0 / num_groups, jnp.float32)}


def _num_groups(config, info) -> int:
    if config.get("task", "classify") != "classify" or info.num_habitats is None:
        raise ValueError(
            f"loss.group_dro needs a classifier on a dataset with habitats (label x habitat "
            f"groups); dataset {info.name!r} has none, task {config.get('task', 'classify')!r}"
        )
    if info.group_labels is not None:
        raise ValueError(
            f"loss.group_dro: dataset {info.name!r} groups by another label than the class "
            "(e.g. Waterbirds with data.label=species); train on the group label instead"
        )
    return info.num_classes * info.num_habitats


@dataclasses.dataclass(frozen=True)
class GroupDRO:
    eta: float
    num_habitats: int
    adjustment: np.ndarray  # float32 [G]: C / sqrt(n_g) (0 for an empty group or C = 0)

    @classmethod
    def from_config(cls, config, info) -> GroupDRO | None:
        """From `config.loss.group_dro` and the training source's info; None when off."""
        if not enabled(config):
            return None
        dro = config.loss.group_dro
        num_groups = _num_groups(config, info)
        counts = np.bincount(sampling.example_groups(info), minlength=num_groups)
        c = float(dro.get("adjustment", 0.0))
        if c < 0:
            raise ValueError(f"loss.group_dro.adjustment must be >= 0, got {c}")
        adjustment = np.where(counts > 0, c / np.sqrt(np.maximum(counts, 1)), 0.0)
        return cls(float(dro.eta), info.num_habitats, adjustment.astype(np.float32))

    def group_ids(self, batch: dict[str, Any]) -> jax.Array:
        """int32[B] group of every row (-1 where the habitat is unknown: no group's loss)."""
        labels, habitats = batch["label"], batch["habitat"]
        return jnp.where(habitats >= 0, labels * self.num_habitats + habitats, -1)

    def loss(self, example_losses: jax.Array, groups: jax.Array, q: jax.Array):
        """(sum_g q'_g L_g, q'): the robust loss and the updated weights (see module doc)."""
        onehot = jax.nn.one_hot(groups, q.shape[0], dtype=jnp.float32)  # -1 -> all zeros
        counts = onehot.sum(0)
        group_losses = (onehot.T @ example_losses) / jnp.maximum(counts, 1.0)
        step = self.eta * jax.lax.stop_gradient(group_losses + self.adjustment)
        q = q * jnp.exp(step)
        q = q / q.sum()
        return group_losses @ q, q
