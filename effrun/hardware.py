"""Where and how tensors run: device, precision, memory format, compilation, threads, seeds."""

from __future__ import annotations

import contextlib
import functools
import os
import random
from dataclasses import dataclass
from typing import Optional

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "auto": None}


@functools.cache  # asked on every autocast() call, i.e. every training step
def cpu_has_fast_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 autocast is
    emulated and was measured ~10x slower than fp32 for ResNet-20 training (AVX2 AMD EPYC)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass
class Hardware:
    """The `hardware` config group. `device: auto` picks CUDA when present, else the CPU."""

    device: str = "auto"
    precision: str = "auto"
    channels_last: bool = False
    compile: bool = False
    threads: Optional[int] = None
    deterministic: bool = False

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
            raise ValueError("hardware.device=cuda but no CUDA device is visible: "
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

    def maybe_compile(self, fn):
        return torch.compile(fn) if self.compile else fn


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # numpy is optional for effrun itself
        pass
