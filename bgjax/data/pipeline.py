"""The one input pipeline: source -> composite -> augment -> batch -> shard -> device.

A plain Grain chain over a random-access source (see `bgjax.data`):

    MapDataset.source(source)
      .seed(seed) [.shuffle().repeat(num_epochs)]        train only: reshuffled every epoch
                                                         (or balanced / upweighted epochs:
                                                         `sampling.Resampled`)
      .random_map(Composite)                             the IN-9 variant (or a mixture of them)
      [.random_map(Augment)]                             train only: image and mask move together
      .map(Finish)                                       resize to image_size, fix dtypes
                                                         (eval: by the `EvalResize` rule)
      [process_index::process_count]                     this process's shard (+ eval padding)
      .batch(local_batch_size)
      .to_iter_dataset(ReadOptions) [.mp_prefetch(...)]
      .map(ToGlobal) [ThreadPrefetchIterDataset]         `on_devices` (the trainer): global
                                                         jax.Arrays, N batches sent ahead

The random maps sit BEFORE the shard on purpose: Grain keys each element's rng by its position in
the dataset the map is applied to, so keying by the global position makes the data (partners,
crops) independent of the number of processes. MapDatasets are lazy, so every process still
reads and composites only its own examples.

Batches are host-local dicts of NumPy arrays:

    image uint8[b, S, S, 3], mask uint8[b, S, S], label int32[b], habitat int32[b], valid bool[b]

uint8 crosses host -> device (4x less than float32); `to_global` makes the global jax.Arrays and
`normalize` runs on device inside the jitted step. The trainer's `on_devices` sends the next
batches while the current step runs, and its checkpointed position is the last batch consumed.
Evaluation never drops an example: the last batch is padded with valid=False rows, and every
process yields the same number of batches so collective steps cannot hang.

Worker processes (`worker_count > 0`) are spawned and re-import `__main__`, so a script that
uses them needs the `if __name__ == "__main__":` guard. grain 0.2.18 also reads an absl flag when
it starts them and raises UnparsedFlagAccessError unless absl flags were parsed; under
`absl.app.run` (the bgjax CLI) they are, and elsewhere (notebooks, pytest, plain scripts) `build`
marks them parsed, leaving every flag at its default.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from typing import Any

import grain
import grain.experimental
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bgjax import hostmem, variants
from bgjax.data import augment as augment_lib
from bgjax.data import sampling as sampling_lib

Variant = str | Mapping[str, float]


def local_batch_size(
    global_batch: int, process_count: int | None = None, num_devices: int | None = None
) -> int:
    """The per-process batch: `global_batch / process_count`, with clear errors when uneven."""
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch <= 0:
        raise ValueError(f"batch_size must be positive, got {global_batch}")
    if num_devices is not None and global_batch % num_devices:
        raise ValueError(
            f"global batch_size {global_batch} is not divisible by the mesh's {num_devices} "
            "devices; the batch dimension is split evenly over all of them"
        )
    if global_batch % process_count:
        raise ValueError(
            f"global batch_size {global_batch} is not divisible by the {process_count} processes"
        )
    return global_batch // process_count


def _variant_table(variant: Variant) -> tuple[tuple[str, ...], np.ndarray]:
    """Variant names and their cumulative probabilities, from a name or {name: weight}."""
    weights = {variant: 1.0} if isinstance(variant, str) else dict(variant)
    unknown = sorted(set(weights) - set(variants.VARIANTS))
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; valid: {', '.join(variants.VARIANTS)}")
    values = np.array(list(weights.values()), np.float64)
    if values.size == 0 or np.any(values < 0) or values.sum() <= 0:
        raise ValueError(f"variant weights must be >= 0 with a positive sum, got {weights}")
    cumulative = np.cumsum(values / values.sum())
    cumulative[-1] = 1.0  # rng.random() < 1 then always lands on a variant despite rounding
    return tuple(weights), cumulative


class _Indexed:
    """The source with each example's own index added (mixed variants need it for partners)."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.source[index], "index": index}


