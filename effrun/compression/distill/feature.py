"""Hint (feature) distillation, after FitNets (Romero et al., 2015), on top of the logit loss.

Named student layers are matched to named teacher layers; a learned 1x1 conv per pair maps the
student's channels to the teacher's (spatial sizes are matched by average pooling), and the mean
squared error between them is added to the KD loss with weight `beta`. The projections train
with the student and are dropped afterwards: the artifact is the plain student.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from effrun.compression.distill.kd import KEY, DistillBase, kd_loss
from effrun.errors import EffrunError
from effrun.train import LossFn


def _record(module: nn.Module, layers: list[str], store: list, key: str) -> list:
    """Forward hooks that put each named layer's output into store[i]; returns the handles."""
    modules = dict(module.named_modules())
    handles = []
    for i, name in enumerate(layers):
        if name not in modules or not name:
            raise EffrunError(f"{KEY}.{key}: no layer named {name!r}")

        def hook(_m, _inputs, output, i=i):
            store[i] = output
        handles.append(modules[name].register_forward_hook(hook))
    return handles


class HintStudent(nn.Module):
    """The student plus one projection per hint pair: what the training loop optimizes."""

    def __init__(self, student: nn.Module, layers: list[str], student_channels: list[int],
                 teacher_channels: list[int]):
        super().__init__()
        self.student = student
        self.proj = nn.ModuleList(nn.Conv2d(cs, ct, 1, bias=False)
                                  for cs, ct in zip(student_channels, teacher_channels,
                                                    strict=True))
        self.features: list = [None] * len(layers)
        self.handles = _record(student, layers, self.features, "student_layers")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)

    def hint_loss(self, teacher_features: list[torch.Tensor]) -> torch.Tensor:
        total = 0.0
        for proj, s, t in zip(self.proj, self.features, teacher_features, strict=True):
            s = proj(s.float())
            if s.shape[-2:] != t.shape[-2:]:
                s = F.adaptive_avg_pool2d(s, t.shape[-2:])
            total = total + F.mse_loss(s, t.float())
        return total / len(self.proj)


@dataclass
class FeatureKD(DistillBase):
    student_layers: list[str] = field(default_factory=lambda: ["layer1", "layer2", "layer3"])
    teacher_layers: list[str] = field(default_factory=lambda: ["layer1", "layer2", "layer3"])
    beta: float = 1.0  # weight of the hint loss added to the KD loss

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.student_layers or len(self.student_layers) != len(self.teacher_layers):
            raise ValueError(f"{KEY}.student_layers and {KEY}.teacher_layers must be non-empty "
                             f"lists of equal length")
        if self.beta < 0:
            raise ValueError(f"{KEY}.beta must be >= 0, got {self.beta}")

    def setup(self, model: nn.Module, inputs) -> tuple[nn.Module, nn.Module, dict | None]:
        teacher, student, student_config = super().setup(model, inputs)
        # Check the layer names and read the feature widths now, before any training.
        self._widths = {}
        for net, layers, key in ((student, self.student_layers, "student_layers"),
                                 (teacher, self.teacher_layers, "teacher_layers")):
            store = [None] * len(layers)
            handles = _record(net, layers, store, key)
            device = next(net.parameters()).device
            with torch.no_grad():
                net.eval()(torch.zeros(1, 3, *inputs.data.image_size, device=device))
            for h in handles:
                h.remove()
            for name, out in zip(layers, store, strict=True):
                if not isinstance(out, torch.Tensor) or out.dim() != 4:
                    raise EffrunError(f"{KEY}.{key}: {name!r} does not output an NCHW feature map")
            self._widths[key] = [out.shape[1] for out in store]
        return teacher, student, student_config

    def trainable(self, student: nn.Module, teacher: nn.Module, inputs) -> nn.Module:
        return HintStudent(student, self.student_layers, self._widths["student_layers"],
                           self._widths["teacher_layers"])

    def release(self, trainable: HintStudent) -> nn.Module:
        for h in trainable.handles:
            h.remove()
        return trainable.student

    def loss_fn(self, trainable: HintStudent, teacher: nn.Module, inputs
                ) -> tuple[LossFn, dict]:
        ce = nn.CrossEntropyLoss(label_smoothing=inputs.train.label_smoothing)
        teacher_features: list = [None] * len(self.teacher_layers)
        _record(teacher, self.teacher_layers, teacher_features, "teacher_layers")

        def loss(logits: torch.Tensor, batch: torch.Tensor, labels: torch.Tensor):
            # Features change with every augmented view, so the teacher runs on every batch.
            with torch.no_grad(), inputs.hw.autocast():
                target = teacher(batch).float()
            return (kd_loss(logits, target, labels, temperature=self.temperature,
                            alpha=self.alpha, ce=ce)
                    + self.beta * trainable.hint_loss(teacher_features))

        return loss, {}
