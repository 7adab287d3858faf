"""The airbench model and recipe: whitening init, model hooks, and the recipe on synthetic data."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_cfg

from effrun import pipeline
from effrun.data import SyntheticData
from effrun.hardware import Hardware
from effrun.measure import count_params, set_threads
from effrun.models import Airbench, build_model, model_config_dict
from effrun.optim import SGD
from effrun.schema import TrainConfig
from effrun.train import fit


@pytest.fixture(autouse=True)
def one_thread():
    with set_threads(1):
        yield


def correlated_images(n: int = 64, size: int = 16) -> torch.Tensor:
    """Smooth, channel-correlated images: their 2x2 patches are far from white."""
    g = torch.Generator().manual_seed(0)
    base = F.avg_pool2d(torch.randn(n, 1, size + 2, size + 2, generator=g), 3, 1)
    colour = torch.randn(n, 3, size, size, generator=g)
    return 2.0 * base + 0.3 * colour + 0.5


def test_whitening_gives_identity_patch_covariance():
    model = Airbench().build(10)
    images = correlated_images()
    patches = images.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12)
    raw_cov = patches.T @ patches / len(patches)
    assert (raw_cov - torch.eye(12)).abs().max() > 0.5, "the test images are not white already"
    model.init_from_data(images)
    weight = model.whiten.weight
    out = F.conv2d(images, weight[:12])  # bias left out: it is a trained shift
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12)
    cov = flat.T @ flat / len(flat)
    torch.testing.assert_close(cov, torch.eye(12), atol=0.02, rtol=0)
    assert torch.equal(weight[12:], -weight[:12]), "the second half are the negated filters"
    assert not weight.requires_grad


def test_airbench_size_and_whitening_bias_schedule():
    model = Airbench().build(10)
    assert abs(count_params(model) - 1.97e6) < 0.01e6  # airbench94's published size
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert not any(bn.weight.requires_grad for bn in (model.group1.bn1, model.group3.bn2))
    model.on_epoch_start(2)
    assert model.whiten.bias.requires_grad
    model.on_epoch_start(3)
    assert not model.whiten.bias.requires_grad
    # The rebuilt model keeps its whitening filters through the state_dict.
    model.init_from_data(correlated_images(8, 32))
    rebuilt = build_model(model_config_dict(Airbench()), 10)
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt.whiten.weight, model.whiten.weight)


def tiny_run_args(tmp_path, epochs: int, name: str = "ckpt.pt") -> dict:
    data = SyntheticData(num_train=256, num_test=64).load(seed=0)
    train = TrainConfig(epochs=epochs, batch_size=64, label_smoothing=0.2, lookahead_every=2,
                        tta="flip_translate", eval_every=2)
    opt = SGD(lr=0.2, momentum=0.85, weight_decay=1e-3, decoupled_weight_decay=True,
              decay_norm_and_bias=True, norm_bias_lr_scale=8.0, schedule="linear",
              warmup_epochs=1.0, warmup_from=0.2, final_lr_fraction=0.07)
    return dict(data=data, hw=Hardware(device="cpu", precision="fp32"), train=train,
                optimizer=opt, augment=None, checkpoint=tmp_path / name, seed=0,
                fingerprint="tiny")


def tiny_airbench() -> torch.nn.Module:
    torch.manual_seed(0)
    return Airbench(widths=[8, 16, 16], whiten_bias_epochs=1).build(10)


def test_lookahead_run_resumes_to_the_same_weights(tmp_path):
    straight = tiny_airbench()
    result = fit(straight, **tiny_run_args(tmp_path, epochs=3, name="a.pt"))
    assert [("test_accuracy" in h) for h in result["history"]] == [False, True, True]
    resumed = tiny_airbench()

    def interrupt(model, step, total):  # 4 steps per epoch: stop in the second epoch
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(resumed, **tiny_run_args(tmp_path, epochs=3, name="b.pt"), after_step=interrupt)
    ckpt = torch.load(tmp_path / "b.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["lookahead"], "the lookahead average is checkpointed"
    resumed = tiny_airbench()
    fit(resumed, **tiny_run_args(tmp_path, epochs=3, name="b.pt"))
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(),
                         strict=True):
        assert torch.equal(a, b), k
    assert not resumed.whiten.bias.requires_grad, "the hook froze the bias after epoch 1"


def test_recipe_composes_and_runs_on_synthetic_data(tmp_path):
    cfg = compose_cfg(["+experiment=cifar10_airbench", "dataset=synthetic", "hardware=cpu",
                       "dataset.num_train=1024", "dataset.num_test=256", "train.epochs=3",
                       "train.batch_size=128", "model.widths=[16,32,32]", "stages=[train]"])
    summary = pipeline.run(cfg, tmp_path)
    metrics = json.loads((tmp_path / "01_train" / "metrics.json").read_text())
    # lr 11.5 per 1024 examples (airbench's units) is 1.5 per step at batch 1024, so 1.5/8 at
    # batch 128; the schedule ends at 7% of it.
    assert metrics["history"][-1]["lr"] == pytest.approx(1.5 * 128 / 1024 * 0.07)
    assert "test_accuracy" not in metrics["history"][0], "eval_every: 0 skips epoch evaluation"
    assert summary[0]["accuracy"] > 0.2, "well above the 10% of chance"
    blob = torch.load(tmp_path / "01_train" / "model.pt", weights_only=True)
    whiten = blob["state_dict"]["whiten.weight"]
    assert torch.equal(whiten[12:], -whiten[:12]), "the pipeline called init_from_data"
