"""DDP through torchrun (effrun/distributed.py), proven on this CPU machine with 2 gloo ranks.

The proof of equivalence: 2 ranks × batch B/2 follow the loss trajectory of 1 process × batch
B. It holds only where the ranks compute one process's math, so the runs use
- hardware.sync_bn=true: each rank's BatchNorm would otherwise normalise with the statistics of
  its half batch (and keep its own running statistics), another model than one process trains;
- augmentation=none: crop and cutout offsets are drawn per batch from the loader's generator,
  so half batches draw other offsets than the whole one;
- fp32: bf16 autocast would round the two sums in different orders, far above fp32's noise.
What is left is float rounding: gradients summed in another order (all-reduce), BatchNorm
statistics as E[x²] - E[x]² of summed moments instead of torch's kernel. Measured: the per-epoch
losses of the two agree to 5.9e-5 relative or better over 12 steps, so the tolerance is 2e-3;
without sync_bn they differ by up to 2.1e-2 (test_without_sync_bn_the_ranks_train_another_model).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import compose_cfg, write_image_tree

from effrun import distributed, pipeline
from effrun.data import BatchLoader
from effrun.errors import ConfigError

TOLERANCE = 2e-3  # relative, on each epoch's train and test loss (see the module docstring)
SMALL = ["+experiment=smoke", "stages=[train]", "train.epochs=3", "train.batch_size=32",
         "dataset.num_train=128", "dataset.num_test=64", "dataset.image_size=16",
         "model.width=4", "augmentation=none", "hardware.precision=fp32",
         "hardware.sync_bn=true", "cache.enabled=false"]


def torchrun(args: list[str], cwd: Path, nproc: int = 2, wait: bool = True):
    """`torchrun --standalone --nproc_per_node=N -m effrun ARGS` (a free port on localhost);
    the finished process, or with wait=False the running one (stdout/stderr to files in cwd)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "effrun", *args]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["OMP_NUM_THREADS"] = "1"  # torchrun's own default for several ranks, said outright
    if wait:
        return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=600)
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=open(cwd / "stdout.txt", "w"),
                            stderr=open(cwd / "stderr.txt", "w"))


def history(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "01_train" / "metrics.json").read_text())["history"]


def assert_same_trajectory(one: Path, two: Path, epochs: int) -> None:
    """Every epoch's train and test loss of run `two` within TOLERANCE of run `one`'s."""
    assert len(history(one)) == len(history(two)) == epochs
    for a, b in zip(history(one), history(two), strict=True):
        for key in ("train_loss", "test_loss"):
            assert b[key] == pytest.approx(a[key], rel=TOLERANCE), (key, a, b)


def test_two_ranks_follow_one_process_and_write_once(tmp_path):
    """(a) 2 ranks × 16 images per step train as 1 process × 32; (c) rank 0 alone writes:
    one timestamped run dir for both ranks, each file once, each log line once."""
    (tmp_path / "ddp").mkdir()
    # Without the report (matplotlib): rank 0 alone writes it too, test_whole_study shows.
    done = torchrun([*SMALL, "~hydra.callbacks.report"], tmp_path / "ddp")
    assert done.returncode == 0, done.stderr[-3000:]
    one = tmp_path / "one"
    pipeline.run(compose_cfg(SMALL), one)

    runs = list((tmp_path / "ddp" / "outputs" / "smoke").iterdir())
    assert len(runs) == 1, f"the ranks named different run dirs: {runs}"
    two = runs[0]
    assert_same_trajectory(one, two, epochs=3)

    files = sorted(str(p.relative_to(two)) for p in two.rglob("*") if p.is_file())
    assert files == [
        ".effrun.lock", "01_train/checkpoint.prev.pt", "01_train/checkpoint.pt",
        "01_train/metrics.json", "01_train/model.pt", "01_train/stage.json", "config.json",
        "effrun.log", "invocations.jsonl", "summary.json"]
    assert len((two / "invocations.jsonl").read_text().splitlines()) == 1
    log = (two / "effrun.log").read_text().splitlines()
    assert sum("train epoch" in line for line in log) == 3
    assert len(log) == len(set(log)), "a line was logged twice"
    assert done.stdout.count("effrun · smoke") == 1, "the summary table printed twice"


