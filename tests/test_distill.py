"""Distill stage: Hinton KD and feature (hint) distillation on tiny models and synthetic data;
the cifar10_prune / cifar10_distill presets."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_cfg, options, run_cli_here, stage_ctx

from effrun import pipeline
from effrun.artifacts import load_model, save_model
from effrun.compression.distill.kd import LogitCache, kd_loss
from effrun.compression.prune.channel import ChannelPrune
from effrun.data import BatchLoader
from effrun.errors import EffrunError
from effrun.models import CifarResNet, model_config_dict
from effrun.schema import ConfigError, validate

# Teacher: ResNet-20 at width 8; student option resnet20 (width 16). 16x16 synthetic images.
TINY = ["+experiment=smoke", "dataset.num_train=128", "dataset.num_test=64",
        "dataset.image_size=16", "model.width=8", "train.batch_size=32", "train.epochs=1",
        "compression.distill.student=resnet20"]


def make_ctx(tmp_path, method: str, overrides=()):
    """StageInputs as the pipeline builds them, for calling a method directly."""
    return stage_ctx(tmp_path, "distill", [*TINY, f"compression/distill={method}",
                                          "stages=[train,distill]", *overrides])


def test_distill_options_are_found():
    assert {"kd", "feature"} <= set(options("compression/distill"))


def test_kd_loss_formula():
    s, t, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    ce = torch.nn.CrossEntropyLoss()
    assert torch.allclose(kd_loss(s, t, y, temperature=4, alpha=0.0, ce=ce), ce(s, y))
    assert kd_loss(s, s, y, temperature=4, alpha=1.0, ce=ce).abs() < 1e-6
    manual = (F.softmax(t / 2, 1) * (F.log_softmax(t / 2, 1) - F.log_softmax(s / 2, 1))
              ).sum(1).mean() * 4
    assert torch.allclose(kd_loss(s, t, y, temperature=2, alpha=1.0, ce=ce), manual, atol=1e-6)


def test_kd_pipeline_with_no_teacher_comparison(tmp_path):
    cfg = compose_cfg([*TINY, "compression/distill=kd", "stages=[train,distill,benchmark]",
                       "augmentation=none", "compression.distill.epochs=3",
                       "compression.distill.compare_scratch=true"])
    summary = pipeline.run(cfg, tmp_path)
    metrics = json.loads((tmp_path / "03_distill" / "metrics.json").read_text())
    losses = [h["train_loss"] for h in metrics["history"]]
    assert len(losses) == 3 and losses[-1] < losses[0], "KD loss decreases"
    assert metrics["teacher_logits_cached"] and metrics["teacher_cache_misses"] == 0
    assert len(metrics["no_teacher_history"]) == 3, "the comparison trains the same epochs"
    assert metrics["kd_gain_pt"] == pytest.approx(
        100 * (metrics["accuracy"] - metrics["no_teacher_accuracy"]))
    student, meta = load_model(tmp_path / "03_distill" / "model.pt")
    assert meta["model_config"]["width"] == 16 and student.layer1[0].conv1.out_channels == 16
    assert (tmp_path / "03_distill" / "no_teacher_model.pt").is_file()
    assert [r["stage"] for r in summary] == ["train", "distill"]
    assert all(r["latency_ms_p50_bs1"] for r in summary), "benchmarked beside the teacher"
    assert "without a teacher" in summary[1]["note"]


def test_teacher_logit_cache_matches_the_teacher(tmp_path):
    ctx, _, teacher = make_ctx(tmp_path, "kd", ["augmentation=none"])
    teacher = ctx.hw.prepare(teacher).eval()
    cache = LogitCache(teacher, ctx)  # logits under the run's autocast, as the loss sees them
    data = ctx.data
    loader = BatchLoader(data.train_x, data.train_y, 32, mean=data.mean, std=data.std,
                         shuffle=True, channels_last=ctx.hw.channels_last, seed=3)
    for inputs, _ in loader:
        cached = cache.lookup(inputs)
        with torch.no_grad(), ctx.hw.autocast():
            assert torch.allclose(cached, teacher(inputs).float(), atol=1e-5)
    assert cache.misses == 0
    assert cache.lookup(torch.randn(2, 3, 16, 16)) is None and cache.misses == 1


def test_feature_distillation_trains_and_returns_plain_student(tmp_path):
    ctx, method, teacher = make_ctx(tmp_path, "feature", ["compression.distill.epochs=3"])
    result = method(teacher, ctx)
    student = result.model
    losses = [h["train_loss"] for h in result.metrics["history"]]
    assert losses[-1] < losses[0]
    assert not student._forward_hooks and not student.layer2._forward_hooks, "hooks removed"
    assert not any(k.startswith(("proj", "student.")) for k in student.state_dict())
    assert result.model_config["_target_"].endswith("CifarResNet")
    path = save_model(student, tmp_path / "s.pt", model_config=result.model_config,
                      num_classes=10, stage="distill")
    assert load_model(path)[0].fc.in_features == 64


def test_kd_from_checkpoint_teacher_into_pruned_student(tmp_path):
    """student: null trains the previous stage's model (here a pruned one) under a teacher."""
    ctx, _, model = make_ctx(tmp_path / "p", "kd")
    ctx.stage_dir.mkdir()
    teacher_path = save_model(model, tmp_path / "teacher.pt", model_config=ctx.model_config,
                              num_classes=10, stage="train")
    pruned = ChannelPrune(ratio=0.5, finetune_epochs=0)(model, ctx).model
    ctx2, method, _ = make_ctx(tmp_path, "kd", ["compression.distill.student=null",
                                                f"compression.distill.teacher={teacher_path}",
                                                "compression.distill.epochs=1"])
    result = method(pruned, ctx2)
    assert result.model is pruned and pruned.layer1[0].conv1.out_channels == 4
    assert result.model_config is None, "the parent's architecture config is kept"


