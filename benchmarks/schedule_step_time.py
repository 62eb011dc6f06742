"""Step time of sm3fn.optim.SM3 under a scheduler that changes momentum every step (issue 15).

    python -m benchmarks.schedule_step_time            # a few seconds

``OneCycleLR`` (``cycle_momentum=True``) writes a new ``group["momentum"]``
every step; ``LambdaLR`` only a new lr.  Both read their hyperparameters at
run time in the fused kernel, so their step times should match (before,
every new momentum built a kernel: about 2 s a step).  Steps of the two
optimizers are interleaved on one thread; printed: median step time of
each, the median of the per-round ratio OneCycleLR / LambdaLR, and how many
kernels were built after the first step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from sm3fn._kernels import fused_cpu
from sm3fn.benchmark import machine
from sm3fn.optim import SM3


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = torch.randn(64, 256), torch.randn(64, 10)
    runs = {}
    for name in ("LambdaLR", "OneCycleLR"):
        model = nn.Sequential(nn.Linear(256, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 10))
        opt = SM3(model.parameters(), lr=0.1, momentum=0.9)
        if name == "LambdaLR":
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s))
        else:
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=args.steps + 1)
        runs[name] = (model, opt, sched)

    def step(model, opt, sched):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        sched.step()

    for run in runs.values():  # the first step builds the kernels
        step(*run)
    built = len(fused_cpu._kernels)
    times = {k: [] for k in runs}
    for i in range(args.steps):
        for name in list(runs)[i % 2:] + list(runs)[: i % 2]:
            t = time.perf_counter()
            step(*runs[name])
            times[name].append(time.perf_counter() - t)
    ratio = statistics.median(a / b for a, b in zip(times["OneCycleLR"], times["LambdaLR"]))
    out = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    print(f"machine: {machine()}")
    print(", ".join(f"{k} {v:.2f} ms/step" for k, v in out.items())
          + f"; OneCycleLR / LambdaLR = {ratio:.2f}x (median of {args.steps} interleaved rounds); "
          f"kernels built after the first step: {len(fused_cpu._kernels) - built}")
    return {"median_ms": out, "ratio": ratio, "built_after_first": len(fused_cpu._kernels) - built}


if __name__ == "__main__":
    main()
