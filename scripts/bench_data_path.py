"""The streaming data path (dataset.loader=stream) against the memory path: memory and speed.

1. Peak RSS of one streaming epoch over a generated ImageFolder tree of N and 2N JPEGs
   (default 20,000 and 40,000 at 128 px, 10 classes; the 2N tree hard-links the N tree's files
   and adds as many), each in a fresh subprocess: the main process's peak (ru_maxrss) and the
   largest worker's (RUSAGE_CHILDREN). Streaming holds no train split, so it should stay flat.
2. Throughput (img/s) on the JPEG CIFAR-10 copy ($EFFRUN_CIFAR10_JPEG): the memory path
   (BatchLoader over the cached uint8 tensors) and the stream path (2 worker processes decoding
   per sample), both with the standard augmentation (crop 4 + flip) on the CPU, in one process,
   interleaved over `--rounds` rounds of `--images` images; prints every round and the spread.

Generated trees and decode caches live under --work (default /tmp/effrun-bench-data), reused
by later runs. Run: .venv/bin/python scripts/bench_data_path.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from effrun.data import Augmentation, ImageFolderData
from effrun.data.stream import train_loader

CLASSES = 10
TEST_PER_CLASS = 100


def write_jpegs(root: Path, split: str, start: int, count: int, size: int) -> None:
    """`count` JPEGs per split, numbered from `start`, spread over the classes: a class colour
    with a lighter square at a random place (cheap to make, not all alike)."""
    from torchvision.io import encode_jpeg

    gen = torch.Generator().manual_seed(start)
    colours = torch.randint(30, 200, (CLASSES, 3, 1, 1), generator=torch.Generator().manual_seed(0))
    for k in range(CLASSES):
        (root / split / f"c{k}").mkdir(parents=True, exist_ok=True)
    for i in range(start, start + count):
        k = i % CLASSES
        image = colours[k].expand(3, size, size).clone().to(torch.uint8)
        top, left = torch.randint(0, size // 2, (2,), generator=gen).tolist()
        image[:, top:top + size // 2, left:left + size // 2] += 50
        data = encode_jpeg(image, quality=85).numpy().tobytes()
        (root / split / f"c{k}" / f"{i:06d}.jpg").write_bytes(data)


def tree_of(work: Path, n: int, size: int, base: Path | None = None) -> Path:
    """A tree with n train images (and CLASSES x TEST_PER_CLASS test ones); with `base` (a tree
    of n // 2), its files are hard-linked and n // 2 more written."""
    root = work / f"tree-{n}-{size}px"
    if (root / "done").is_file():
        return root
    t0 = time.perf_counter()
    if base is None:
        write_jpegs(root, "train", 0, n, size)
        write_jpegs(root, "test", 0, CLASSES * TEST_PER_CLASS, size)
    else:
        for path in base.rglob("*.jpg"):
            target = root / path.relative_to(base)
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                os.link(path, target)
        write_jpegs(root, "train", n // 2, n - n // 2, size)
    (root / "done").write_text("")
    print(f"generated {root} in {time.perf_counter() - t0:.0f} s", flush=True)
    return root


def stream_epoch(root: str, cache: str, crop: int, workers: int, batch: int) -> None:
    """One streaming epoch (subprocess entry): prints JSON with the peaks and the throughput."""
    data = ImageFolderData(root=root, loader="stream", crop_size=crop, workers=workers,
                           cache_dir=cache).load(seed=0)
    loader = train_loader(data, batch, augment=Augmentation(flip=True),
                          device=torch.device("cpu"), channels_last=False, seed=0)
    t0, seen = time.perf_counter(), 0
    for _, labels in loader:
        seen += len(labels)
    seconds = time.perf_counter() - t0
    del loader  # its worker processes end and are waited for: RUSAGE_CHILDREN counts them
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"images": seen, "seconds": seconds, "main_mib": kib / 1024,
                      "worker_mib": child_kib / 1024}))


