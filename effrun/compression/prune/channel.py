"""Structured channel pruning with Torch-Pruning: removes whole channels, leaving a smaller dense
network that is faster with ordinary kernels.

Torch-Pruning's dependency graph finds the coupled layers (a residual sum ties the channels of
every conv feeding it, the BNs after them and the convs reading them), so whole groups shrink
together and the network stays valid. The classifier keeps its outputs. The pruned network is
saved as a plain state_dict: its tensor shapes are the architecture, and
effrun.models.load_state_into resizes a freshly built model to them; the per-layer widths are
also stored in the artifact's `extra` for reference.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from effrun.compression.prune.common import finetune, match, prunable_layers, train_batches
from effrun.compression.prune.sensitivity import (
    SensitivityOptions,
    analyze,
    follow_ratios,
)
from effrun.errors import EffrunError
from effrun.measure import count_flops, count_params
from effrun.stage import StageInputs, StageResult

KEY = "compression.prune"
IMPORTANCES = ("l1", "taylor")
# With a MACs budget the pruner advances in this many small ratio increments, MACs counted after
# each, and stops at the first that meets the budget.
MACS_RESOLUTION = 100
Pruner = getattr(tp.pruner, "BasePruner", None) or tp.pruner.MetaPruner  # renamed in 1.5
log = logging.getLogger("effrun")


def count_macs(model: nn.Module, image_size) -> int:
    return count_flops(model, (1, 3, *image_size)) // 2  # FlopCounterMode counts 2 per MAC


class MacsCounter:
    """Conv2d/Linear MACs from layer shapes, for the many counts of a MACs-budget search.

    Pruning changes channel counts, never spatial sizes, so one traced forward records each
    layer's output size and later counts are arithmetic (count_flops dispatches every op, ~100x
    slower). For these CNNs it equals count_macs, which only counts convs and matmuls too.
    """

    def __init__(self, model: nn.Module, image_size):
        self.spatial: dict[str, int] = {}
        layers = prunable_layers(model)
        handles = [m.register_forward_hook(self._hook(name)) for name, m in layers.items()]
        device = next(model.parameters()).device
        was_training = model.training
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, *image_size, device=device))
        model.train(was_training)
        for h in handles:
            h.remove()

    def _hook(self, name: str):
        def record(_m, _inputs, output):
            self.spatial[name] = output[0, 0].numel() if output.dim() == 4 else 1
        return record

    def __call__(self, model: nn.Module) -> int:
        total = 0
        for name, m in prunable_layers(model).items():
            per_output = m.weight[0].numel()  # in/groups * kh * kw, or in_features
            outputs = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
            total += outputs * per_output * self.spatial[name]
        return total


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output width of every Conv2d/Linear: with the input size, the pruned architecture."""
    return {name: m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
            for name, m in prunable_layers(model).items()}


