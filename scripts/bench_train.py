"""How fast effrun trains, against hand-written code and against the published figures.

  overhead  effrun's train loop (effrun.train.fit) against a minimal hand-written PyTorch loop
            doing the same work (same cached tensors, model, init, batch size, precision,
            optimizer, schedule, augmentation, label smoothing, lookahead), interleaved in one
            process; prints fit/hand time ratios per round, their median and spread.
  run       a whole recipe (cifar10_airbench, cifar10_baseline) on real data: seconds per epoch,
            test accuracy with and without TTA. Reads a finished run dir instead of training
            unless --retrain.
  floor     the least time any fp32 implementation of a recipe can take here: its training and
            TTA-eval FLOPs (counted) over this machine's measured fp32 matmul peak.

  OMP_NUM_THREADS=1 taskset -c 1 python scripts/bench_train.py overhead --rounds 5
  python scripts/bench_train.py run cifar10_airbench --run-dir outputs/cifar10_airbench/bench
  python scripts/bench_train.py run cifar10_baseline --run-dir outputs/cifar10_baseline/main
  python scripts/bench_train.py floor cifar10_airbench hardware.threads=2
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from effrun import pipeline
from effrun.artifacts import load_model, read_json
from effrun.data import sample_indices
from effrun.evaluate import evaluate, tta_views
from effrun.schema import EffrunConfig, compose, validate
from effrun.train import fit

CIFAR10 = str(Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpeg")


def resolved(experiment: str, overrides: list[str]) -> EffrunConfig:
    return validate(compose([f"+experiment={experiment}", *overrides]))


# ------------------------------------------------------------------ (a) runner overhead


def hand_written_epochs(model: nn.Module, config: EffrunConfig, x, y, test_x, test_y,
                        data) -> float:
    """The whole recipe as plain PyTorch, then a test pass; returns test accuracy."""
    hw, train, aug = config.hardware, config.run.train, config.augmentation
    fmt = hw.memory_format
    model = model.to(memory_format=fmt)
    opt = config.optimizer.build(model, batch_size=train.batch_size)
    steps_per_epoch = len(x) // train.batch_size
    total = steps_per_epoch * train.epochs
    sched = config.optimizer.scheduler(opt, total, steps_per_epoch)
    scale = (1 / (255 * torch.tensor(data.std))).view(1, 3, 1, 1)
    shift = (-torch.tensor(data.mean) / torch.tensor(data.std)).view(1, 3, 1, 1)
    avg = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    base_flip = torch.rand(len(x), generator=torch.Generator().manual_seed(0)) < 0.5
    step = 0
    for epoch in range(train.epochs):
        if hasattr(model, "on_epoch_start"):
            model.on_epoch_start(epoch)
        model.train()
        order = torch.randperm(len(x))
        for i in range(steps_per_epoch):
            idx = order[i * train.batch_size:(i + 1) * train.batch_size]
            inputs = x[idx].float() * scale + shift
            if aug.crop_padding:
                inputs = random_crop(inputs, aug.crop_padding)
            if aug.flip:
                flip = (base_flip[idx] ^ bool(epoch % 2) if aug.alternate_flip
                        else torch.rand(len(idx)) < 0.5)
                inputs = torch.where(flip[:, None, None, None], inputs.flip(-1), inputs)
            inputs = inputs.contiguous(memory_format=fmt)
            with hw.autocast():
                logits = model(inputs)
            loss = F.cross_entropy(logits.float(), y[idx], label_smoothing=train.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if train.lookahead_every and (step % train.lookahead_every == 0 or step == total):
                with torch.no_grad():
                    d = 1.0 if step == total else train.lookahead_decay * (step / total) ** 3
                    live = model.state_dict()
                    for k, v in avg.items():
                        v.lerp_(live[k], 1 - d)
                        live[k].copy_(v)
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(test_x), train.eval_batch_size):
            batch = test_x[start:start + train.eval_batch_size].float() * scale + shift
            with hw.autocast():
                logits = model(batch.contiguous(memory_format=fmt))
            correct += int((logits.argmax(1) == test_y[start:start + len(batch)]).sum())
    return correct / len(test_x)


def random_crop(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Random translation by up to `pad` px: one slice per distinct offset, not a gather."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad,) * 4, mode="reflect")
    offsets = torch.randint(0, (2 * pad + 1) ** 2, (n,))
    out = torch.empty_like(x)
    for o in offsets.unique().tolist():
        sel = (offsets == o).nonzero().squeeze(1)
        dy, dx = divmod(o, 2 * pad + 1)
        out[sel] = padded[sel, :, dy:dy + h, dx:dx + w]
    return out


def overhead(args) -> None:
    config = resolved(args.experiment, [f"dataset.root={args.data}", f"hardware={args.hardware}",
                                        f"train.epochs={args.epochs}", "train.tta=none",
                                        "train.eval_every=0", *args.overrides])
    config.hardware.setup(0)
    full = config.dataset.load(seed=0)
    pick = sample_indices(len(full.train_y), args.train_images, seed=0)
    data = copy.copy(full)
    data.train_x, data.train_y = full.train_x[pick], full.train_y[pick]
    # Random subsets: image trees are stored class by class.
    pick = sample_indices(len(full.test_y), args.test_images, seed=1)
    data.test_x, data.test_y = full.test_x[pick], full.test_y[pick]
    model = config.model.build(num_classes=data.num_classes)
    pipeline.init_from_data(model, data, seed=0)
    hw = config.hardware
    print(f"{args.experiment}: {type(model).__name__}, {len(data.train_y)} train / "
          f"{len(data.test_y)} test images, batch {config.run.train.batch_size}, "
          f"{args.epochs} epochs, precision {hw.resolved_precision}, channels_last "
          f"{hw.channels_last}, threads {torch.get_num_threads()}")
    ratios, cpu_ratios = [], []
    for rnd in range(args.rounds):
        times, cpu = {}, {}
        # ABBA order: a drift in machine load hits both sides alike.
        for side in (("fit", "hand") if rnd % 2 == 0 else ("hand", "fit")):
            m = copy.deepcopy(model)
            t0, c0 = time.perf_counter(), time.process_time()
            if side == "fit":
                with tempfile.TemporaryDirectory() as tmp:
                    acc = fit(m, data, hw=config.hardware, train=config.run.train,
                              optimizer=config.optimizer, augment=config.augmentation,
                              checkpoint=Path(tmp) / "ckpt.pt",
                              seed=0)["test_accuracy"]
            else:
                acc = hand_written_epochs(m, config, data.train_x, data.train_y, data.test_x,
                                          data.test_y, data)
            times[side], cpu[side] = time.perf_counter() - t0, time.process_time() - c0
            print(f"  round {rnd + 1} {side:4s} {times[side]:7.2f}s wall {cpu[side]:7.2f}s cpu"
                  f"  test acc {acc:.3f}", flush=True)
        ratios.append(times["fit"] / times["hand"])
        cpu_ratios.append(cpu["fit"] / cpu["hand"])
    # CPU time is what the process itself spent: on a shared core it is far steadier than wall.
    for name, values in (("wall", ratios), ("cpu", cpu_ratios)):
        print(f"fit / hand-written {name} time: median {statistics.median(values):.3f}, "
              f"min {min(values):.3f}, max {max(values):.3f} over {len(values)} rounds "
              f"({', '.join(f'{x:.3f}' for x in values)})")


# ------------------------------------------------------------------ (b), (c) whole recipes


def run(args) -> None:
    run_dir = Path(args.run_dir or f"outputs/{args.experiment}/bench")
    train_dir = pipeline.stage_dir_for(run_dir, "train")
    overrides = [f"dataset.root={args.data}", f"hardware={args.hardware}", "stages=[train]",
                 *args.overrides]
    config = resolved(args.experiment, overrides)
    if args.retrain or not (train_dir / "stage.json").exists():
        if (train_dir / "stage.json").exists():  # keep the finished run; train next to it
            run_dir = run_dir.with_name(f"{run_dir.name}_retrain_{time.strftime('%H%M%S')}")
            train_dir = pipeline.stage_dir_for(run_dir, "train")
        cfg = compose([f"+experiment={args.experiment}", *overrides])
        t0 = time.perf_counter()
        pipeline.run(cfg, run_dir)
        print(f"trained in {time.perf_counter() - t0:.0f}s wall (data, train, final eval)")
    report(config, run_dir, train_dir)


def report(config: EffrunConfig, run_dir: Path, train_dir: Path) -> None:
    metrics = read_json(train_dir / "metrics.json")
    stage = read_json(train_dir / "stage.json")
    epochs = [h["seconds"] for h in metrics["history"]]
    tta = stage["config"]["train"].get("tta", "none")
    config.hardware.setup(0)
    data = config.dataset.load(seed=0)
    model, _ = load_model(train_dir / "model.pt")
    model = config.hardware.prepare(model)
    plain = evaluate(model, data.test_x, data.test_y, data, config.hardware)["accuracy"]
    out = {"run_dir": str(run_dir), "epochs": len(epochs),
           "seconds_per_epoch": statistics.mean(epochs), "train_seconds": sum(epochs),
           "cpu_seconds_per_epoch": statistics.mean(h.get("cpu_seconds", float("nan"))
                                                    for h in metrics["history"]),
           "stage_seconds": stage["seconds"], "test_accuracy_no_tta": plain,
           f"test_accuracy_tta_{tta}": metrics["test_accuracy"],
           "images_per_s_last_epoch": metrics.get("images_per_s")}
    print(json.dumps(out, indent=2))


# ------------------------------------------------------------------ the compute floor


def matmul_peak_flops(threads: int, size: int = 2048, repeats: int = 20) -> float:
    """Best fp32 FLOP/s of a square matmul, the most efficient kernel the CPU runs."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def floor(args) -> None:
    config = resolved(args.experiment, ["dataset=synthetic", f"hardware={args.hardware}",
                                   *args.overrides])
    config.hardware.setup(0)
    train = config.run.train
    model = config.model.build(num_classes=10)
    x = torch.randn(64, 3, 32, 32)
    counter = FlopCounterMode(display=False)
    with counter:  # forward and backward as training runs them (frozen weights get no grads)
        F.cross_entropy(model.train()(x), torch.zeros(64, dtype=torch.long)).backward()
    train_flops = counter.get_total_flops() / 64
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(x)
    views = len(tta_views(x, train.tta))
    eval_flops = counter.get_total_flops() / 64 * views
    peak = matmul_peak_flops(torch.get_num_threads())
    epoch_s = args.train_images * train_flops / peak
    eval_s = args.test_images * eval_flops / peak
    total = train.epochs * epoch_s + eval_s
    print(f"{args.experiment}: {train_flops / 1e9:.3f} GFLOP per training image (forward + "
          f"backward), {eval_flops / 1e9:.3f} GFLOP per test image ({views} TTA views)")
    print(f"fp32 matmul peak, {torch.get_num_threads()} threads: {peak / 1e9:.1f} GFLOP/s")
    print(f"floor at that peak: {epoch_s:.0f} s per epoch of {args.train_images} images "
          f"({args.train_images / epoch_s:.0f} img/s), {train.epochs} epochs + TTA eval = "
          f"{total:.0f} s ({total / 60:.1f} min)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="mode", required=True)
    o = sub.add_parser("overhead", help="fit() against a hand-written loop, interleaved")
    o.add_argument("--experiment", default="cifar10_airbench")
    o.add_argument("--rounds", type=int, default=5)
    o.add_argument("--epochs", type=int, default=2)
    o.add_argument("--train-images", type=int, default=4096)
    o.add_argument("--test-images", type=int, default=1000)
    w = sub.add_parser("run", help="a whole recipe: seconds/epoch and accuracy")
    w.add_argument("experiment")
    w.add_argument("--run-dir", help="a run dir to read (or to train into)")
    w.add_argument("--retrain", action="store_true", help="train even if --run-dir is finished")
    fl = sub.add_parser("floor", help="the recipe's FLOPs over the measured matmul peak")
    fl.add_argument("experiment")
    fl.add_argument("--train-images", type=int, default=50000)
    fl.add_argument("--test-images", type=int, default=10000)
    for sp in (o, w, fl):
        sp.add_argument("--data", default=CIFAR10, help="CIFAR-10 root (tree or torchvision)")
        sp.add_argument("--hardware", default="cpu")
        sp.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. train.epochs=2")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    {"overhead": overhead, "run": run, "floor": floor}[args.mode](args)


if __name__ == "__main__":
    main()