def test_one_rank_under_torchrun_trains_through_ddp(tmp_path):
    """torchrun with one rank joins a group of one and trains through DDP (the path a GPU
    job with one rank checks NCCL on), as one process would."""
    (tmp_path / "ddp").mkdir()
    done = torchrun([*SMALL, "~hydra.callbacks.report"], tmp_path / "ddp", nproc=1)
    assert done.returncode == 0, done.stderr[-3000:]
    (one_rank,) = list((tmp_path / "ddp" / "outputs" / "smoke").iterdir())
    assert "| torchrun 1 ranks (gloo)" in (one_rank / "effrun.log").read_text()
    pipeline.run(compose_cfg(SMALL), tmp_path / "one")
    assert_same_trajectory(tmp_path / "one", one_rank, epochs=3)


def test_global_batch_not_divisible_by_ranks_is_one_config_error(tmp_path, monkeypatch):
    """(d) in this process, posing as rank 0 of 2: refused before the run dir is touched. The
    same through torchrun: test_torchrun_refuses_an_odd_global_batch (slow)."""
    monkeypatch.setattr(distributed, "rank_and_world", lambda: (0, 2))
    with pytest.raises(ConfigError, match=r"^train.batch_size=63 is not divisible by the 2 "
                                          r"ranks of this torchrun job"):
        pipeline.run(compose_cfg([*SMALL, "train.batch_size=63"]), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_shards_make_up_the_global_batches():
    """Every rank draws the same order and takes every world-th sample: the ranks' batch k
    together is the global batch k; with a short last batch kept, the order is padded so that
    every rank takes the same number of steps."""
    x = torch.randint(0, 256, (37, 3, 4, 4), dtype=torch.uint8)
    y = torch.arange(37)
    common = dict(mean=[0.5] * 3, std=[0.25] * 3, shuffle=True, seed=5)
    whole = [labels for _, labels in BatchLoader(x, y, 12, drop_last=True, **common)]
    shards = [[labels for _, labels in BatchLoader(x, y, 4, drop_last=True, rank=r,
                                                   world_size=3, **common)] for r in range(3)]
    assert [len(s) for s in shards] == [len(whole)] * 3 == [3] * 3
    for k, batch in enumerate(whole):
        together = torch.cat([s[k] for s in shards])
        assert sorted(together.tolist()) == sorted(batch.tolist())
    kept = [list(BatchLoader(x, y, 4, drop_last=False, rank=r, world_size=3, **common))
            for r in range(3)]
    assert [len(k) for k in kept] == [4, 4, 4]  # ceil(37 / 3) = 13 samples each, 1 padded
    seen = torch.cat([labels for k in kept for _, labels in k])
    assert len(seen) == 39 and set(seen.tolist()) == set(range(37))


# ---------------------------------------------------------------- slow: longer torchrun runs

PRIMITIVES = """
import sys
from pathlib import Path

import torch
from torch import nn

from effrun import distributed
from effrun.errors import EffrunError

distributed.init()
out, rank = Path(sys.argv[1]), torch.distributed.get_rank()


def once():
    with open(out / "calls.txt", "a") as calls:
        calls.write(f"{distributed.rank_and_world()}\\n")
    return 42


def refuse():
    raise EffrunError("rank 0 says no")


assert distributed.on_main(once) == 42
try:
    distributed.on_main(refuse)
except EffrunError as e:
    (out / f"error{rank}.txt").write_text(f"{e} {getattr(e, 'forwarded', False)}")
# main_only: rank 0 keeps a result that cannot be pickled; the others get None.
kept = distributed.main_only(lambda: (lambda: "unpicklable"))
assert (kept() == "unpicklable") if rank == 0 else kept is None
try:
    distributed.main_only(refuse)
except EffrunError as e:
    (out / f"main_only_error{rank}.txt").write_text(str(e))

# GlobalBatchNorm on each rank's half batch == BatchNorm on the whole batch, backward included.
torch.manual_seed(0)
x, w = torch.randn(8, 3, 4, 4, requires_grad=True), torch.randn(8, 3, 4, 4)
whole = nn.BatchNorm2d(3)
(whole(x) * w).sum().div(8).backward()
bn = nn.BatchNorm2d(3)
with distributed.data_parallel(nn.Sequential(bn), sync_bn=True) as synced:
    half = x.detach()[4 * rank : 4 * rank + 4].requires_grad_(True)
    (synced(half) * w[4 * rank : 4 * rank + 4]).sum().div(4).backward()  # the rank's mean
assert type(bn).__name__ == "BatchNorm2d"
# DDP averages the weights' gradients over the ranks; the inputs' are each rank's own.
torch.testing.assert_close(half.grad / 2, x.grad[4 * rank : 4 * rank + 4])
torch.testing.assert_close(bn.weight.grad, whole.weight.grad)
torch.testing.assert_close(bn.running_var, whole.running_var)
(out / f"ok{rank}.txt").write_text("ok")
distributed.finish()
"""


@pytest.mark.slow
def test_primitives_on_two_ranks(tmp_path):
    """on_main computes once, on rank 0, and forwards its error to every rank (main_only too,
    keeping its result on rank 0); GlobalBatchNorm
    (hardware.sync_bn on the CPU) on half batches gives BatchNorm's whole-batch output,
    gradients and running statistics."""
    script = tmp_path / "primitives.py"
    script.write_text(PRIMITIVES)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(script), str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "calls.txt").read_text() == "(0, 1)\n"
    assert (tmp_path / "error0.txt").read_text() == "rank 0 says no False"
    assert (tmp_path / "error1.txt").read_text() == "rank 0 says no True"
    assert (tmp_path / "ok0.txt").exists() and (tmp_path / "ok1.txt").exists()
    for rank in (0, 1):
        assert (tmp_path / f"main_only_error{rank}.txt").read_text() == "rank 0 says no"


