"""Every preset and every group option composes and passes the typed schemas; typos fail early."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import pytest
from conftest import CONFIGS, compose_cfg, options, run_cli, run_cli_here
from hydra.errors import ConfigCompositionException
from hydra.utils import get_class
from omegaconf import OmegaConf

from effrun.models import Airbench
from effrun.schema import SCHEMAS, ConfigError, build_node, load_option, validate

GROUPS = ["dataset", "model", "optimizer", "augmentation", "hardware", "tracking"]


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiment_composes(experiment):
    cfg = compose_cfg([f"+experiment={experiment}"])
    r = validate(cfg)
    assert r.run.name == experiment, "a preset names its run dir after its file"


@pytest.mark.parametrize("group,option",
                         [(g, o) for g in GROUPS for o in options(g)]
                         + [(f"compression/{s}", o) for s in ("prune", "distill", "quantize")
                            for o in options(f"compression/{s}")])
def test_group_option_validates(group, option):
    overrides = [f"{group}={option}"]
    if group == "dataset" and option == "imagefolder":
        overrides.append("dataset.root=/some/dir")
    if group.startswith("compression/"):
        overrides.append(f"stages=[train,{group.split('/')[1]},benchmark]")
    r = validate(compose_cfg(overrides))
    assert r is not None


@pytest.mark.parametrize("override,expect", [
    (["+model.depht=20"], "model.depht: unknown key"),  # + reaches the schema (a YAML typo)
    (["model.depth=abc"], "model.depth"),
    (["model.depth=21"], "6n+2"),
    (["train.epochs=-1"], "train.epochs"),
    (["stages=[train,bogus]"], "unknown stage 'bogus'"),
    (["~compression/prune"], "compression/prune"),
    (["stages=[prune,benchmark]"], "init_from"),
    (["optimizer.schedule=wavy"], "optimizer.schedule"),
    (["hardware.precision=fp8"], "hardware.precision"),
    (["benchmark.batch_sizes=[]"], "benchmark.batch_sizes"),
])
def test_bad_config_is_one_clear_error(override, expect):
    """Wrong types fail while Hydra composes (the schemas are in the composed config), naming
    the key; everything else fails in validation, one line naming the key."""
    try:
        validate(compose_cfg(override))
    except ConfigCompositionException as e:
        assert expect in str(e) and "abc" in override[0], "only type errors fail at compose"
        return
    except ConfigError as e:
        assert expect in str(e) and "\n" not in str(e)
        return
    raise AssertionError(f"{override} was accepted")


def test_stages_run_in_fixed_order():
    r = validate(compose_cfg(["stages=[benchmark,train]"]))
    assert r.run.stages == ["train", "benchmark"]


def test_cli_bad_config_short_message_no_traceback(tmp_path, monkeypatch):
    res = run_cli_here(["model.depth=abc", f"hydra.run.dir={tmp_path}/run"], tmp_path,
                       monkeypatch)
    assert res.returncode != 0
    assert "model.depth" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_cli_unknown_option_and_key(tmp_path, monkeypatch):
    res = run_cli_here(["model=resnet9000"], tmp_path, monkeypatch)
    assert res.returncode != 0 and "resnet20" in res.stderr  # Hydra lists the options
    assert "Traceback" not in res.stderr
    res = run_cli_here(["train.epochz=3"], tmp_path, monkeypatch)
    assert res.returncode != 0 and "epochz" in res.stderr and "Traceback" not in res.stderr


def test_cli_help_and_cfg(tmp_path, monkeypatch):
    res = run_cli_here(["--help"], tmp_path, monkeypatch)
    assert res.returncode == 0 and "model: " in res.stdout and "resnet20" in res.stdout
    res = run_cli(["--cfg", "job", "+experiment=smoke"], cwd=tmp_path)  # as a process does
    assert res.returncode == 0 and "name: smoke" in res.stdout
    assert not (tmp_path / "outputs").exists()


# ------------------------------------------------------------------ one home per default

def option_yamls() -> list[tuple[str, Path]]:
    groups = [*GROUPS, *(f"compression/{s}" for s in ("prune", "distill", "quantize"))]
    return [(g, p) for g in groups for p in sorted((CONFIGS / g).glob("*.yaml"))]


@pytest.mark.parametrize("group,path", option_yamls(), ids=lambda v: getattr(v, "stem", v))
def test_option_yaml_states_only_what_differs_from_its_schema(group, path):
    """Drift test: a YAML option extends a registered schema (a config dataclass, whose field
    defaults are the one home of every default) and holds only values that differ from it."""
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    entries = raw.pop("defaults", None)
    assert entries, f"{path} extends no schema (defaults: [- /schema/{group}/<Class>@_here_])"
    assert "_target_" not in raw, "the schema sets _target_"
    base = load_option(group, path.stem)
    cls = get_class(base._target_)
    assert cls.__name__ in {t.rsplit(".", 1)[1] for t in SCHEMAS[group]}
    schema = OmegaConf.to_container(OmegaConf.structured(cls), resolve=False)
    for entry in entries:  # what it extends, without its own values
        if entry.startswith("/schema/"):
            continue
        schema.update(OmegaConf.to_container(load_option(group, entry), resolve=False))
    for key, value in raw.items():
        assert key in schema, f"{path}: {key} is not a field of {cls.__name__}"
        assert value != schema[key], f"{path}: {key}: {value!r} restates the default"
    if OmegaConf.is_missing(base, "root"):  # imagefolder: the user must give its root
        base.root = "/some/dir"
    built = build_node(base, group)
    assert built == cls(**{k: v for k, v in OmegaConf.to_container(base, resolve=True).items()
                           if k != "_target_"})


def test_every_schema_is_used_and_root_keys_live_in_the_schema():
    used = {load_option(g, p.stem)._target_ for g, p in option_yamls()}
    assert used == {t for targets in SCHEMAS.values() for t in targets}
    root = OmegaConf.load(CONFIGS / "config.yaml")
    assert set(root) == {"defaults", "hydra"}, "root defaults belong to effrun.schema.RunConfig"


def test_experiments_extend_not_copy():
    """The compression presets extend cifar10_baseline and state only what differs."""
    baseline = validate(compose_cfg(["+experiment=cifar10_baseline"]))
    for name in ("cifar10_int8", "cifar10_qat", "cifar10_prune", "cifar10_distill"):
        raw = OmegaConf.load(CONFIGS / "experiment" / f"{name}.yaml")
        assert "cifar10_baseline" in raw.defaults, name
        assert "optimizer" not in raw, f"{name} copies the baseline's optimizer"
        config = validate(compose_cfg([f"+experiment={name}"]))
        assert config.optimizer == baseline.optimizer and config.run.seed == baseline.run.seed


# Where issue 9 changed the resolved presets on purpose (the rest must equal the configs
# composed before it, in tests/data/presets_before_issue9/).
CHANGED_BY_ISSUE_9 = {
    "*": {"optimizer.units": "new key (torch units unless a preset says otherwise)",
          "train.lookahead_decay": "now per step: 0.95 (was 0.95**5 per 5-step update)",
          "dataset.cache_dir": "removed from synthetic data, which reads no cache",
          "trust_artifact": "new key (issue 10): load artifacts from elsewhere as they are",
          "dataset.skip_bad_images": "new key (issue 10)",
          "tracking.*": "new key (issue 11): the tracking group, none by default",
          "cache.*": "new keys (issue 11): the stage cache across runs",
          "resume_from": "new key (issue 11): continue after a finished stage",
          "benchmark.latency_budget_ms": "new key (issue 11): a search's latency budget",
          "export": "new key (issue 12): ONNX / OpenVINO export, none by default",
          "hardware.sync_bn": "new key (issue 14): BatchNorm over the global batch (torchrun)",
          "dataset.loader": "new key (issue 14): memory (as before), stream or auto",
          "benchmark.backends": "new key (issue 12): runtimes timed, torch by default",
          "benchmark.rounds": "new key (issue 12): interleaved timing rounds",
          "benchmark.accuracy_tolerance": "new key (issue 12): naming the fastest deployable",
          "train.checkpoint_every": "new key (issue 14): checkpoints inside an epoch",
          **{f"dataset.{key}": "new key (issue 13): subsets and class balance, as before"
             for key in ("train_size", "selection", "balance")},
          "select.*": "new keys (issue 13): data pruning in the train stage, off",
          **{f"augmentation.{key}": "new key (issue 13): op policies, mixup/CutMix, off"
             for key in ("policy", "randaugment_ops", "randaugment_magnitude",
                         "autoaugment_policy", "mix", "mix_alpha", "mix_prob")}},
    "cifar10_airbench": {"optimizer.lr": "11.5 per 1024 examples (was 1.5 per step)",
                         "optimizer.weight_decay": "0.0153 per 1024 examples",
                         "model.head_scale": "1/9 exactly (was 0.111111111)"},
    # The first run is the whole study (see README): every key below is new or changed.
    "default": {"stages": "", "train.epochs": "", "train.batch_size": "", "optimizer.*": "",
                "dataset.num_train": "", "dataset.confusion": "", "compression.*": ""},
    # smoke is the first run's study on tiny learnable data: it follows the new defaults.
    "smoke": {"dataset.confusion": "", "compression.distill.alpha": "",
              "compression.distill.lr": "", "compression.distill.student": "",
              "compression.prune.lr": "", "compression.prune.target_macs_ratio": "",
              "dataset.image_size": "16 px (after issue 14): the suite's study, 4x cheaper"},
}


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(__file__).parent / "data"
                                                           / "presets_before_issue9").glob("*")))
def test_presets_resolve_as_before_except_where_issue_9_changed_them(name, monkeypatch):
    monkeypatch.delenv("EFFRUN_CIFAR10_ROOT", raising=False)
    old = json.loads((Path(__file__).parent / "data" / "presets_before_issue9"
                      / f"{name}.json").read_text())
    cfg = compose_cfg([] if name == "default" else [f"+experiment={name}"])
    new = OmegaConf.to_container(cfg, resolve=True)
    old_flat, new_flat = flatten(old), flatten(new)
    allowed = {**CHANGED_BY_ISSUE_9["*"], **CHANGED_BY_ISSUE_9.get(name, {})}
    changed = {k for k in old_flat.keys() | new_flat.keys() if old_flat.get(k, "<absent>")
               != new_flat.get(k, "<absent>")}
    unexpected = {k for k in changed if not any(fnmatch.fnmatch(k, a) for a in allowed)}
    assert not unexpected, sorted(unexpected)


def test_airbench_units_give_the_old_per_step_values():
    """lr and weight decay in airbench's units reach torch as the constants the recipe used."""
    config = validate(compose_cfg(["+experiment=cifar10_airbench"]))
    groups = config.optimizer.param_groups(Airbench().build(10), batch_size=1024)
    plain = groups[0]
    assert plain["lr"] == pytest.approx(1.5)
    assert plain["lr"] * plain["weight_decay"] == pytest.approx(0.0019957, rel=1e-4)
