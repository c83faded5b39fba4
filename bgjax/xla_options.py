"""Per-executable XLA compiler options: the hot jits (train, eval, saliency, adversarial) pass
`compiler_options()` to `jax.jit`.

On the CPU backend, measured on the real ConvNeXt-T / ViT-S train steps (BENCHMARKS.md):
- Matrix products go to Eigen instead of YNNPACK (XLA's default routes every standalone dot
  to YNNPACK). YNNPACK's kernels are slow on ConvNeXt's narrow early stages (96 / 192 channels:
  e.g. the [50176, 384] x [384, 96] input gradient at 92 GFLOP/s, Eigen 226): ConvNeXt-T step
  -6%; ViT-S and the demo's small models unchanged. YNNPACK keeps its reductions and
  convolutions (without them the step is 60% slower).
- 512-bit vectors for XLA's own loops (it prefers 256): the depthwise convolution's 49-tap
  multiply-add runs ~30% faster; ConvNeXt-T step another -3%.
Both are plain DebugOptions fields, so they apply to that one executable, whatever else the
process compiles. Options a user sets in `XLA_FLAGS` win (we leave those keys out), and a jaxlib
that no longer knows one of them gets none (checked once, on a tiny compile).

On GPUs: the latency-hiding scheduler (`_GPU_OPTIONS`, unmeasured). TPUs: none.

Also here, the other per-process runtime settings of the commands: the persistent compilation
cache (`enable_compilation_cache`, on for train, eval and the demo) and the profiler window of
`config.profile_steps` (`StepProfiler`).
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp

_CPU_OPTIONS = {
    # The default list minus LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT.
    "xla_cpu_experimental_ynn_fusion_type": (
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,LIBRARY_FUSION_TYPE_REDUCE"
    ),
    "xla_cpu_prefer_vector_width": 512,
}
# NVIDIA's JAX-Toolbox advice for data-parallel training (docs/GPU_performance.md there): the
# latency-hiding scheduler overlaps the gradient all-reduce / FSDP all-gathers with compute.
# Not measured here (no GPU lent to this project yet): to be kept only if the compiled schedule
# on a GPU shows the overlap (async collective starts ahead of their dones in the HLO).
_GPU_OPTIONS = {"xla_gpu_enable_latency_hiding_scheduler": True}


def compiler_options(backend: str | None = None) -> dict | None:
    """Options for `jax.jit(..., compiler_options=...)` on `backend` (default: JAX's)."""
    backend = backend or jax.default_backend()
    xla_flags = os.environ.get("XLA_FLAGS", "")
    if backend == "cpu":
        return _cpu_options(xla_flags)
    if backend == "gpu":
        return _gpu_options(xla_flags)
    return None


@functools.cache
def _cpu_options(xla_flags: str) -> dict | None:
    return supported(_CPU_OPTIONS, xla_flags, "XLA:CPU")


@functools.cache
def _gpu_options(xla_flags: str) -> dict | None:
    return supported(_GPU_OPTIONS, xla_flags, "XLA:GPU")


def supported(options: dict, xla_flags: str, what: str) -> dict | None:
    """`options` less those `xla_flags` sets, if this jaxlib compiles with them (a tiny
    compile on the default backend), else None."""
    options = {k: v for k, v in options.items() if f"--{k}" not in xla_flags}
    if not options:
        return None
    try:
        jax.jit(lambda x: x @ x, compiler_options=options).lower(jnp.ones((2, 2))).compile()
    except Exception as error:  # an older/newer jaxlib without these options or values
        logging.warning("%s compiler options %s not supported here (%s)", what, options, error)
        return None
    return options


# ---------------------------------------------------------------------------------------------
# Compilation cache and profiling


def default_cache_dir() -> str:
    """Shared by all runs of a user, so a rerun or another run of the same model reuses the
    compiled train / eval steps: $XDG_CACHE_HOME/bgjax/jax (default ~/.cache/bgjax/jax)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "bgjax", "jax")


def enable_compilation_cache(directory: str | None = None) -> str:
    """JAX's persistent compilation cache in `directory` (default `default_cache_dir()`),
    unless the user configured one (JAX_COMPILATION_CACHE_DIR or jax.config); returns the
    directory in use. Call before the first compilation."""
    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", directory or default_cache_dir())
    return jax.config.jax_compilation_cache_dir


class StepProfiler:
    """A `jax.profiler` trace of steps [first, last] (`config.profile_steps`, 1-based) into
    `directory` (TensorBoard's profile plugin or Perfetto open it). The trainer calls
    `before_step` / `after_step` around each step's dispatch and `close` at the end."""

    def __init__(self, steps, directory):
        steps = tuple(steps or ())
        if steps and (len(steps) != 2 or not 0 < steps[0] <= steps[1]):
            raise ValueError(
                f"config.profile_steps must be (first, last) with 0 < first <= last, got {steps}"
            )
        self.first, self.last = steps or (None, None)
        self.directory = str(directory)
        self.active = False

    def before_step(self, step: int, state) -> None:
        if step == self.first:
            jax.block_until_ready(state)  # the window holds its steps only
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after_step(self, step: int, state) -> None:
        if self.active and step == self.last:
            jax.block_until_ready(state)
            self.close()

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            logging.info("profile of steps %s-%s in %s", self.first, self.last, self.directory)
