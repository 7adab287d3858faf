"""Checkpoints inside an epoch (train.checkpoint_every): a run stopped mid-epoch resumes at the
next batch, from the memory loader and the stream loader, and ends as an unbroken run."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import compose_cfg, write_image_tree
from torch import nn

from effrun.checkpoint import prev_checkpoint
from effrun.data import Augmentation, BatchLoader, ImageFolderData, SyntheticData
from effrun.errors import ConfigError, EffrunError
from effrun.hardware import Hardware
from effrun.keys import fingerprint, stage_config
from effrun.measure import set_threads
from effrun.optim import SGD
from effrun.schema import TrainConfig, validate
from effrun.train import fit

TIMINGS = ("seconds", "cpu_seconds", "images_per_s")  # differ between any two runs


class Interrupted(Exception):
    """Raised by `stop_at` in place of a kill: the run ends after that optimizer step."""


@pytest.fixture(autouse=True)
def one_thread():
    with set_threads(1):  # bit-identical resume needs the same reduction order in both runs
        yield


def net() -> nn.Module:
    # Dropout draws from torch's global generator: the resume must restore it to the step.
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.25),
                         nn.Linear(8, 3))


def stop_at(stop_step: int):
    def after_step(model, step, total):
        if step == stop_step:
            raise Interrupted
    return after_step


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """3 classes x 8 train JPEGs of 24x24 px: 6 steps of 4 per epoch."""
    return write_image_tree(tmp_path_factory.mktemp("tree"), classes=3, per_class=8, size=24)


def memory_args(tmp_path, tree) -> dict:
    """128 synthetic images, batches of 32: 4 steps per epoch; crops, flips, cutout, mixup."""
    data = SyntheticData(num_train=128, num_test=32, image_size=16, num_classes=3).load(seed=0)
    return dict(data=data, train=TrainConfig(epochs=3, batch_size=32, eval_every=0,
                                             checkpoint_every=3, ema_decay=0.9),
                augment=Augmentation(crop_padding=2, flip=True, cutout=4, mix="mixup"))


def stream_args(tmp_path, tree) -> dict:
    """The tree read from its files every epoch (the ImageNet path), random resized crops."""
    data = ImageFolderData(root=str(tree), loader="stream", workers=0, crop_size=16,
                           cache_dir=str(tmp_path / "cache")).load(seed=0)
    return dict(data=data, train=TrainConfig(epochs=2, batch_size=4, eval_every=1,
                                             checkpoint_every=4, lookahead_every=2),
                augment=Augmentation(flip=True, cutout=4))


def fit_args(args: dict, checkpoint) -> dict:
    return dict(hw=Hardware(device="cpu", precision="fp32", channels_last=False),
                optimizer=SGD(lr=0.05, schedule="linear"), checkpoint=checkpoint, seed=0,
                fingerprint="tiny", **args)


def without_timings(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k not in TIMINGS} for h in history]


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), k


# (args, the step to stop after, the position of the last checkpoint before it, the log's words)
CASES = {"memory": (memory_args, 7, {"epoch": 1, "batch": 2}, "at epoch 2/3, step 2/4"),
         "stream": (stream_args, 10, {"epoch": 1, "batch": 2}, "at epoch 2/2, step 2/6")}


@pytest.mark.parametrize("loader", sorted(CASES))
def test_a_run_stopped_inside_an_epoch_ends_as_an_unbroken_one(loader, tmp_path, tree, caplog):
    make_args, stop_step, where, words = CASES[loader]
    args = make_args(tmp_path, tree)
    straight = net()
    expected = fit(straight, **fit_args(args, tmp_path / "a.pt"))

    with pytest.raises(Interrupted):
        fit(net(), **fit_args(args, tmp_path / "b.pt"), after_step=stop_at(stop_step))
    state = torch.load(tmp_path / "b.pt", weights_only=True)
    position = state["position"]
    assert {k: position[k] for k in where} == where
    assert position["loader"] == where, "the loader's own state_dict: the same position"
    assert state["epoch"] == where["epoch"] and len(state["history"]) == where["epoch"]
    assert prev_checkpoint(tmp_path / "b.pt").exists(), "the one before is kept"

    resumed = net()
    with caplog.at_level(logging.INFO, logger="effrun.train"):
        result = fit(resumed, **fit_args(args, tmp_path / "b.pt"))
    assert f"train: resumed from {tmp_path / 'b.pt'} {words}" in caplog.text
    assert_same_weights(straight, resumed)
    assert without_timings(result["history"]) == without_timings(expected["history"])
    assert result["test_accuracy"] == expected["test_accuracy"]
    assert all(h["seconds"] > 0 and h["images_per_s"] > 0 for h in result["history"])
    final = torch.load(tmp_path / "b.pt", weights_only=True)
    assert final["position"] is None and final["epoch"] == args["train"].epochs


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_position(tmp_path, tree,
                                                                          caplog):
    args = memory_args(tmp_path, tree)
    straight = net()
    fit(straight, **fit_args(args, tmp_path / "a.pt"))
    with pytest.raises(Interrupted):  # checkpoints after steps 3, 4 (epoch end) and 6
        fit(net(), **fit_args(args, tmp_path / "b.pt"), after_step=stop_at(7))
    (tmp_path / "b.pt").write_bytes(b"torn")
    resumed = net()
    with caplog.at_level(logging.INFO, logger="effrun.train"):
        fit(resumed, **fit_args(args, tmp_path / "b.pt"))
    assert "resumed from the previous checkpoint b.prev.pt after epoch 1/3" in caplog.text
    assert_same_weights(straight, resumed)


def test_without_checkpoint_every_only_epochs_are_checkpointed(tmp_path, tree, monkeypatch):
    args = memory_args(tmp_path, tree)
    args["train"] = TrainConfig(epochs=2, batch_size=32, eval_every=0)
    assert args["train"].checkpoint_every == 0, "the default: as before"
    import effrun.train

    saved = []
    real_save = effrun.train.save_checkpoint

    def spy(loop, epoch, fingerprint, position=None):
        saved.append((epoch, position))
        real_save(loop, epoch, fingerprint, position)
    monkeypatch.setattr(effrun.train, "save_checkpoint", spy)
    with pytest.raises(Interrupted):
        fit(net(), **fit_args(args, tmp_path / "b.pt"), after_step=stop_at(7))
    assert saved == [(0, None)]
    state = torch.load(tmp_path / "b.pt", weights_only=True)
    assert state["epoch"] == 1 and state["position"] is None


def test_a_position_from_another_epoch_length_is_refused(tmp_path, tree):
    args = memory_args(tmp_path, tree)
    with pytest.raises(Interrupted):
        fit(net(), **fit_args(args, tmp_path / "b.pt"), after_step=stop_at(7))
    args["train"] = TrainConfig(epochs=3, batch_size=16, eval_every=0, checkpoint_every=3,
                                ema_decay=0.9)
    with pytest.raises(EffrunError, match="stopped inside epoch 2 of a run with 1 ranks and 4 "
                                          "steps per epoch; this run has 1 and 8"):
        fit(net(), **fit_args(args, tmp_path / "b.pt"))


def test_memory_loader_continues_a_pass_from_its_position():
    x = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator())
    aug = Augmentation(crop_padding=2, flip=True, cutout=3, mix="cutmix")

    def loader(rank: int = 0) -> BatchLoader:
        return BatchLoader(x, torch.arange(40) % 4, 4, mean=(0.5,) * 3, std=(0.25,) * 3,
                           shuffle=True, augment=aug, seed=7, rank=rank, world_size=2)
    for rank in (0, 1):
        full = loader(rank)
        full.set_epoch(2)
        whole = list(full)
        assert full.state_dict() == {"epoch": 3, "batch": 0}
        resumed = loader(rank)
        resumed.load_state_dict({"epoch": 2, "batch": 3})
        rest = list(resumed)
        assert len(rest) == len(whole) - 3
        for (a, la), (b, lb) in zip(rest, whole[3:], strict=True):
            assert torch.equal(a, b) and torch.equal(la, lb)


def test_negative_checkpoint_every_is_a_config_error():
    with pytest.raises(ValueError, match="train.checkpoint_every must be >= 0"):
        TrainConfig(checkpoint_every=-1)
    with pytest.raises(ConfigError, match="checkpoint_every"):
        validate(compose_cfg(["+experiment=smoke", "train.checkpoint_every=-5"]))
    assert validate(compose_cfg(["+experiment=smoke", "train.checkpoint_every=100"])
                    ).run.train.checkpoint_every == 100


def test_checkpoint_every_leaves_the_stage_keys_alone():
    """Turning mid-epoch checkpoints on to resume a long run finds its finished stages: how
    often training checkpoints changes nothing it computes."""
    keys = [fingerprint(stage_config(validate(compose_cfg(["+experiment=smoke", *extra])),
                                     "train"))
            for extra in ([], ["train.checkpoint_every=7"], ["train.epochs=9"])]
    assert keys[0] == keys[1] != keys[2]


TWO_RANKS = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    import torch
    from torch import nn
    from effrun import distributed
    from effrun.data import Augmentation, SyntheticData
    from effrun.hardware import Hardware
    from effrun.optim import SGD
    from effrun.schema import TrainConfig
    from effrun.train import fit

    class Interrupted(Exception):
        pass

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(8, 10))

    def stop(model, step, total):
        if step == 7:
            raise Interrupted

    distributed.init()
    out = Path(sys.argv[1])
    args = dict(data=SyntheticData(num_train=128, num_test=32, image_size=16).load(seed=0),
                hw=Hardware(device="cpu", precision="fp32", channels_last=False),
                train=TrainConfig(epochs=2, batch_size=32, eval_every=0, checkpoint_every=3),
                optimizer=SGD(lr=0.05, schedule="linear"), seed=0, fingerprint="ddp",
                augment=Augmentation(crop_padding=2, flip=True, cutout=4, mix="mixup"))
    straight = net()
    expected = fit(straight, checkpoint=out / "a.pt", **args)
    try:
        fit(net(), checkpoint=out / "b.pt", after_step=stop, **args)
    except Interrupted:
        pass
    position = torch.load(out / "b.pt", weights_only=True)["position"]
    resumed = net()
    result = fit(resumed, checkpoint=out / "b.pt", **args)
    same = all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(),
                                                  resumed.state_dict().values(), strict=True))
    losses = [[h["train_loss"] for h in r["history"]] for r in (expected, result)]
    rank = distributed.rank_and_world()[0]
    (out / f"rank{rank}.json").write_text(json.dumps(
        {"same": same, "losses": losses, "at": [position["epoch"], position["batch"]]}))
    distributed.finish()
''')


@pytest.mark.slow
def test_two_ranks_resume_inside_an_epoch_from_rank_0s_file(tmp_path):
    """2 gloo ranks under torchrun: stopped after step 7 (last checkpoint: epoch 2, step 2 of
    4), resumed from the one file rank 0 wrote, they end with the unbroken run's weights."""
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as torchrun sets it for several ranks
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(script), str(tmp_path)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["at"] == [1, 2] and report["same"], (rank, report)
        expected, resumed = report["losses"]
        assert resumed == expected, "the resumed epoch's loss sums every rank's whole shard"
