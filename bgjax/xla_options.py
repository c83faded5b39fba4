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
that no longer knows one of them gets none (checked once, on a tiny compile). Accelerators: none.
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


def compiler_options(backend: str | None = None) -> dict | None:
    """Options for `jax.jit(..., compiler_options=...)` on `backend` (default: JAX's)."""
    backend = backend or jax.default_backend()
    if backend != "cpu":
        return None
    return _cpu_options(os.environ.get("XLA_FLAGS", ""))


@functools.cache
def _cpu_options(xla_flags: str) -> dict | None:
    options = {k: v for k, v in _CPU_OPTIONS.items() if f"--{k}" not in xla_flags}
    if not options:
        return None
    try:
        jax.jit(lambda x: x @ x, compiler_options=options).lower(jnp.ones((2, 2))).compile()
    except Exception as error:  # an older/newer jaxlib without these options or values
        logging.warning("XLA:CPU compiler options %s not supported here (%s)", options, error)
        return None
    return options
