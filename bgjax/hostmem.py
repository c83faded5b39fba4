"""Host memory: make glibc malloc keep freed buffers, so big per-step buffers are reused.

XLA:CPU allocates one block for all temporaries of a step (1.4 GB for ViT-S/16, ~2.5 GB for
ConvNeXt-T at batch 16 and 224 px) and frees it when the step ends. By default glibc serves such a
block with a fresh `mmap` and unmaps it on free, so every step page-faults and zero-fills the whole
block again: 390k / ~650k page faults per step, 12-15% of the step on 2 cores (BENCHMARKS.md).

`keep_freed_memory` (run by `bgjax` and the benchmarks before JAX starts) makes the main heap
serve big blocks too and never hand freed memory back, so the next step reuses the block. The
block must then be allocated on the main thread: JAX's CPU client dispatches asynchronously on a
worker thread by default, and a worker thread's arena cannot hold more than 64 MB (glibc maps
bigger blocks whatever the settings). With synchronous CPU dispatch the step runs on the calling
thread: `BGJAX_KEEP_HEAP=sync` in the environment (for `bgjax` commands), or
`sync_cpu_dispatch()` before JAX starts. That is worth it for big models on the CPU (0 faults per
step, ViT-S step -12%); the demo's small models have small blocks and keep asynchronous dispatch
(measured ~3% faster).
(One shared arena, `M_ARENA_MAX=1`, would also do it, but costs the demo's threaded input
pipeline 10% in lock contention.) The price: the process keeps its peak heap until it exits.
`BGJAX_KEEP_HEAP=0` turns it all off. Not glibc (macOS, musl): a no-op.

CPU backend only: on a GPU/TPU host the step's buffers live on the device, and keeping the peak
heap would only hold host memory. The backend must be known before JAX starts (the settings
apply to blocks allocated afterwards, and synchronous dispatch only before JAX's CPU client
exists), so `cpu_backend` reads what JAX will read, without importing it: `JAX_PLATFORMS`, whose
first entry is the default backend, and otherwise whether an accelerator plugin is installed (a
PJRT plugin, found as JAX finds them: the `jax_plugins` entry points and namespace package, or
libtpu). An installed plugin on a host without the device (JAX then falls back to the CPU, with a
warning) leaves the heap as glibc has it: only slower, never wrong; `JAX_PLATFORMS=cpu` states it.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import pkgutil
import platform
from importlib import metadata

# glibc's mallopt parameter numbers (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4


def _mallopt(settings: dict[int, int]) -> bool:
    """Apply glibc mallopt settings; False (and nothing changed) where there is no glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    applied = [libc.mallopt(param, value) == 1 for param, value in settings.items()]
    return all(applied)


def cpu_backend() -> bool:
    """Whether JAX's default backend will be the CPU, decided without starting JAX."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    return not _accelerator_plugins()


def _accelerator_plugins() -> list[str]:
    """The installed PJRT plugins (CUDA, ROCm, TPU, ...), named as JAX discovers them."""
    found = [entry.name for entry in metadata.entry_points(group="jax_plugins")]
    namespace = importlib.util.find_spec("jax_plugins")
    if namespace is not None and namespace.submodule_search_locations:
        found += [m.name for m in pkgutil.iter_modules(namespace.submodule_search_locations)]
    if os.environ.get("TPU_LIBRARY_PATH") or importlib.util.find_spec("libtpu") is not None:
        found.append("tpu")
    return found


def keep_freed_memory() -> bool:
    """Big freed blocks stay in the main heap for reuse; `BGJAX_KEEP_HEAP`: 1 (default), 0 (off)
    or sync (also `sync_cpu_dispatch`). Nothing happens unless JAX will run on the CPU
    (`cpu_backend`). Returns whether the heap settings were applied."""
    mode = os.environ.get("BGJAX_KEEP_HEAP", "1")
    if mode not in ("0", "1", "sync"):
        raise ValueError(f"BGJAX_KEEP_HEAP must be 0, 1 or sync, got {mode!r}")
    if mode == "0" or not cpu_backend():
        return False
    if mode == "sync":
        sync_cpu_dispatch()
    # No mmap: big blocks come from the main heap too. Trim threshold -1: freed memory is never
    # returned to the OS (glibc's documented "disable trimming" value).
    return _mallopt({M_MMAP_MAX: 0, M_TRIM_THRESHOLD: -1})


def sync_cpu_dispatch() -> None:
    """Run CPU computations on the calling thread, so their big blocks come from (and go back
    to) the main heap. Takes effect only before JAX creates its CPU client."""
    import jax

    jax.config.update("jax_cpu_enable_async_dispatch", False)


def keep_freed_image_buffers(worker_index: int = 0, worker_count: int = 0) -> None:
    """Grain worker init: keep freed image buffers instead of returning them.

    In a fresh worker process every ~150 KB image buffer (decode, composite, crop) was mmap'd
    and unmapped again: ~2,000 page faults per 32 x 224 px batch (the main process: ~4) and ~18%
    more CPU per image. Fixed thresholds keep freed buffers in the heap for reuse, while a worker's
    memory still shrinks after a burst (unlike `keep_freed_memory`).
    """
    del worker_index, worker_count
    _mallopt({M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 256 << 20})  # 32 MB: glibc's max