class Composite(grain.transforms.RandomMap):
    """Makes the requested IN-9 variant of an example; a mixture picks one per example.

    Everything random (the variant of a mixture, the background donor of mixed_*) comes from the
    per-element rng, so a seed fixes the dataset and every training epoch draws fresh partners.
    """

    def __init__(self, source, variant: Variant):
        self.source = source
        self.names, self.cumulative = _variant_table(variant)
        self.sampler = None
        if any(name in variants.MIXED for name in self.names):
            info = getattr(source, "info", None)
            if info is None:
                raise ValueError("mixed variants need a source with .info.labels (DatasetInfo)")
            self.sampler = variants.PartnerSampler(info.labels, info.num_classes)

    def random_map(self, element, rng: np.random.Generator):
        name = self.names[0]
        if len(self.names) > 1:
            name = self.names[int(np.searchsorted(self.cumulative, rng.random(), side="right"))]
        image, mask = element["image"], element["mask"]
        bg_index = -1  # the background donor's index (mixed variants), for per-example records
        if name != "original":  # composite("original") would only copy the image
            donor = {}
            if name in variants.MIXED:
                bg_index = self.sampler.sample(name, element["index"], rng)
                partner = self.source[bg_index]
                donor = dict(
                    bg_image=partner["image"], bg_mask=partner["mask"], bg_bbox=partner["bbox"]
                )
            image = variants.composite(name, image, mask, bbox=element["bbox"], **donor)
            mask = variants.composite_mask(name, mask)
        return dict(
            image=image, mask=mask, label=element["label"], habitat=element["habitat"],
            bg_index=np.int32(bg_index),
        )  # fmt: skip


class Augment(grain.transforms.RandomMap):
    """The `augment` config's ops (see `bgjax.data.augment`); outputs image_size x image_size."""

    def __init__(self, config: Any, image_size: int):
        self.op = augment_lib.make(config, image_size)

    def random_map(self, element, rng: np.random.Generator):
        image, mask = self.op(element["image"], element["mask"], rng)
        return {**element, "image": image, "mask": mask}


@dataclasses.dataclass(frozen=True)
class EvalResize:
    """How evaluation maps an image to image_size (`augment.eval_resize`): "warp" squashes the
    whole frame; "resize_crop" is timm's eval transform (shorter side to image_size / crop_pct,
    centre crop). Read from `config.data` (keys eval_resize, crop_pct, interpolation); the
    defaults are bgjax's original rule. `asdict()` is what a results file should record."""

    rule: str = "warp"
    crop_pct: float = 0.875
    interpolation: str = "bilinear"

    def __post_init__(self):
        if self.rule not in augment_lib.EVAL_RESIZE_RULES:
            raise ValueError(
                f"data.eval_resize {self.rule!r}; known: {augment_lib.EVAL_RESIZE_RULES}"
            )
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"data.crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.interpolation not in augment_lib.INTERPOLATIONS:
            raise ValueError(
                f"data.interpolation {self.interpolation!r}; known: {augment_lib.INTERPOLATIONS}"
            )

    @classmethod
    def from_config(cls, data_config: Any) -> EvalResize:
        get = data_config.get
        return cls(
            rule=get("eval_resize", cls.rule),
            crop_pct=float(get("crop_pct", cls.crop_pct)),
            interpolation=get("interpolation", cls.interpolation),
        )

    def asdict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __call__(self, image, mask, size: int):
        return augment_lib.eval_resize(image, mask, size, **self.asdict())


class Finish(grain.transforms.Map):
    """Resizes to image_size when the source's images differ (by `resize`; training's augment
    output already has that size), and fixes the batch dtypes."""

    def __init__(self, image_size: int, resize: EvalResize = EvalResize()):
        self.image_size = image_size
        self.resize = resize

    def map(self, element):
        image, mask = element["image"], element["mask"]
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[:2] != mask.shape:
            raise ValueError(
                f"an example needs image uint8[H, W, 3] and mask [H, W], got image "
                f"{image.dtype}{list(image.shape)} and mask {mask.dtype}{list(mask.shape)}"
            )
        image, mask = self.resize(image, mask, self.image_size)
        return dict(
            image=np.ascontiguousarray(image, np.uint8),
            mask=np.ascontiguousarray(mask, np.uint8),
            label=np.int32(element["label"]),
            habitat=np.int32(element["habitat"]),
            bg_index=np.int32(element.get("bg_index", -1)),
            valid=np.True_,
        )


def _padding(count: int, image_size: int) -> grain.MapDataset:
    """`count` blank rows with valid=False (label 0, habitat -1), to fill the last eval batch."""
    row = dict(
        image=np.zeros((image_size, image_size, 3), np.uint8),
        mask=np.zeros((image_size, image_size), np.uint8),
        label=np.int32(0),
        habitat=np.int32(-1),
        bg_index=np.int32(-1),
        valid=np.False_,
    )
    return grain.MapDataset.source([row] * count)


