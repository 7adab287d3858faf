"""The stage contract: what a stage method receives and the one result it returns.

Every model-producing stage (train, prune, distill, quantize) is a call

    result = method(model, inputs)        # method: the config dataclass of the chosen option

- `model` is the parent stage's model, reloaded from its artifact (or freshly built for train).
- `inputs` (`StageInputs`) is read-only: the data, the hardware, the run's training settings,
  the parent's record, the stage's directory (for checkpoints) and two services, `fit` (the
  spine's resumable training loop) and `evaluate` (the one evaluation entry).
- `result` (`StageResult`) is everything the stage produced; nothing flows back through
  `inputs`:
    model          the new model
    accuracy       its test top-1 (0..1), as it will be deployed
    metrics        method-specific figures for metrics.json (history, sparsity, ...)
    model_config   the config that rebuilds its architecture; None keeps the parent's
    figures        params / flops / weight_bytes when the model cannot be measured as an
                   nn.Module (an int8 graph); None = the pipeline measures them
    artifact_meta  plain-container entries stored inside the artifact (e.g. pruned widths)
    deploy         how the artifact must run (`Deployment`): what the benchmark may read
    save           how to write the artifact, `save(stage_dir, meta) -> path`; None = effrun's
                   self-describing model.pt (state_dict + model config)
    note           a one-line caveat printed under the summary table

The pipeline writes metrics.json, stage.json and the artifact from the result; the artifact's
metadata is `{"stage", "model_config", "num_classes", "deploy", **artifact_meta}`. Under torchrun
every rank calls the train, prune and distill methods, and a quantize method that trains
(`trains_across_ranks`: int8_qat; the others run on rank 0 alone); rank 0 writes the result.
A method that finishes on rank 0 alone (int8_qat compiles, scores and saves there) returns None
on the other ranks.

What the benchmark may read from an artifact's metadata is only `Deployment`:
    precision        "float": runs as the run trains (autocast precision, memory format);
                     anything else (e.g. "int8"): the model carries its own numerics, runs as is
    compile_options  Inductor settings it must be compiled with (set = only the compiled form is
                     the deployed one: it is scored and timed compiled, also without
                     hardware.compile)
    expected_kernels a regex the compiled code must match (else flagged: e.g. fused int8 kernels)
    compare_to       a reference artifact (its float parent) timed point by point beside it
    device           where it must run ("cpu" for the x86 int8 path, also in a CUDA run; the
                     reference is then timed there too); None = the run's device
    backend          the runtime the artifact is a model of ("onnxruntime", "openvino": an .onnx
                     or OpenVINO IR file, effrun/backends.py); None = torch
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from effrun.data import Augmentation, DataSplits
from effrun.errors import EffrunError
from effrun.evaluate import evaluate
from effrun.hardware import Hardware
from effrun.measure import ModelFigures
from effrun.models import model_config_dict
from effrun.schema import TrainConfig
from effrun.tracking import Tracker
from effrun.train import LossFn, StepHook, fit

log = logging.getLogger("effrun")

# save(stage_dir, artifact metadata) -> the artifact's path
Saver = Callable[[Path, dict], Path]


@dataclass(frozen=True)
class Deployment:
    """How an artifact runs when deployed; the only artifact metadata the benchmark reads."""

    precision: str = "float"
    compile_options: dict | None = None
    expected_kernels: str | None = None
    compare_to: str | None = None
    device: str | None = None  # where it must run (x86 int8: "cpu"); None = the run's device
    backend: str | None = None  # "onnxruntime" / "openvino": not a torch model; None = torch

    @property
    def native(self) -> bool:
        """True when the model carries its own numerics (int8) instead of the run's autocast."""
        return self.precision != "float"

    def to_meta(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_meta(cls, meta: dict) -> Deployment:
        # Artifacts written before the contract kept these keys at the top level.
        source = meta.get("deploy") or meta
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in source.items() if k in known and v is not None}
        return cls(**values)


@dataclass
class StageResult:
    model: nn.Module
    accuracy: float
    metrics: dict[str, Any] = field(default_factory=dict)
    model_config: dict | None = None
    figures: ModelFigures | None = None
    artifact_meta: dict[str, Any] = field(default_factory=dict)
    deploy: Deployment = field(default_factory=Deployment)
    save: Saver | None = None
    note: str | None = None


@dataclass
class ModelRecord:
    """A model a stage produced: where its artifact lies and how it scored."""

    stage: str
    artifact: Path
    model_config: dict
    num_classes: int
    fingerprint: str
    metrics: dict = field(default_factory=dict)


