"""Data pruning: the train stage trains on a share of the train split (`select.*`).

Where it lives: inside the train stage, before its model is built. The data the train stage
trains on is part of its config, so its key (effrun/keys.py: `select` counts when keep < 1)
covers it, and resuming, the stage cache and `resume_from` work unchanged; later stages
(pruning fine-tune, distillation, int8 calibration) see the whole train split. A separate stage
would add a model-less stage kind to every record, cache and report for one tensor of indices.

    method      none (all of it) | random (a seeded draw) | el2n | loss | forgetting
    keep        the share kept, in (0, 1]; keep=1 trains on everything whatever the method
    order       hard_first keeps the highest scores (Paul et al. 2021), easy_first the lowest
                (with little data kept, easy examples tend to win: Sorscher et al. 2022)
    per_class   rank within each class and keep each class's share (the kept set has the
                split's class balance); false ranks all images together

Scores (high = hard) come from `proxy_runs` short runs of the run's own model, optimizer and
augmentation, each a whole `proxy_epochs` schedule from a fresh init (seed + 1 + r):

    el2n        |softmax(f(x)) - onehot(y)|_2 at the end of the proxy run (Paul et al. 2021)
    loss        cross-entropy at the end of the proxy run
    forgetting  how often an image went from right to wrong (Toneva et al. 2019), checked on
                the whole train split `forgetting_checks` times per proxy epoch; an image never
                classified right counts as forgotten most (infinity)

averaged over the proxy runs, on unaugmented images in eval mode. Ties are broken by a seeded
shuffle. The scores are saved in the train stage dir (scores.pt: {"key", "method", "scores"},
scores.json: what made them, the sha256 of scores.pt) and kept in the stage cache as
`<cache.dir>/scores-<key>/` under a key of everything they depend on (data, model, optimizer,
augmentation, train settings but its epochs, precision, device, seed, init, proxy settings,
effrun and torch versions) but not `keep`, `order` or `per_class`: sweeping the share scores
once. A proxy run interrupted starts again from scratch (it is short); its checkpoint is
removed once it finished. Its closing test evaluation (fit's) only feeds a log line, so it sees
the first PROXY_TEST_IMAGES test images. Scored methods refuse to run under torchrun for now
(every rank would score and take the scores' lock); random selection runs there.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import effrun
from effrun import artifacts, distributed
from effrun import cache as stage_cache
from effrun.data import BatchLoader, DataSplits
from effrun.data.subset import (
    class_weights,
    proportional_quotas,
    require_labels,
    shuffled,
    take_per_class,
)
from effrun.errors import EffrunError
from effrun.keys import fingerprint, stage_config
from effrun.stage import StageInputs

log = logging.getLogger("effrun")
SCORES_FILE, SCORES_INFO = "scores.pt", "scores.json"
_SELECT_STREAM = 3_000_017  # the seeded draws of selection, apart from the data's own
PROXY_TEST_IMAGES = 1000


def train_data(config, inputs: StageInputs, build_model: Callable[[], nn.Module]
               ) -> tuple[DataSplits, dict]:
    """(the data the train stage trains on, the `select` entry of its metrics): the whole
    train split, or the share `select.keep` of it that `select.method` picks. `build_model`
    gives a fresh model to start a proxy run from (as the train stage would start)."""
    select, data = config.run.select, inputs.data
    if select.method == "none" or select.keep >= 1:
        return data, {}
    if data.train_stream is not None:
        raise EffrunError(f"select.method={select.method} needs the train split in memory: "
                          "set dataset.loader=memory")
    n = len(data.train_y)
    count = max(1, round(select.keep * n))
    seed = inputs.seed + _SELECT_STREAM
    info = {"method": select.method, "keep": select.keep, "kept": count, "of": n}
    if select.method == "random":
        ranking = shuffled(n, seed)
    elif distributed.job_size() > 1:  # every rank would take the scores' lock mid-collective
        raise EffrunError(f"select.method={select.method} does not run under torchrun yet: "
                          "run it in one process, or use select.method=random")
    else:
        require_labels(data.train_y, f"select.method={select.method}")
        scores, info["scores"] = scores_for(config, inputs, build_model)
        ranking = rank(scores, select.order, seed)
        info["order"] = select.order
    kept = kept_indices(ranking, data.train_y, count, select.per_class)
    log.info("select: training on %d of %d images (%s%s)", count, n, select.method,
             f", {select.order}" if select.method != "random" else "")
    weights = None if data.class_weights is None else class_weights(
        data.train_y[kept], len(data.class_weights))
    subset = dataclasses.replace(data, train_x=data.train_x[kept].contiguous(),
                                 train_y=data.train_y[kept].contiguous(), class_weights=weights)
    return subset, {"select": info}


def rank(scores: torch.Tensor, order: str, seed: int) -> torch.Tensor:
    """Indices from the first kept to the last: the highest scores first for hard_first, the
    lowest for easy_first; equal scores in a seeded random order."""
    shuffle = shuffled(len(scores), seed)
    return shuffle[torch.argsort(scores[shuffle], descending=order == "hard_first", stable=True)]


def kept_indices(ranking: torch.Tensor, labels: torch.Tensor, count: int, per_class: bool
                 ) -> torch.Tensor:
    """The first `count` of `ranking` (sorted back into split order); with `per_class`, the
    first of each class in `ranking`'s order, each class keeping its share."""
    if not per_class:
        return ranking[:count].sort().values
    quota = proportional_quotas(torch.bincount(labels), count)
    return torch.nonzero(take_per_class(labels, quota, ranking)).flatten()