def _shard(
    ds: grain.MapDataset,
    index: int,
    count: int,
    local_batch: int,
    image_size: int,
    *,
    pad: bool,
    drop_remainder: bool,
) -> grain.MapDataset:
    """This process's disjoint share `ds[index::count]`, sized so every process has as many batches.

    With `pad`, every share is padded to the same whole number of batches. With
    `drop_remainder`, a finite dataset is first cut to a multiple of `count` (at most count - 1
    examples), so dropping partial batches leaves equal counts. An endless stream needs neither.
    """
    total = len(ds)
    if total >= sys.maxsize:
        return ds[index::count]
    if pad:
        per_process = -(-total // count)
        target = -(-per_process // local_batch) * local_batch
        share = ds[index::count]
        if target > len(share):
            share = grain.MapDataset.concatenate([share, _padding(target - len(share), image_size)])
        return share
    if drop_remainder:
        ds = ds[: total - total % count]
    return ds[index::count]


def build(
    source,
    *,
    variant: Variant = "original",
    batch_size: int,
    image_size: int,
    train: bool,
    seed: int,
    augment: Any = None,
    eval_resize: EvalResize | None = None,
    num_epochs: int | None = None,
    sampling: sampling_lib.Sampling | None = None,
    worker_count: int = 0,
    pad_to_batch: bool | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    num_devices: int | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
    """The Grain IterDataset of this process's batches (see the module doc for the chain).

    Args:
      source: a random-access source (`bgjax.data`); mixed variants need `source.info.labels`.
      variant: a name from `bgjax.variants.VARIANTS`, or {name: weight} for a mixture.
      batch_size: the GLOBAL batch size; each process yields batch_size / process_count rows.
      image_size: output side S; images of another size are resized (mask: nearest).
      train: shuffle (reshuffled each epoch), repeat `num_epochs` (None = forever), augment, and
        drop a last partial batch. Otherwise one pass in index order.
      seed: fixes the order, the mixed partners, the variant mixture and the augmentation.
      augment: an augment config (`bgjax.data.augment`), applied when `train` only, so one
        config serves the train and eval builds.
      eval_resize: the rule that brings evaluation images to image_size (`EvalResize`, e.g.
        `EvalResize.from_config(config.data)`); None = warp. Training without an augment
        config always warps, as before.
      sampling: which examples a training epoch visits (`bgjax.data.sampling`, e.g.
        `Sampling.from_config(config.data)`); None = each once, reshuffled every epoch.
      worker_count: > 0 runs the chain in that many spawned worker processes (see module doc).
      pad_to_batch: pad the last batch with valid=False rows instead of dropping or shortening
        it; defaults to `not train`. Without it, an eval's last batch may be short and, with
        several processes, their batch counts may differ by one.
      process_index, process_count: default to JAX's; pass them to simulate several hosts.
      num_devices: when given (the mesh's device count), the global batch must divide by it.
      read_options: Grain reader threads / prefetch buffer (counted in batches).
    """
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} out of range for process_count {count}")
    local_batch = local_batch_size(batch_size, count, num_devices)
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if len(source) == 0:
        raise ValueError(f"the source {source!r} is empty")
    if not train and num_epochs not in (None, 1):
        raise ValueError(f"num_epochs={num_epochs} applies to training; evaluation is one pass")
    pad = (not train) if pad_to_batch is None else pad_to_batch

    sampling = sampling or sampling_lib.Sampling()
    ds = grain.MapDataset.source(_Indexed(source)).seed(seed)
    if train and sampling.natural:
        ds = ds.shuffle().repeat(num_epochs)
    elif train:
        ds = sampling.for_variant(variant).apply(ds, source.info, seed).repeat(num_epochs)
    ds = ds.random_map(Composite(source, variant))
    if train and augment:
        ds = ds.random_map(Augment(augment, image_size))
    ds = ds.map(Finish(image_size, EvalResize() if train or eval_resize is None else eval_resize))
    drop_remainder = train and not pad
    ds = _shard(ds, index, count, local_batch, image_size, pad=pad, drop_remainder=drop_remainder)
    ds = ds.batch(local_batch, drop_remainder=drop_remainder)
    # The buffer counts batches, so keep it short. Worker processes already run in parallel;
    # their threads only hide read latency.
    if read_options is None:
        threads = 4 if worker_count == 0 else 2
        read_options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=4)
    it = ds.to_iter_dataset(read_options)
    if worker_count > 0:
        _ensure_flags_parsed()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=worker_count),
            worker_init_fn=hostmem.keep_freed_image_buffers,
        )
    return it


