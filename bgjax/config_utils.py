"""Helpers for the config files (big_vision style) and for reading configs back.

A config file defines `get_config(arg=None) -> ConfigDict`; `arg` is the text after the colon in
`--config cub.py:arch=vit,size=small`, parsed by `parse_arg` against typed defaults.
`base_config()` holds the keys every experiment shares, so each file only states what differs.
`--config` takes a path or the name of a config shipped in `bgjax/configs/` (`resolve_config`).
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
from absl import flags

_TRUE, _FALSE = ("1", "true", "yes", "y"), ("0", "false", "no", "n")


def _convert(key: str, text: str, default: Any) -> Any:
    if isinstance(default, bool):
        if text.lower() not in _TRUE + _FALSE:
            raise ValueError(f"config arg {key}={text!r}: expected a boolean")
        return text.lower() in _TRUE
    if default is None:
        return text
    try:
        return type(default)(text)
    except ValueError:
        raise ValueError(f"config arg {key}={text!r}: expected {type(default).__name__}") from None


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """'k=v,k=v' -> ConfigDict over `defaults`, values converted to the defaults' types.

    `parse_arg("arch=vit,steps=50", arch="convnext", steps=300)` -> {arch: "vit", steps: 50}.
    Unknown keys are an error naming the known ones.
    """
    result = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"config arg {item!r} is not of the form key=value")
        if key not in defaults:
            raise ValueError(f"unknown config arg {key!r}; known: {', '.join(sorted(defaults))}")
        result[key] = _convert(key, value.strip(), defaults[key])
    return ml_collections.ConfigDict(result)


def choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"config arg {name}={value!r}; expected one of {allowed}")
    return value


def base_config() -> ml_collections.ConfigDict:
    """Keys every training config has (see train.py for their meaning)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = ml_collections.ConfigDict()  # passed to bgjax.data.get_source
    # Evaluation's resize to data.image_size (bgjax.data.pipeline.EvalResize): "warp" the whole
    # frame, or "resize_crop" (timm's: shorter side to image_size / crop_pct, centre crop);
    # interpolation "bilinear" (OpenCV) or "bicubic" (PIL's, as timm).
    c.data.eval_resize = "warp"
    c.data.crop_pct = 0.875
    c.data.interpolation = "bilinear"
    # Which examples a training epoch visits (bgjax.data.sampling): "natural", "class_balanced",
    # "group_balanced"; upweight: example indices repeated `factor` times, from a JSON `file`
    # or the error set of the run `errors_of` (JTT, bgjax.tasks.jtt).
    c.data.sampling = "natural"
    c.data.upweight = ml_collections.ConfigDict(dict(file="", errors_of="", factor=1))
    c.data_workers = 0  # Grain worker processes (0: reader threads in-process)
    # Batches sent to the devices ahead of the running step, by a thread (0: off).
    c.prefetch_to_device = 2
    c.train_variant = "original"  # str, or {variant: weight}
    c.augment = None  # bgjax.data.augment config, or None
    c.mask_source = "gt"  # "gt": the dataset's masks

    c.model = ml_collections.ConfigDict()
    c.model.name = "convnext_atto"
    c.model.masking = "none"
    c.model.frozen_backbone = False
    # Compute dtype; parameters and optimizer state stay float32. "auto": bfloat16 on GPU/TPU,
    # float32 on the CPU (bgjax.models.cpu_kernels.resolve_dtype).
    c.model.dtype = "auto"
    # ViT attention: "auto" (cuDNN's fused kernel on NVIDIA GPUs in bf16, else XLA's), "xla",
    # "cudnn".
    c.model.attention = "auto"
    c.model.drop_path_rate = 0.0
    c.model.kernels = "auto"  # op lowerings: "cpu" (XLA:CPU-tuned), "xla", "auto" (by backend)
    # What each block keeps for the backward pass: "none" (all), "full" (recompute the block),
    # "dots", "dots_no_batch" (keep matmul outputs; bgjax.models.stacking). Typed `object` so
    # that older configs' True/False (full/none) still override it.
    c.model.remat = ml_collections.FieldReference("none", field_type=object)
    c.model.init = ""  # a timm-format .safetensors to start from ("" = random init)

    c.batch_size = 64  # global
    c.total_steps = 300
    c.optimizer = ml_collections.ConfigDict(
        dict(
            lr=1e-3,
            wd=0.05,
            wd_params="kernels",  # or "all" (see bgjax/optim.py)
            warmup_steps=20,
            min_lr_ratio=0.0,
            b1=0.9,
            b2=0.999,
            head_lr_mult=1.0,
            head_keys=("head",),
            clip_norm=1.0,
            grad_accum=1,
            ema_decay=0.0,
        )
    )
    c.loss = ml_collections.ConfigDict(
        dict(label_smoothing=0.0, mixup_alpha=0.0, cutmix_alpha=0.0, switch_prob=0.5)
    )
    # Group DRO (bgjax.tasks.group_dro): eta > 0 turns it on; adjustment = C of C / sqrt(n_g).
    c.loss.group_dro = ml_collections.ConfigDict(dict(eta=0.0, adjustment=0.0))
    c.mesh = [("data", -1), ("fsdp", 1)]
    c.fsdp_min_size = 2**16  # smaller tensors stay replicated on an fsdp mesh (bgjax.parallel)
    c.checkpoint = ml_collections.ConfigDict(
        dict(
            every_steps=100,
            keep=2,
            keep_best=1,
            best_metric="eval/original/accuracy",
            best_mode="max",
            async_save=True,
        )
    )
    c.eval = ml_collections.ConfigDict(
        dict(every_steps=100, split="val", variants=("original",), batch_size=128, use_ema=False)
    )
    c.eval.data = None  # a config.data for the evaluation source; None = config.data
    c.log_every_steps = 10
    # (first, last): a jax.profiler trace of those steps in workdir/profile (TensorBoard's
    # profile plugin or Perfetto open it); () = none.
    c.profile_steps = ()
    c.progress_bar = True
    return c


