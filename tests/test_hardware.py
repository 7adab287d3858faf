"""hardware.reuse_freed_memory: glibc keeps big freed blocks, so reusing them costs no faults."""

import platform
import resource

import pytest
import torch

from effrun.hardware import Hardware, keep_freed_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
BLOCKS_MIB = (64, 48, 64, 40)  # each above glibc's largest dynamic mmap threshold (32 MiB)
PAGES = sum(BLOCKS_MIB) * 2**20 // resource.getpagesize()


def faults_per_step(steps: int = 4) -> list[int]:
    """Page faults of each of `steps` rounds that allocate, fill and free the same big tensors,
    the memory pattern of a training step."""
    out = []
    for _ in range(steps):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        blocks = [torch.ones(mib * 2**18) for mib in BLOCKS_MIB]
        del blocks
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return out


@pytest.mark.skipif(not GLIBC, reason="the setting exists only in glibc")
def test_reuse_freed_memory_avoids_page_faults():
    try:
        assert keep_freed_memory(False)
        # glibc's default: every block is mmapped, unmapped on free and faulted in again.
        assert min(faults_per_step()) > PAGES // 2
        assert keep_freed_memory(True)
        # The heap grows over the first few steps (aligned requests fragment it; seen: 3 to 8
        # steps), then a step reuses it whole.
        assert min(faults_per_step(12)) < PAGES // 20
    finally:
        keep_freed_memory(True)  # what hardware=cpu sets anyway


@pytest.mark.skipif(not GLIBC, reason="the setting exists only in glibc")
def test_hardware_setup_applies_reuse_freed_memory():
    try:
        keep_freed_memory(False)
        Hardware(device="cpu", reuse_freed_memory=True).setup(0)
        assert min(faults_per_step(12)) < PAGES // 20
    finally:
        keep_freed_memory(True)


@pytest.mark.skipif(GLIBC, reason="checks the fallback where glibc is absent")
def test_reuse_freed_memory_is_a_warning_without_glibc():
    assert keep_freed_memory(True) is False