def _ensure_flags_parsed() -> None:
    """grain 0.2.18's mp_prefetch reads an absl flag in the parent and raises
    UnparsedFlagAccessError unless flags were parsed (programs under `absl.app.run` have). Outside
    absl (notebooks, pytest, plain scripts) nothing will parse them, so their defaults stand."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def to_global(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Host-local batch -> global jax.Arrays, dim 0 sharded over ALL mesh axes."""
    sharding = NamedSharding(mesh, P(mesh.axis_names))
    local = {key: np.asarray(value) for key, value in batch.items()}
    rows = {value.shape[0] for value in local.values()}
    if len(rows) != 1:
        shapes = {key: value.shape for key, value in local.items()}
        raise ValueError(f"batch entries disagree on the batch dimension: {shapes}")
    global_rows = rows.pop() * jax.process_count()
    local_batch_size(global_rows, jax.process_count(), mesh.size)  # divisibility errors
    return {
        key: jax.make_array_from_process_local_data(
            sharding, value, (global_rows, *value.shape[1:])
        )
        for key, value in local.items()
    }


class ToGlobal(grain.transforms.Map):
    """A host batch -> global jax.Arrays on `mesh` (`to_global`), keeping only `keys` (None: all):
    entries the step does not read (masks, when nothing uses them) never cross to the devices."""

    def __init__(self, mesh: jax.sharding.Mesh, keys: tuple[str, ...] | None = None):
        self.mesh, self.keys = mesh, keys

    def map(self, batch):
        kept = {k: v for k, v in batch.items() if self.keys is None or k in self.keys}
        return to_global(kept, self.mesh)


def on_devices(
    ds: grain.IterDataset,
    mesh: jax.sharding.Mesh,
    *,
    keys: tuple[str, ...] | None = None,
    prefetch: int = 2,
) -> grain.IterDataset:
    """`ds`'s batches as global jax.Arrays on `mesh`, with `prefetch` of them (0: none) sent to
    the devices ahead, by a background thread, while the current step runs (the thread holds
    one more while it waits for room in the queue).

    Grain's `ThreadPrefetchIterDataset` pairs each queued batch with the iterator state taken
    right after that batch was read, and its `get_state` is the state of the last batch handed
    out: a checkpoint saves the position of the last CONSUMED batch, not of the ones queued, so
    a resumed run continues exactly (set_state drops the queue and refills from there).
    """
    if prefetch < 0:
        raise ValueError(f"config.prefetch_to_device must be >= 0 (0: off), got {prefetch}")
    ds = ds.map(ToGlobal(mesh, keys))
    if prefetch:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    return ds


def normalize(images: jax.Array, mean: Any, std: Any, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """uint8 images [..., 3] -> (x / 255 - mean) / std in `dtype`; mean/std in [0, 1] units."""
    mean = jnp.asarray(mean, jnp.float32) * 255.0
    inv_std = 1.0 / (jnp.asarray(std, jnp.float32) * 255.0)
    return ((images.astype(jnp.float32) - mean) * inv_std).astype(dtype)


def load_examples(
    source, variant: str, *, image_size: int, seed: int, limit: int | None = None,
    eval_resize: EvalResize | None = None,
) -> dict[str, np.ndarray]:  # fmt: skip
    """`image`, `mask`, `label`, `habitat` of the first `limit` (default all) examples of
    `variant`, in index order, on every process (for analyses that need the whole set), brought
    to image_size by `eval_resize` as evaluation does."""
    limit = len(source) if limit is None else min(limit, len(source))
    batch = min(256, limit)
    ds = build(
        source, variant=variant, batch_size=batch, image_size=image_size, train=False,
        seed=seed, process_index=0, process_count=1, eval_resize=eval_resize,
    )  # fmt: skip
    rows, have = [], 0
    for b in ds:
        rows.append({k: v[b["valid"]] for k, v in b.items() if k != "valid"})
        have += int(b["valid"].sum())
        if have >= limit:
            break
    return {k: np.concatenate([r[k] for r in rows])[:limit] for k in rows[0]}
