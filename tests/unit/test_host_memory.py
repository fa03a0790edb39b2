"""keep_freed_memory: freed tensor buffers are reused, not faulted in again on every allocation;
release_freed_memory: the pages they leave inside the heap go back to the kernel when asked."""

from __future__ import annotations

import platform
import resource

import torch

from service.host_memory import keep_freed_memory, release_freed_memory


def _faults_while_allocating(times: int, numel: int) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(times):
        torch.empty(numel).fill_(1.0)  # touch every page, then free
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_freed_tensor_buffers_are_reused_without_page_faults():
    assert platform.libc_ver()[0] == "glibc"  # the service's images and CI run on glibc
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True  # idempotent
    numel = 2 * 1024 * 1024  # 8 MiB of float32: above glibc's default mmap threshold (128 KiB)
    _faults_while_allocating(1, numel)  # first use may grow the heap
    faults = _faults_while_allocating(20, numel)
    pages_per_buffer = numel * 4 // resource.getpagesize()
    # Reused: at most a buffer or two is faulted in while the heap settles. Untuned glibc unmaps the blocks,
    # and the 20 rounds fault ~9 buffers' worth of pages (18,429 faults measured on Debian 12).
    assert faults <= 2 * pages_per_buffer, f"{faults} page faults for 20 reused 8 MiB buffers"


def _resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def test_free_pages_between_live_blocks_are_released_on_request():
    assert keep_freed_memory() is True
    # 64 MiB in 1 MiB blocks, every other one kept alive: the freed half sits between live blocks, where no
    # trim of the heap's top can reach it (a bundle replaced between long-lived ones leaves such holes).
    blocks = [torch.ones(256 * 1024) for _ in range(64)]
    del blocks[::2]
    before = _resident_mib()
    assert release_freed_memory() is True
    after = _resident_mib()
    assert before - after >= 16, f"resident {before:.1f} -> {after:.1f} MiB: the 32 MiB freed stayed resident"
    assert len(blocks) == 32 and all(float(b[0]) == 1.0 for b in blocks)  # the live half is untouched
