"""The root keys of the config (`RunConfig`: name, stages, seed, train.*, benchmark.*, cache.*,
select.*, ...), as typed dataclasses: the one home of their defaults. effrun.schema registers
`RunConfig` as `schema/run` and validates the rest of the composed config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from effrun.errors import EffrunError

# The fixed order in which stages run, whatever order `stages` lists them in.
STAGE_ORDER = ("train", "prune", "distill", "quantize", "benchmark")
TTA_MODES = ("none", "flip", "flip_translate")


@dataclass
class TrainConfig:
    epochs: int = 4
    batch_size: int = 64
    eval_batch_size: int = 500
    label_smoothing: float = 0.0
    ema_decay: Optional[float] = None  # e.g. 0.999; evaluation and artifact use the EMA weights
    grad_clip_norm: Optional[float] = None
    tta: str = "none"  # test-time augmentation at evaluation: none | flip | flip_translate
    # Lookahead-style weight averaging (airbench): every `lookahead_every` steps an averaged copy
    # of the weights moves toward the live ones and the live ones are reset to it. 0 = off.
    lookahead_every: int = 0
    # Its decay per optimizer step (airbench: 0.95); an update every N steps decays by
    # lookahead_decay ** N, ramped in as progress**3.
    lookahead_decay: float = 0.95
    # Evaluate on val/test every N epochs (the last epoch always); 0 = only after training.
    eval_every: int = 1
    # Also checkpoint every N optimizer steps inside an epoch, so a long epoch (ImageNet through
    # the stream loader) resumes where it stopped; 0 = only at epoch ends.
    checkpoint_every: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"train.epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("train.batch_size and train.eval_batch_size must be >= 1")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"train.ema_decay must be in (0, 1) or null, got {self.ema_decay}")
        if self.lookahead_every < 0 or not 0 <= self.lookahead_decay < 1:
            raise ValueError("train.lookahead_every must be >= 0 and train.lookahead_decay in "
                             f"[0, 1), got {self.lookahead_every} and {self.lookahead_decay}")
        if self.eval_every < 0:
            raise ValueError(f"train.eval_every must be >= 0, got {self.eval_every}")
        if self.checkpoint_every < 0:
            raise ValueError(f"train.checkpoint_every must be >= 0 (steps; 0 = at epoch ends "
                             f"only), got {self.checkpoint_every}")
        if self.tta not in TTA_MODES:
            raise ValueError(f"train.tta must be one of {TTA_MODES}, got {self.tta!r}")


@dataclass
class BenchmarkConfig:
    batch_sizes: list[int] = field(default_factory=lambda: [1, 64])
    threads: Optional[list[int]] = None  # null = torch's current thread count
    warmup: int = 5
    iters: int = 30
    min_time_s: float = 0.5  # keep timing past `iters` until this long has passed
    # Runtimes every model is timed and scored on (effrun/backends.py): torch, onnxruntime,
    # openvino (the last two need effrun[deploy]). A float model runs on each; an int8
    # artifact only on the runtime it was made for.
    backends: list[str] = field(default_factory=lambda: ["torch"])
    # Timing alternates between every variant, backend and reference in this many rounds.
    rounds: int = 5
    # The run names the fastest (model, backend) whose top-1 is at most this far (a fraction:
    # 0.005 = 0.5 points) below the best top-1 measured in the benchmark.
    accuracy_tolerance: float = 0.005
    # A batch-1 p50 latency budget (ms) for a search: under the optuna sweeper with one
    # objective, a trial over it scores -latency / budget instead of its top-1 (effrun.cli).
    latency_budget_ms: Optional[float] = None

    def __post_init__(self) -> None:
        if self.latency_budget_ms is not None and not self.latency_budget_ms > 0:
            raise ValueError("benchmark.latency_budget_ms must be null or > 0 (milliseconds)")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError("benchmark.batch_sizes must be a non-empty list of ints >= 1")
        if self.threads is not None and (not self.threads or min(self.threads) < 1):
            raise ValueError("benchmark.threads must be null or a non-empty list of ints >= 1")
        if self.iters < 1 or self.warmup < 0 or self.rounds < 1:
            raise ValueError("benchmark.iters and benchmark.rounds must be >= 1 and "
                             "benchmark.warmup >= 0")
        if not 0 <= self.accuracy_tolerance < 1:
            raise ValueError("benchmark.accuracy_tolerance is a fraction of top-1 in [0, 1), "
                             f"got {self.accuracy_tolerance}")
        from effrun.backends import check_backends
        try:
            check_backends(list(self.backends))
        except EffrunError as e:
            raise ValueError(str(e)) from None


@dataclass
class CacheConfig:
    """The stage cache (effrun/cache.py): finished model stages reused across runs."""

    enabled: bool = True
    # A relative path is relative to the directory effrun is launched from; the tests point
    # EFFRUN_STAGE_CACHE_DIR at a temp dir.
    dir: str = "${oc.env:EFFRUN_STAGE_CACHE_DIR,outputs/cache}"


SELECT_METHODS = ("none", "random", "el2n", "loss", "forgetting")
SELECT_ORDERS = ("hard_first", "easy_first")


@dataclass
class SelectConfig:
    """Data pruning in the train stage (effrun/select.py): it trains on a share `keep` of the
    train split, drawn at random or ranked by per-example scores from short proxy runs."""

    method: str = "none"  # none | random | el2n | loss | forgetting
    keep: float = 1.0  # share of the train split the train stage trains on, in (0, 1]
    order: str = "hard_first"  # which end of the score ranking is kept: hard_first | easy_first
    per_class: bool = True  # rank within each class; every class keeps its share
    proxy_epochs: int = 2  # length of each scoring run (its own short schedule)
    proxy_runs: int = 1  # scores are averaged over this many proxy runs (seeds)
    forgetting_checks: int = 4  # forgetting: train-split checks per proxy epoch

    def __post_init__(self) -> None:
        if self.method not in SELECT_METHODS:
            raise ValueError(f"select.method must be one of {SELECT_METHODS}, got {self.method!r}")
        if not 0.0 < self.keep <= 1.0:
            raise ValueError(f"select.keep must be in (0, 1], got {self.keep}")
        if self.order not in SELECT_ORDERS:
            raise ValueError(f"select.order must be one of {SELECT_ORDERS}, got {self.order!r}")
        if min(self.proxy_epochs, self.proxy_runs, self.forgetting_checks) < 1:
            raise ValueError("select.proxy_epochs, select.proxy_runs and select.forgetting_checks "
                             "must be >= 1")

    def key(self) -> dict | None:
        """What the kept data depends on, for the train stage's key (effrun/keys.py); None
        when all of it is kept (keep=1 of any method trains on the same data)."""
        if self.method == "none" or self.keep >= 1:
            return None
        fields = dataclasses.asdict(self)
        if self.method == "random":  # no scores: the proxy and ranking settings do not matter
            return {k: fields[k] for k in ("method", "keep", "per_class")}
        if self.method != "forgetting":
            fields.pop("forgetting_checks")
        return fields


@dataclass
class RunConfig:
    name: str = "default"
    stages: list[str] = field(default_factory=lambda: list(STAGE_ORDER))
    seed: int = 0
    init_from: Optional[str] = None  # a model artifact (.pt) to start from instead of random init
    # Artifacts effrun did not write in this run dir (init_from, a distillation teacher) are
    # scanned and any code in them refused; true loads them as they are (an AOTInductor
    # package runs a shared library from inside the file).
    trust_artifact: bool = False
    # A finished stage dir (or a run dir: its last finished model stage) whose artifact the
    # configured stages after it continue from; init_from instead trains from given weights.
    resume_from: Optional[str] = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    # Deployment formats each float model stage also writes beside model.pt (effrun/export.py):
    # onnx (model_fp32.onnx), openvino (model_openvino.xml/.bin); needs effrun[deploy].
    export: list[str] = field(default_factory=list)
    # Data pruning: the train stage trains on a random or score-ranked share of the train split.
    select: SelectConfig = field(default_factory=SelectConfig)

    def __post_init__(self) -> None:
        if self.export:
            from effrun.export import check_formats
            try:
                check_formats(list(self.export))
            except EffrunError as e:
                raise ValueError(str(e)) from None
        if not self.stages:
            raise ValueError(f"stages must list at least one stage of {list(STAGE_ORDER)}, got []")
        unknown = [s for s in self.stages if s not in STAGE_ORDER]
        if unknown:
            raise ValueError(f"stages: unknown stage {unknown[0]!r}; allowed: {list(STAGE_ORDER)}")
        if self.init_from is not None and self.resume_from is not None:
            raise ValueError("init_from and resume_from cannot both be set: init_from trains "
                             "from given weights, resume_from continues after a finished stage")
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"stages lists a stage twice: {self.stages}")
        self.stages = [s for s in STAGE_ORDER if s in self.stages]
