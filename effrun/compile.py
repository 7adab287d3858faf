"""The one compile wrapper and the one fused-kernel lister, used by training, evaluation, the
quantize stage, the benchmark and the scripts alike."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable

import torch
from torch import nn

# Inductor's x86 int8 lowering (torch 2.14) warns about its own torch.tensor(tensor) call on
# every compile; it is torch-internal and says nothing about the user's model.
warnings.filterwarnings("ignore", message="To copy construct from a tensor",
                        category=UserWarning, module=r"torch\._inductor\.mkldnn_lowerings")

# Inductor settings of every model compiled for inference (float and int8): freezing folds
# BatchNorm into the convs, treats weights as constants and prepacks them for oneDNN.
INFERENCE_OPTIONS = {"freezing": True}
# Fused oneDNN int8 kernels as named in Inductor's generated code (Python or C++ wrapper).
FUSED_INT8_OP = re.compile(r"(?:onednn\.|aoti_torch_cpu__)(q(?:conv|linear)\w*)")


class Compiled(nn.Module):
    """torch.compile of a model; every (re)compilation runs under the given Inductor settings.

    `dynamic=False` (the default) gives each input shape its own graph, as a deployment at one
    batch size would (a graph recompiled with a symbolic batch was measured ~5x slower at batch
    1 on the CPU); training passes `dynamic=None`, torch's own default. train()/eval() reach the
    wrapped model, so an exported graph that refuses them is wrapped before compiling.
    """

    def __init__(self, model: nn.Module, options: dict | None = None,
                 dynamic: bool | None = False):
        super().__init__()
        self.model, self.options = model, dict(options or {})
        self.compiled = torch.compile(model, dynamic=dynamic)

    def train(self, mode: bool = True) -> Compiled:
        self.training = mode
        self.model.train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch._inductor.config.patch(**self.options):
            return self.compiled(x)


def fused_int8_kernels(code: str | Iterable[str]) -> dict[str, int]:
    """How often each fused int8 kernel is called in generated code (empty: nothing fused)."""
    text = code if isinstance(code, str) else "\n".join(code)
    counts: dict[str, int] = {}
    for op in FUSED_INT8_OP.findall(text):
        op = op.removesuffix("_tensor")  # the C++ wrapper's name for the same kernel
        counts[op] = counts.get(op, 0) + 1
    return counts


def compile_and_list_kernels(compiled: Compiled, example: torch.Tensor) -> dict[str, int]:
    """First call of a Compiled model at `example`'s shape; returns the fused int8 kernels in
    the code Inductor generated for it."""
    from torch._inductor.utils import run_and_get_code

    with torch.no_grad(), torch._inductor.config.patch(**compiled.options):
        _, codes = run_and_get_code(compiled.compiled, example)
    return fused_int8_kernels(codes)
