"""Deployment runtimes side by side: torch (eager, compiled), effrun's int8, ONNX Runtime and
OpenVINO, fp32 and int8, and the channel-pruned model on each (issue 12, item 5).

    python scripts/bench_backends.py --data $EFFRUN_CIFAR10_JPEG [--epochs 4] [--threads 1 2]
        [--rounds 5] [--work outputs/bench_backends] [--out result.json]

Models come from effrun itself, through the stage cache (a rerun reuses them): a ResNet-20
trained `--epochs` on CIFAR-10 (cifar10_baseline's recipe) and exported to ONNX / OpenVINO IR;
its channel-pruned child (half the MACs, one fine-tuning epoch); and its int8 forms made by each
quantize method (int8_ptq: torch pt2e + Inductor; int8_onnxruntime: static QDQ per-channel;
int8_openvino: NNCF), all calibrated on the same 2,048 training images.

Top-1 is each form's own, on the 10,000 test images, as deployed. Latency: at each thread count
and batch size every form is timed in each of `--rounds` rounds, one after the other (one
measure_interleaved call per round), so load on this shared machine hits them all alike; the
table gives the median over rounds of each form's p50 and its ratio to effrun's compiled fp32 in
the same round (median, min-max over rounds).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
from pathlib import Path

import torch

from effrun import backends, pipeline
from effrun.artifacts import load_model
from effrun.compile import Compiled
from effrun.compression.quantize.common import COMPILE_OPTIONS
from effrun.evaluate import evaluate
from effrun.hardware import Hardware
from effrun.measure import measure_interleaved, set_threads
from effrun.schema import compose

FP32 = Hardware(device="cpu", precision="fp32", channels_last=False)
BASELINE = "effrun compiled fp32"
QUANTIZERS = ("int8_ptq", "int8_onnxruntime", "int8_openvino")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.environ.get("EFFRUN_CIFAR10_JPEG"),
                   help="CIFAR-10 (ImageFolder train/ test/ or torchvision layout)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--init-from", type=Path,
                   help="a trained ResNet-20 model.pt to use instead of training one")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--methods", nargs="+", default=list(QUANTIZERS))
    p.add_argument("--work", type=Path, default=Path("outputs/bench_backends"))
    p.add_argument("--out", type=Path, help="also write the figures as JSON here")
    return p.parse_args()


def make_models(args) -> dict[str, Path]:
    """{stage name: stage dir} of the trained, pruned and quantized models (stage cache)."""
    os.environ.setdefault("EFFRUN_STAGE_CACHE_DIR", str(args.work / "cache"))
    base = ["+experiment=cifar10_baseline", f"dataset.root={args.data}", "hardware=cpu",
            f"train.epochs={args.epochs}", "export=[onnx,openvino]"]
    if args.init_from:  # its train stage, 0 epochs, rewrites it with its exports
        base += [f"init_from={args.init_from.resolve()}", "train.epochs=0"]
    dirs = {}
    pipeline.run(compose([*base, "stages=[train,prune]", "compression/prune=channel",
                          "compression.prune.target_macs_ratio=0.5",
                          "compression.prune.finetune_epochs=1"]), args.work / "float")
    dirs["train"], dirs["prune"] = args.work / "float/01_train", args.work / "float/02_prune"
    for method in args.methods:
        quantize = [a for a in base if not a.startswith("init_from=")]
        pipeline.run(compose([*quantize, "stages=[quantize]", f"compression/quantize={method}",
                              f"resume_from={dirs['train']}"]), args.work / method)
        dirs[method] = args.work / method / "04_quantize"
    return dirs


def forms(dirs: dict[str, Path], threads: int) -> dict[str, tuple]:
    """{row name: (callable, takes channels_last input)} at `threads` threads."""
    out = {}
    fp32 = load_model(dirs["train"] / "model.pt")[0].eval()
    out["torch eager fp32"] = fp32
    out[BASELINE] = Compiled(fp32, {"freezing": True})
    out["effrun compiled fp32 + cpp wrapper"] = Compiled(fp32, {"freezing": True,
                                                               "cpp_wrapper": True})
    out["ONNX Runtime fp32"] = backends.load(dirs["train"] / "model_fp32.onnx", "onnxruntime",
                                             threads)
    out["OpenVINO fp32"] = backends.load(dirs["train"] / "model_openvino.xml", "openvino", threads)
    if "int8_ptq" in dirs:
        int8 = load_model(dirs["int8_ptq"] / "model.pt2")[0]
        out["effrun int8 (pt2e + Inductor)"] = Compiled(int8, COMPILE_OPTIONS)
    if "int8_onnxruntime" in dirs:
        out["ONNX Runtime int8 (static QDQ)"] = backends.load(
            dirs["int8_onnxruntime"] / "model_int8.onnx", "onnxruntime", threads)
    if "int8_openvino" in dirs:
        out["OpenVINO int8 (NNCF)"] = backends.load(
            dirs["int8_openvino"] / "model_int8_openvino.xml", "openvino", threads)
    pruned = load_model(dirs["prune"] / "model.pt")[0].eval()
    out["pruned: effrun compiled fp32"] = Compiled(pruned, {"freezing": True})
    out["pruned: ONNX Runtime fp32"] = backends.load(dirs["prune"] / "model_fp32.onnx",
                                                     "onnxruntime", threads)
    out["pruned: OpenVINO fp32"] = backends.load(dirs["prune"] / "model_openvino.xml",
                                                 "openvino", threads)
    return out


def top1(models: dict, data) -> dict[str, float]:
    """Each form's top-1 on the test split (compiled forms scored at a fixed batch, padded)."""
    out = {}
    for name, model in models.items():
        if name == "effrun compiled fp32 + cpp wrapper":
            continue  # the same graph as the compiled fp32 row
        out[name] = evaluate(model, data.test_x, data.test_y, data, FP32, batch_size=500,
                             pad_last=True)["accuracy"]
        logging.info("top-1 %-34s %.2f%%", name, 100 * out[name])
    out["effrun compiled fp32 + cpp wrapper"] = out[BASELINE]
    return out