@pytest.mark.parametrize("override,expect", [
    ("compression.distill.student=resnet9000", "compression.distill.student"),
    ("compression.distill.temperature=0", "compression.distill.temperature"),
    ("compression.distill.alpha=1.5", "compression.distill.alpha"),
])
def test_bad_distill_config_is_one_line(override, expect):
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg([*TINY, "compression/distill=kd", "stages=[train,distill]",
                              override]))
    assert expect in str(e.value) and "\n" not in str(e.value)


def _bad_teacher(tmp_path, kind: str) -> str:
    if kind == "garbage":
        (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
        return str(tmp_path / "bad.pt")
    if kind == "missing":
        return str(tmp_path / "nowhere.pt")
    model = CifarResNet(depth=20, width=8).build(num_classes=5)  # other class count
    return str(save_model(model, tmp_path / "five.pt", num_classes=5, stage="train",
                          model_config=model_config_dict(CifarResNet(depth=20, width=8))))


@pytest.mark.parametrize("kind,expect", [("garbage", "compression.distill.teacher"),
                                         ("missing", "compression.distill.teacher"),
                                         ("classes", "classes")])
def test_bad_teacher_fails_before_training(tmp_path, kind, expect):
    teacher = _bad_teacher(tmp_path, kind)
    ctx, method, model = make_ctx(tmp_path, "kd", [f"compression.distill.teacher={teacher}"])
    with pytest.raises(EffrunError) as e:
        method(model, ctx)
    assert expect in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "kd.pt").exists(), "no training started"


@pytest.mark.parametrize("key", ["student_layers", "teacher_layers"])
def test_feature_unknown_layer_fails_before_training(tmp_path, key):
    ctx, method, model = make_ctx(tmp_path, "feature",
                                  [f"compression.distill.{key}=[layer1,layer7,layer3]"])
    with pytest.raises(EffrunError, match=f"compression.distill.{key}: no layer named 'layer7'"):
        method(model, ctx)
    assert not (tmp_path / "kd.pt").exists()


def test_cli_bad_teacher_is_one_line(tmp_path, monkeypatch):
    teacher = _bad_teacher(tmp_path, "garbage")
    init = save_model(CifarResNet(depth=20, width=8).build(10), tmp_path / "init.pt",
                      model_config=model_config_dict(CifarResNet(depth=20, width=8)),
                      num_classes=10, stage="train")
    res = run_cli_here([*TINY, "compression/distill=kd", "stages=[distill]",
                        f"init_from={init}", f"compression.distill.teacher={teacher}",
                        f"hydra.run.dir={tmp_path}/run"], tmp_path, monkeypatch)
    assert res.returncode == 1 and "compression.distill.teacher" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_presets_compose_to_the_studies():
    prune = validate(compose_cfg(["+experiment=cifar10_prune"]))
    method = prune.compression["prune"]
    assert isinstance(method, ChannelPrune) and method.target_macs_ratio <= 0.5
    assert prune.model.depth == 56 and prune.run.stages == ["train", "prune", "benchmark"]
    distill = validate(compose_cfg(["+experiment=cifar10_distill"]))
    kd = distill.compression["distill"]
    assert distill.model.depth == 56 and kd.student == "resnet20" and kd.compare_scratch
    assert distill.run.stages == ["train", "distill", "benchmark"]
