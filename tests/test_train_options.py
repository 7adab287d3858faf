"""Reusable training options: param groups, warmup start, lookahead, alternating flip, TTA views."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from effrun.data import Augmentation, BatchLoader, DataSplits
from effrun.evaluate import evaluate, tta_views, tta_weights
from effrun.hardware import Hardware
from effrun.optim import SGD, AdamW
from effrun.schema import TrainConfig
from effrun.train import Lookahead


def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))


def groups_by_size(groups: list[dict]) -> dict[int, dict]:
    return {len(g["params"]): g for g in groups}


def test_default_param_groups_unchanged():
    net = small_net()
    net(torch.randn(1, 3, 5, 5))
    groups = SGD(lr=0.1, weight_decay=5e-4).param_groups(net)
    # conv.weight + linear.weight decay; conv.bias, bn.weight, bn.bias, linear.bias do not.
    assert [len(g["params"]) for g in groups] == [2, 4]
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0]
    assert all(g["lr"] == 0.1 for g in groups)
    one = SGD(lr=0.1, decay_norm_and_bias=True).param_groups(net)
    assert len(one) == 1 and len(one[0]["params"]) == 6


@pytest.mark.parametrize("opt_cls", [SGD, AdamW])
def test_norm_bias_lr_scale_and_decoupled_decay(opt_cls):
    net = small_net()
    net(torch.randn(1, 3, 5, 5))
    opt = opt_cls(lr=0.5, weight_decay=0.002, decay_norm_and_bias=True, norm_bias_lr_scale=64.0,
                  decoupled_weight_decay=True)
    groups = groups_by_size(opt.param_groups(net))
    norm_bias = groups[1]
    assert norm_bias["params"][0] is net[1].bias and norm_bias["lr"] == 32.0
    for g in groups.values():
        assert g["lr"] * g["weight_decay"] == pytest.approx(0.002)
    built = opt.build(net)
    assert [g["lr"] for g in built.param_groups] == [0.5, 32.0]


def test_warmup_from_and_linear_decay():
    net = nn.Linear(2, 2)
    opt = SGD(lr=1.0, schedule="linear", warmup_epochs=1.0, warmup_from=0.2,
              final_lr_fraction=0.07)
    torch_opt = opt.build(net)
    sched = opt.scheduler(torch_opt, total_steps=100, steps_per_epoch=10)
    lrs = []
    for _ in range(100):
        lrs.append(torch_opt.param_groups[0]["lr"])
        torch_opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.2 + 0.8 / 10)
    assert max(lrs) == pytest.approx(1.0) and lrs[9] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.07 + 0.93 / 90, abs=1e-6)
    with pytest.raises(ValueError, match="warmup_from"):
        SGD(schedule="onecycle", warmup_from=0.2)


def test_lookahead_follows_then_damps_then_lands_on_average():
    net = nn.Linear(1, 1, bias=False)
    look = Lookahead(net, every=2, decay=0.5)
    with torch.no_grad():
        net.weight.fill_(1.0)
    look.step(net, 1, 10)  # not a multiple of `every`: nothing happens
    assert net.weight.item() == 1.0 and look.state["weight"].item() != 1.0
    look.step(net, 2, 10)  # d = 0.5 * 0.2**3 = 0.004: the average nearly follows
    expected = look.state["weight"].item()
    assert net.weight.item() == expected and expected > 0.99
    with torch.no_grad():
        net.weight.fill_(2.0)
    look.step(net, 10, 10)  # the last step takes the average as it is
    assert net.weight.item() == expected
    with pytest.raises(ValueError, match="lookahead"):
        TrainConfig(lookahead_every=-1)


def labelled_images(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose left column holds their index (the rest 0), labels index % 3."""
    x = torch.zeros(n, 3, 6, 6, dtype=torch.uint8)
    x[:, :, :, 0] = torch.arange(n, dtype=torch.uint8)[:, None, None] + 10
    return x, torch.arange(n) % 3