@dataclass
class ChannelPrune(SensitivityOptions):
    ratio: float = 0.5  # share of channels removed per group (when target_macs_ratio is null)
    target_macs_ratio: float | None = None  # prune until MACs <= this share of the original
    importance: str = "l1"  # l1: L1 norm of the group's weights | taylor: |w * dL/dw|
    global_pruning: bool = False  # rank all groups together (uneven widths) instead of per group
    max_layer_ratio: float = 0.9  # no group loses more than this share of its channels
    round_to: int | None = None  # keep widths multiples of this (SIMD-friendly, e.g. 8)
    steps: int = 1  # prune in this many rounds (iterative), fine-tuning between them
    step_epochs: int = 1  # fine-tuning epochs between rounds
    finetune_epochs: int = 5  # fine-tuning epochs after the last round
    lr: float = 0.01  # fine-tuning learning rate (the run's optimizer, no warm-up)
    ignore: list[str] = field(default_factory=list)  # layers kept whole (the classifier always)
    taylor_batches: int = 4  # training batches whose gradients score channels (taylor)
    # sensitivity, sensitivity_samples, sensitivity_follow: see SensitivityOptions
    sensitivity_levels: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"{KEY}.ratio must be in [0, 1), got {self.ratio}")
        if self.target_macs_ratio is not None and not 0.0 < self.target_macs_ratio <= 1.0:
            raise ValueError(f"{KEY}.target_macs_ratio must be in (0, 1] or null, "
                             f"got {self.target_macs_ratio}")
        if self.importance not in IMPORTANCES:
            raise ValueError(f"{KEY}.importance must be one of {IMPORTANCES}, "
                             f"got {self.importance!r}")
        if not 0.0 < self.max_layer_ratio < 1.0:
            raise ValueError(f"{KEY}.max_layer_ratio must be in (0, 1), got "
                             f"{self.max_layer_ratio}")
        if self.steps < 1 or self.step_epochs < 0 or self.finetune_epochs < 0 or self.lr <= 0:
            raise ValueError(f"{KEY}: steps >= 1, step_epochs >= 0, finetune_epochs >= 0 "
                             f"and lr > 0 are required")
        if self.round_to is not None and self.round_to < 1:
            raise ValueError(f"{KEY}.round_to must be >= 1 or null, got {self.round_to}")
        super().__post_init__()

    # -- helpers ---------------------------------------------------------------------------
    def _ignored(self, model: nn.Module) -> list[nn.Module]:
        layers = prunable_layers(model)
        names = list(layers)
        kept = set(match(names, self.ignore, f"{KEY}.ignore")) | {names[-1]}  # the classifier
        return [layers[n] for n in names if n in kept]

    def _importance(self):
        if self.importance == "taylor":
            return tp.importance.TaylorImportance()
        return tp.importance.MagnitudeImportance(p=1)

    def _pruner(self, model, example, ratios: dict[str, float] | None, iterative_steps: int,
                pruning_ratio: float, global_pruning: bool, importance=None):
        kwargs = {}
        if ratios is not None:
            kwargs["pruning_ratio_dict"] = {model.get_submodule(n): r for n, r in ratios.items()}
        return Pruner(model, example, importance=importance or self._importance(),
                      global_pruning=global_pruning, pruning_ratio=pruning_ratio,
                      max_pruning_ratio=self.max_layer_ratio, iterative_steps=iterative_steps,
                      ignored_layers=self._ignored(model), round_to=self.round_to, **kwargs)

    def _score(self, model: nn.Module, batches) -> None:
        """Gradients for Taylor importance, in eval mode so BN statistics stay untouched."""
        if self.importance != "taylor":
            return
        was_training = model.training
        model.eval()
        model.zero_grad(set_to_none=True)
        for inputs, labels in batches:
            nn.functional.cross_entropy(model(inputs), labels).backward()
        model.train(was_training)

    # -- the stage -------------------------------------------------------------------------
    def __call__(self, model: nn.Module, inputs: StageInputs) -> StageResult:
        size = inputs.data.image_size
        device = next(model.parameters()).device
        example = torch.zeros(1, 3, *size, device=device)
        self._ignored(model)  # a bad `ignore` name fails here, before any work
        macs0, params0, widths0 = count_macs(model, size), count_params(model), layer_widths(model)
        batches = train_batches(inputs, self.taylor_batches, device=device) \
            if self.importance == "taylor" else []
        fast_macs = MacsCounter(model, size)
        fast0 = fast_macs(model)
        metrics: dict = {"method": "channel", "importance": self.importance}
        ratios = None
        if self.sensitivity:
            ratios, metrics["sensitivity"] = self._sensitivity(model, inputs, example, batches,
                                                               fast_macs)
            if ratios is not None:
                metrics["group_ratios"] = ratios
        macs_mode = self.target_macs_ratio is not None and ratios is None
        pruner = self._pruner(
            model, example, ratios,
            iterative_steps=MACS_RESOLUTION if macs_mode else self.steps,
            pruning_ratio=0.0 if ratios else self.max_layer_ratio if macs_mode else self.ratio,
            global_pruning=self.global_pruning and ratios is None)
        for round_ in range(1, self.steps + 1):
            # Taylor scores come from one gradient pass per round: Torch-Pruning slices .grad
            # along with each weight, so the small increments below keep using them.
            self._score(model, batches)
            if macs_mode:
                goal = 1.0 - (1.0 - self.target_macs_ratio) * round_ / self.steps
                while fast_macs(model) > goal * fast0:
                    if pruner.current_step >= pruner.iterative_steps:
                        raise EffrunError(
                            f"{KEY}.target_macs_ratio={self.target_macs_ratio} is out of reach "
                            f"with max_layer_ratio={self.max_layer_ratio} (reached "
                            f"{fast_macs(model) / fast0:.3f}): raise max_layer_ratio")
                    pruner.step()
            else:
                pruner.step()
            model.zero_grad(set_to_none=True)
            log.info("prune: round %d/%d, MACs %.3f of the original", round_, self.steps,
                     fast_macs(model) / fast0)
            if round_ < self.steps:
                name = f"round{round_}"
                tuned = finetune(model, inputs, epochs=self.step_epochs, lr=self.lr, name=name)
                if tuned:
                    metrics.setdefault("finetune", {})[name] = tuned

        macs = count_macs(model, size)
        widths = layer_widths(model)
        params_ratio = count_params(model) / params0
        metrics.update({
            "macs": macs, "macs_original": macs0, "macs_ratio": macs / macs0,
            "params_ratio": params_ratio, "widths": widths, "widths_original": widths0,
            "accuracy_before_finetune": inputs.evaluate(model)["accuracy"]})
        tuned = finetune(model, inputs, epochs=self.finetune_epochs, lr=self.lr)
        if tuned:
            metrics.setdefault("finetune", {})["finetune"] = tuned
        # The loop's final test figure when it fine-tuned; saves another evaluation pass.
        accuracy = tuned["test_accuracy"] if tuned else inputs.evaluate(model)["accuracy"]
        note = (f"structured: {100 * macs / macs0:.1f}% of the original MACs, "
                f"{100 * params_ratio:.1f}% of the parameters, a smaller dense network")
        return StageResult(model=model, accuracy=accuracy, metrics=metrics, note=note,
                           artifact_meta={"pruned_widths": widths})

    def _sensitivity(self, model, inputs, example, batches, fast_macs
                     ) -> tuple[dict[str, float] | None, dict]:
        ignored = self._ignored(model)
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
        names = {m: n for n, m in model.named_modules()}
        # One unit per prunable group, named after its root layer (residual groups included).
        groups = graph.get_all_groups(ignored_layers=ignored,
                                      root_module_types=[nn.Conv2d, nn.Linear])
        units = [names[g[0][0].target.module] for g in groups]
        macs0 = fast_macs(model)

        def prune_one(m: nn.Module, unit: str, level: float) -> None:
            self._score(m, batches)
            self._pruner(m, example, {unit: level}, 1, 0.0, False).step()

        rows, report = analyze(model, inputs, units, self.sensitivity_levels, prune_one,
                               self.sensitivity_samples)
        if not self.sensitivity_follow:
            return None, report
        widths = layer_widths(model)
        channels = {u: widths[u] for u in units}

        def reduction(ratios: dict[str, float]) -> float:
            if self.target_macs_ratio is None:  # the channel share removed, over all groups
                return sum(ratios[u] * channels[u] for u in units) / sum(channels.values())
            trial = copy.deepcopy(model)  # widths do not depend on the scores: L1 is enough
            self._pruner(trial, example, ratios, 1, 0.0, False,
                         importance=tp.importance.MagnitudeImportance(p=1)).step()
            return 1.0 - fast_macs(trial) / macs0

        target = self.ratio if self.target_macs_ratio is None else 1.0 - self.target_macs_ratio
        return follow_ratios(rows, reduction, target, KEY), report