def measure_rss(work: Path, args: argparse.Namespace) -> None:
    small = tree_of(work, args.n, args.size)
    large = tree_of(work, 2 * args.n, args.size, base=small)
    rows = []
    for root in (small, large):
        cmd = [sys.executable, __file__, "--stream-epoch", str(root), "--work", str(work),
               "--crop", str(args.crop), "--workers", str(args.workers)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"\npeak RSS of one streaming epoch ({args.size} px JPEGs, random resized crops "
          f"{args.crop}², batch {args.batch}, {args.workers} workers)")
    print(f"{'train images':>12} {'main MiB':>9} {'worker MiB':>10} {'img/s':>7}")
    for row in rows:
        print(f"{row['images']:>12,} {row['main_mib']:>9.0f} {row['worker_mib']:>10.0f} "
              f"{row['images'] / row['seconds']:>7.0f}")
    print(f"2N / N: main {rows[1]['main_mib'] / rows[0]['main_mib']:.3f}x, largest worker "
          f"{rows[1]['worker_mib'] / rows[0]['worker_mib']:.3f}x")


def one_round(loader, images: int) -> float:
    """img/s over the first `images` images of a fresh pass."""
    t0, seen = time.perf_counter(), 0
    for _, labels in loader:
        seen += len(labels)
        if seen >= images:
            break
    return seen / (time.perf_counter() - t0)


def measure_throughput(cifar: Path, work: Path, args: argparse.Namespace) -> None:
    aug = Augmentation(crop_padding=4, flip=True)
    loaders = {}
    for kind in ("memory", "stream"):
        t0 = time.perf_counter()
        data = ImageFolderData(root=str(cifar), loader=kind, workers=args.workers,
                               cache_dir=str(work / "cache")).load(seed=0)
        loaders[kind] = train_loader(data, args.batch, augment=aug, device=torch.device("cpu"),
                                     channels_last=False, seed=0)
        print(f"{kind}: data ready in {time.perf_counter() - t0:.1f} s", flush=True)
    rates: dict[str, list[float]] = {kind: [] for kind in loaders}
    for _ in range(args.rounds):  # interleaved: load changes on this shared machine hit both
        for kind, loader in loaders.items():
            rates[kind].append(one_round(loader, args.images))
    print(f"\nthroughput on {cifar} (32 px JPEGs, batch {args.batch}, crop 4 + flip on the "
          f"CPU; stream: {args.workers} workers), {args.rounds} interleaved rounds of "
          f"{args.images:,} images")
    print(f"{'path':>7} {'median img/s':>13} {'min':>8} {'max':>8}   rounds")
    for kind, values in rates.items():
        print(f"{kind:>7} {statistics.median(values):>13,.0f} {min(values):>8,.0f} "
              f"{max(values):>8,.0f}   {', '.join(f'{v:,.0f}' for v in values)}")
    ratio = statistics.median(rates["memory"]) / statistics.median(rates["stream"])
    print(f"memory / stream: {ratio:.1f}x (medians)")


def machine() -> str:
    flags = set()
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in flags]
    return (f"{model}, {os.cpu_count()} cores, {' '.join(isa)}; load average "
            f"{os.getloadavg()[0]:.1f} (shared with other work)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/effrun-bench-data")
    parser.add_argument("--n", type=int, default=20_000, help="images of the smaller tree")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--crop", type=int, default=112)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=20_000, help="per throughput round")
    parser.add_argument("--cifar", default=os.environ.get("EFFRUN_CIFAR10_JPEG"))
    parser.add_argument("--stream-epoch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work)
    if args.stream_epoch:
        stream_epoch(args.stream_epoch, str(work / "cache"), args.crop, args.workers,
                     args.batch)
        return
    print(machine(), flush=True)
    measure_rss(work, args)
    if args.cifar:
        measure_throughput(Path(args.cifar), work, args)
    else:
        print("throughput skipped: set EFFRUN_CIFAR10_JPEG or --cifar to the JPEG CIFAR-10 copy")
    print(machine())


if __name__ == "__main__":
    main()
