"""The depthwise 'SAME' convolution (stride 1, odd k, kernel [k, k, 1, C]) in its two lowerings.

    grouped   one grouped convolution (`feature_group_count=C`): fast on GPU / TPU;
    shifted   k*k shifted multiply-adds with a hand-written gradient, for XLA:CPU, whose grouped
              convolution is slow (docs/reference.md#cpu-depthwise-convolution; BENCHMARKS.md).

Both give the same values up to the order of floating-point sums. `cpu_kernels.ops` puts one in a
model's `Ops` (`model.kernels`: "grouped" for "xla", "shifted" for "cpu"); `dw_impl` overrides it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def grouped(x, kernel):
    """Depthwise 'SAME' conv as one grouped convolution (fast on GPU/TPU)."""
    kh, kw = kernel.shape[:2]
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(1, 1),
        padding=((kh // 2, kh // 2), (kw // 2, kw // 2)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
    )


def _taps(x, kernel):
    kh, kw = kernel.shape[:2]
    h, w = x.shape[1:3]
    xp = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    out = jnp.zeros_like(x)
    for i in range(kh):
        for j in range(kw):
            out = out + xp[:, i : i + h, j : j + w, :] * kernel[i, j, 0]
    return out


def _shift_multiply_add(x, kernel):
    """Depthwise 'SAME' correlation as k*k shifted multiply-adds of a padded input, computed
    once: XLA fuses elementwise chains into their consumers and recomputes them there, and on
    CPU this one lands inside the next LayerNorm's YNNPACK reduction (materialising every
    shifted input) or inside the FFT's layout transposes (k*k strided reads per element): 2-5x
    slower (BENCHMARKS.md). A conditional is a boundary fusion does not cross; both branches
    are the same function, so which one runs is irrelevant. (`lax.optimization_barrier` does
    not help: XLA:CPU removes it before fusion.)"""
    traced_true = kernel[0, 0, 0, 0] == kernel[0, 0, 0, 0]  # not a constant: the cond stays
    return jax.lax.cond(traced_true, _taps, _taps, x, kernel)


def _fft_size(n: int) -> int:
    """The smallest even 2^a 3^b 5^c 7^d >= n: fast FFT lengths (measured: stage 4's 13 -> 14
    runs its kernel gradient 2x faster than 15; 62 -> 64 and 34 -> 36 beat the odd 63 and 35)."""
    while True:
        m = n
        for p in (2, 3, 5, 7):
            while m % p == 0:
                m //= p
        if m == 1 and n % 2 == 0:
            return n
        n += 1


def _kernel_grad(x, g, kh: int, kw: int):
    """d(loss)/d(kernel) [kh, kw, 1, C] = sum over (b, h, w) of the padded input shifted by
    (i, j) times the output gradient, for all 49 (i, j) at once: a cross-correlation computed
    with FFTs (float32), zero-padded so the circular correlation does not wrap."""
    h, w = x.shape[1:3]
    lh, lw = _fft_size(h + kh - 1), _fft_size(w + kw - 1)
    x, g = x.astype(jnp.float32), g.astype(jnp.float32)
    xp = jnp.pad(x, ((0, 0), (kh // 2, lh - h - kh // 2), (kw // 2, lw - w - kw // 2), (0, 0)))
    gp = jnp.pad(g, ((0, 0), (0, lh - h), (0, lw - w), (0, 0)))
    spectrum = jnp.fft.rfft2(xp, axes=(1, 2)) * jnp.conj(jnp.fft.rfft2(gp, axes=(1, 2)))
    corr = jnp.fft.irfft2(spectrum.sum(axis=0), s=(lh, lw), axes=(0, 1))
    return corr[:kh, :kw, None, :]


@jax.custom_vjp
def shifted(x, kernel):
    """Depthwise 'SAME' conv as k*k shifted multiply-adds of a padded input (odd k).

    XLA:CPU's grouped convolution is ~17x slower than this, fwd+bwd (BENCHMARKS.md). The
    backward pass is written out: the input gradient is the same conv with the flipped kernel,
    and the kernel gradient one FFT cross-correlation; autodiff of the 49 multiply-adds instead
    gives 49 separate reductions, 5x slower and 5x longer to compile (BENCHMARKS.md).
    """
    return _shift_multiply_add(x, kernel)


def _shifted_fwd(x, kernel):
    return _shift_multiply_add(x, kernel), (x, kernel)


def _shifted_bwd(residuals, g):
    x, kernel = residuals
    dx = _shift_multiply_add(g, kernel[::-1, ::-1])
    dk = _kernel_grad(x, g, *kernel.shape[:2]).astype(kernel.dtype)
    return dx, dk


shifted.defvjp(_shifted_fwd, _shifted_bwd)