def job_pids(pid: int) -> list[int]:
    """`pid` and every process under it (torchrun starts its ranks in their own sessions, so
    killing its process group would leave them running)."""
    found = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            found += job_pids(int(child))
    return found


@pytest.mark.slow
def test_two_ranks_follow_one_process_streaming_too(tmp_path):
    """The same proof with dataset.loader=stream (files read each epoch through a DataLoader
    with DistributedSampler's sharding) on a tiny JPEG tree: 2 ranks × 4 as 1 process × 8."""
    tree = write_image_tree(tmp_path / "tree", classes=2, per_class=16, test_per_class=4,
                            size=32)
    args = ["hardware=cpu", "stages=[train]", "dataset=imagefolder", f"dataset.root={tree}",
            "dataset.loader=stream", "dataset.workers=0", "dataset.image_size=32",
            "train.epochs=3", "train.batch_size=8", "optimizer.lr=3e-4",  # far from loss 0
            "model.width=4", "augmentation=none",
            "hardware.precision=fp32", "hardware.sync_bn=true", "cache.enabled=false"]
    done = torchrun([*args, f"hydra.run.dir={tmp_path / 'two'}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    pipeline.run(compose_cfg(args), tmp_path / "one")
    assert_same_trajectory(tmp_path / "one", tmp_path / "two", epochs=3)


@pytest.mark.slow
def test_without_sync_bn_the_ranks_train_another_model(tmp_path):
    """The control of the proof: with each rank's BatchNorm on its half batch the losses
    leave the tolerance (measured up to 2.1e-2), so the comparison above can fail."""
    run_dir = tmp_path / "two"
    done = torchrun([*SMALL, "hardware.sync_bn=false", f"hydra.run.dir={run_dir}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    pipeline.run(compose_cfg(SMALL), tmp_path / "one")
    differences = [abs(b[key] / a[key] - 1)
                   for a, b in zip(history(tmp_path / "one"), history(run_dir), strict=True)
                   for key in ("train_loss", "test_loss")]
    assert max(differences) > 2 * TOLERANCE, differences


@pytest.mark.slow
def test_kill_9_of_the_job_then_a_rerun_resumes(tmp_path):
    """(b) kill -9 of torchrun and both ranks after the first checkpoint (every 3 steps of 16
    per epoch: most likely inside an epoch); the same command on the same run dir resumes from
    it (every rank reads it) and ends with the history of an unbroken 2-rank run."""
    run_dir = tmp_path / "run"
    args = [*SMALL, "train.epochs=8", "dataset.num_train=512", "train.checkpoint_every=3",
            f"hydra.run.dir={run_dir}"]
    job = torchrun(args, tmp_path, wait=False)
    checkpoint = run_dir / "01_train" / "checkpoint.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert checkpoint.exists() and job.poll() is None, (tmp_path / "stderr.txt").read_text()
    pids = job_pids(job.pid)
    assert len(pids) >= 3, "torchrun and its two ranks"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    job.wait()
    assert not (run_dir / "summary.json").exists()

    done = torchrun(args, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    log = (run_dir / "effrun.log").read_text()
    assert "train: resumed from" in log
    assert [h["epoch"] for h in history(run_dir)] == list(range(1, 9))
    assert (run_dir / "summary.json").is_file()
    unbroken = tmp_path / "unbroken"
    done = torchrun([*args[:-1], f"hydra.run.dir={unbroken}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for a, b in zip(history(unbroken), history(run_dir), strict=True):
        assert (a["train_loss"], a["test_loss"]) == (b["train_loss"], b["test_loss"]), (a, b)


@pytest.mark.slow
def test_torchrun_refuses_an_odd_global_batch(tmp_path):
    """(d) through torchrun: one line from effrun (rank 0's; the other rank found the same),
    no traceback of effrun's, nothing written, a failed exit."""
    done = torchrun([*SMALL, "train.batch_size=63", f"hydra.run.dir={tmp_path / 'run'}"],
                    tmp_path)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("effrun: error")]
    assert lines == ["effrun: error: train.batch_size=63 is not divisible by the 2 ranks of "
                     "this torchrun job: it is the global batch, each rank takes "
                     "train.batch_size / 2 of it  (HYDRA_FULL_ERROR=1 shows the traceback)"]
    assert "effrun/" not in done.stderr.split("effrun: error")[0], "a traceback from effrun"
    assert not (tmp_path / "run" / "config.json").exists()


@pytest.mark.slow
def test_whole_study_under_torchrun(tmp_path):
    """Every stage under 2 ranks: prune and distill fine-tune through DDP, quantize and
    benchmark run on rank 0 alone while rank 1 waits; each stage's files once."""
    run_dir = tmp_path / "run"
    done = torchrun(["+experiment=smoke", "dataset.num_train=256", "dataset.num_test=64",
                     "train.epochs=1", "hardware.sync_bn=true", f"hydra.run.dir={run_dir}"],
                    tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["stage"] for r in summary["records"]] == ["train", "prune", "distill", "quantize"]
    assert all(r["latency_ms_p50_bs1"] for r in summary["records"])
    assert (run_dir / "report.html").is_file()  # rank 0's callback; the others skip it
    log = (run_dir / "effrun.log").read_text()
    assert log.count("quantize: int8 top-1") == 1
    assert log.count("benchmark: quantize (") == 1


# int8_qat's fine-tuning under 2 ranks against 1 process (SMALL: sync_bn, fp32, no augmentation).
# The float train stage follows one process exactly; QAT's cannot: its BatchNorm is an op inside
# the exported graph, which sync_bn does not reach, so each rank normalises its half batch, and
# the fake-quant ranges are rank 0's (DDP broadcasts buffers). Measured: QAT's per-epoch losses
# within 4.9% of one process's; the bound is 15%.
QAT_TOLERANCE = 0.15


@pytest.mark.slow
def test_qat_fine_tunes_on_every_rank(tmp_path):
    """int8_qat under torchrun: every rank fine-tunes (its metrics say 2 ranks: run on rank 0
    alone it would say 1), rank 0 alone converts, scores and writes the int8 model."""
    args = [*SMALL, "stages=[train,quantize]", "compression/quantize=int8_qat",
            "~hydra.callbacks.report"]
    done = torchrun([*args, f"hydra.run.dir={tmp_path / 'two'}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    pipeline.run(compose_cfg(args), tmp_path / "one")

    qat = {name: json.loads((tmp_path / name / "04_quantize" / "metrics.json").read_text())
           ["qat"] for name in ("one", "two")}
    assert (qat["one"]["ranks"], qat["two"]["ranks"]) == (1, 2)
    assert len(qat["two"]["history"]) == len(qat["one"]["history"]) == 2
    for a, b in zip(qat["one"]["history"], qat["two"]["history"], strict=True):
        for key in ("train_loss", "test_loss"):
            assert b[key] == pytest.approx(a[key], rel=QAT_TOLERANCE), (key, a, b)
    log = (tmp_path / "two" / "effrun.log").read_text()
    assert log.count("quantize: int8 top-1") == 1 and log.count("quantize:qat epoch 2/2") == 1
    assert (tmp_path / "two" / "04_quantize" / "model.pt2").is_file()
