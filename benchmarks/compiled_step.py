"""``torch.compile(opt.step)`` against the eager step and ``Adam(fused=True)``, with a scheduler.

    python benchmarks/compiled_step.py                  # an MLP with 1024x4096 weights (issue 19)
    python benchmarks/compiled_step.py --width 256 --repeats 11 --threads 1

Every round steps each contender once, in rotating order, after the same
gradients: SM3's eager step (the fused CPU kernel), ``torch.compile(opt.step)``
of it (one custom op, ``sm3fn::sm3_step_``), ``torch.optim.Adam(fused=True)``,
and the pure functional step ``tx.update`` + ``apply_updates`` eager and under
``torch.compile``.  The learning rate is a tensor that a scheduler changes
every round, so a compiled step that recompiled would show here (the count
of graphs compiled is printed).  Printed: milliseconds per step (median) and
each step over fused Adam's of the same round (median and IQR).  What it
prints is also saved in ``--out`` (default ``benchmarks/out/``, ignored by git)
as ``compiled_step_output.txt``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _output import DEFAULT_DIR, printed_into  # noqa: E402

import sm3fn  # noqa: E402
from sm3fn.benchmark import machine  # noqa: E402
from sm3fn.optim import SM3  # noqa: E402


def _mlp(width: int, depth: int) -> torch.nn.Module:
    layers = []
    for i in range(depth):
        layers += [torch.nn.Linear(width if i % 2 == 0 else 4 * width, 4 * width if i % 2 == 0 else width),
                   torch.nn.GELU()]
    return torch.nn.Sequential(*layers)


def _with_grads(model: torch.nn.Module) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    return model


def _quartiles(values):
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


def contenders(width: int, depth: int, momentum: float) -> dict:
    """name -> (step function, a function that sets this round's lr)."""
    torch.manual_seed(0)
    out = {}
    for name in ("SM3 eager", "SM3 compiled"):
        opt = SM3(_with_grads(_mlp(width, depth)).parameters(), lr=torch.tensor(1e-6), momentum=momentum)
        # compiled before the scheduler wraps opt.step (its wrapper is a frame dynamo skips),
        # so that the step is one graph (fullgraph)
        step = torch.compile(opt.step, fullgraph=True) if name == "SM3 compiled" else opt.step
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s % 7))
        out[name] = (step, sched.step)
    adam = torch.optim.Adam(_with_grads(_mlp(width, depth)).parameters(), lr=torch.tensor(1e-6), fused=True)
    adam_sched = torch.optim.lr_scheduler.LambdaLR(adam, lambda s: 1.0 / (1 + s % 7))
    out["Adam fused"] = (adam.step, adam_sched.step)

    model = _with_grads(_mlp(width, depth))
    params = {k: p.detach() for k, p in model.named_parameters()}
    grads = {k: p.grad for k, p in model.named_parameters()}
    lr = torch.tensor(1e-6)
    tx = sm3fn.sm3(learning_rate=lr, momentum=momentum)

    def pure(p, s):
        updates, s = tx.update(grads, s, p)
        return sm3fn.apply_updates(p, updates), s

    for name, fn in (("pure eager", pure), ("pure compiled", torch.compile(pure, fullgraph=True))):
        box = {"p": dict(params), "s": tx.init(params)}

        def step(fn=fn, box=box):
            box["p"], box["s"] = fn(box["p"], box["s"])

        out[name] = (step, lambda: lr.fill_(1e-6 * torch.rand(()).item()))
    return out


def bench(width: int, depth: int, momentum: float, repeats: int) -> tuple[dict, int]:
    # the compiled step runs opt.step as it was before the scheduler wrapped it, so the
    # scheduler warns that it was stepped first; it was not
    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
    steps = contenders(width, depth, momentum)
    for step, schedule in steps.values():  # warm-up: state, kernel builds, compiles
        for _ in range(3):
            step()
            schedule()
    graphs = counters["stats"]["unique_graphs"]
    times = {k: [] for k in steps}
    names = list(steps)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            step, schedule = steps[name]
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
            schedule()
    recompiled = counters["stats"]["unique_graphs"] - graphs
    return {name: {"ms": 1e3 * statistics.median(ts),
                   "x_adam": _quartiles([t / a for t, a in zip(ts, times["Adam fused"])])}
            for name, ts in times.items()}, recompiled


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=1024, help="hidden width; weights are width x 4*width")
    ap.add_argument("--depth", type=int, default=2, help="linear layers")
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", type=Path, default=DEFAULT_DIR, help="folder for the saved output")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with printed_into(args.out / "compiled_step_output.txt"):
        report(args)


def report(args) -> None:
    print(f"machine: {machine().rsplit(', ', 1)[0]}; {torch.get_num_threads()} thread(s); "
          f"MLP {args.depth} x ({args.width}x{4 * args.width}), momentum {args.momentum}")
    results, recompiled = bench(args.width, args.depth, args.momentum, args.repeats)
    print(f"{'step':>14s} {'ms':>9s} {'x Adam fused (IQR)':>20s}")
    for name, r in results.items():
        q1, med, q3 = r["x_adam"]
        print(f"{name:>14s} {r['ms']:9.2f} {f'{med:.2f} ({q1:.2f}-{q3:.2f})':>20s}")
    print(f"graphs compiled during the timed rounds (lr changed every round): {recompiled}")


if __name__ == "__main__":
    main()