def time_rounds(models: dict, batch: int, rounds: int, image_size) -> dict[str, dict]:
    """Median p50 over rounds and the per-round ratio to the baseline (median, min, max)."""
    x = torch.randn(batch, 3, *image_size)
    iters = 20 if batch == 1 else 4
    p50s: dict[str, list[float]] = {name: [] for name in models}
    for r in range(rounds):
        timed = measure_interleaved(models, x, warmup=5 if r == 0 else 1, iters=iters,
                                    rounds=1)
        for name, m in timed.items():
            p50s[name].append(m["latency_ms_p50"])
    base = p50s[BASELINE]
    out = {}
    for name, values in p50s.items():
        ratios = [v / b for v, b in zip(values, base, strict=True)]
        out[name] = {"ms": statistics.median(values), "ratio": statistics.median(ratios),
                     "ratio_min": min(ratios), "ratio_max": max(ratios)}
    return out


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.data:
        raise SystemExit("--data (or EFFRUN_CIFAR10_JPEG) must name the CIFAR-10 copy")
    dirs = make_models(args)
    from effrun.schema import validate
    config = validate(compose(["+experiment=cifar10_baseline", f"dataset.root={args.data}"]))
    data = config.dataset.load(seed=0)
    flags = sorted(f for f in ("avx2", "avx512_vnni", "avx512_bf16", "amx_int8")
                   if f in Path("/proc/cpuinfo").read_text())
    print(f"CPU flags: {', '.join(flags)}; {os.cpu_count()} cores; torch {torch.__version__}")
    accuracy = top1(forms(dirs, torch.get_num_threads()), data)
    results = {"accuracy": accuracy, "latency": {}}
    for threads in args.threads:
        with set_threads(threads):
            models = forms(dirs, threads)
            for batch in args.batch_sizes:
                timed = time_rounds(models, batch, args.rounds, data.image_size)
                results["latency"][f"{threads}x{batch}"] = timed
    print_table(results, args)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


def print_table(results: dict, args) -> None:
    points = list(results["latency"])
    header = "| system | top-1 | " + " | ".join(
        f"{p.split('x')[0]} thr bs {p.split('x')[1]}: ms (ratio, min-max)" for p in points)
    print(header + " |")
    print("|---|---|" + "---|" * len(points))
    for name, acc in results["accuracy"].items():
        cells = []
        for p in points:
            t = results["latency"][p][name]
            cells.append(f"{t['ms']:.3f} ({t['ratio']:.2f}, {t['ratio_min']:.2f}-"
                         f"{t['ratio_max']:.2f})")
        print(f"| {name} | {100 * acc:.2f}% | " + " | ".join(cells) + " |")
    print(f"ratio = latency / {BASELINE} in the same round; {args.rounds} rounds")


if __name__ == "__main__":
    main()