# The smallest models of each family, for tests and smoke runs at 32 px.
TINY_MODELS = {
    "convnext": dict(name="convnext_atto", depths=(1, 1, 1, 1), dims=(8, 16, 16, 32)),
    "resnet": dict(name="resnet18", layers=(1, 1, 1, 1), channels=(8, 16, 16, 32), stem_channels=8),
    "vit": dict(
        name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2
    ),
}


def set_tiny(c: ml_collections.ConfigDict, arch: str) -> None:
    """Shrink a config to a seconds-long smoke run: tiny model, 32 px, batch 8, 6 steps, no
    augmentation, no worker processes."""
    c.model.update(TINY_MODELS[arch])
    c.augment = None
    c.data_workers = 0
    c.data.image_size = 32
    c.batch_size = 8
    c.total_steps = 6
    c.optimizer.warmup_steps = 1
    c.checkpoint.every_steps = 3
    c.eval.every_steps = 3
    c.eval.batch_size = 16
    c.log_every_steps = 1


# Documented model options of each family, at the models' defaults, so each can be set on the
# command line (`--config.model.late_stage=4`). head_pool "": the masking strategy's default.
# scan_blocks: each stack of identical blocks stored stacked and run as one lax.scan (compiles
# faster; a run resumes only with the value it started with; bgjax.models.stacking).
MODEL_OPTIONS = {
    "convnext": dict(late_stage=3, scan_blocks=False),
    "resnet": dict(late_stage=3, freeze_bn=False),
    "vit": dict(late_block=-1, head_pool="", scan_blocks=False),
}


def epochs_to_steps(
    epochs: ml_collections.FieldReference,
    num_examples: int,
    batch_size: ml_collections.FieldReference,
) -> ml_collections.FieldReference:
    """round(epochs * num_examples / batch_size) as a lazy reference (`c.get_ref("epochs")`,
    `c.get_ref("batch_size")`): a step count derived from an epoch recipe follows overrides of
    epochs or batch size made after `get_config` (`--config.batch_size=128` halves it), and an
    explicit value set on the derived key (`--config.total_steps=500`) replaces the formula."""
    return (epochs * float(num_examples) / batch_size + 0.5).to_int()


def every_nth(total_steps: ml_collections.FieldReference, n: int) -> ml_collections.FieldReference:
    """ceil(total_steps / n) as a lazy reference: an interval that follows total_steps, >= 1.
    Call once per key: keys sharing one reference would be overridden together."""
    return (total_steps + (n - 1)) // n


CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
_OLD_PREFIX = "configs/"  # the repository-relative spelling from before configs were packaged


def packaged_configs() -> list[str]:
    """Names of the configs shipped with bgjax: ["cub.py", ..., "sweeps/synthetic_tiny.py"]."""
    files = CONFIGS_DIR.rglob("*.py")
    return sorted(f.relative_to(CONFIGS_DIR).as_posix() for f in files if f.name != "__init__.py")


def resolve_config(spec: str | Path) -> str:
    """`spec` (`file[:arg]`) with its file made a path that exists.

    An existing path is kept; otherwise the file is a packaged name (`synthetic.py`,
    `sweeps/synthetic_tiny.py`, or the old `configs/synthetic.py`) under CONFIGS_DIR. A path
    comes first, so a user's own `./synthetic.py` is not shadowed by the packaged one.
    """
    file, sep, arg = str(spec).partition(":")
    if Path(file).exists():
        return str(spec)
    name = file.removeprefix(_OLD_PREFIX)
    if name in packaged_configs():
        return f"{CONFIGS_DIR / name}{sep}{arg}"
    raise FileNotFoundError(
        f"config file {file!r} does not exist, nor is it a packaged config; "
        f"packaged: {', '.join(packaged_configs())}"
    )


