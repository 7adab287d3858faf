"""What each augmentation option costs on this machine: images/s of the training loader
(gather, op policy, normalize, crop/flip/cutout, mix) per option in configs/augmentation, on
CIFAR-size (32 px) uint8 images, against `standard`.

Every option runs one pass over the same images per round, in a new random order each round,
so a change in machine load hits them all alike. Reported per option: median images/s over
rounds by wall clock and by process CPU time, the ratio to `standard` by CPU time (median of
the per-round ratios, with its min-max spread; CPU time is the steadier figure on a shared
core), and, with --train-steps, what the option adds over `none` per image as a share of a
ResNet-20 fp32 training step's CPU time per image (measured in the same process).

  python scripts/bench_augment.py                       # 1 thread, batch 512, 5 rounds
  python scripts/bench_augment.py --threads 2 --rounds 7 --train-steps 3
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from effrun.data import BatchLoader, SyntheticData
from effrun.models import CifarResNet
from effrun.schema import build_node, config_dir, load_option


def options() -> list[str]:
    return sorted(p.stem for p in (Path(config_dir()) / "augmentation").glob("*.yaml"))


def one_pass(name: str, loader: BatchLoader) -> tuple[float, float]:
    """(wall s, process CPU s) of one pass over the loader."""
    t0, c0 = time.perf_counter(), time.process_time()
    for _batch in loader:
        pass
    return time.perf_counter() - t0, time.process_time() - c0


def train_step_seconds(batch: int, steps: int) -> float:
    """Process CPU seconds per image of a ResNet-20 fp32 training step (forward, backward,
    SGD)."""
    model = CifarResNet(depth=20).build(10).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    times = []
    for _ in range(steps + 1):  # the first step warms up
        t0 = time.process_time()
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.process_time() - t0)
    return statistics.median(times[1:]) / batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-steps", type=int, default=0,
                        help="also time this many ResNet-20 training steps at --batch")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = SyntheticData(num_train=args.images, num_test=10, image_size=32).load(seed=0)
    names = options()
    loaders = {name: BatchLoader(data.train_x, data.train_y, args.batch, mean=data.mean,
                                 std=data.std, shuffle=True, drop_last=True, seed=0,
                                 augment=build_node(load_option("augmentation", name), name),
                                 num_classes=data.num_classes)
               for name in names}
    images = len(loaders["none"]) * args.batch
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    order = random.Random(0)
    for name in names:  # warm-up pass (first-call allocations, lazy imports)
        one_pass(name, loaders[name])
    for _ in tqdm(range(args.rounds), desc="rounds"):
        order.shuffle(names)
        for name in names:
            w, c = one_pass(name, loaders[name])
            wall[name].append(images / w)
            cpu[name].append(images / c)
    step = train_step_seconds(args.batch, args.train_steps) if args.train_steps else None
    report(sorted(names), wall, cpu, step, args)


def report(names: list[str], wall: dict, cpu: dict, step: float | None, args) -> None:
    print(f"{torch.get_num_threads()} thread(s), batch {args.batch}, 32x32 uint8, "
          f"{args.rounds} rounds; torch {torch.__version__}")
    header = f"{'option':<15} {'img/s wall':>11} {'img/s cpu':>10} {'vs standard':>12} " \
             f"{'spread':>13}"
    if step is not None:
        header += f" {'+ step time':>12}"
        print(f"ResNet-20 fp32 training step: {1 / step:.0f} img/s by CPU time (median of "
              f"{args.train_steps} steps)")
    print(header)
    none_s = 1 / statistics.median(cpu["none"])
    for name in names:
        ratios = [c / s for c, s in zip(cpu[name], cpu["standard"], strict=True)]
        line = (f"{name:<15} {statistics.median(wall[name]):>11.0f} "
                f"{statistics.median(cpu[name]):>10.0f} {statistics.median(ratios):>11.2f}x "
                f"{min(ratios):>6.2f}-{max(ratios):.2f}")
        if step is not None:
            extra = 1 / statistics.median(cpu[name]) - none_s
            line += f" {100 * extra / step:>11.1f}%"
        print(line)


if __name__ == "__main__":
    main()
