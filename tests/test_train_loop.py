"""effrun.train.fit on a tiny CPU run: fp16 loss scaling, checkpoint contents, resume, errors."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

from effrun.data import SyntheticData
from effrun.errors import ConfigError, EffrunError
from effrun.hardware import Hardware
from effrun.measure import set_threads
from effrun.optim import SGD
from effrun.schema import ConfigError as SchemaConfigError
from effrun.schema import TrainConfig
from effrun.train import TrainingDiverged, fit

STEPS_PER_EPOCH = 4  # 128 training images in batches of 32


@pytest.fixture(autouse=True)
def one_thread():
    with set_threads(1):  # bit-identical resume needs the same reduction order in both runs
        yield


@functools.cache
def cpu_fp16_error() -> str | None:
    """Why fp16 autocast with a GradScaler cannot train on this CPU, or None when it can."""
    try:
        net = nn.Conv2d(3, 4, 3)
        with torch.autocast("cpu", dtype=torch.float16):
            out = net(torch.randn(2, 3, 8, 8))
        if out.dtype != torch.float16:
            return f"CPU autocast with float16 computed {out.dtype}"
        scaler = torch.amp.GradScaler("cpu")
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        scaler.scale(out.float().mean()).backward()
        scaler.step(opt)
        scaler.update()
    except (RuntimeError, NotImplementedError) as e:
        return f"torch {torch.__version__} cannot train fp16 on the CPU: {e}"
    return None


@pytest.fixture
def fp16_cpu() -> None:
    """Skips the test where this torch cannot train with fp16 autocast on the CPU."""
    if (why := cpu_fp16_error()) is not None:
        pytest.skip(why)


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


class HookedNet(nn.Sequential):
    """A model with the EpochStart hook; records the epochs it was called with."""

    def __init__(self) -> None:
        super().__init__(*tiny_net())
        self.epochs_started: list[int] = []

    def on_epoch_start(self, epoch: int) -> None:
        self.epochs_started.append(epoch)


def run_args(tmp_path, precision: str = "fp32", name: str = "ckpt.pt", epochs: int = 3,
             **train) -> dict:
    data = SyntheticData(num_train=128, num_test=32, image_size=16).load(seed=0)
    return dict(data=data, hw=Hardware(device="cpu", precision=precision, channels_last=False),
                train=TrainConfig(epochs=epochs, batch_size=32, eval_every=0, **train),
                optimizer=SGD(lr=0.05, schedule="linear"), augment=None,
                checkpoint=tmp_path / name, seed=0, fingerprint="tiny")


def stop_at(stop_step: int):
    def after_step(model, step, total):
        if step == stop_step:
            raise KeyboardInterrupt
    return after_step


def interrupted_then_resumed(model_fn, args: dict, edit_checkpoint=None) -> nn.Module:
    """Stop in the second epoch (after epoch 1 was checkpointed), optionally edit the checkpoint,
    then run again to the end; returns the resumed model."""
    with pytest.raises(KeyboardInterrupt):
        fit(model_fn(), **args, after_step=stop_at(STEPS_PER_EPOCH + 2))
    if edit_checkpoint is not None:
        ckpt = torch.load(args["checkpoint"], weights_only=True)
        edit_checkpoint(ckpt)
        torch.save(ckpt, args["checkpoint"])
    resumed = model_fn()
    fit(resumed, **args)
    return resumed


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), k


@pytest.fixture
def scaler_calls(monkeypatch) -> list[str]:
    """Names of the GradScaler methods fit calls, in order (request it after fp16_cpu, whose
    probe calls them too)."""
    calls: list[str] = []
    for name in ("scale", "unscale_", "step", "update", "load_state_dict"):
        real = getattr(torch.amp.GradScaler, name)

        def spy(self, *args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.amp.GradScaler, name, spy)
    return calls


def test_fp16_scales_the_loss_and_resume_restores_the_scaler(tmp_path, fp16_cpu, scaler_calls):
    straight = tiny_net()
    result = fit(straight, **run_args(tmp_path, "fp16", "a.pt", grad_clip_norm=5.0))
    steps = 3 * STEPS_PER_EPOCH
    # Unscaled before clipping, every step.
    assert scaler_calls == ["scale", "unscale_", "step", "update"] * steps
    scaler_state = torch.load(tmp_path / "a.pt", weights_only=True)["scaler"]
    assert scaler_state["scale"] > 1.0, "the checkpoint holds the scaler's state"
    losses = [h["train_loss"] for h in result["history"]]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    assert math.isfinite(result["test_loss"])

    scaler_calls.clear()
    args = run_args(tmp_path, "fp16", "b.pt", grad_clip_norm=5.0)
    resumed = interrupted_then_resumed(tiny_net, args)
    assert scaler_calls.count("load_state_dict") == 1, "resume restored the scaler"
    assert_same_weights(straight, resumed)
    assert torch.load(tmp_path / "b.pt", weights_only=True)["scaler"] == scaler_state


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fp32_and_bf16_train_without_a_scaler(tmp_path, scaler_calls, precision):
    fit(tiny_net(), **run_args(tmp_path, precision, epochs=1, grad_clip_norm=5.0))
    assert scaler_calls == []
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["scaler"] is None


def test_checkpoint_keeps_cuda_rng_and_old_checkpoints_still_resume(tmp_path):
    straight = tiny_net()
    fit(straight, **run_args(tmp_path, name="a.pt"))
    ckpt = torch.load(tmp_path / "a.pt", weights_only=True)
    assert "cuda_rng" in ckpt and ckpt["cuda_rng"] is None, "None: this run did not use CUDA"

    resumed = interrupted_then_resumed(tiny_net, run_args(tmp_path, name="b.pt"))
    assert_same_weights(straight, resumed)

    def drop_new_keys(ckpt: dict) -> None:  # as a checkpoint written before they existed
        del ckpt["cuda_rng"], ckpt["scaler"]

    old_style = interrupted_then_resumed(tiny_net, run_args(tmp_path, name="c.pt"),
                                         edit_checkpoint=drop_new_keys)
    assert_same_weights(straight, old_style)


def test_old_fp16_checkpoint_without_scaler_resumes(tmp_path, fp16_cpu):
    def drop_scaler(ckpt: dict) -> None:
        del ckpt["scaler"]

    args = run_args(tmp_path, "fp16", epochs=2)
    interrupted_then_resumed(tiny_net, args, edit_checkpoint=drop_scaler)
    ckpt = torch.load(args["checkpoint"], weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["scaler"] is not None


def test_epoch_start_hook_runs_for_every_epoch_trained(tmp_path):
    args = run_args(tmp_path)
    first = HookedNet()
    with pytest.raises(KeyboardInterrupt):
        fit(first, **args, after_step=stop_at(STEPS_PER_EPOCH + 2))
    assert first.epochs_started == [0, 1]
    resumed = HookedNet()
    fit(resumed, **args)
    assert resumed.epochs_started == [1, 2], "resume starts in the interrupted epoch"


def test_checkpoint_of_another_config_is_a_run_time_error(tmp_path):
    args = run_args(tmp_path, epochs=1)
    fit(tiny_net(), **args)
    with pytest.raises(EffrunError, match="different config") as info:
        fit(tiny_net(), **{**args, "fingerprint": "other"})
    assert not isinstance(info.value, (ConfigError, SchemaConfigError)), "not a validation error"
    assert "\n" not in str(info.value)


def test_divergence_is_a_run_time_error(tmp_path):
    def nan_loss(logits, inputs, labels):
        return logits.sum() * float("nan")

    with pytest.raises(TrainingDiverged, match="loss became nan") as info:
        fit(tiny_net(), **run_args(tmp_path, epochs=1), loss_fn=nan_loss)
    assert isinstance(info.value, EffrunError)
    assert "\n" not in str(info.value)
