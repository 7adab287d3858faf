"""Accuracy-aware fallback: keep the layers int8 hurts most in floating point, one at a time.

Sensitivity is measured, not guessed: for each int8 layer, the model is quantized with only that
layer kept float and scored; the layers whose float copy recovers the most accuracy go back to
float first, one per step, until the drop against the float model is within tolerance or every
layer has been tried. Scoring runs the converted graph uncompiled (reference int8 numerics, no
per-candidate compile) on `eval_images` images of the validation split when there is one, else of
the test split (then say so: the choice of float layers has seen test images).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from effrun.compression.quantize.common import Int8Model, plain_cpu

log = logging.getLogger("effrun")

QuantizeFn = Callable[[list[str]], torch.fx.GraphModule]  # float layers -> converted graph


def accuracy_fallback(quantize: QuantizeFn, layers: list[str], float_model: nn.Module, inputs,
                      *, max_drop: float, eval_images: int, start: list[str]
                      ) -> tuple[torch.fx.GraphModule, dict]:
    data = inputs.data
    split = "val" if data.val_x is not None else "test"

    def score(model: nn.Module) -> float:
        return inputs.evaluate(model, split, tta="none", limit=eval_images,
                               hw=plain_cpu())["accuracy"]

    float_acc = score(float_model)
    kept = list(start)
    gm = quantize(kept)
    acc = score(Int8Model(gm))
    steps = [{"float_layers": list(kept), "accuracy": acc, "drop": float_acc - acc}]
    n = len(data.val_y if split == "val" else data.test_y)
    log.info("quantize fallback: float %.4f, int8 %.4f on %d %s images (max drop %.4f)",
             float_acc, acc, min(eval_images, n), split, max_drop)
    sensitivity: dict[str, float] = {}
    if float_acc - acc > max_drop:
        candidates = [name for name in layers if name not in kept]
        for name in candidates:  # one layer float at a time: how much does it recover?
            sensitivity[name] = score(Int8Model(quantize(kept + [name])))
            log.info("quantize fallback: %s float -> %.4f", name, sensitivity[name])
        for name in sorted(candidates, key=lambda n: -sensitivity[n]):
            kept.append(name)
            gm = quantize(kept)
            acc = score(Int8Model(gm))
            steps.append({"float_layers": list(kept), "accuracy": acc, "drop": float_acc - acc})
            log.info("quantize fallback: %d float layer(s), accuracy %.4f (drop %.4f)",
                     len(kept), acc, float_acc - acc)
            if float_acc - acc <= max_drop:
                break
    within = float_acc - acc <= max_drop
    if not within:
        log.warning("quantize fallback: still %.4f below float with every layer tried",
                    float_acc - acc)
    return gm, {"max_accuracy_drop": max_drop, "split": split, "eval_images": eval_images,
                "float_accuracy": float_acc, "sensitivity": sensitivity, "steps": steps,
                "float_layers": kept, "within_tolerance": within}
