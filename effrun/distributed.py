"""Data-parallel runs under torchrun: the process group, which rank does what, and DDP.

torchrun starts one effrun per rank with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT set; `init` (the CLI calls it before Hydra composes) joins them into one process
group: gloo for CPU tensors, and NCCL for CUDA tensors where a GPU and NCCL are there (one
rank under torchrun too: it trains through DDP in a group of one). Without torchrun nothing
here communicates: every query answers rank 0 of 1.

Who does what:
- every rank trains (`data_parallel`: DistributedDataParallel, each rank its shard of every
  global batch, gradients all-reduced) and scores its shard of an evaluation (counts summed);
- rank 0 alone writes: the run dir's records, checkpoints, artifacts, the log, summary.json;
- `on_main(fn)`: single-process work (quantize, benchmark, the stage cache) runs on rank 0
  while the others wait, and every rank returns rank 0's result (or raises its error). Inside
  it rank 0 is alone: nothing in it communicates (`rank_and_world` answers rank 0 of 1).
  `main_only(fn)` is the same with the result kept on rank 0 (the others get None).
- A quantize method that trains (`trains_across_ranks`: int8_qat) runs on every rank: they
  fine-tune together, then rank 0 alone compiles, scores and saves (`main_only`).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from effrun.errors import ConfigError, EffrunError

T = TypeVar("T")
# How long a rank waits in a collective, e.g. for rank 0 to quantize and benchmark alone. A rank
# that dies makes torchrun stop the others at once; this only bounds a rank that hangs.
WAIT_LIMIT = timedelta(hours=4)
_state = {"alone": False, "started": None}
# Stages that are one process by nature: rank 0 computes them while the others wait.
SINGLE_PROCESS_STAGES = ("quantize", "benchmark")


def init() -> None:
    """Join torchrun's process group (from its environment variables); a no-op for one rank.
    The CUDA device is the one LOCAL_RANK names. Rank 0's clock names the run dir of all."""
    _state["started"] = time.time()  # this command's start (`started`)
    # One rank under torchrun joins too (a group of one): it trains through DDP as a larger
    # job would, e.g. to check the NCCL path on a single GPU. Plain `effrun` joins nothing.
    by_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    if dist.is_initialized() or not (by_torchrun or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        return
    backend, ranks_here = "gloo", int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    # One rank per GPU; more ranks on a node than GPUs (CPU ranks on a GPU machine): gloo only.
    if dist.is_nccl_available() and 0 < ranks_here <= torch.cuda.device_count():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"  # each tensor's device picks its backend
    dist.init_process_group(backend, timeout=WAIT_LIMIT)
    _state["started"] = broadcast_object(_state["started"])


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def started() -> datetime:
    """When this command started (`init`): rank 0's clock under torchrun, so that every rank
    composes the same timestamped run dir; the first call's time where `init` did not run."""
    if _state["started"] is None:
        _state["started"] = time.time()
    return datetime.fromtimestamp(_state["started"])


def rank_and_world() -> tuple[int, int]:
    """(this rank, the number of ranks) that train together; (0, 1) without torchrun and inside
    `on_main`."""
    if _state["alone"] or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def describe() -> str:
    """The torchrun job for the log: "2 ranks (gloo)"; "" without torchrun."""
    if not dist.is_initialized():
        return ""
    return f"{dist.get_world_size()} ranks ({dist.get_backend()})"


def job_size() -> int:
    """The number of ranks of this torchrun job (1 without torchrun), also inside `on_main`."""
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """True on the rank that writes (rank 0), and in a run without torchrun."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()


def broadcast_object(obj: T) -> T:
    """Rank 0's `obj` on every rank (picklable; through the CPU backend)."""
    if rank_and_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=torch.device("cpu"))
    return box[0]


