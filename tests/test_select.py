"""Data pruning in the train stage (effrun/select.py) and the accuracy-vs-data report: scores
computed, saved and reused when only the kept share changes, the order respected, bad input
refused, and the curve rendered from job records."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import compose_cfg, run_cli

from effrun import pipeline, select
from effrun.data.splits import DataSplits
from effrun.errors import EffrunError
from effrun.report import report
from effrun.schema import validate
from effrun.stage import stage_inputs

TINY = ["+experiment=smoke", "stages=[train]", "dataset.num_train=200", "dataset.num_test=50",
        "dataset.image_size=8", "model=resnet20_slim", "train.epochs=1",
        "select.proxy_epochs=1"]


def test_rank_orders_hard_or_easy_first_and_breaks_ties_by_seed():
    scores = torch.tensor([0.5, 2.0, 0.1, 2.0, 1.0])
    hard = select.rank(scores, "hard_first", seed=0)
    assert scores[hard].tolist() == pytest.approx([2.0, 2.0, 1.0, 0.5, 0.1])
    assert select.rank(scores, "easy_first", seed=0)[0] == 2
    ties = {tuple(select.rank(torch.zeros(20), "hard_first", seed=s)[:5].tolist())
            for s in range(4)}
    assert len(ties) > 1, "equal scores are ordered by the seed, not by index"
    assert torch.equal(select.rank(scores, "hard_first", 3), select.rank(scores, "hard_first", 3))


def test_kept_indices_keep_each_class_share_or_the_top_overall():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    ranking = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])  # class 0 ranked entirely first
    assert select.kept_indices(ranking, labels, 4, per_class=False).tolist() == [0, 1, 2, 3]
    assert select.kept_indices(ranking, labels, 4, per_class=True).tolist() == [0, 1, 4, 5]


def test_forgetting_counts_right_to_wrong_and_never_learned_as_most(monkeypatch):
    checks = iter([torch.tensor([1, 1, 0, 0]), torch.tensor([0, 1, 0, 1]),
                   torch.tensor([1, 1, 0, 0])])
    monkeypatch.setattr(select, "per_image", lambda model, inputs, fn: next(checks))
    inputs = type("Inputs", (), {"data": DataSplits(torch.zeros(4, 3, 2, 2, dtype=torch.uint8),
                                                    torch.zeros(4, dtype=torch.long),
                                                    torch.zeros(1), torch.zeros(1))})()
    counter = select.ForgettingCounter(inputs, checks=3)
    for step in (1, 2, 3):
        counter(None, step, 3)
    assert counter.scores().tolist() == [1.0, 0.0, float("inf"), 1.0]


def test_selection_needs_labels_and_data_in_memory(tmp_path):
    config = validate(compose_cfg([*TINY, "select.method=el2n", "select.keep=0.5"]))
    x = torch.zeros(6, 3, 8, 8, dtype=torch.uint8)
    data = DataSplits(x, torch.tensor([0, 1, -1, 0, 1, -1]), x, torch.zeros(6, dtype=torch.long))
    inputs = stage_inputs(config, "train", tmp_path, data)
    with pytest.raises(EffrunError, match="select.method=el2n needs labels") as err:
        select.train_data(config, inputs, build_model=lambda: None)
    assert "\n" not in str(err.value)


def _run(tmp_path: Path, name: str, *overrides) -> dict:
    run_dir = tmp_path / name
    pipeline.run(compose_cfg([*TINY, *overrides]), run_dir)
    return json.loads((run_dir / "01_train" / "metrics.json").read_text())


def test_scores_are_computed_once_saved_and_reused_when_only_the_share_changes(tmp_path,
                                                                                caplog):
    caplog.set_level(logging.INFO, logger="effrun")
    first = _run(tmp_path, "a", "select.method=el2n", "select.keep=0.5")["select"]
    assert (first["kept"], first["of"], first["scores"]["source"]) == (100, 200, "computed")
    assert caplog.text.count("select: proxy run") == 1
    saved = torch.load(tmp_path / "a" / "01_train" / "scores.pt", weights_only=True)
    assert saved["scores"].shape == (200,) and saved["method"] == "el2n"
    assert bool(((saved["scores"] >= 0) & (saved["scores"] <= 2 ** 0.5 + 1e-6)).all())

    caplog.clear()
    second = _run(tmp_path, "b", "select.method=el2n", "select.keep=0.25",
                  "select.order=easy_first")["select"]
    assert second["scores"] == {"key": first["scores"]["key"], "source": "cache"}
    assert second["kept"] == 50 and "select: proxy run" not in caplog.text
    assert "scores reused from cache entry" in caplog.text
    reused = torch.load(tmp_path / "b" / "01_train" / "scores.pt", weights_only=True)
    assert torch.equal(reused["scores"], saved["scores"])

    # The kept images are the easiest of each class: rerun the selection on run b's stage dir
    # (the scores are read from there, no proxy run) and compare with the saved scores.
    config = validate(compose_cfg([*TINY, "select.method=el2n", "select.keep=0.25",
                                   "select.order=easy_first"]))
    data = config.dataset.load(seed=config.run.seed)
    inputs = stage_inputs(config, "train", tmp_path / "b" / "01_train", data)
    kept, info = select.train_data(config, inputs, build_model=lambda: None)
    assert info["select"]["scores"]["source"] == "stage_dir" and len(kept.train_y) == 50
    scores = saved["scores"]
    picked = torch.zeros(200, dtype=torch.bool)
    for image in kept.train_x:
        picked |= (data.train_x == image).flatten(1).all(1)
    for c in range(10):
        in_class = data.train_y == c
        assert scores[picked & in_class].max() <= scores[~picked & in_class].min()


def test_random_selection_is_a_seeded_share_of_every_class(tmp_path):
    def kept(seed: int):
        config = validate(compose_cfg([*TINY, "select.method=random", "select.keep=0.3",
                                       f"seed={seed}"]))
        data = config.dataset.load(seed=0)
        inputs = stage_inputs(config, "train", tmp_path, data)
        return select.train_data(config, inputs, build_model=lambda: None)

    (a, info), (b, _), (c, _) = kept(0), kept(0), kept(1)
    assert info == {"select": {"method": "random", "keep": 0.3, "kept": 60, "of": 200}}
    assert torch.bincount(a.train_y).tolist() == [6] * 10
    assert torch.equal(a.train_x, b.train_x) and not torch.equal(a.train_x, c.train_x)


def test_forgetting_scores_are_counts_and_the_proxy_checkpoint_goes(tmp_path):
    forget = _run(tmp_path, "f", "select.method=forgetting", "select.keep=0.5",
                  "select.forgetting_checks=2")["select"]
    assert forget["kept"] == 100 and forget["scores"]["source"] == "computed"
    scores = torch.load(tmp_path / "f" / "01_train" / "scores.pt", weights_only=True)["scores"]
    finite = scores[torch.isfinite(scores)]
    assert torch.equal(finite, finite.round()) and bool((scores >= 0).all())
    assert not (tmp_path / "f" / "01_train" / "proxy0.pt").exists(), "proxy checkpoint removed"


def fake_job(root: Path, num: int, method: str, keep: float, seed: int, acc: float) -> None:
    run_dir = root / f"{num}_select.method={method},select.keep={keep},seed={seed}"
    (run_dir / "01_train").mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps(
        {"name": "data_curve", "records": [{"stage": "train", "accuracy": acc}]}))
    (run_dir / "config.json").write_text(json.dumps(
        {"name": "data_curve", "seed": seed, "select": {"method": method, "keep": keep,
                                                        "order": "hard_first"},
         "dataset": {"train_fraction": 1.0}}))
    overrides = [f"select.method={method}", f"select.keep={keep}", f"seed={seed}"]
    (run_dir / "invocations.jsonl").write_text(json.dumps({"overrides": overrides}) + "\n")
    kept = round(keep * 1000)
    (run_dir / "01_train" / "metrics.json").write_text(json.dumps(
        {"train_seconds": 10 * keep, "select": {"kept": kept} if keep < 1 else {}}))


def test_curve_report_renders_from_job_records(tmp_path):
    sweep, num = tmp_path / "multirun", 0
    accuracy = {("random", 0.25): 0.60, ("random", 1.0): 0.80, ("el2n", 0.25): 0.64,
                ("el2n", 1.0): 0.80}
    for (method, keep), acc in accuracy.items():
        for seed, jitter in ((0, -0.01), (1, 0.01)):
            fake_job(sweep, num, method, keep, seed, acc + jitter)
            num += 1
    _, files = report([sweep])
    assert files["curve_png"].stat().st_size > 1000
    lines = files["curve_md"].read_text().splitlines()
    row = next(line for line in lines if line.startswith("| el2n hard_first | 25 |"))
    assert "| 2 | 64.00 ± 1.41 [63.00-65.00] | 2.5 | 250 |" in row
    assert any(line.startswith("| random | 100 | 2 | 80.00") for line in lines)
    csv_text = files["curve_csv"].read_text()
    assert csv_text.startswith("line,fraction,n,seeds,accuracy") and "0;1" in csv_text


def test_curve_report_stays_out_of_reports_on_one_data_share(tmp_path):
    fake_job(tmp_path / "one", 0, "none", 1.0, 0, 0.7)
    _, files = report([tmp_path / "one"])
    assert "curve_md" not in files and not (tmp_path / "one" / "data_curve.md").exists()


@pytest.mark.slow
def test_data_curve_smoke_preset_sweeps_and_reports(tmp_path):
    """The smoke curve as a multirun: every job finishes, the scores are computed once per
    seed (one cache entry each), and the sweep's report has the curve."""
    cache = tmp_path / "cache"
    res = run_cli(["-m", "+experiment=data_curve_smoke", f"hydra.sweep.dir={tmp_path}/sweep"],
                  cwd=tmp_path, timeout=1200,
                  env={"EFFRUN_STAGE_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(list(cache.glob("scores-*/scores.json"))) == 2
    table = (tmp_path / "sweep" / "data_curve.md").read_text()
    for line in ("| random | 25 | 2 |", "| el2n hard_first | 50 | 2 |",
                 "| el2n hard_first | 100 |"):
        assert line in table
