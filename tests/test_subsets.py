"""Training subsets (dataset.train_fraction / train_size, selection) and class rebalancing
(dataset.balance): deterministic, exact, balanced when asked, and bad values refused in one
line. No training: the data layer and the loss only."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_cfg

from effrun.data import SyntheticData
from effrun.data.splits import DataSplits, finish_splits
from effrun.data.subset import balanced_quotas, class_weights, resample_indices, subset_mask
from effrun.errors import ConfigError, EffrunError
from effrun.keys import stage_config
from effrun.schema import SelectConfig, validate


def imbalanced(counts=(40, 20, 10, 5), seed=0) -> DataSplits:
    """Train split with `counts` images per class (tiny 4x4 images, their index as pixels)."""
    labels = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]
    ids = torch.arange(len(labels))
    x = (ids % 256).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 4, 4).contiguous()
    return DataSplits(x, labels, x[:4].clone(), labels[:4].clone(),
                      classes=[f"c{k}" for k in range(len(counts))])


def tiny(**kw) -> SyntheticData:
    return SyntheticData(num_train=300, num_test=10, image_size=8, **kw)


def test_train_size_is_exact_and_deterministic_from_the_seed():
    for selection in ("stratified", "class_balanced", "random"):
        a = tiny(train_size=77, selection=selection).load(seed=0)
        b = tiny(train_size=77, selection=selection).load(seed=0)
        c = tiny(train_size=77, selection=selection).load(seed=1)
        assert len(a.train_y) == 77
        assert torch.equal(a.train_x, b.train_x), f"{selection}: same seed, same subset"
        assert not torch.equal(a.train_x, c.train_x), f"{selection}: the seed draws it"


def test_class_balanced_takes_equal_counts_and_water_fills_short_classes():
    full = imbalanced((40, 20, 10, 5))
    even = finish_splits(full, 0.0, 1.0, 0, train_size=20, selection="class_balanced")
    assert torch.bincount(even.train_y).tolist() == [5, 5, 5, 5]
    short = finish_splits(full, 0.0, 1.0, 0, train_size=44, selection="class_balanced")
    # 11 each, but classes 2 and 3 have only 10 and 5: they give all, classes 0 and 1 share
    # the 7 left (the odd one to the lowest class number)
    assert torch.bincount(short.train_y).tolist() == [15, 14, 10, 5]
    assert balanced_quotas(torch.tensor([40, 20, 10, 5]), 75).tolist() == [40, 20, 10, 5]


def test_stratified_keeps_class_shares_and_random_does_not_look_at_labels():
    full = imbalanced((40, 20, 10, 5))
    strat = finish_splits(full, 0.0, 0.4, 0)
    assert torch.bincount(strat.train_y).tolist() == [16, 8, 4, 2]
    mask = subset_mask(full.train_y, 30, "random", seed=3)
    assert int(mask.sum()) == 30
    assert torch.equal(mask, subset_mask(full.train_y, 30, "random", seed=3))
    # random works on unlabeled images; the label-based draws refuse them in one line
    unlabeled = torch.full((10,), -1)
    assert int(subset_mask(unlabeled, 4, "random", seed=0).sum()) == 4
    with pytest.raises(EffrunError, match="needs labels") as err:
        subset_mask(unlabeled, 4, "class_balanced", seed=0)
    assert "\n" not in str(err.value)


def test_resample_tops_every_class_up_to_the_largest():
    full = imbalanced((40, 20, 10, 5))
    out = finish_splits(full, 0.0, 1.0, 0, balance="resample")
    assert torch.bincount(out.train_y).tolist() == [40, 40, 40, 40]
    # every original image is still there once; the copies are drawn from their own class
    idx = resample_indices(full.train_y, seed=0)
    assert torch.equal(idx[:75], torch.arange(75))
    assert torch.equal(full.train_y[idx[75:]].bincount(), torch.tensor([0, 20, 30, 35]))
    assert torch.equal(idx, resample_indices(full.train_y, seed=0))
    assert out.class_weights is None


def test_loss_weights_weigh_each_class_equally_in_the_training_loss(tmp_path):
    full = imbalanced((40, 20, 10, 5))
    out = finish_splits(full, 0.0, 1.0, 0, balance="loss_weights")
    counts = torch.tensor([40.0, 20, 10, 5])
    assert torch.allclose(out.class_weights, 75 / (4 * counts))
    assert torch.allclose(out.class_weights * counts, torch.full((4,), 75 / 4))
    assert torch.equal(class_weights(torch.tensor([0, 0, 2]), 3), torch.tensor([0.75, 0, 1.5]))

    # the loop's loss is the weighted cross-entropy (and plain without the weights)
    from effrun.train import _build_loop

    config = validate(compose_cfg(["+experiment=smoke", "hardware=cpu"]))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 4))
    logits, labels = torch.randn(8, 4), torch.tensor([0, 1, 2, 3, 3, 3, 0, 1])
    for data, weight in ((out, out.class_weights), (full, None)):
        loop = _build_loop(model, data, hw=config.hardware, train=config.run.train,
                           optimizer=config.optimizer, augment=None,
                           checkpoint=tmp_path / "c.pt", seed=0, epochs=1, loss_fn=None,
                           after_step=None, desc="t")
        expected = F.cross_entropy(logits, labels, weight=weight)
        assert torch.allclose(loop.loss_fn(logits, None, labels), expected)


@pytest.mark.parametrize("cls,values,expect", [
    (SyntheticData, {"train_fraction": 0}, "dataset.train_fraction must be in (0, 1]"),
    (SyntheticData, {"train_fraction": 1.5}, "dataset.train_fraction must be in (0, 1]"),
    (SyntheticData, {"train_size": 0}, "dataset.train_size must be >= 1"),
    (SyntheticData, {"train_size": 100, "train_fraction": 0.5}, "not both"),
    (SyntheticData, {"selection": "best"}, "dataset.selection must be one of"),
    (SyntheticData, {"balance": "smote"}, "dataset.balance must be one of"),
    (SelectConfig, {"keep": 0}, "select.keep must be in (0, 1]"),
    (SelectConfig, {"keep": 1.2}, "select.keep must be in (0, 1]"),
    (SelectConfig, {"method": "coreset"}, "select.method must be one of"),
    (SelectConfig, {"order": "middle"}, "select.order must be one of"),
    (SelectConfig, {"proxy_epochs": 0}, "select.proxy_epochs"),
])
def test_bad_values_are_one_line(cls, values, expect):
    with pytest.raises(ValueError) as err:
        cls(**values)
    assert expect in str(err.value) and "\n" not in str(err.value)


def test_bad_values_in_a_config_are_one_config_error():
    for override, expect in ((["dataset.train_fraction=1.5"], "dataset.train_fraction"),
                             (["select.keep=0"], "select.keep must be in (0, 1], got 0")):
        with pytest.raises(ConfigError) as err:
            validate(compose_cfg(override))
        assert expect in str(err.value) and "\n" not in str(err.value)


def test_sizes_the_data_cannot_give_are_one_line_at_load():
    with pytest.raises(EffrunError, match="train_size=301 but the train split has only 300"):
        tiny(train_size=301).load(0)
    with pytest.raises(EffrunError, match="fewer than the 10 classes"):
        tiny(train_size=5, selection="class_balanced").load(0)


def test_stage_keys_count_the_new_keys_only_when_set():
    """Defaults leave the train key as it was before the keys existed; set, they change it;
    keep=1 of any method is one key; random ignores the ranking settings."""
    config = validate(compose_cfg(["+experiment=smoke"]))

    def train_key(selection: str = "stratified", **select):
        raw = config.raw.copy()
        raw.dataset.selection = selection
        run = dataclasses.replace(config.run, select=SelectConfig(**select))
        return stage_config(dataclasses.replace(config, raw=raw, run=run), "train")

    plain = train_key()
    assert not {"train_size", "selection", "balance"} & set(plain["dataset"])
    assert "select" not in plain
    assert train_key("random")["dataset"]["selection"] == "random"
    assert train_key(method="el2n", keep=1.0) == plain
    assert train_key(method="random", keep=0.5, order="easy_first") == \
        train_key(method="random", keep=0.5)
    assert train_key(method="el2n", keep=0.5, order="easy_first") != \
        train_key(method="el2n", keep=0.5)
