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

from effrun.compression.quantize import artifact
from effrun.compression.quantize.common import (
    INT8_LAYERS,
    Compiled,
    Int8Model,
    accuracy,
    compile_and_list_kernels,
    example_batch,
    export_model,
    float_bytes,
    graph_bytes,
    int8_layer_names,
    lean_graph,
    preflight,
)
from effrun.compression.quantize.fallback import accuracy_fallback
from effrun.measure import count_flops, count_params

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
    key: ClassVar[str] = "compression.quantize"

    def quantize(self, exported: torch.fx.GraphModule, ctx, float_layers: list[str],
                 reduce_range: bool) -> torch.fx.GraphModule:
        """The exported float graph → a converted (q/dq) graph."""
        raise NotImplementedError

    def check_data(self, ctx) -> None:
        """Method-specific checks on the run (before any work)."""

    def __call__(self, model: nn.Module, ctx) -> nn.Module:
        info = preflight(model, ctx.hw, float_layers=self.float_layers,
                         layer_types=self.layer_types)
        self.check_data(ctx)
        reduce_range = (self.reduce_range if self.reduce_range is not None
                        else info["cpu_int8_isa"] in ("avx2", "none", "unknown"))
        model = model.cpu().eval()
        example = example_batch(ctx.data)
        shape = (1, *example.shape[1:])
        tta = ctx.cfg.run.train.tta  # float and int8 scored the same way, here and now
        float_acc = accuracy(model, ctx.data, tta=tta)
        ctx.metrics.update(params=count_params(model), flops=count_flops(model, shape),
                           preflight=info, reduce_range=reduce_range)
        float_size = float_bytes(model)

        exported = export_model(model.train(self.export_in_train_mode), example)
        model.eval()

        def quantize(float_layers: list[str]) -> torch.fx.GraphModule:
            return self.quantize(copy.deepcopy(exported), ctx, float_layers, reduce_range)

        max_drop = getattr(self, "max_accuracy_drop", None)
        if max_drop is not None:
            gm, report = accuracy_fallback(
                quantize, int8_layer_names(model, self.layer_types), model, ctx.data,
                max_drop=max_drop, eval_images=self.fallback_eval_images,
                start=list(self.float_layers))
            ctx.metrics["fallback"] = report
            float_layers = report["float_layers"]
        else:
            gm, float_layers = quantize(list(self.float_layers)), list(self.float_layers)

        int8 = Int8Model(lean_graph(gm))
        compiled = Compiled(int8)
        # Compiled at the evaluation batch shape, so that scoring it does not compile again.
        eval_shape = (min(EVAL_BATCH, len(ctx.data.test_y)), *example.shape[1:])
        kernels = compile_and_list_kernels(compiled, torch.randn(eval_shape))
        if not kernels:
            log.warning("quantize: Inductor generated no fused int8 kernel: this model will "
                        "run its int8 graph as reference q/dq ops, slower than float")
        acc = accuracy(compiled, ctx.data, tta=tta, batch_size=EVAL_BATCH)
        size = graph_bytes(int8.gm)
        ctx.metrics.update(accuracy=acc, float_accuracy=float_acc, accuracy_drop=float_acc - acc,
                           size_bytes=size, float_size_bytes=float_size,
                           size_ratio=size / float_size, fused_int8_kernels=kernels,
                           float_layers=float_layers)
        log.info("quantize: int8 top-1 %.4f (float %.4f), %d -> %d bytes, kernels %s", acc,
                 float_acc, float_size, size, kernels)
        ctx.artifact_extra.update(
            method=type(self).__name__, float_layers=float_layers, size_bytes=size,
            float_size_bytes=float_size, fused_int8_kernels=kernels,
            compare_to=str(ctx.parent.artifact) if ctx.parent else None,
            example_shape=list(example.shape))
        return int8

    def save(self, model: nn.Module, stage_dir: Path, ctx) -> Path:
        return artifact.save_int8(model, Path(stage_dir), ctx, aot_package=self.aot_package)

    def _check_positive(self, name: str, value, minimum=1) -> None:
        if value < minimum:
            raise ValueError(f"{self.key}.{name} must be >= {minimum}, got {value}")

    def _check_fallback(self) -> None:
        drop = getattr(self, "max_accuracy_drop", None)
        if drop is not None and not 0 <= drop < 1:
            raise ValueError(f"{self.key}.max_accuracy_drop is a fraction of top-1 in [0, 1) "
                             f"(0.003 = 0.3 points) or null, got {drop}")
        self._check_positive("fallback_eval_images", getattr(self, "fallback_eval_images", 1))
