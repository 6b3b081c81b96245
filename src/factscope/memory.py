"""Keep the process's resident memory near the model's own: the allocator settings of a run, and giving freed memory
back to the system between batches.

Measured on SmolLM2 in fp32 (BENCHMARKS.md, "Without folding"): with glibc's defaults, the decomposition's
medium-sized tensors (activations of a batch, ~0.1–1 MB each) and pyarrow's buffers left the heap fragmented, and
resident memory grew by ~100 MB over the batches and the merge of their tables, memory that was free but never
returned. Both calls are no-ops where the C library is not glibc (macOS, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache

M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h
# buffers from this size up get their own mapping, returned to the system when freed. glibc's default starts at
# 128 KiB but rises to 32 MiB as such buffers are freed, after which they fragment the heap. Smaller, fixed
# thresholds saved no more memory on SmolLM2 and cost twice the system time (256 KiB: +2.3 s of page faults).
MMAP_THRESHOLD = 1 << 20


@cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name)
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def tune_allocator() -> None:
    """Before a model loads: a fixed mmap threshold for glibc, and pyarrow on the system allocator, so that
    `release_free_memory` can return what pyarrow frees (its default pool, mimalloc, keeps it)."""
    import pyarrow as pa

    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        pa.set_memory_pool(pa.system_memory_pool())


def release_free_memory() -> None:
    """Return the heap's free pages to the system (glibc's malloc_trim): after each batch and when a stage
    drops a large object, so the next step starts from what is really in use."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def release_unreferenced() -> None:
    """`release_free_memory` after a collection: for a large object just dropped whose parts may sit in reference
    cycles (a model's bridge: its hooks refer back to the modules), which only the collector frees."""
    import gc

    gc.collect()
    release_free_memory()
