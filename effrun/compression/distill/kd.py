"""Hinton et al. (2015) knowledge distillation: the student learns the teacher's softened logits.

loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(labels)

The teacher is the model the previous stage produced (the baseline, or the pruned model) or an
artifact given by `teacher`; the student is a fresh model option (`student: resnet20`) or, when
`student` is null and `teacher` is a path, the previous stage's model trained on. With
`compare_scratch` the same student (same initial weights, epochs, optimizer) is also trained
without a teacher, so metrics.json holds the gain distillation brought.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from effrun import artifacts
from effrun.data import BatchLoader
from effrun.errors import ConfigError, EffrunError
from effrun.models import model_config_dict
from effrun.schema import build_node, load_option
from effrun.stage import StageInputs, StageResult
from effrun.train import LossFn

KEY = "compression.distill"
log = logging.getLogger("effrun")


def model_option(name: str, where: str) -> object:
    """The config dataclass of model option `name` (configs/model/<name>.yaml)."""
    try:
        node = load_option("model", name)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return build_node(node, where)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, *,
            temperature: float, alpha: float, ce: nn.Module) -> torch.Tensor:
    soft = F.kl_div(F.log_softmax(student / temperature, 1),
                    F.log_softmax(teacher / temperature, 1), reduction="batchmean",
                    log_target=True) * temperature**2  # T^2 keeps gradient scale as T varies
    return alpha * soft + (1.0 - alpha) * ce(student, labels) if alpha < 1 else soft


class LogitCache:
    """Teacher logits of every training image, computed once under no-grad.

    Only valid when augmentation is off, so a training batch holds the loader's exact
    normalized images. The loader gives no sample indices, so a batch is matched by an exact
    integer hash of its float bits (no rounding involved); any miss falls back to running the
    teacher, so a mismatch can cost time but never give wrong targets.
    """

    def __init__(self, teacher: nn.Module, inputs):
        data, hw = inputs.data, inputs.hw
        gen = torch.Generator().manual_seed(0)
        numel = data.train_x[0].numel()
        # < 2**16 times < 2**31 bits, summed over 3*32*32 values, stays inside int64.
        self.weights = torch.randint(1, 2**16, (numel,), generator=gen).to(hw.torch_device)
        loader = BatchLoader(data.train_x, data.train_y, inputs.train.eval_batch_size,
                             mean=data.mean, std=data.std, device=hw.torch_device,
                             channels_last=hw.channels_last)
        keys, logits = [], []
        with torch.no_grad():
            for inputs, _ in loader:
                keys.append(self.key(inputs))
                with hw.autocast():
                    logits.append(teacher(inputs).float())
        keys_t = torch.cat(keys)
        order = torch.argsort(keys_t)
        self.keys, self.logits = keys_t[order], torch.cat(logits)[order]
        self.misses = 0
        log.info("distill: teacher logits cached for %d training images", len(self.keys))

    def key(self, inputs: torch.Tensor) -> torch.Tensor:
        bits = inputs.float().contiguous().view(torch.int32).flatten(1).long()
        return (bits * self.weights).sum(1)

    def lookup(self, inputs: torch.Tensor) -> torch.Tensor | None:
        keys = self.key(inputs)
        pos = torch.searchsorted(self.keys, keys).clamp(max=len(self.keys) - 1)
        if not bool((self.keys[pos] == keys).all()):
            self.misses += 1
            return None
        return self.logits[pos]


@dataclass
class DistillBase:
    """What every distillation method shares: the teacher, the student, the training and the
    optional no-teacher comparison. Subclasses say how the loss uses the teacher."""

    student: str | None = "resnet20"  # a model option (configs/model/); null = the previous model
    teacher: str | None = None  # a model artifact (.pt); null = the previous stage's model
    temperature: float = 4.0
    alpha: float = 0.9  # weight of the distillation term; 1 - alpha goes to the label loss
    epochs: int | None = None  # null = train.epochs
    lr: float | None = None  # null = the run's optimizer as configured
    compare_scratch: bool = False  # also train the same student without a teacher, same epochs

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"{KEY}.temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"{KEY}.alpha must be in [0, 1], got {self.alpha}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"{KEY}.epochs must be >= 1 or null, got {self.epochs}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"{KEY}.lr must be > 0 or null, got {self.lr}")
        if self.student is not None:
            model_option(self.student, f"{KEY}.student")

    # -- setup: every check runs here, before any training ------------------------------------
    def setup(self, model: nn.Module, inputs) -> tuple[nn.Module, nn.Module, dict | None]:
        """(teacher, student, the student's model config or None when it is `model`), checked
        against each other and the data."""
        if self.teacher is not None:
            try:
                # From elsewhere, and StageInputs does not carry trust_artifact: always
                # scanned (effrun.untrusted); effrun's own .pt and .pt2 pass.
                teacher, _ = artifacts.load_model(Path(self.teacher), trusted=False)
            except Exception as e:  # missing file, not an artifact, shapes that do not fit
                raise EffrunError(f"{KEY}.teacher: cannot load {self.teacher}: "
                                  f"{str(e).splitlines()[0]}") from None
        elif self.student is None:
            raise EffrunError(f"{KEY}: set student (a model option) or teacher (an artifact); "
                              f"with neither the model would distill from itself")
        else:
            teacher = copy.deepcopy(model)
        student, student_config = model, None
        if self.student is not None:
            option = model_option(self.student, f"{KEY}.student")
            student = option.build(num_classes=inputs.data.num_classes)
            student_config = model_config_dict(option)
        example = torch.zeros(2, 3, *inputs.data.image_size)
        with torch.no_grad():
            t_out, s_out = teacher.eval()(example), student.eval()(example)
        if t_out.shape != s_out.shape or s_out.shape[1] != inputs.data.num_classes:
            raise EffrunError(f"{KEY}: teacher gives {t_out.shape[1]} classes, student "
                              f"{s_out.shape[1]}, the data has {inputs.data.num_classes}")
        teacher = inputs.hw.prepare(teacher).eval().requires_grad_(False)
        return teacher, student, student_config

    # -- what the methods override ----------------------------------------------------------------
    def trainable(self, student: nn.Module, teacher: nn.Module, inputs) -> nn.Module:
        """The module the training loop optimizes (here the student itself)."""
        return student

    def release(self, trainable: nn.Module) -> nn.Module:
        """The student out of `trainable`, with any training-only hooks removed."""
        return trainable

    def loss_fn(self, trainable: nn.Module, teacher: nn.Module, inputs
                ) -> tuple[LossFn, dict]:
        """The training loss and a dict the method fills with figures while it runs."""
        raise NotImplementedError

    # -- the stage --------------------------------------------------------------------------
    def __call__(self, model: nn.Module, inputs: StageInputs) -> StageResult:
        teacher, student, student_config = self.setup(model, inputs)
        epochs = self.epochs or inputs.train.epochs
        optimizer = (inputs.optimizer if self.lr is None
                     else dataclasses.replace(inputs.optimizer, lr=self.lr))
        initial = copy.deepcopy(student.state_dict()) if self.compare_scratch else None
        trainable = self.trainable(student, teacher, inputs)
        loss_fn, loss_figures = self.loss_fn(trainable, teacher, inputs)
        fitted = inputs.fit(trainable, epochs=epochs, optimizer=optimizer, loss_fn=loss_fn,
                            name="kd")
        student = self.release(trainable)
        accuracy = fitted["test_accuracy"]
        metrics = {"method": type(self).__name__, "epochs": epochs,
                   "teacher": self.teacher or (inputs.parent.stage if inputs.parent else None),
                   "teacher_accuracy": self._teacher_accuracy(teacher, inputs),
                   **loss_figures, "history": fitted["history"]}
        note = None
        if self.compare_scratch:
            config = student_config or inputs.model_config
            scratch = self._no_teacher(student, initial, epochs, optimizer, inputs, config)
            metrics.update(scratch, kd_gain_pt=100 * (accuracy - scratch["no_teacher_accuracy"]))
            note = (f"distilled student {100 * accuracy:.2f}% vs the same student without a "
                    f"teacher {100 * scratch['no_teacher_accuracy']:.2f}% "
                    f"({metrics['kd_gain_pt']:+.2f} pt, {epochs} epochs each)")
        return StageResult(model=student, accuracy=accuracy, metrics=metrics,
                           model_config=student_config, note=note)

    def _teacher_accuracy(self, teacher: nn.Module, inputs) -> float:
        parent = inputs.parent
        known = parent.metrics.get("accuracy") if parent and not self.teacher else None
        return known if known is not None else inputs.evaluate(teacher)["accuracy"]

    def _no_teacher(self, student, initial, epochs, optimizer, inputs, model_config) -> dict:
        """The same student from the same initial weights, trained on labels alone."""
        plain = copy.deepcopy(student)
        plain.load_state_dict(initial)
        fitted = inputs.fit(plain, epochs=epochs, optimizer=optimizer, name="no_teacher")
        artifacts.save_model(plain, Path(inputs.stage_dir) / "no_teacher_model.pt",
                             model_config=model_config, num_classes=inputs.data.num_classes,
                             stage="distill:no_teacher")
        return {"no_teacher_accuracy": fitted["test_accuracy"],
                "no_teacher_history": fitted["history"]}


@dataclass
class KD(DistillBase):
    """Hinton KD; with augmentation off the teacher's logits are computed once and cached."""

    cache_teacher_logits: bool = True  # with augmentation off, run the teacher once per image

    def loss_fn(self, trainable: nn.Module, teacher: nn.Module, inputs
                ) -> tuple[LossFn, dict]:
        ce = nn.CrossEntropyLoss(label_smoothing=inputs.train.label_smoothing)
        cache = None
        if self.cache_teacher_logits and not inputs.augmentation.enabled:
            cache = LogitCache(teacher, inputs)
        # Filled as training runs; read after it (the stage reports whether the cache served
        # every batch).
        figures = {"teacher_logits_cached": cache is not None, "teacher_cache_misses": None}

        def loss(logits: torch.Tensor, batch: torch.Tensor, labels: torch.Tensor):
            target = cache.lookup(batch) if cache is not None else None
            if target is None:
                with torch.no_grad(), inputs.hw.autocast():
                    target = teacher(batch).float()
            if cache is not None:
                figures["teacher_cache_misses"] = cache.misses
            return kd_loss(logits, target, labels, temperature=self.temperature,
                           alpha=self.alpha, ce=ce)

        if cache is not None:
            figures["teacher_cache_misses"] = 0
        return loss, figures
