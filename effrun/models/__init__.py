"""Model zoo: dataclass configs (also the typed YAML schema) and rebuild/reload helpers.

A model is stored as `model_config_dict(cfg)` (plain dict with `_target_`) plus a state_dict.
`build_model` rebuilds the original architecture from the dict and `load_state_into` first
resizes layers whose saved shapes differ, so structurally pruned models reload without pickling
modules.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from torch import nn

from effrun.errors import EffrunError
from effrun.models.airbench import Airbench
from effrun.models.cifar_resnet import CifarResNet, ResNet18Cifar
from effrun.models.mobilenetv2 import MobileNetV2Cifar
from effrun.models.torchvision_models import TorchvisionModel

__all__ = [
    "Airbench",
    "CifarResNet",
    "MobileNetV2Cifar",
    "ResNet18Cifar",
    "TorchvisionModel",
    "build_model",
    "load_state_into",
    "model_config_dict",
]


def _public_path(cls: type) -> str:
    # Prefer the short `effrun.models.X` path the YAML files use over the defining module.
    if globals().get(cls.__name__) is cls:
        return f"{__name__}.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def model_config_dict(cfg_obj: Any) -> dict:
    """`{"_target_": "effrun.models.CifarResNet", "depth": 20, ...}` for a config dataclass."""
    if isinstance(cfg_obj, DictConfig):
        cfg_obj = OmegaConf.to_object(cfg_obj)
    if not dataclasses.is_dataclass(cfg_obj) or isinstance(cfg_obj, type):
        raise TypeError(f"expected a model config dataclass instance, got {type(cfg_obj)!r}")
    return {"_target_": _public_path(type(cfg_obj)), **dataclasses.asdict(cfg_obj)}


def build_model(config: Mapping | Any, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build a model from a config dataclass or a `model_config_dict`-style mapping."""
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True)
    if isinstance(config, Mapping):
        options = dict(config)
        if "_target_" not in options:
            raise EffrunError(f"model config has no '_target_' key: {options}")
        cls = get_class(options.pop("_target_"))
        if not dataclasses.is_dataclass(cls):
            raise EffrunError(f"model _target_ {cls!r} is not a model config dataclass")
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for {cls.__name__}; valid: {sorted(known)}"
            )
        config = cls(**options)
    if not hasattr(config, "build"):
        raise TypeError(f"model config {type(config)!r} has no build(num_classes, in_channels)")
    return config.build(num_classes=num_classes, in_channels=in_channels)


def _resized_conv(conv: nn.Conv2d, weight_shape: torch.Size) -> nn.Conv2d:
    out_channels, in_per_group = weight_shape[0], weight_shape[1]
    if conv.groups > 1 and conv.groups == conv.in_channels:
        # Depthwise: one group per input channel, keeping the channel multiplier.
        multiplier = conv.out_channels // conv.in_channels
        groups = out_channels // multiplier
        in_channels = groups * in_per_group
    else:
        groups = conv.groups
        in_channels = in_per_group * groups
    return nn.Conv2d(
        in_channels,
        out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )


def _resized_module(module: nn.Module, name: str, state_dict: Mapping) -> nn.Module | None:
    """A fresh module matching the saved shapes, or None when the shapes already match."""
    prefix = f"{name}." if name else ""
    if isinstance(module, nn.Conv2d):
        saved = state_dict.get(prefix + "weight")
        if saved is None or saved.shape == module.weight.shape:
            return None
        return _resized_conv(module, saved.shape)
    if isinstance(module, nn.BatchNorm2d):
        key = "weight" if module.affine else "running_mean"
        saved = state_dict.get(prefix + key)
        if saved is None or saved.shape[0] == module.num_features:
            return None
        return nn.BatchNorm2d(
            saved.shape[0],
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
        )
    if isinstance(module, nn.Linear):
        saved = state_dict.get(prefix + "weight")
        if saved is None or saved.shape == module.weight.shape:
            return None
        return nn.Linear(saved.shape[1], saved.shape[0], bias=module.bias is not None)
    return None


def load_state_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Load `state_dict` strictly, first resizing Conv2d/BatchNorm2d/Linear layers to its shapes.

    Resized modules are new modules (same stride/padding/dilation/bias presence/eps/momentum) put
    on the old module's device, dtype and train/eval mode; their values all come from
    `state_dict`. Other layer
    types are not resized: a shape mismatch there fails in `load_state_dict`.
    """
    replacements = []
    for name, module in model.named_modules():
        new_module = _resized_module(module, name, state_dict)
        if new_module is None:
            continue
        if not name:
            raise ValueError("cannot resize the root module itself; wrap it in a container")
        reference = next(module.parameters(), None)
        if reference is None:
            reference = next(module.buffers(), None)
        if reference is not None:
            new_module.to(device=reference.device, dtype=reference.dtype)
        new_module.train(module.training)
        replacements.append((name, new_module))
    for name, new_module in replacements:
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, new_module)
    model.load_state_dict(state_dict, strict=True)
    return model