def scores_key(config, inputs: StageInputs) -> str:
    """The scores' cache key: what they depend on, not which of them are kept."""
    select = config.run.select
    scfg = stage_config(config, "train")
    scfg.pop("select", None)
    scfg["train"] = {k: v for k, v in scfg["train"].items()
                     if k not in ("epochs", "tta", "eval_every")}
    proxy = {"method": select.method, "proxy_epochs": select.proxy_epochs,
             "proxy_runs": select.proxy_runs}
    if select.method == "forgetting":
        proxy["forgetting_checks"] = select.forgetting_checks
    return fingerprint({"scores": proxy, "stage": scfg,
                        "parent": inputs.parent.fingerprint if inputs.parent else None,
                        "versions": {"effrun": effrun.__version__, "torch": torch.__version__}})


def scores_for(config, inputs: StageInputs, build_model: Callable[[], nn.Module]
               ) -> tuple[torch.Tensor, dict]:
    """(per-image scores of the train split, where they came from): this stage dir's scores
    (a resumed run), the stage cache's, or computed now by proxy runs (then saved in both)."""
    key, method = scores_key(config, inputs), config.run.select.method
    found = read_scores(inputs.stage_dir, key)
    if found is not None:
        log.info("select: scores reused from %s", inputs.stage_dir / SCORES_FILE)
        return found, {"key": key, "source": "stage_dir"}
    with stage_cache.claim(config.run.cache, "scores", key) as entry:  # other jobs wait here
        found = read_scores(entry.path, key) if entry else None
        if found is not None:
            log.info("select: scores reused from cache entry %s (%s)", key, entry.path)
            source = {"source": "cache"}
        else:
            t0, cpu0 = time.perf_counter(), time.process_time()
            found = compute_scores(config.run.select, inputs, build_model)
            # CPU seconds of this process too: on a shared machine, the steadier figure.
            source = {"source": "computed", "proxy_seconds": round(time.perf_counter() - t0, 3),
                      "proxy_cpu_seconds": round(time.process_time() - cpu0, 3)}
            if entry:
                try:
                    write_scores(entry.path, found, {"key": key, "method": method, **source})
                except OSError as err:  # a full or read-only cache: the run goes on
                    log.warning("select: scores not stored in the stage cache (%s)", err)
        write_scores(inputs.stage_dir, found, {"key": key, "method": method, **source})
    return found, {"key": key, **source}


