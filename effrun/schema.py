"""Typed schemas for the composed config: the one home of every default value.

Every config dataclass (a group option's `_target_`, and `RunConfig` for the root keys) is
registered in Hydra's ConfigStore as `schema/<group>/<ClassName>` (`register_schemas`), with its
field defaults and `_target_`. An option YAML extends its schema and holds only what differs:

    # configs/optimizer/adamw.yaml
    defaults:
      - /schema/optimizer/AdamW@_here_
    lr: 2.0e-3

so the composed config lists every key (Hydra rejects unknown keys and wrong types while
composing), and the dataclass default is the only place a value is stated. `validate` then
builds the dataclasses; their `__post_init__` range checks run before any compute starts.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from effrun.errors import ConfigError
from effrun.run_config import (  # noqa: F401 (the root keys' schemas, re-exported)
    STAGE_ORDER,
    TTA_MODES,
    BenchmarkConfig,
    CacheConfig,
    RunConfig,
    SelectConfig,
    TrainConfig,
)
from effrun.tracking import NoTracking

GROUPS = ("dataset", "model", "optimizer", "augmentation", "hardware")
COMPRESSION_GROUPS = ("prune", "distill", "quantize")
# The config dataclasses the option YAMLs extend, by config group (see the module docstring).
SCHEMAS = {
    "dataset": ("effrun.data.SyntheticData", "effrun.data.CIFAR10Data",
                "effrun.data.CIFAR100Data", "effrun.data.ImageFolderData"),
    "model": ("effrun.models.CifarResNet", "effrun.models.ResNet18Cifar",
              "effrun.models.MobileNetV2Cifar", "effrun.models.Airbench",
              "effrun.models.TorchvisionModel"),
    "optimizer": ("effrun.optim.SGD", "effrun.optim.AdamW"),
    "augmentation": ("effrun.data.Augmentation",),
    "hardware": ("effrun.hardware.Hardware",),
    "compression/prune": ("effrun.compression.prune.magnitude.MagnitudePrune",
                          "effrun.compression.prune.channel.ChannelPrune",
                          "effrun.compression.prune.nm.NMPrune"),
    "compression/distill": ("effrun.compression.distill.kd.KD",
                            "effrun.compression.distill.feature.FeatureKD"),
    "compression/quantize": ("effrun.compression.quantize.int8_ptq.Int8PTQ",
                             "effrun.compression.quantize.int8_qat.Int8QAT",
                             "effrun.compression.quantize.int8_dynamic.Int8Dynamic",
                             "effrun.compression.quantize.int8_onnxruntime.Int8OnnxRuntime",
                             "effrun.compression.quantize.int8_openvino.Int8OpenVINO"),
    "tracking": ("effrun.tracking.NoTracking", "effrun.tracking.TensorBoard",
                 "effrun.tracking.MLflow"),
}


def config_dir() -> str:
    """The configs shipped inside the package (found by absolute path from anywhere)."""
    return str(Path(__file__).resolve().parent / "configs")


def schema_node(cls: type, target: str | None = None) -> DictConfig:
    """The structured config of a dataclass (its defaults and types), plus `_target_`."""
    node = OmegaConf.structured(cls)
    if target is not None:
        OmegaConf.set_struct(node, False)
        node._target_ = target
        OmegaConf.set_struct(node, True)
    return node


# Hydra 1.3 deep-copies its config repository for every compose (twice per command, once per
# sweep job, 171 times for --help), and with it the ConfigStore singleton that holds every
# schema below: 0.1 s a copy on a 2-core EPYC, 12 s of `effrun --help`. A singleton's copy is
# the singleton (Hydra >= 1.4 fetches ConfigStore.instance() instead of keeping one, hydra PR
# 2928); the store's load() already hands out copies of its nodes.
ConfigStore.__deepcopy__ = lambda self, memo: self


@functools.cache
def register_schemas() -> None:
    """Put every schema in Hydra's ConfigStore; call before composing (the CLI does on import,
    `compose` below too). Once per process: the store is process-wide, and building the
    structured configs again cost 0.3 s a call on a 2-core EPYC (every compose made them)."""
    store = ConfigStore.instance()
    for group, targets in SCHEMAS.items():
        for target in targets:
            cls = get_class(target)
            store.store(group=f"schema/{group}", name=cls.__name__,
                        node=schema_node(cls, target))
    root = schema_node(RunConfig)
    OmegaConf.set_struct(root, False)  # the groups (dataset, model, ...) join at the root
    store.store(group="schema", name="run", node=root)


def load_option(group: str, name: str) -> DictConfig:
    """One option of a config group as Hydra composes it (its schema, the options it extends,
    its own values), without composing a whole config: safe inside a running Hydra job."""
    path = Path(config_dir()) / group / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise ConfigError(f"no {group} option {name!r} (options: {known})")
    raw = OmegaConf.load(path)
    node = OmegaConf.create()
    for entry in raw.pop("defaults", []):
        if entry == "_self_":
            continue
        target = entry.split("@")[0]
        if target.startswith("/"):
            register_schemas()
            schema = ConfigStore.instance().load(f"{target[1:]}.yaml").node
            node = OmegaConf.merge(node, schema)
        else:  # another option of the same group
            node = OmegaConf.merge(node, load_option(group, target))
    return OmegaConf.merge(node, raw)


def compose(overrides: list[str] | None = None) -> DictConfig:
    """The composed config for command-line style overrides, as `effrun` composes it (without
    the hydra node): the one way tests and scripts build a config."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides or []))


