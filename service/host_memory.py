"""Host memory: let glibc keep freed tensor buffers for reuse instead of handing them back to the kernel.

PyTorch's CPU tensors come from malloc. glibc serves large blocks with fresh `mmap`s and unmaps them on free
(and trims the heap top past 128 KiB), so every forward pass faults its activations in page by page again:
~13,000 page faults per batch of 32 sentences on MiniLM, each page zeroed by the kernel (and the faults of
parallel threads can contend for the process's memory map lock). Raising the mmap and trim thresholds keeps those
blocks in the heap, as jemalloc or tcmalloc would: faster CPU forwards (bench/engine.py with and without
`--keep-freed-memory`, docs/benchmarks.md). The cost: the heap stays at its peak size instead of shrinking
between batches.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's maximum: blocks above it (none at batch sizes we serve) still map
TRIM_THRESHOLD = 1024 * 1024 * 1024


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - glibc only; musl and macOS have no such symbol
    except (OSError, AttributeError):
        log.info("not glibc: host allocator left as it is")
        return None
    return libc


def limit_arenas(arenas: int) -> bool:
    """Cap glibc's heap arenas (its default: 8 per core, one more for each new thread that finds the others
    locked). Bundles are decoded on the upload's worker thread and freed later by whichever thread drops
    them, and every worker thread that ever decoded one keeps an arena holding that freed memory for its own
    next allocation: with many threads the process grows with uploads (docs/benchmarks.md, "Soak"). Call it
    before threads start; threads that already have an arena keep it. False where the C library is not
    glibc."""
    libc = _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_ARENA_MAX, arenas) == 1
    if not ok:
        log.warning("mallopt refused the arena limit %d", arenas)
    return ok


def keep_freed_memory() -> bool:
    """Apply the thresholds to this process (idempotent). False where the C library is not glibc."""
    libc = _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        log.warning("mallopt refused the host allocator thresholds")
    return ok


def release_freed_memory() -> bool:
    """Hand the free pages inside the heaps back to the kernel (glibc `malloc_trim(0)`; under a millisecond).

    With the thresholds above nothing is ever trimmed, so memory freed between long-lived blocks stays
    resident: each replaced task version leaves its decoded bundle's pages behind, and the process grew with
    uploads while the memory in use stayed flat (docs/benchmarks.md, "Soak"). The runtime calls this when a
    task's versions change (rare next to forwards); the next forward faults in only what it needs again.
    Not a setting of the process: an action, harmless where called. False where the C library is not glibc."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