def compute_scores(select, inputs: StageInputs, build_model: Callable[[], nn.Module]
                   ) -> torch.Tensor:
    """The mean over `select.proxy_runs` proxy runs of each train image's score."""
    total = torch.zeros(len(inputs.data.train_y), dtype=torch.float64)
    # fit ends with a test evaluation; for a proxy run it is only a log line, so a cheap one.
    data = inputs.data
    inputs = dataclasses.replace(inputs, data=dataclasses.replace(
        data, test_x=data.test_x[:PROXY_TEST_IMAGES], test_y=data.test_y[:PROXY_TEST_IMAGES]))
    for run in range(select.proxy_runs):
        seed = inputs.seed + 1 + run
        name = f"proxy{run}"
        for stale in (f"{name}.pt", f"{name}.prev.pt"):  # an interrupted proxy run restarts
            (inputs.stage_dir / stale).unlink(missing_ok=True)
        # Its own random stream: the train stage's model starts the same whether scores were
        # computed or reused.
        with torch.random.fork_rng(devices=[] if inputs.hw.torch_device.type == "cpu"
                                   else None):
            torch.manual_seed(seed)
            model = build_model()
            counter = (ForgettingCounter(inputs, select.forgetting_checks * select.proxy_epochs)
                       if select.method == "forgetting" else None)
            fitted = dataclasses.replace(inputs, seed=seed).fit(
                model, epochs=select.proxy_epochs, name=name, after_step=counter,
                eval_every=0, tta="none")
        log.info("select: proxy run %d/%d (%d epochs, top-1 %.4f on the first %d test images)",
                 run + 1, select.proxy_runs, select.proxy_epochs, fitted["test_accuracy"],
                 len(inputs.data.test_y))
        if counter is not None:
            scores = counter.scores()
        else:
            scores = per_image(model, inputs, _score_fn(select.method))
        total += scores.double()
        for done in (f"{name}.pt", f"{name}.prev.pt"):
            (inputs.stage_dir / done).unlink(missing_ok=True)
    return (total / select.proxy_runs).float()


def _score_fn(method: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if method == "el2n":
        return lambda logits, y: (logits.softmax(1) - F.one_hot(y, logits.shape[1])).norm(dim=1)
    return lambda logits, y: F.cross_entropy(logits, y, reduction="none")


@torch.no_grad()
def per_image(model: nn.Module, inputs: StageInputs,
              fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`fn(logits, labels)` of every train image (unaugmented, eval mode), in split order."""
    data, hw = inputs.data, inputs.hw
    was_training = model.training
    model.eval()
    loader = BatchLoader(data.train_x, data.train_y, inputs.train.eval_batch_size,
                         mean=data.mean, std=data.std, device=hw.torch_device,
                         channels_last=hw.channels_last)
    out = []
    for images, labels in loader:
        with hw.autocast():
            logits = model(images)
        out.append(fn(logits.float(), labels).float().cpu())
    model.train(was_training)
    return torch.cat(out)


class ForgettingCounter:
    """An `after_step` hook: every 1/`checks` of the proxy run's steps, which train images the
    model gets right; counts the right-to-wrong transitions (forgetting events)."""

    def __init__(self, inputs: StageInputs, checks: int):
        self.inputs, self.checks = inputs, checks
        n = len(inputs.data.train_y)
        self.forgotten = torch.zeros(n)
        self.learned = torch.zeros(n, dtype=torch.bool)
        self.previous: torch.Tensor | None = None

    def __call__(self, model: nn.Module, step: int, total: int) -> None:
        every = max(1, total // self.checks)
        if step % every and step < total:
            return
        right = per_image(model, self.inputs, lambda logits, y: logits.argmax(1) == y).bool()
        if self.previous is not None:
            self.forgotten += (self.previous & ~right).float()
        self.learned |= right
        self.previous = right

    def scores(self) -> torch.Tensor:
        return torch.where(self.learned, self.forgotten, torch.full_like(self.forgotten,
                                                                         float("inf")))


def write_scores(folder: Path, scores: torch.Tensor, meta: dict) -> None:
    """scores.pt, then scores.json (written last: it vouches for scores.pt by sha256)."""
    folder.mkdir(parents=True, exist_ok=True)
    artifacts.torch_save({"key": meta["key"], "method": meta["method"], "scores": scores},
                         folder / SCORES_FILE)
    artifacts.write_json({**meta, "images": len(scores), "created": artifacts.now_iso(),
                          "sha256": artifacts.sha256_file(folder / SCORES_FILE)},
                         folder / SCORES_INFO)


def read_scores(folder: Path, key: str) -> torch.Tensor | None:
    """The scores saved in `folder` under `key`; None when absent, of another key, or damaged
    (one warning line; they are computed again)."""
    try:
        info = artifacts.read_json(folder / SCORES_INFO)
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("key") != key:
        return None
    path = folder / SCORES_FILE
    if not path.is_file() or artifacts.sha256_file(path) != info.get("sha256"):
        log.warning("select: %s is missing or does not match its sha256: computing the scores "
                    "again", path)
        return None
    return torch.load(path, weights_only=True)["scores"]