def load_config(spec: str | Path) -> ml_collections.ConfigDict:
    """A config from `file.py[:arg]` (what --config takes: a path or a packaged name, see
    `resolve_config`) or a workdir's config.json."""
    path, _, arg = resolve_config(spec).partition(":")
    path = Path(path)
    if path.suffix == ".json":
        return ml_collections.ConfigDict(json.loads(path.read_text()))
    module_spec = importlib.util.spec_from_file_location(f"_bgjax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"name": x}} -> {"model.name": x}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, (Mapping, ml_collections.ConfigDict)):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _literal(text: Any) -> Any:
    """'128' -> 128, "('a','b')" -> tuple, 'in9' -> 'in9' (not a Python literal: kept as text)."""
    if not isinstance(text, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(
    config: ml_collections.ConfigDict,
    overrides: Mapping[str, Any],
    *,
    allow_new: bool = False,
    frozen: Sequence[str] = (),
    where: str = "",
) -> ml_collections.ConfigDict:
    """A copy of `config` with dotted-key overrides `{"data.image_size": 128, ...}` applied.

    Text values are parsed as Python literals when the key takes them ("128" -> 128). Unknown
    keys are errors naming the keys there are, unless `allow_new`; keys under a `frozen` group
    (e.g. "model" when a checkpoint fixes the architecture) are refused. `where` prefixes
    errors.
    """
    # A deep copy keeps the config's references, so derived keys follow these overrides too.
    config = copy.deepcopy(ml_collections.ConfigDict(config))
    config.unlock()
    prefix = f"{where}: " if where else ""
    for path, value in overrides.items():
        if path.split(".")[0] in frozen:
            raise ValueError(
                f"{prefix}--config.{path}: {path.split('.')[0]} keys cannot be overridden at "
                "evaluation, the checkpoint fixes the architecture"
            )
        *parents, leaf = path.split(".")
        node = config
        for depth, part in enumerate(parents):
            if part not in node and allow_new:
                node[part] = ml_collections.ConfigDict()
            here = ".".join(parents[:depth]) or "<top level>"
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                raise ValueError(
                    f"{prefix}unknown config key {path!r}: {here} has no group {part!r}"
                )
            node = node[part]
        if leaf not in node and not allow_new:
            here = ".".join(parents) or "<top level>"
            raise ValueError(
                f"{prefix}unknown config key {path!r}; keys of {here}: "
                f"{', '.join(sorted(node.keys()))}"
            )
        try:
            node[leaf] = _literal(value)
        except TypeError as e:
            try:  # a text value for a text key that reads as a literal ("123" for a name)
                node[leaf] = value
            except TypeError:
                raise ValueError(f"{prefix}--config.{path}={value!r}: {e}") from None
    return config


_OVERRIDE_FLAG = re.compile(r"^--?config\.([A-Za-z_][\w.]*)(?:=|$)")


def define_override_flags(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Define a text flag `config.<key>` for each `--config.<key>=value` in `argv`.

    For commands that read a saved run (eval, the analyses): its keys are known only from the
    workdir's config.json, read after flag parsing, so each override is taken as text here and
    checked and typed by `apply_overrides`.
    """
    for arg in argv:
        match = _OVERRIDE_FLAG.match(arg)
        if match and f"config.{match[1]}" not in flag_values:
            flags.DEFINE_string(
                f"config.{match[1]}", None, "override of the saved config", flag_values=flag_values
            )


def override_flag_values(fv: flags.FlagValues = flags.FLAGS) -> dict[str, str]:
    """{key: text} of the `--config.<key>` overrides given on the command line."""
    return {
        name[len("config.") :]: fv[name].value
        for name in fv
        if name.startswith("config.") and fv[name].present and isinstance(fv[name].value, str)
    }


def config_spec(argv: Sequence[str]) -> str | None:
    """The value of `--config` in a command line, or None."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def check_override_keys(config: ml_collections.ConfigDict, argv: Sequence[str]) -> None:
    """ValueError naming the first `--config.<key>` whose key the config does not have."""
    for arg in argv:
        prefix = next((p for p in ("--config.", "--noconfig.") if arg.startswith(p)), None)
        if prefix is None:
            continue
        path = arg[len(prefix) :].split("=", 1)[0]
        node: Any = config
        for i, part in enumerate(path.split(".")):
            where = "config" + "".join(f".{p}" for p in path.split(".")[:i])
            if node is None:
                raise ValueError(
                    f"unknown config key '{path}' ({arg}): {where} is None in the config file; "
                    "give it a value there first"
                )
            if not isinstance(node, ml_collections.ConfigDict):
                break  # an index into a list/tuple: config_flags checks it
            if part not in node:
                raise ValueError(
                    f"unknown config key '{path}' ({arg}): {where} has no key '{part}'; "
                    f"its keys are: {', '.join(sorted(node.keys()))}"
                )
            node = node[part]


def parse_flags_with_overrides(argv: Sequence[str]) -> list[str]:
    """A command's `flags_parser` (see bgjax.cli): absl's, after `define_override_flags`."""
    from absl import app

    define_override_flags(argv)
    return app.parse_flags_with_usage(list(argv))