def trainable_hardware(model: nn.Module, hw: Hardware) -> Hardware:
    """`hw`, or a contiguous-format copy when channels_last would crash training on the CPU.

    torch's CPU (oneDNN) backward of a strided 1x1 conv reading fewer than 8 channels corrupts
    the heap in channels_last (double free / segfault, torch 2.14 on AVX2). Such convs appear in
    channel-pruned or very narrow ResNets (the downsampling shortcuts); they train fine in the
    contiguous format, a little slower.
    """
    risky = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)
             and m.kernel_size == (1, 1) and max(m.stride) > 1 and m.in_channels < 8]
    if not (risky and hw.channels_last and hw.torch_device.type == "cpu"):
        return hw
    log.warning("training in contiguous memory format: %s read < 8 channels, which crashes "
                "channels_last training on the CPU", ", ".join(risky))
    return dataclasses.replace(hw, channels_last=False)


@dataclass(frozen=True)
class StageInputs:
    """What a stage method receives (read-only). Build it with `stage_inputs`."""

    stage: str
    stage_dir: Path
    data: DataSplits
    hw: Hardware
    train: TrainConfig
    optimizer: Any
    augmentation: Augmentation
    seed: int
    fingerprint: str
    parent: ModelRecord | None = None
    model_config: dict = field(default_factory=dict)  # rebuilds the parent's architecture
    # The run's tracking session: `fit` reports each epoch to it (a no-op without tracking).
    tracker: Tracker = field(default_factory=Tracker)

    def fit(self, model: nn.Module, *, epochs: int | None = None, optimizer: Any = None,
            loss_fn: LossFn | None = None, after_step: StepHook | None = None,
            augment: Any = "default", name: str = "checkpoint", hw: Hardware | None = None,
            **train_overrides) -> dict:
        """The spine's training loop, checkpointed (and resumable) in this stage's directory.

        `optimizer` defaults to the run's; `train_overrides` replace fields of the run's `train`
        config (e.g. batch_size); `hw` replaces the run's hardware. Use a distinct `name` per
        call in one stage: it names the checkpoint file.
        """
        train_cfg = dataclasses.replace(self.train, **train_overrides)
        desc = self.stage if name == "checkpoint" else f"{self.stage}:{name}"
        return fit(model, self.data, hw=trainable_hardware(model, hw or self.hw), train=train_cfg,
                   optimizer=optimizer or self.optimizer,
                   augment=self.augmentation if augment == "default" else augment,
                   checkpoint=self.stage_dir / f"{name}.pt", seed=self.seed,
                   fingerprint=self.fingerprint, epochs=epochs, loss_fn=loss_fn,
                   after_step=after_step, desc=desc,
                   on_epoch=lambda record: self.tracker.log_epoch(desc, record))

    def evaluate(self, model: nn.Module, split: str = "test", *, tta: str | None = None,
                 limit: int | None = None, hw: Hardware | None = None,
                 batch_size: int | None = None, pad_last: bool = False) -> dict:
        """Accuracy and loss of `model` on a split ("test" or "val"), with the run's TTA unless
        `tta` is given; `limit` scores the first images only; `hw` replaces the run's hardware
        (e.g. plain fp32 CPU for int8 graphs); `pad_last` keeps every batch one shape (for a
        model compiled for a static shape)."""
        x, y = (self.data.test_x, self.data.test_y) if split == "test" else (
            self.data.val_x, self.data.val_y)
        if x is None:
            raise EffrunError(f"no {split} split: set dataset.val_fraction > 0")
        if limit is not None:
            x, y = x[:limit], y[:limit]
        hw = hw or self.hw
        return evaluate(hw.prepare(model), x, y, self.data, hw,
                        batch_size=batch_size or self.train.eval_batch_size,
                        tta=self.train.tta if tta is None else tta, pad_last=pad_last)


def stage_inputs(config, stage: str, stage_dir: Path, data: DataSplits, *,
                 parent: ModelRecord | None = None, fingerprint: str = "",
                 tracker: Tracker | None = None) -> StageInputs:
    """The inputs of `stage` under a validated config (`effrun.schema.EffrunConfig`); the one
    place they are built: the pipeline, the tests and the scripts all call this."""
    return StageInputs(stage=stage, stage_dir=Path(stage_dir), data=data, hw=config.hardware,
                       train=config.run.train, optimizer=config.optimizer,
                       augmentation=config.augmentation, seed=config.run.seed,
                       fingerprint=fingerprint, parent=parent,
                       model_config=parent.model_config if parent else
                       model_config_dict(config.model), tracker=tracker or Tracker())
