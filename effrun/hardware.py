"""Where and how tensors run: device, precision, memory format, compilation, threads, seeds."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import platform
import random
from dataclasses import dataclass
from typing import Optional

import torch

from effrun.errors import EffrunError

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "auto": None}


@functools.cache  # read once per process
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of this CPU from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 autocast is
    emulated and was measured ~10x slower than fp32 for ResNet-20 training (AVX2 AMD EPYC)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def cpu_int8_isa() -> str:
    """The best int8 dot-product instructions of this CPU: amx, avx512_vnni, avx_vnni, avx2,
    none, or unknown where /proc/cpuinfo cannot be read."""
    flags = cpu_flags()
    if not flags:
        return "unknown"
    for flag, name in (("amx_int8", "amx"), ("avx512_vnni", "avx512_vnni"),
                       ("avx_vnni", "avx_vnni"), ("avx2", "avx2")):
        if flag in flags:
            return name
    return "none"


@dataclass
class Hardware:
    """The `hardware` config group. `device: auto` picks CUDA when present, else the CPU."""

    device: str = "auto"  # auto | cpu | cuda[:N]
    # fp32 | bf16 | fp16 (autocast) | auto: bf16 on CUDA and on bf16-native CPUs, else fp32
    precision: str = "auto"
    channels_last: bool = True  # NHWC: faster convs on CPUs (oneDNN) and tensor cores
    compile: bool = False  # torch.compile the training step and the evaluation forward
    threads: Optional[int] = None  # null = torch's default (one per core)
    deterministic: bool = False
    # glibc keeps freed memory for reuse: no page faults on big buffers each step (CPU)
    reuse_freed_memory: bool = True
    # torchrun: BatchNorm statistics of the whole global batch, not each rank's share of it
    # (effrun/distributed.py); no effect with one process
    sync_bn: bool = False

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"hardware.device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"hardware.precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}"
            )
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"hardware.threads must be >= 1 or null, got {self.threads}")

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise EffrunError("hardware.device=cuda but no CUDA device is visible: "
                             "use hardware=cpu or hardware=auto")
        return torch.device(self.device)

    @property
    def resolved_precision(self) -> str:
        """`auto` is bf16 on CUDA and on CPUs with native bf16, else fp32."""
        if self.precision != "auto":
            return self.precision
        if self.torch_device.type == "cuda" or cpu_has_fast_bf16():
            return "bf16"
        return "fp32"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return PRECISIONS[self.resolved_precision]

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed-precision context for forward passes (a no-op in fp32)."""
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.torch_device.type, dtype=dtype)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def setup(self, seed: int) -> torch.device:
        """Apply threads, seeds and determinism for this process; returns the device."""
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        if self.reuse_freed_memory:
            keep_freed_memory()
        seed_everything(seed)
        if self.deterministic:
            # cuBLAS needs this workspace setting for deterministic matmuls.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif torch.cuda.is_available():
            torch.backends.cudnn.benchmark = True
        return self.torch_device

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move a model to the device in the configured memory format."""
        return model.to(self.torch_device, memory_format=self.memory_format)

    def maybe_compile(self, model: torch.nn.Module) -> torch.nn.Module:
        """`model` compiled (torch's own dynamic-shape default) when hardware.compile is on."""
        from effrun.compile import Compiled

        return Compiled(model, dynamic=None) if self.compile else model


def keep_freed_memory(on: bool = True) -> bool:
    """Make glibc keep freed memory in the process for reuse instead of returning it to the OS.

    glibc serves every block over 32 MiB with a fresh mmap and unmaps it on free, so each training
    step faults in its activation buffers page by page again (~750k page faults and ~2 s of kernel
    time per airbench step at batch 1024). With mmap and trimming off, the heap keeps those pages:
    airbench trained 1.26x faster at batch 1024 on 2 AVX2 cores, in a process that stays at its peak
    resident size. The setting is process-wide; `on=False` sets the limits glibc's defaults settle
    at in such a process (for benchmarks that interleave both). Returns False, with a warning,
    where the C library is not glibc.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _warn_no_glibc()
        return False
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_threshold, m_mmap_max = -1, -3, -4  # from glibc's malloc.h
    if on:
        settings = {m_mmap_max: 0, m_trim_threshold: 2**31 - 1}
    else:  # where glibc's dynamic thresholds settle once big blocks were freed: 32 MiB, 2 x that
        settings = {m_mmap_max: 65536, m_mmap_threshold: 32 * 2**20, m_trim_threshold: 64 * 2**20}
    return all(libc.mallopt(option, value) == 1 for option, value in settings.items())


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim), so that resident-size
    growth measures what comes next even where `keep_freed_memory` has kept them; a no-op
    elsewhere."""
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        ctypes.CDLL(None).malloc_trim(0)


@functools.cache  # once per process
def _warn_no_glibc() -> None:
    log.warning("hardware.reuse_freed_memory needs glibc (found %s, libc %r): left off",
                platform.system(), platform.libc_ver()[0])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # numpy is optional for effrun itself
        pass
