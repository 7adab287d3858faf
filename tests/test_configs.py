"""Every preset and every group option composes and passes the typed schemas; typos fail early."""

from __future__ import annotations

import pytest
from conftest import compose_cfg, options, run_cli

from effrun.schema import ConfigError, validate

GROUPS = ["dataset", "model", "optimizer", "augmentation", "hardware"]


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
    (["stages=[prune,benchmark]"], "compression/prune"),
    (["optimizer.schedule=wavy"], "optimizer.schedule"),
    (["hardware.precision=fp8"], "hardware.precision"),
    (["benchmark.batch_sizes=[]"], "benchmark.batch_sizes"),
])
def test_bad_config_is_one_clear_error(override, expect):
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(override))
    assert expect in str(e.value)
    assert "\n" not in str(e.value)


def test_stages_run_in_fixed_order():
    r = validate(compose_cfg(["stages=[benchmark,train]"]))
    assert r.run.stages == ["train", "benchmark"]


def test_cli_bad_config_short_message_no_traceback(tmp_path):
    res = run_cli(["model.depth=abc", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    assert res.returncode != 0
    assert "model.depth" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_cli_unknown_option_and_key(tmp_path):
    res = run_cli(["model=resnet9000"], cwd=tmp_path)
    assert res.returncode != 0 and "resnet20" in res.stderr  # Hydra lists the options
    assert "Traceback" not in res.stderr
    res = run_cli(["train.epochz=3"], cwd=tmp_path)
    assert res.returncode != 0 and "epochz" in res.stderr and "Traceback" not in res.stderr


def test_cli_help_and_cfg(tmp_path):
    res = run_cli(["--help"], cwd=tmp_path)
    assert res.returncode == 0 and "model: " in res.stdout and "resnet20" in res.stdout
    res = run_cli(["--cfg", "job", "+experiment=smoke"], cwd=tmp_path)
    assert res.returncode == 0 and "name: smoke" in res.stdout
    assert not (tmp_path / "outputs").exists()
