"""Any torchvision classification model by name, randomly initialised (no weight downloads)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from torch import nn


def check_torchvision_name(name: str) -> None:
    import torchvision  # imported where used: it takes seconds (its ops import torch._dynamo)

    known = torchvision.models.list_models()
    if name in known:
        return
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ValueError(
        f"model.name={name!r} is not a torchvision model.{hint} "
        "List all names with torchvision.models.list_models()."
    )


def replace_input_conv(model: nn.Module, in_channels: int) -> None:
    """Swap the first 3-channel Conv2d for one reading `in_channels` (e.g. grayscale data)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            new_conv = nn.Conv2d(
                in_channels,
                module.out_channels,
                module.kernel_size,
                module.stride,
                module.padding,
                module.dilation,
                module.groups,
                bias=module.bias is not None,
                padding_mode=module.padding_mode,
            )
            parent_name, _, child_name = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child_name, new_conv)
            return
    raise ValueError(f"found no 3-channel input Conv2d to adapt to in_channels={in_channels}")


@dataclass
class TorchvisionModel:
    """`torchvision.models.get_model(name, weights=None, num_classes=...)`.

    ImageNet architectures downsample 32x32 inputs aggressively (resnet18 ends at 1x1); they are
    here for breadth and for larger-resolution datasets, not as strong CIFAR baselines.
    """

    name: str = "resnet18"

    def __post_init__(self) -> None:
        check_torchvision_name(self.name)

    def build(self, num_classes: int, in_channels: int = 3) -> nn.Module:
        check_torchvision_name(self.name)
        import torchvision

        model = torchvision.models.get_model(self.name, weights=None, num_classes=num_classes)
        if in_channels != 3:
            replace_input_conv(model, in_channels)
        return model
