"""resume_from: a study continues after a finished stage of another run (a stage dir, or a run
dir's last finished model stage), keyed as if one run had made every stage."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import compose_cfg
from test_cache import TINY, info, metrics, one_thread  # noqa: F401  (one_thread: autouse)

from effrun import pipeline
from effrun.errors import ConfigError, EffrunError
from effrun.measure import set_threads
from effrun.schema import validate


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A finished train + prune run, with its cache: (run dir, cache dir)."""
    base = tmp_path_factory.mktemp("source")
    with set_threads(1):
        pipeline.run(compose_cfg([*TINY, f"cache.dir={base / 'cache'}"]), base / "run")
    return base / "run", base / "cache"


def resume(run_dir, resume_from, *extra, cache="cache.enabled=false"):
    return pipeline.run(compose_cfg([*TINY, f"resume_from={resume_from}", cache, *extra]),
                        run_dir)


def test_from_a_stage_dir_only_later_stages_run_keyed_as_in_one_run(tmp_path, source):
    run_dir, cache_dir = source
    summary = resume(tmp_path / "run", run_dir / "01_train", "stages=[prune]",
                     cache=f"cache.dir={cache_dir}")
    assert sorted(p.name for p in (tmp_path / "run").glob("0*")) == ["02_prune"]
    pruned = info(tmp_path / "run", "prune")
    assert pruned["parent"] == {"stage": "init:train",
                                "artifact": str(run_dir / "01_train" / "model.pt")}
    # the same prune key as the run that made both stages: its cache entry is reused
    assert pruned["fingerprint"] == info(run_dir, "prune")["fingerprint"]
    assert pruned["cache"]["hit"] is True
    assert pruned["cache"]["entry"] == info(run_dir, "prune")["cache"]["stored"]
    assert [r["stage"] for r in summary] == ["prune"]


def test_computed_again_it_gives_the_same_result(tmp_path, source):
    resume(tmp_path / "run", source[0] / "01_train")  # cache off: prune computed
    assert "cache" not in info(tmp_path / "run", "prune")
    assert info(tmp_path / "run", "prune")["fingerprint"] == info(source[0], "prune")[
        "fingerprint"]
    assert metrics(tmp_path / "run", "prune")["accuracy"] == metrics(source[0], "prune")[
        "accuracy"]


def test_from_a_run_dir_its_last_finished_model_stage(tmp_path, source):
    summary = resume(tmp_path / "run", source[0], "stages=[train,prune,benchmark]",
                     "benchmark.batch_sizes=[1]")
    assert sorted(p.name for p in (tmp_path / "run").glob("0*")) == ["05_benchmark"]
    assert [r["stage"] for r in summary] == ["init:prune"]
    measured = json.loads((tmp_path / "run" / "05_benchmark" / "metrics.json").read_text())
    assert measured["models"][0]["artifact"] == str(source[0] / "02_prune" / "model.pt")


def test_another_model_is_one_line_naming_both(tmp_path, source):
    where = source[0] / "01_train"
    with pytest.raises(EffrunError) as err:
        resume(tmp_path / "run", where, "model=resnet56")
    assert str(err.value) == (f"resume_from={where} holds model {{depth: 20}} but the config "
                              f"composes {{depth: 56}}")
    assert not (tmp_path / "run").exists(), "refused before the run dir is touched"


def test_nothing_after_it_is_refused(tmp_path, source):
    with pytest.raises(EffrunError, match=r"holds a finished 'prune' stage and no stage of "
                                          r"\['train', 'prune'\] comes after it"):
        resume(tmp_path / "run", source[0])


def test_a_changed_stage_is_refused_and_left_as_it_is(tmp_path, source):
    copy = tmp_path / "source"
    shutil.copytree(source[0], copy)
    model = copy / "01_train" / "model.pt"
    model.write_bytes(model.read_bytes() + b"\0")
    with pytest.raises(EffrunError) as err:
        resume(tmp_path / "run", copy / "01_train")
    assert str(err.value) == (f"resume_from={copy / '01_train'}: 01_train/model.pt changed "
                              f"since it was written")
    assert (copy / "01_train" / "stage.json").is_file(), "another run's record is not removed"


def test_init_from_and_resume_from_together_are_refused(source):
    with pytest.raises(ConfigError, match="init_from and resume_from cannot both be set"):
        validate(compose_cfg([f"resume_from={source[0]}",
                              f"init_from={source[0] / '01_train' / 'model.pt'}"]))