def all_reduce_sum(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Each tensor summed over the ranks (one collective for all); as given with one rank."""
    if rank_and_world()[1] == 1:
        return list(tensors)
    flat = torch.cat([t.detach().reshape(-1).double() for t in tensors])
    dist.all_reduce(flat)
    sizes = [t.numel() for t in tensors]
    return [part.view(t.shape).to(t.dtype)
            for part, t in zip(flat.split(sizes), tensors, strict=True)]


def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` computed once, on rank 0, alone; every rank returns its result.
    The others wait meanwhile. An EffrunError or ConfigError there is raised on every rank
    (any other exception is a bug: rank 0 shows its traceback and torchrun stops the others)."""
    return _alone_on_main(fn, args, kwargs, share=True)


def main_only(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """As `on_main`, but the result stays on rank 0 (the others return None): for results that
    only rank 0 writes and that need not, or cannot, be pickled (a model, a saving closure)."""
    return _alone_on_main(fn, args, kwargs, share=False)


def _alone_on_main(fn: Callable[..., T], args: tuple, kwargs: dict, share: bool) -> T | None:
    if rank_and_world()[1] == 1:
        return fn(*args, **kwargs)
    outcome: tuple[str, Any] = ("ok", None)
    if is_main():
        _state["alone"] = True
        try:
            outcome = ("ok", fn(*args, **kwargs))
        except (EffrunError, ConfigError) as e:
            outcome = ("error", e)
        finally:
            _state["alone"] = False
    kind, value = broadcast_object(outcome if share or outcome[0] == "error" else ("ok", None))
    if kind == "error":
        if not is_main():
            value.forwarded = True  # rank 0 reports it; see effrun.cli.report_failure
        raise value
    return outcome[1] if is_main() else value


def per_rank_batch(batch_size: int, key: str = "train.batch_size") -> int:
    """A global batch's share of one rank; a size the ranks cannot split evenly is refused."""
    world = rank_and_world()[1]
    if batch_size % world:
        raise ConfigError(f"{key}={batch_size} is not divisible by the {world} ranks of this "
                          f"torchrun job: it is the global batch, each rank takes "
                          f"{key} / {world} of it")
    return batch_size // world


@contextlib.contextmanager
def data_parallel(model: nn.Module, sync_bn: bool) -> Iterator[nn.Module]:
    """`model` wrapped for training on every rank: DistributedDataParallel (each rank's
    gradients averaged over the ranks in backward); the model itself without torchrun. With
    `sync_bn` its BatchNorm layers use the statistics of the whole global batch while inside
    (layers sharing the originals' tensors; the originals are put back on exit). Under
    torchrun with one rank it is DDP too (a group of one: the path a larger job takes)."""
    if _state["alone"] or not dist.is_initialized():
        yield model
        return
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    swapped = _swap_batchnorm(model, lambda bn: _synced_batchnorm(bn, cuda)) if sync_bn else {}
    try:
        yield nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if cuda else None)
    finally:
        for name, original in swapped.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, original)


def _swap_batchnorm(model: nn.Module, make: Callable[[_BatchNorm], nn.Module]
                    ) -> dict[str, nn.Module]:
    """Every BatchNorm layer inside `model` replaced by `make(layer)`, in place; returns the
    replaced layers by name."""
    swapped = {}
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, _BatchNorm) and not isinstance(child, SYNCED):
                setattr(module, child_name, make(child))
                swapped[f"{name}.{child_name}" if name else child_name] = child
    return swapped


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics are those of the global batch: the per-channel sums
    of every rank are all-reduced (autograd-aware, so each rank's loss reaches every rank's
    inputs), as torch's SyncBatchNorm does on GPUs only. Evaluation uses the running
    statistics, as any BatchNorm."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {input.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or rank_and_world()[1] == 1:
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        xf = x.float()
        count = torch.full((1,), x.numel() / x.shape[1], device=x.device)
        sums = _SumOverRanks.apply(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count]))
        channels, total = x.shape[1], sums[-1]
        mean = sums[:channels] / total
        var = (sums[channels:2 * channels] / total - mean * mean).clamp_min(0)
        if self.track_running_stats:
            self._update_running(mean.detach(), var.detach() * total / (total - 1).clamp_min(1))
        shape = [1, channels] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        factor = (self.momentum if self.momentum is not None
                  else 1.0 / float(self.num_batches_tracked))
        self.running_mean.lerp_(mean, factor)
        self.running_var.lerp_(unbiased_var, factor)


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) that autograd goes through: the gradient of a sum over the ranks is
    the sum of every rank's gradient."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


SYNCED = (nn.SyncBatchNorm, GlobalBatchNorm)


def _synced_batchnorm(bn: _BatchNorm, cuda: bool) -> nn.Module:
    """A synchronised twin of `bn` sharing its parameters and statistics tensors: torch's
    SyncBatchNorm on CUDA (it supports nothing else), GlobalBatchNorm elsewhere."""
    kind = nn.SyncBatchNorm if cuda else GlobalBatchNorm
    twin = kind(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    if bn.affine:
        twin.weight, twin.bias = bn.weight, bn.bias
    if bn.track_running_stats:
        twin.running_mean, twin.running_var = bn.running_mean, bn.running_var
        twin.num_batches_tracked = bn.num_batches_tracked
    return twin.train(bn.training)
