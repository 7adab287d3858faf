"""The flow all int8 methods share; each method only says how it turns a graph into int8.

preflight → export (strict, dynamic batch) → method.quantize (PTQ / QAT / dynamic) → optional
accuracy-aware fallback → drop dead fp32 copies → compile (freezing) and check that fused int8
kernels appeared → top-1 of the compiled graph, as deployed → save as .pt2 (+ AOTInductor).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from effrun import distributed
from effrun.compile import FUSED_INT8_OP, Compiled, compile_and_list_kernels
from effrun.compression.quantize import artifact
from effrun.compression.quantize.common import (
    COMPILE_OPTIONS,
    INT8_LAYERS,
    Int8Model,
    example_batch,
    export_model,
    float_bytes,
    graph_bytes,
    int8_layer_names,
    lean_graph,
    plain_cpu,
    preflight,
)
from effrun.compression.quantize.fallback import accuracy_fallback
from effrun.measure import ModelFigures, count_flops, count_params
from effrun.stage import Deployment, StageInputs, StageResult

log = logging.getLogger("effrun")
EVAL_BATCH = 500


@dataclass
class Int8Method:
    float_layers: list[str] = field(default_factory=list)  # layers kept float from the start
    # Activations in 7 bits: avoids int16 overflow in AVX2's u8*s8 multiply on CPUs without
    # VNNI. null = on exactly when this CPU lacks VNNI/AMX.
    reduce_range: bool | None = None
    aot_package: bool = False  # also write an AOTInductor package (model_aoti.pt2)

    layer_types: ClassVar[tuple] = INT8_LAYERS
    export_in_train_mode: ClassVar[bool] = False
    # Under torchrun: False = the stage runs on rank 0 alone; True = every rank runs the method
    # (it trains with DDP) and rank 0 alone finishes it.
    trains_across_ranks: ClassVar[bool] = False
    key: ClassVar[str] = "compression.quantize"

    def quantize(self, exported: torch.fx.GraphModule, inputs: StageInputs,
                 float_layers: list[str], reduce_range: bool
                 ) -> tuple[torch.fx.GraphModule, dict]:
        """The exported float graph → a converted (q/dq) graph, and the method's figures for
        metrics.json (e.g. calibration batches seen)."""
        raise NotImplementedError

    def check_data(self, inputs: StageInputs) -> None:
        """Method-specific checks on the run (before any work)."""

    def __call__(self, model: nn.Module, inputs: StageInputs) -> StageResult | None:
        info = preflight(model, inputs.hw, float_layers=self.float_layers,
                         layer_types=self.layer_types)
        self.check_data(inputs)
        reduce_range = (self.reduce_range if self.reduce_range is not None
                        else info["cpu_int8_isa"] in ("avx2", "none", "unknown"))
        model = model.cpu().eval()
        example = example_batch(inputs.data)
        # Float and int8 are scored the same way, here and now: plain fp32 CPU, the run's TTA.
        # Measured before converting: QAT fine-tunes weights it may share with `model`.
        float_acc = inputs.evaluate(model, hw=plain_cpu())["accuracy"]
        # Under torchrun a method that trains (trains_across_ranks) converts on every rank,
        # which fine-tune together; rank 0 alone compiles, scores and saves the int8 graph.
        gm, float_layers, method_figures = self._convert(model, example, inputs, reduce_range)
        return distributed.main_only(self._finish, model, inputs, example, gm, float_acc, {
            "preflight": info, "reduce_range": reduce_range, **method_figures,
            "float_layers": float_layers})

    def _finish(self, model: nn.Module, inputs: StageInputs, example: torch.Tensor,
                gm: torch.fx.GraphModule, float_acc: float, metrics: dict) -> StageResult:
        """The converted graph compiled (checking for fused int8 kernels), scored as deployed
        and described; the result saves it as .pt2 (+ AOTInductor)."""
        figures = ModelFigures(params=count_params(model),
                               flops=count_flops(model, (1, *example.shape[1:])),
                               weight_bytes=0)
        float_size = float_bytes(model)
        int8 = Int8Model(lean_graph(gm))
        compiled = Compiled(int8, COMPILE_OPTIONS)
        # Compiled at the evaluation batch shape, so that scoring it does not compile again.
        eval_shape = (min(EVAL_BATCH, len(inputs.data.test_y)), *example.shape[1:])
        kernels = compile_and_list_kernels(compiled, torch.randn(eval_shape))
        if not kernels:
            log.warning("quantize: Inductor generated no fused int8 kernel: this model will "
                        "run its int8 graph as reference q/dq ops, slower than float")
        acc = inputs.evaluate(compiled, hw=plain_cpu(), batch_size=eval_shape[0],
                              pad_last=True)["accuracy"]
        figures.weight_bytes = graph_bytes(int8.gm)
        log.info("quantize: int8 top-1 %.4f (float %.4f), %d -> %d bytes, kernels %s", acc,
                 float_acc, float_size, figures.weight_bytes, kernels)
        metrics = {**metrics, "float_accuracy": float_acc, "accuracy_drop": float_acc - acc,
                   "float_weight_bytes": float_size,
                   "weight_ratio": figures.weight_bytes / float_size,
                   "fused_int8_kernels": kernels}
        deploy = Deployment(precision="int8", compile_options=COMPILE_OPTIONS,
                            expected_kernels=FUSED_INT8_OP.pattern, device="cpu",
                            compare_to=str(inputs.parent.artifact) if inputs.parent else None)
        extra = {"method": type(self).__name__, "float_layers": metrics["float_layers"],
                 "weight_bytes": figures.weight_bytes, "float_weight_bytes": float_size,
                 "fused_int8_kernels": kernels, "example_shape": list(example.shape)}

        def save(stage_dir: Path, meta: dict) -> Path:
            return artifact.save_int8(int8, Path(stage_dir), meta, example,
                                      aot_package=self.aot_package)

        return StageResult(model=int8, accuracy=acc, metrics=metrics, figures=figures,
                           artifact_meta=extra, deploy=deploy, save=save)

    def _convert(self, model: nn.Module, example: torch.Tensor, inputs: StageInputs,
                 reduce_range: bool) -> tuple[torch.fx.GraphModule, list[str], dict]:
        """Export, quantize and (with max_accuracy_drop) fall back to float layer by layer;
        returns the converted graph, the layers kept float and the method's figures."""
        exported = export_model(model.train(self.export_in_train_mode), example)
        model.eval()
        figures: dict = {}

        def quantize(float_layers: list[str]) -> torch.fx.GraphModule:
            gm, method_figures = self.quantize(copy.deepcopy(exported), inputs, float_layers,
                                               reduce_range)
            figures.update(method_figures)
            return gm

        max_drop = getattr(self, "max_accuracy_drop", None)
        if max_drop is None:
            return quantize(list(self.float_layers)), list(self.float_layers), figures
        gm, report = accuracy_fallback(
            quantize, int8_layer_names(model, self.layer_types), model, inputs,
            max_drop=max_drop, eval_images=self.fallback_eval_images,
            start=list(self.float_layers))
        return gm, report["float_layers"], {**figures, "fallback": report}

    def _check_positive(self, name: str, value, minimum=1) -> None:
        if value < minimum:
            raise ValueError(f"{self.key}.{name} must be >= {minimum}, got {value}")

    def _check_fallback(self) -> None:
        drop = getattr(self, "max_accuracy_drop", None)
        if drop is not None and not 0 <= drop < 1:
            raise ValueError(f"{self.key}.max_accuracy_drop is a fraction of top-1 in [0, 1) "
                             f"(0.003 = 0.3 points) or null, got {drop}")
        self._check_positive("fallback_eval_images", getattr(self, "fallback_eval_images", 1))
