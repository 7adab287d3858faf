"""int8 on each backend: top-1 and latency of effrun's int8 methods on one float model.

    python scripts/bench_int8_backends.py --model <.../01_train/model.pt> --data <cifar10> \
        [--threads 1] [--flows ptq,ort,ort_s8,ov,ov_pt2e,ov_pt2e_nncf] [--out result.json] \
        [--executorch-dir DIR]

Flows, all calibrated on the same images (common.calibration_batches: 32 x 64 training images,
seed 0), scored on the whole test split without TTA:
  fp32 torch/ort/ov  the float model (compiled torch; ONNX export on ONNX Runtime / OpenVINO)
  ptq           int8_ptq: torchao pt2e + X86InductorQuantizer, compiled by Inductor (freezing)
  ort / ort_s8  int8_onnxruntime with uint8 / int8 activations (QDQ, per-channel weights)
  ov            int8_openvino: nncf.quantize of the OpenVINO model (converted from ONNX),
                bias correction off (the method's default)
  ov_fbc        the same with NNCF's fast bias correction (NNCF's own default)
  ov_pt2e       NNCF's OpenVINOQuantizer in torchao's pt2e flow (torch.export → prepare_pt2e →
                calibrate → convert_pt2e) → ov.convert_model of the converted program
  ov_pt2e_nncf  the same quantizer through nncf.experimental.torch.fx.quantize_pt2e (NNCF's
                calibration with fast bias correction) instead of torchao's observers
OpenVINOQuantizer lives in executorch (executorch.backends.openvino.quantizer); without
executorch installed, --executorch-dir names an unpacked executorch wheel whose quantizer
modules are loaded alone (they need only nncf and torchao).
Latency: batch 1 and 64, `--threads` threads, every flow timed in interleaved rounds
(effrun.measure.measure_interleaved), so load on a shared machine hits them alike.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

from effrun import backends
from effrun.artifacts import load_model
from effrun.compile import Compiled
from effrun.compression.quantize import backend_artifact as ba
from effrun.compression.quantize.common import (
    calibration_batches,
    example_batch,
    export_program,
    plain_cpu,
)
from effrun.compression.quantize.int8_onnxruntime import Int8OnnxRuntime
from effrun.compression.quantize.int8_openvino import Int8OpenVINO
from effrun.compression.quantize.int8_ptq import Int8PTQ
from effrun.export import export_onnx
from effrun.measure import measure_interleaved
from effrun.schema import compose, validate
from effrun.stage import stage_inputs

FLOWS = ("ptq", "ort", "ort_s8", "ov", "ov_fbc", "ov_pt2e", "ov_pt2e_nncf")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a float effrun model.pt (e.g. ResNet-20)")
    p.add_argument("--data", default=os.environ.get("EFFRUN_CIFAR10_JPEG", "data/cifar10"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--flows", default=",".join(FLOWS))
    p.add_argument("--iters", type=int, default=60, help="timed calls per flow and batch")
    p.add_argument("--executorch-dir", type=Path, help="an unpacked executorch wheel")
    p.add_argument("--out", type=Path)
    return p.parse_args()


def openvino_quantizer(executorch_dir: Path | None):
    """executorch.backends.openvino.quantizer.OpenVINOQuantizer, from an installed executorch
    or from the quantizer's two modules in an unpacked wheel (its package __init__ pulls in
    executorch's LLM tooling, which is not needed here)."""
    try:
        from executorch.backends.openvino.quantizer import OpenVINOQuantizer
        return OpenVINOQuantizer
    except ImportError:
        if executorch_dir is None:
            raise
    root = executorch_dir / "executorch" / "backends" / "openvino" / "quantizer"
    for name in ("executorch", "executorch.backends", "executorch.backends.openvino",
                 "executorch.backends.openvino.quantizer"):
        sys.modules.setdefault(name, types.ModuleType(name))
    for name in ("observers", "quantizer"):
        full = f"executorch.backends.openvino.quantizer.{name}"
        spec = importlib.util.spec_from_file_location(full, root / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
    return sys.modules["executorch.backends.openvino.quantizer.quantizer"].OpenVINOQuantizer


def ov_pt2e(model, inputs, tmp: Path, quantizer_cls, *, nncf_calibration: bool):
    """The pt2e flow with OpenVINOQuantizer → an OpenVINO IR in `tmp`; its path."""
    import nncf
    import openvino as ov
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    example = example_batch(inputs.data)
    gm = export_program(model, example).module()
    batches = list(calibration_batches(inputs.data, 32, 64, inputs.seed))
    if nncf_calibration:
        from nncf.experimental.torch.fx import quantize_pt2e
        converted = quantize_pt2e(gm, quantizer_cls(), nncf.Dataset(batches),
                                  subset_size=len(batches), fold_quantize=False)
    else:
        prepared = prepare_pt2e(gm, quantizer_cls())
        with torch.no_grad():
            for batch in batches:
                prepared(batch)
        converted = convert_pt2e(prepared, fold_quantize=False)
    # Unfolded (float weights + quantize/dequantize): OpenVINO's torch frontend fails on the
    # int8 weight constants of a folded graph (openvino 2026.4, "Arguments do not have the
    # same element type") and fuses the q/dq pattern into int8 kernels itself.
    program = export_program(converted, example)
    xml = tmp / f"pt2e_{'nncf' if nncf_calibration else 'torchao'}.xml"
    ba.save_openvino(ov.convert_model(program), xml, {})
    return xml


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("nncf").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    flows = args.flows.split(",")
    float_model = load_model(Path(args.model))[0].eval()
    config = validate(compose(["+experiment=cifar10_baseline", f"dataset.root={args.data}",
                               "train.tta=none", f"hardware.threads={args.threads}"]))
    config.hardware.setup(config.run.seed)
    data = config.dataset.load(seed=config.run.seed)
    models, top1, seconds = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inputs = stage_inputs(config, "quantize", tmp, data, fingerprint="bench_int8")
        top1["fp32 torch"] = inputs.evaluate(float_model, hw=plain_cpu())["accuracy"]
        models["fp32 torch"] = Compiled(float_model, dynamic=False)
        export_onnx(float_model, example_batch(data), tmp / "fp32.onnx")
        models["fp32 ort"] = backends.load(tmp / "fp32.onnx", "onnxruntime", args.threads)
        models["fp32 ov"] = backends.load(tmp / "fp32.onnx", "openvino", args.threads)
        for name in ("fp32 ort", "fp32 ov"):
            top1[name] = inputs.evaluate(models[name], hw=plain_cpu())["accuracy"]
        methods = {"ptq": Int8PTQ(), "ort": Int8OnnxRuntime(),
                   "ort_s8": Int8OnnxRuntime(activation_type="int8"), "ov": Int8OpenVINO(),
                   "ov_fbc": Int8OpenVINO(bias_correction="fast")}
        for flow in flows:
            t0 = time.perf_counter()
            if flow in methods:
                result = methods[flow](float_model, inputs)
                model, top1[flow] = result.model, result.accuracy
                if flow == "ptq":  # static shapes, as bench_quant.py times it
                    model = Compiled(result.model, result.deploy.compile_options, dynamic=False)
            else:
                xml = ov_pt2e(float_model, inputs, tmp, openvino_quantizer(args.executorch_dir),
                              nncf_calibration=flow == "ov_pt2e_nncf")
                model = backends.load(xml, "openvino", args.threads)
                top1[flow] = inputs.evaluate(model, hw=plain_cpu())["accuracy"]
            seconds[flow] = time.perf_counter() - t0
            models[flow] = model
            print(f"{flow}: top-1 {100 * top1[flow]:.2f}% ({seconds[flow]:.0f} s)", flush=True)
        latency = {}
        for batch in (1, 64):
            timed = measure_interleaved(models, torch.randn(batch, 3, 32, 32), warmup=5,
                                        iters=args.iters if batch == 1 else args.iters // 4,
                                        rounds=5)
            latency[batch] = {k: v["latency_ms_p50"] for k, v in timed.items()}
    print(f"\n{args.threads} thread(s); top-1 on the {len(data.test_y)} test images, no TTA")
    print(f"{'flow':<14}{'top-1 %':>9}{'bs1 ms':>9}{'bs64 ms':>9}")
    for name in models:
        print(f"{name:<14}{100 * top1[name]:>9.2f}{latency[1][name]:>9.2f}"
              f"{latency[64][name]:>9.1f}")
    print(f"({time.perf_counter() - t_start:.0f} s)")
    if args.out:
        args.out.write_text(json.dumps({"top1": top1, "latency_ms_p50": latency,
                                        "quantize_seconds": seconds, "threads": args.threads},
                                       indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