@dataclass
class EffrunConfig:
    """The validated config: the root keys (`run`) and one dataclass instance per group."""

    run: RunConfig
    dataset: Any
    model: Any
    optimizer: Any
    augmentation: Any
    hardware: Any
    compression: dict[str, Any]  # "prune" / "distill" / "quantize" -> method instance, when chosen
    raw: DictConfig
    # The tracking option (effrun.tracking); a config without the group (one written before
    # it existed) tracks nothing.
    tracking: Any = field(default_factory=NoTracking)


def build_node(node: DictConfig, where: str) -> Any:
    """Check one `_target_` node against its dataclass and return the instance."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise ConfigError(f"{where}: expected a config with a _target_, got {node!r}")
    target = node._target_
    try:
        cls = get_class(target)
    except Exception as e:  # hydra raises a chain of import errors; one line is enough
        raise ConfigError(
            f"{where}._target_: cannot import {target!r} ({e.__class__.__name__})") from None
    if not dataclasses.is_dataclass(cls):
        raise ConfigError(f"{where}._target_: {target} is not a config dataclass")
    values = OmegaConf.to_container(node, resolve=True)
    values.pop("_target_")
    return typed(cls, values, where)


def typed(cls: type, values: dict, where: str) -> Any:
    """Merge `values` onto the structured schema of `cls`: unknown keys and wrong types fail."""
    schema = OmegaConf.structured(cls)
    try:
        merged = OmegaConf.merge(schema, values)
        return OmegaConf.to_object(merged)
    except ConfigKeyError as e:
        key = _key(e)
        owner = _owner(cls, key)
        allowed = ", ".join(f.name for f in dataclasses.fields(owner))
        raise ConfigError(f"{where}.{key}: unknown key for {owner.__name__}; "
                          f"allowed: {allowed}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where}.{_key(e)}: {_first_line(e.msg)}") from None
    except (ValueError, TypeError) as e:  # __post_init__ range checks
        raise ConfigError(_first_line(str(e))) from None


def validate(cfg: DictConfig) -> EffrunConfig:
    """Check the whole composed config; raises ConfigError naming the key at fault."""
    groups = {g: cfg.get(g) for g in GROUPS}
    for g, node in groups.items():
        if node is None:
            raise ConfigError(f"config group {g!r} is missing: choose an option, e.g. {g}=...")
    root = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items()
            if k not in GROUPS and k not in ("compression", "tracking")}
    run = typed(RunConfig, root, "config")
    built = {g: build_node(node, g) for g, node in groups.items()}
    compression = {}
    comp_node = cfg.get("compression") or {}
    for key in comp_node:
        if key not in COMPRESSION_GROUPS:
            raise ConfigError(f"compression.{key}: unknown compression group; "
                              f"allowed: {list(COMPRESSION_GROUPS)}")
        if comp_node[key] is not None:
            compression[key] = build_node(comp_node[key], f"compression.{key}")
    for stage in ("prune", "distill", "quantize"):
        if stage in run.stages and stage not in compression:
            raise ConfigError(f"stage {stage!r} is listed but no method is chosen: "
                              f"set compression/{stage}=<method>")
    first_model_stage = next((s for s in run.stages if s != "benchmark"), None)
    given = run.init_from is not None or run.resume_from is not None  # a model to start from
    if first_model_stage not in (None, "train") and not given:
        raise ConfigError(f"stages start at {first_model_stage!r} without training: "
                          f"add 'train' to stages or set init_from=<model artifact .pt>")
    if run.stages == ["benchmark"] and not given:
        raise ConfigError("stages=[benchmark] needs a model: set init_from=<model artifact .pt>")
    tracking = (build_node(cfg.tracking, "tracking") if cfg.get("tracking") is not None
                else NoTracking())
    return EffrunConfig(run=run, compression=compression, raw=cfg, tracking=tracking, **built)


def _owner(cls: type, key: str) -> type:
    """The dataclass that holds the last part of a dotted key (`train.epoch` -> TrainConfig)."""
    for part in key.split(".")[:-1]:
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        hints = _field_types(cls)
        sub = hints.get(part, types.get(part))
        if not (isinstance(sub, type) and dataclasses.is_dataclass(sub)):
            break
        cls = sub
    return cls


def _field_types(cls: type) -> dict:
    import typing
    try:
        return typing.get_type_hints(cls)
    except Exception:  # unresolvable annotations: fall back to the raw ones
        return {}


def _key(e: OmegaConfBaseException) -> str:
    return str(getattr(e, "full_key", None) or getattr(e, "key", None) or "?")


def _first_line(msg: str) -> str:
    return msg.strip().splitlines()[0] if msg and msg.strip() else "invalid value"
