"""Per-tensor cost of SM3's fused kernel against fused Adam, on 1 and more threads.

    python benchmarks/fused_kernel.py                  # GPT-2 small's matrix shapes, 1 and 2 threads
    python benchmarks/fused_kernel.py --threads 1 4 --repeats 21 --dtypes float32

For each shape and parameter dtype (bfloat16: SM3 with float32 statistics,
Adam with its default, bfloat16 state), SM3's fused sweep, its blocked path (``fused=False``)
and ``torch.optim.Adam(fused=True)`` step one tensor each, interleaved round
by round; printed: nanoseconds per element (median) and each step over
fused Adam's of the same round (median and IQR).  The per-element and
thread figures of docs/speed.md come from this script; what it prints is also
saved in ``--out`` (default ``benchmarks/out/``) as ``fused_kernel_output.txt``,
of which docs/fused_kernel_output.txt is the copy the page shows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _output import DEFAULT_DIR, printed_into  # noqa: E402

from sm3fn._kernels import sm3_step_
from sm3fn._sm3_math import init_accumulators
from sm3fn.benchmark import machine

SHAPES = [(768, 768), (768, 3072), (3072, 768), (768, 2304), (50257, 768)]


def _quartiles(values):
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


def bench(shape, dtype: torch.dtype, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(shape, generator=gen).to(dtype)
    g = torch.randn(shape, generator=gen).to(dtype)
    accs = list(init_accumulators(p, torch.float32 if dtype != torch.float64 else dtype))
    adam_p = torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype))
    adam_p.grad = torch.randn(shape, generator=gen).to(dtype)
    adam = torch.optim.Adam([adam_p], lr=1e-6, fused=True)

    def sm3(fused):
        return lambda: sm3_step_([p], [g], [accs], [None], lr=1e-6, momentum=0.0, beta=0.0, eps=1e-30,
                                 fused=fused)

    steps = {"SM3 fused": sm3(True), "SM3 blocked": sm3(False), "Adam fused": adam.step}
    for step in steps.values():  # warm-up: state, kernel build
        step()
    times = {k: [] for k in steps}
    names = list(steps)
    for r in range(repeats):
        for name in names[r % 3:] + names[:r % 3]:
            t = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t)
    n = p.numel()
    return {name: {"ns_per_element": 1e9 * statistics.median(ts) / n,
                   "x_adam": _quartiles([t / a for t, a in zip(ts, times["Adam fused"])])}
            for name, ts in times.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--out", type=Path, default=DEFAULT_DIR, help="folder for the saved output")
    args = ap.parse_args(argv)
    with printed_into(args.out / "fused_kernel_output.txt"):
        report(args)


def report(args: argparse.Namespace) -> None:
    print(f"machine: {machine().rsplit(', ', 1)[0]}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"\n{threads} thread(s)")
        print(f"{'dtype':>9s} {'shape':>12s} {'optimizer':>12s} {'ns/element':>10s} {'x Adam fused (IQR)':>20s}")
        for dtype in args.dtypes:
            for shape in SHAPES:
                for name, r in bench(shape, getattr(torch, dtype), args.repeats).items():
                    q1, med, q3 = r["x_adam"]
                    print(f"{dtype:>9s} {str(shape):>12s} {name:>12s} {r['ns_per_element']:10.3f} "
                          f"{f'{med:.2f} ({q1:.2f}-{q3:.2f})':>20s}", flush=True)


if __name__ == "__main__":
    main()