def test_alternating_flip_flips_each_sample_every_other_epoch():
    x, y = labelled_images()
    aug = Augmentation(flip=True, alternate_flip=True)
    loader = BatchLoader(x, y, 8, mean=(0.0,) * 3, std=(1 / 255,) * 3, shuffle=True,
                         augment=aug, seed=3)
    flips = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        flipped = {}
        for inputs, labels in loader:
            for image, label in zip(inputs, labels, strict=True):
                right = bool(image[0, 0, -1] > 0)
                index = int(image[0, 0, -1 if right else 0]) - 10
                assert int(label) == y[index], "the label travels with its image"
                flipped[index] = right
        assert len(flipped) == len(x)
        flips.append(flipped)
    for a, b in zip(flips[:-1], flips[1:], strict=True):
        assert all(a[i] != b[i] for i in a), "each epoch flips exactly the others"
    assert 0 < sum(flips[0].values()) < len(x)
    other_seed = BatchLoader(x, y, 40, mean=(0.0,) * 3, std=(1 / 255,) * 3, augment=aug, seed=4)
    first = next(iter(other_seed))[0][:, 0, 0, -1] > 0
    assert [bool(f) for f in first] != [flips[0][i] for i in range(len(x))]
    with pytest.raises(ValueError, match="alternate_flip"):
        Augmentation(alternate_flip=True)


@pytest.mark.parametrize("mode", ["none", "flip", "flip_translate"])
def test_tta_views_keep_labels(mode):
    # Each image is one flat colour that spells its label: every view of it must still spell it.
    y = torch.arange(30) % 3
    x = torch.zeros(30, 3, 8, 8, dtype=torch.uint8)
    x[torch.arange(30), y] = 200
    data = DataSplits(x, y, x, y, classes=["a", "b", "c"], mean=(0.0,) * 3, std=(1.0,) * 3)

    class ColourMean(nn.Module):
        def forward(self, inputs):
            return inputs.mean(dim=(2, 3))

    views = tta_views(torch.randn(2, 3, 8, 8), mode)
    assert all(v.shape == (2, 3, 8, 8) for v in views)
    assert len(tta_weights(mode)) == len(views) and sum(tta_weights(mode)) == pytest.approx(1)
    hw = Hardware(device="cpu", precision="fp32")
    assert evaluate(ColourMean(), x, y, data, hw, batch_size=7, tta=mode)["accuracy"] == 1.0


def test_flip_translate_views_are_shifted_copies():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    views = tta_views(x, "flip_translate")
    assert torch.equal(views[1], x.flip(-1))
    assert torch.equal(views[2][..., 1:, 1:], x[..., :-1, :-1])  # content moved down-right
    assert torch.equal(views[4][..., :-1, :-1], x[..., 1:, 1:])  # content moved up-left
    assert torch.equal(views[3], views[2].flip(-1)) and torch.equal(views[5], views[4].flip(-1))


def test_hardware_compile_covers_train_step_and_eval(tmp_path, monkeypatch):
    """hardware.compile compiles the training step and the evaluation forward (here with Dynamo's
    eager backend: the wiring is under test, not Inductor)."""
    from conftest import compose_cfg

    from effrun.schema import validate
    from effrun.train import fit

    calls = []
    real_compile = torch.compile

    def recording_compile(model, **kwargs):
        compiled = real_compile(model, backend="eager")

        def forward(x):
            calls.append((model.training, torch.is_grad_enabled()))
            return compiled(x)
        return forward

    monkeypatch.setattr(torch, "compile", recording_compile)
    r = validate(compose_cfg(["+experiment=smoke", "stages=[train]", "dataset.num_train=128",
                              "dataset.num_test=64", "train.epochs=1", "hardware.compile=true"]))
    data = r.dataset.load(seed=0)
    model = r.hardware.prepare(r.model.build(num_classes=data.num_classes))
    fit(model, data, hw=r.hardware, train=r.run.train, optimizer=r.optimizer,
        augment=r.augmentation, checkpoint=tmp_path / "ckpt.pt", seed=0)
    assert (True, True) in calls  # training steps
    assert (False, False) in calls  # the final test evaluation
