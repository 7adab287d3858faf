"""Prune stage: magnitude, channel (Torch-Pruning) and N:M on tiny models and synthetic data."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import compose_cfg, options, stage_ctx

from effrun import pipeline
from effrun.artifacts import load_model, read_model_file, save_model
from effrun.compression.prune.channel import ChannelPrune, MacsCounter, count_macs
from effrun.compression.prune.magnitude import MagnitudePrune, agp_sparsity, magnitude_masks
from effrun.compression.prune.nm import follows_nm
from effrun.errors import EffrunError
from effrun.models import CifarResNet
from effrun.schema import ConfigError, validate
from effrun.stage import trainable_hardware

# Tiny and fast: 16x16 synthetic images, ResNet-20 at width 8, one short epoch.
TINY = ["+experiment=smoke", "dataset.num_train=128", "dataset.num_test=64",
        "dataset.image_size=16", "model.width=8", "train.batch_size=32", "train.epochs=1"]
X = torch.randn(3, 3, 16, 16)


def make_ctx(tmp_path, method: str, overrides=()):
    """StageInputs as the pipeline builds them, for calling a method directly."""
    return stage_ctx(tmp_path, "prune", [*TINY, f"compression/prune={method}",
                                          "stages=[train,prune]", *overrides])


def outputs(model):
    model = model.to(memory_format=torch.contiguous_format).eval()
    with torch.no_grad():
        return model(X)


def reload_equal(result, inputs, tmp_path) -> bool:
    """Save as the pipeline does, rebuild from the artifact, compare outputs exactly."""
    model = result.model
    path = save_model(model, tmp_path / "rt.pt", model_config=inputs.model_config,
                      num_classes=inputs.data.num_classes, stage="prune",
                      extra=result.artifact_meta)
    reloaded, _ = load_model(path)
    return torch.equal(outputs(model), outputs(reloaded))


def test_prune_options_are_found():
    assert {"magnitude", "channel", "nm"} <= set(options("compression/prune"))


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_masks_reach_sparsity(scope):
    model = CifarResNet(depth=20, width=8).build(10)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)][1:]
    masks = magnitude_masks(model, names, 0.7, scope)
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert abs(1 - kept / total - 0.7) < 1e-3
    per_layer = [1 - float(m.float().mean()) for m in masks.values()]
    if scope == "layer":
        assert all(abs(s - 0.7) < 0.01 for s in per_layer)
    else:  # one global threshold prunes layers unevenly
        assert max(per_layer) - min(per_layer) > 0.01


def test_agp_schedule_is_cubic_and_monotone():
    values = [agp_sparsity(0.8, t, 100) for t in range(0, 121, 10)]
    assert values[0] == 0 and values[10] == 0.8 and values[-1] == 0.8
    assert all(a <= b for a, b in zip(values, values[1:], strict=False))
    assert values[5] == pytest.approx(0.8 * (1 - 0.5**3))  # fast early, slow late


def test_magnitude_agp_pipeline_measures_saved_sparsity(tmp_path):
    cfg = compose_cfg([*TINY, "compression/prune=magnitude", "stages=[train,prune,benchmark]",
                       "compression.prune.sparsity=0.8", "compression.prune.schedule=agp",
                       "compression.prune.finetune_epochs=2", "compression.prune.update_every=2"])
    summary = pipeline.run(cfg, tmp_path)
    metrics = json.loads((tmp_path / "02_prune" / "metrics.json").read_text())
    saved = read_model_file(tmp_path / "02_prune" / "model.pt")["state_dict"]
    assert not any("mask" in k or k.endswith("_orig") for k in saved), "masks made permanent"
    layers = metrics["layer_sparsity"]
    zeros = sum(int((saved[f"{n}.weight"] == 0).sum()) for n in layers)
    total = sum(saved[f"{n}.weight"].numel() for n in layers)
    assert metrics["sparsity"] == pytest.approx(zeros / total) == pytest.approx(0.8, abs=1e-3)
    assert "conv1" not in layers and "fc" not in layers, "first conv and classifier kept dense"
    assert (saved["conv1.weight"] != 0).all()
    prune_row = [r for r in summary if r["stage"] == "prune"][0]
    assert prune_row["sparsity"] == metrics["sparsity"] and "latency" in prune_row["note"]
    assert prune_row["latency_ms_p50_bs1"] is not None, "benchmarked beside the baseline"


def test_magnitude_sensitivity_follow(tmp_path):
    ctx, method, model = make_ctx(tmp_path, "magnitude", [
        "model.depth=8", "compression.prune.sensitivity=true",
        "compression.prune.sensitivity_follow=true",
        "compression.prune.sensitivity_levels=[0.5,0.9]", "compression.prune.sparsity=0.6",
        "compression.prune.scope=layer", "compression.prune.finetune_epochs=0",
        "compression.prune.sensitivity_samples=64"])
    result = method(model, ctx)
    rows = list(csv.DictReader(open(tmp_path / "sensitivity.csv")))
    assert len(rows) == 2 * (len(result.metrics["layer_target_sparsity"]))
    targets = result.metrics["layer_target_sparsity"]
    assert len(set(round(v, 3) for v in targets.values())) > 1, "ratios follow the curves"
    assert result.metrics["sparsity"] == pytest.approx(0.6, abs=0.01)


@pytest.mark.parametrize("depth,importance,steps,epochs", [(20, "taylor", 2, 1), (56, "l1", 1, 0)])
def test_channel_prune_meets_macs_budget_and_reloads(tmp_path, depth, importance, steps, epochs):
    ctx, method, model = make_ctx(tmp_path, "channel", [
        f"model.depth={depth}", "compression.prune.target_macs_ratio=0.5",
        f"compression.prune.importance={importance}", f"compression.prune.steps={steps}",
        f"compression.prune.finetune_epochs={epochs}", "compression.prune.step_epochs=1",
        "compression.prune.taylor_batches=1"])
    macs0, params0 = count_macs(model, (16, 16)), sum(p.numel() for p in model.parameters())
    result = method(model, ctx)
    pruned = result.model
    assert count_macs(pruned, (16, 16)) <= 0.5 * macs0
    # The shape-based counter that drives the budget search agrees with the op counter.
    fresh = CifarResNet(depth=depth, width=8).build(10)
    assert MacsCounter(fresh, (16, 16))(pruned) == count_macs(pruned, (16, 16))
    assert sum(p.numel() for p in pruned.parameters()) < params0, "physically smaller"
    assert result.metrics["macs_ratio"] <= 0.5 and pruned.fc.out_features == 10
    widths = result.artifact_meta["pruned_widths"]
    # Residual coupling: every conv feeding a stage's sum keeps the same width.
    stage1 = {widths[n] for n in widths if n == "conv1" or (n.startswith("layer1.")
                                                            and n.endswith("conv2"))}
    assert len(stage1) == 1 and stage1.pop() < 8
    assert reload_equal(result, ctx, tmp_path)
    assert all(pruned.get_submodule(n).out_channels == w for n, w in widths.items()
               if n != "fc")


def test_channel_ratio_mode_round_to_and_ignore(tmp_path):
    ctx, method, model = make_ctx(tmp_path, "channel", [
        "compression.prune.target_macs_ratio=null", "compression.prune.ratio=0.5",
        "compression.prune.round_to=4",
        "compression.prune.ignore=[layer2.1.conv1]", "compression.prune.finetune_epochs=0"])
    result = method(model, ctx)
    widths = result.artifact_meta["pruned_widths"]
    assert widths["layer2.1.conv1"] == 16, "ignored layer keeps its channels"
    assert widths["layer2.0.conv1"] == 8 and all(w % 4 == 0 for w in widths.values()
                                                  if w != 10)
    assert reload_equal(result, ctx, tmp_path)


def test_channel_sensitivity_follow_meets_macs(tmp_path):
    ctx, method, model = make_ctx(tmp_path, "channel", [
        "model.depth=8", "compression.prune.target_macs_ratio=0.6",
        "compression.prune.sensitivity=true",
        "compression.prune.sensitivity_follow=true", "compression.prune.sensitivity_levels=[0.5]",
        "compression.prune.finetune_epochs=0", "compression.prune.sensitivity_samples=64"])
    result = method(model, ctx)
    assert (tmp_path / "sensitivity.csv").is_file() and result.metrics["group_ratios"]
    assert result.metrics["macs_ratio"] <= 0.6 + 1e-6
    assert reload_equal(result, ctx, tmp_path)


def test_nm_two_four_pattern_survives_finetuning(tmp_path):
    ctx, method, model = make_ctx(tmp_path, "nm", ["compression.prune.finetune_epochs=1"])
    result = method(model, ctx)
    save_model(result.model, tmp_path / "model.pt", model_config=ctx.model_config,
               num_classes=ctx.data.num_classes, stage="prune")
    saved = read_model_file(tmp_path / "model.pt")["state_dict"]
    convs = [k for k in saved if k.endswith("conv1.weight") or k.endswith("conv2.weight")]
    assert all(follows_nm(saved[k], 2, 4) for k in convs if k != "conv1.weight")
    assert not follows_nm(saved["conv1.weight"], 2, 4), "first conv kept dense"
    assert result.metrics["pattern_holds"] and result.metrics["sparsity"] == pytest.approx(0.5)
    assert "no speed-up" in result.note
    assert reload_equal(result, ctx, tmp_path)


@pytest.mark.parametrize("override,expect", [
    ("compression/prune=magnitude compression.prune.sparsity=1.0", "sparsity"),
    ("compression/prune=magnitude compression.prune.sparsity=-0.1", "sparsity"),
    ("compression/prune=channel compression.prune.target_macs_ratio=0", "target_macs_ratio"),
    ("compression/prune=nm compression.prune.n=4", "compression.prune.n"),
    ("compression/prune=magnitude compression.prune.scope=row", "compression.prune.scope"),
])
def test_bad_prune_config_is_one_line(override, expect):
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg([*TINY, *override.split(), "stages=[train,prune]"]))
    assert expect in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("method,key", [("magnitude", "layers"), ("channel", "ignore"),
                                        ("nm", "exclude")])
def test_unknown_layer_fails_before_training(tmp_path, method, key):
    ctx, m, model = make_ctx(tmp_path, method, [f"compression.prune.{key}=[layer9.conv]"])
    with pytest.raises(EffrunError) as e:
        m(model, ctx)
    assert f"compression.prune.{key}" in str(e.value) and "layer9.conv" in str(e.value)
    assert "\n" not in str(e.value) and not list(tmp_path.glob("*.pt")), "nothing trained"


def test_unreachable_macs_budget_is_an_error(tmp_path):
    ctx, _, model = make_ctx(tmp_path, "channel", ["model.depth=8"])
    method = ChannelPrune(target_macs_ratio=0.01, max_layer_ratio=0.5, finetune_epochs=0)
    with pytest.raises(EffrunError, match="out of reach"):
        method(model, ctx)


def test_magnitude_oneshot_without_finetuning_keeps_exact_count(tmp_path):
    ctx, _, model = make_ctx(tmp_path, "magnitude")
    method = MagnitudePrune(sparsity=0.3, finetune_epochs=0, layers=["layer3.*"])
    result = method(model, ctx)
    assert set(result.metrics["layer_sparsity"]) == {
        n for n, m in result.model.named_modules() if n.startswith("layer3.")
        and isinstance(m, torch.nn.Conv2d)}
    assert result.metrics["sparsity"] == pytest.approx(0.3, abs=1e-4)


def test_narrow_strided_shortcuts_train_contiguous():
    """channels_last CPU training crashes on strided 1x1 convs reading < 8 channels (a torch
    bug pruned ResNets hit); the stage context falls back to the contiguous format for them."""
    r = validate(compose_cfg(TINY))
    assert r.hardware.channels_last
    narrow, wide = CifarResNet(depth=8, width=4).build(10), CifarResNet(depth=8).build(10)
    assert not trainable_hardware(narrow, r.hardware).channels_last
    assert trainable_hardware(wide, r.hardware) is r.hardware
