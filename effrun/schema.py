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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from effrun.errors import ConfigError, EffrunError
from effrun.tracking import NoTracking

# The fixed order in which stages run, whatever order `stages` lists them in.
STAGE_ORDER = ("train", "prune", "distill", "quantize", "benchmark")
GROUPS = ("dataset", "model", "optimizer", "augmentation", "hardware")
COMPRESSION_GROUPS = ("prune", "distill", "quantize")
TTA_MODES = ("none", "flip", "flip_translate")
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
                             "effrun.compression.quantize.int8_dynamic.Int8Dynamic"),
    "tracking": ("effrun.tracking.NoTracking", "effrun.tracking.TensorBoard",
                 "effrun.tracking.MLflow"),
}


def config_dir() -> str:
    """The configs shipped inside the package (found by absolute path from anywhere)."""
    return str(Path(__file__).resolve().parent / "configs")


@dataclass
class TrainConfig:
    epochs: int = 4
    batch_size: int = 64
    eval_batch_size: int = 500
    label_smoothing: float = 0.0
    ema_decay: Optional[float] = None  # e.g. 0.999; evaluation and artifact use the EMA weights
    grad_clip_norm: Optional[float] = None
    tta: str = "none"  # test-time augmentation at evaluation: none | flip | flip_translate
    # Lookahead-style weight averaging (airbench): every `lookahead_every` steps an averaged copy
    # of the weights moves toward the live ones and the live ones are reset to it. 0 = off.
    lookahead_every: int = 0
    # Its decay per optimizer step (airbench: 0.95); an update every N steps decays by
    # lookahead_decay ** N, ramped in as progress**3.
    lookahead_decay: float = 0.95
    # Evaluate on val/test every N epochs (the last epoch always); 0 = only after training.
    eval_every: int = 1

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"train.epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("train.batch_size and train.eval_batch_size must be >= 1")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"train.ema_decay must be in (0, 1) or null, got {self.ema_decay}")
        if self.lookahead_every < 0 or not 0 <= self.lookahead_decay < 1:
            raise ValueError("train.lookahead_every must be >= 0 and train.lookahead_decay in "
                             f"[0, 1), got {self.lookahead_every} and {self.lookahead_decay}")
        if self.eval_every < 0:
            raise ValueError(f"train.eval_every must be >= 0, got {self.eval_every}")
        if self.tta not in TTA_MODES:
            raise ValueError(f"train.tta must be one of {TTA_MODES}, got {self.tta!r}")


@dataclass
class BenchmarkConfig:
    batch_sizes: list[int] = field(default_factory=lambda: [1, 64])
    threads: Optional[list[int]] = None  # null = torch's current thread count
    warmup: int = 5
    iters: int = 30
    min_time_s: float = 0.5  # keep timing past `iters` until this long has passed
    # A batch-1 p50 latency budget (ms) for a search: under the optuna sweeper with one
    # objective, a trial over it scores -latency / budget instead of its top-1 (effrun.cli).
    latency_budget_ms: Optional[float] = None

    def __post_init__(self) -> None:
        if self.latency_budget_ms is not None and not self.latency_budget_ms > 0:
            raise ValueError("benchmark.latency_budget_ms must be null or > 0 (milliseconds)")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError("benchmark.batch_sizes must be a non-empty list of ints >= 1")
        if self.threads is not None and (not self.threads or min(self.threads) < 1):
            raise ValueError("benchmark.threads must be null or a non-empty list of ints >= 1")
        if self.iters < 1 or self.warmup < 0:
            raise ValueError("benchmark.iters must be >= 1 and benchmark.warmup >= 0")


@dataclass
class CacheConfig:
    """The stage cache (effrun/cache.py): finished model stages reused across runs."""

    enabled: bool = True
    # A relative path is relative to the directory effrun is launched from; the tests point
    # EFFRUN_STAGE_CACHE_DIR at a temp dir.
    dir: str = "${oc.env:EFFRUN_STAGE_CACHE_DIR,outputs/cache}"


@dataclass
class RunConfig:
    name: str = "default"
    stages: list[str] = field(default_factory=lambda: list(STAGE_ORDER))
    seed: int = 0
    init_from: Optional[str] = None  # a model artifact (.pt) to start from instead of random init
    # Artifacts effrun did not write in this run dir (init_from, a distillation teacher) are
    # scanned and any code in them refused; true loads them as they are (an AOTInductor
    # package runs a shared library from inside the file).
    trust_artifact: bool = False
    # A finished stage dir (or a run dir: its last finished model stage) whose artifact the
    # configured stages after it continue from; init_from instead trains from given weights.
    resume_from: Optional[str] = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    # Deployment formats each float model stage also writes beside model.pt (effrun/export.py):
    # onnx (model_fp32.onnx), openvino (model_openvino.xml/.bin); needs effrun[deploy].
    export: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.export:
            from effrun.export import check_formats
            try:
                check_formats(list(self.export))
            except EffrunError as e:
                raise ValueError(str(e)) from None
        if not self.stages:
            raise ValueError(f"stages must list at least one stage of {list(STAGE_ORDER)}, got []")
        unknown = [s for s in self.stages if s not in STAGE_ORDER]
        if unknown:
            raise ValueError(f"stages: unknown stage {unknown[0]!r}; allowed: {list(STAGE_ORDER)}")
        if self.init_from is not None and self.resume_from is not None:
            raise ValueError("init_from and resume_from cannot both be set: init_from trains "
                             "from given weights, resume_from continues after a finished stage")
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"stages lists a stage twice: {self.stages}")
        self.stages = [s for s in STAGE_ORDER if s in self.stages]


def schema_node(cls: type, target: str | None = None) -> DictConfig:
    """The structured config of a dataclass (its defaults and types), plus `_target_`."""
    node = OmegaConf.structured(cls)
    if target is not None:
        OmegaConf.set_struct(node, False)
        node._target_ = target
        OmegaConf.set_struct(node, True)
    return node


def register_schemas() -> None:
    """Put every schema in Hydra's ConfigStore; call before composing (the CLI does on import,
    `compose` below too)."""
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
