"""What each compute-efficiency switch gives on this machine: channels_last, bf16 autocast,
torch.compile, glibc memory reuse (hardware.reuse_freed_memory), thread count, batch size, for
training steps and inference, as ratios to fp32 eager (contiguous memory, same threads and batch
size, glibc's default allocator limits); with several --threads, also each variant against itself
at the first thread count.

Every variant runs in short timed chunks, interleaved round after round, so a change in machine
load hits them all alike; a chunk runs steps until --chunk-s seconds of process CPU time passed.
Reported: median images/s over rounds by wall clock and by process CPU time (the latter is the
steadier figure on a shared core; for 2 threads it counts both threads), and the wall ratio's
spread (min-max over rounds).

The allocator setting is process-wide, and in one process each switch back makes the heap grow
again (a few steps), which understates it at small batches; `--allocator-ab` measures it cleanly:
child processes with glibc's defaults and with hardware.reuse_freed_memory, alternating, each
training one model at one batch size and thread count.

  OMP_NUM_THREADS=1 taskset -c 1 python scripts/bench_switches.py --models resnet20 airbench
  python scripts/bench_switches.py --threads 1 2        # needs two idle cores
  python scripts/bench_switches.py --allocator-ab --models resnet20 --train-batches 128 1024 \
      --threads 2 --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from effrun.hardware import keep_freed_memory
from effrun.models import Airbench, CifarResNet

MODELS = {"resnet20": lambda: CifarResNet(depth=20).build(10),
          "airbench": lambda: Airbench().build(10)}


class Variant:
    def __init__(self, name: str, model: nn.Module, *, train: bool, batch: int, threads: int,
                 channels_last: bool = False, bf16: bool = False, compile: bool = False,
                 reuse_memory: bool = False):
        self.name, self.train, self.batch, self.threads = name, train, batch, threads
        self.reuse_memory = reuse_memory
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model = copy.deepcopy(model).to(memory_format=fmt).train(train)
        self.fn = torch.compile(self.model) if compile else self.model
        self.x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=fmt)
        self.y = torch.randint(0, 10, (batch,))
        self.bf16 = bf16
        self.opt = (torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9) if train
                    else None)
        self.wall: list[float] = []  # images/s per round
        self.cpu: list[float] = []
        self.compile_s = 0.0
        if compile:
            t0 = time.perf_counter()
            self.step()
            self.step()  # the second call settles any recompilation
            self.compile_s = time.perf_counter() - t0

    def autocast(self):
        return (torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16
                else contextlib.nullcontext())

    def step(self) -> None:
        torch.set_num_threads(self.threads)
        if self.train:
            with self.autocast():
                logits = self.fn(self.x)
            loss = F.cross_entropy(logits.float(), self.y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        else:
            with torch.no_grad(), self.autocast():
                self.fn(self.x)

    def chunk(self, seconds: float) -> None:
        keep_freed_memory(self.reuse_memory)  # process-wide: set for this chunk only
        self.step()  # warm (caches, allocator) outside the timed part
        self.step()
        steps, w0, c0 = 0, time.perf_counter(), time.process_time()
        while steps == 0 or time.process_time() - c0 < seconds:
            self.step()
            steps += 1
        self.wall.append(steps * self.batch / (time.perf_counter() - w0))
        self.cpu.append(steps * self.batch / (time.process_time() - c0))
        keep_freed_memory(False)


def variants(model: nn.Module, args) -> list[Variant]:
    out = []
    for train, batch in [(True, b) for b in args.train_batches] + [(False, args.eval_batch)]:
        kind = "train" if train else "infer"
        for threads in args.threads:
            common = dict(train=train, batch=batch, threads=threads)
            out.append(Variant(f"{kind} bs{batch} t{threads} fp32 eager", model, **common))
            out.append(Variant(f"{kind} bs{batch} t{threads} channels_last", model,
                               channels_last=True, **common))
            out.append(Variant(f"{kind} bs{batch} t{threads} channels_last+reuse_memory", model,
                               channels_last=True, reuse_memory=True, **common))
            if batch == args.switch_batch or not train:
                out.append(Variant(f"{kind} bs{batch} t{threads} bf16+channels_last", model,
                                   channels_last=True, bf16=True, **common))
                if args.compile:
                    out.append(Variant(f"{kind} bs{batch} t{threads} compile+channels_last",
                                       model, channels_last=True, compile=True, **common))
    return out


def allocator_child(mode: str, model_name: str, batch: int, threads: int) -> None:
    """One process, one allocator setting for its life: prints images/s and page faults."""
    torch.set_num_threads(threads)
    if mode == "reuse":
        keep_freed_memory(True)
    v = Variant(mode, MODELS[model_name](), train=True, batch=batch, threads=threads,
                channels_last=True)
    for _ in range(8):  # the reusing heap settles within a few steps
        v.step()
    steps = max(4, 8192 // batch)
    f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    for _ in range(steps):
        v.step()
    ips = steps * batch / (time.perf_counter() - t0)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / steps
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(f"{ips} {faults} {peak_mib}")


def allocator_ab(args) -> None:
    for name in args.models:
        for batch in args.train_batches:
            for threads in args.threads:
                runs: dict[str, list] = {"default": [], "reuse": []}
                for rnd in range(args.rounds):
                    for mode in ("default", "reuse") if rnd % 2 == 0 else ("reuse", "default"):
                        out = subprocess.run(
                            [sys.executable, __file__, "--allocator-child", mode, name,
                             str(batch), str(threads)], check=True, capture_output=True,
                            text=True).stdout.split()
                        runs[mode].append([float(x) for x in out[-3:]])
                ratios = [r[0] / d[0] for r, d in zip(runs["reuse"], runs["default"], strict=True)]
                print(f"{name} train bs{batch} t{threads} channels_last: reuse_freed_memory / "
                      f"glibc default {statistics.median(ratios):.2f} [{min(ratios):.2f}-"
                      f"{max(ratios):.2f}] over {len(ratios)} rounds; img/s "
                      f"{statistics.median(r[0] for r in runs['reuse']):.0f} vs "
                      f"{statistics.median(d[0] for d in runs['default']):.0f}; page faults/step "
                      f"{statistics.median(r[1] for r in runs['reuse']):.0f} vs "
                      f"{statistics.median(d[1] for d in runs['default']):.0f}; peak RSS MiB "
                      f"{max(r[2] for r in runs['reuse']):.0f} vs "
                      f"{max(d[2] for d in runs['default']):.0f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet20", "airbench"], choices=MODELS)
    p.add_argument("--threads", nargs="+", type=int, default=[1])
    p.add_argument("--train-batches", nargs="+", type=int, default=[128, 512])
    p.add_argument("--switch-batch", type=int, default=128,
                   help="train batch size at which bf16 and compile are measured")
    p.add_argument("--eval-batch", type=int, default=500)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--chunk-s", type=float, default=3.0)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--allocator-ab", action="store_true",
                   help="only hardware.reuse_freed_memory against glibc's default, in processes")
    p.add_argument("--allocator-child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.allocator_child:
        mode, name, batch, threads = args.allocator_child
        return allocator_child(mode, name, int(batch), int(threads))
    if args.allocator_ab:
        return allocator_ab(args)
    for name in args.models:
        torch.manual_seed(0)
        vs = variants(MODELS[name](), args)
        for rnd in range(args.rounds):
            for v in vs:
                v.chunk(args.chunk_s)
            print(f"{name}: round {rnd + 1}/{args.rounds} done", flush=True)
        print(f"\n{name}: images/s by wall clock and per CPU-second; ratios to fp32 eager at "
              f"the same kind, batch and threads: median [min-max] over rounds")
        print(f"{'variant':48s} {'wall':>7s} {'cpu':>7s}  {'wall ratio':17s} {'cpu ratio':17s}"
              f" wall vs t{args.threads[0]}")
        for v in vs:
            ref = next(r for r in vs if r.train == v.train and r.batch == v.batch
                       and r.threads == v.threads and r.name.endswith("fp32 eager"))
            same = v.name.replace(f" t{v.threads} ", f" t{args.threads[0]} ")
            first = next(r for r in vs if r.name == same)
            extra = f"  (compile {v.compile_s:.0f}s)" if v.compile_s else ""
            print(f"{v.name:48s} {statistics.median(v.wall):7.1f} {statistics.median(v.cpu):7.1f}"
                  f"  {spread(v.wall, ref.wall):17s} {spread(v.cpu, ref.cpu):17s}"
                  f" {spread(v.wall, first.wall)}{extra}")


def spread(values: list[float], reference: list[float]) -> str:
    ratios = [a / b for a, b in zip(values, reference, strict=True)]
    return f"{statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]"


if __name__ == "__main__":
    main()
