"""Benchmark: one SM3 step on the weights of a ResNet-50-like network, against fused Adam.

    python -m sm3fn.benchmark --presets conv          # as a preset of the main benchmark
    python -m sm3fn.benchmark_conv --repeats 11       # this module alone: more options
    python -m sm3fn.benchmark_conv --splits           # the kernel by row length and split (layout's cost model)

The parameters: ResNet-50's (torchvision's layout, written out by hand:
7x7, 3x3 and 1x1 convolutions, the batch norms' 1-d weights and biases, the
fc layer) plus a few layers of other nets (a depthwise 3x3, a Conv1d, a
Conv3d).  Each runs contiguous and ``channels_last`` (``channels_last_3d`` for
the 5-D weight; the 3-D and 2-D ones have no such format and stay
contiguous), in float32 and in bfloat16 (SM3 with float32 statistics), on one
thread.  ``sm3fn.optim.SM3`` (fused kernel, and the blocked path for
comparison) and ``torch.optim.Adam(fused=True)`` step the same parameters
with the same gradients, interleaved round-robin, and each round's ratio to
fused Adam is kept: the median and interquartile range over rounds are
printed, per distinct shape (all the tensors of that shape stepped by one
optimizer) and for the whole network.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from typing import Callable, Optional
from unittest import mock

import torch

from sm3fn._kernels import layout

__all__ = ["main", "run", "bench_conv", "format_conv", "bench_splits", "conv_shapes", "resnet50_shapes",
           "make_params"]


def resnet50_shapes() -> list[tuple[int, ...]]:
    """The parameter shapes of torchvision's resnet50 (weights and biases), in model order."""
    shapes: list[tuple[int, ...]] = []

    def conv_bn(out: int, inp: int, k: int) -> None:
        shapes.extend([(out, inp, k, k), (out,), (out,)])

    conv_bn(64, 3, 7)
    inplanes = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            conv_bn(width, inplanes, 1)
            conv_bn(width, width, 3)
            conv_bn(4 * width, width, 1)
            if b == 0:
                conv_bn(4 * width, inplanes, 1)  # the downsample branch
            inplanes = 4 * width
    shapes.extend([(1000, 2048), (1000,)])
    return shapes


#: layers of other conv nets that ResNet-50 lacks: depthwise (MobileNet), Conv1d (audio), Conv3d (video)
OTHER_SHAPES = [(512, 1, 3, 3), (256, 1, 5, 5), (256, 128, 5), (64, 32, 3, 3, 3)]


def conv_shapes() -> list[tuple[int, ...]]:
    return resnet50_shapes() + OTHER_SHAPES


def _formatted(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    if channels_last and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if channels_last and t.dim() == 5:
        return t.contiguous(memory_format=torch.channels_last_3d)
    return t


def make_params(channels_last: bool, dtype: torch.dtype, seed: int = 0) -> list[torch.nn.Parameter]:
    """The conv preset's parameters, each with a random gradient in the same layout."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in conv_shapes():
        p = torch.nn.Parameter(_formatted((torch.randn(shape, generator=gen) * 0.02).to(dtype), channels_last))
        p.grad = _formatted(torch.randn(shape, generator=gen).to(dtype), channels_last)
        params.append(p)
    return params


def _optimizers(params) -> dict[str, Callable[[], object]]:
    from sm3fn.optim import SM3

    lr = 1e-6  # tiny: every optimizer steps the same shared parameters
    f32 = torch.float32  # the statistics of bfloat16 parameters too
    opts = {
        "sm3fn fused": SM3(params, lr=lr, fused=True, accumulator_dtype=f32, momentum_dtype=f32),
        "sm3fn m=0.9 fused": SM3(params, lr=lr, momentum=0.9, fused=True, accumulator_dtype=f32,
                                 momentum_dtype=f32),
        "sm3fn blocked": SM3(params, lr=lr, fused=False, accumulator_dtype=f32, momentum_dtype=f32),
        "Adam fused": torch.optim.Adam(params, lr=lr, fused=True),
    }
    return {name: opt.step for name, opt in opts.items()}


def _interleaved(groups: dict[str, dict[str, Callable[[], object]]], repeats: int) -> dict:
    """Times the steps of each group round-robin; ratios to the group's ``Adam fused`` per round.

    Groups run one after the other, their steps interleaved, the order rotating
    each round: each step follows another step on the same tensors as often as
    any other does (small tensors are then in cache for all alike).
    """
    times: dict[tuple[str, str], list[float]] = {}
    for g, opts in groups.items():
        steps = list(opts.items())
        for _, step in steps:  # warm-up: state, kernel builds
            step()
            step()
        for r in range(repeats):
            for name, step in steps[r % len(steps):] + steps[: r % len(steps)]:
                t = time.perf_counter()
                step()
                times.setdefault((g, name), []).append(time.perf_counter() - t)
    out: dict[str, dict[str, dict]] = {}
    for (g, name), ts in times.items():
        adam = times[(g, "Adam fused")]
        out.setdefault(g, {})[name] = {"median_ms": 1e3 * statistics.median(ts),
                                       "x_adam": _quartiles([t / a for t, a in zip(ts, adam)]),
                                       "min_x_adam": min(ts) / min(adam)}
    return out


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


def bench_conv(channels_last: bool, dtype: torch.dtype, repeats: int, per_shape: bool = True) -> dict:
    """Whole-network and per-shape step times and ratios to fused Adam (see the module docstring)."""
    params = make_params(channels_last, dtype)
    groups = {"whole network": _optimizers(params)}
    counts = Counter(tuple(p.shape) for p in params)
    if per_shape:
        for shape in counts:
            if len(shape) >= 2:
                groups[str(shape)] = _optimizers([p for p in params if tuple(p.shape) == shape])
    rows = _interleaved(groups, repeats)
    return {"layout": "channels_last" if channels_last else "contiguous", "dtype": str(dtype).split(".")[-1],
            "params": sum(p.numel() for p in params), "tensors": len(params),
            "counts": {str(s): n for s, n in counts.items()}, "rows": rows}


def format_conv(result: dict) -> str:
    names = list(next(iter(result["rows"].values())))
    head = (f"conv preset, {result['layout']}, {result['dtype']}: {result['params'] / 1e6:.1f}M params "
            f"in {result['tensors']} tensors; step time / fused Adam's: median (IQR) over rounds, "
            f"then the ratio of the fastest rounds (least disturbed on a busy machine)")
    lines = [head, f"{'shape':24s} {'n':>3s} {'Adam ms':>8s} " + " ".join(f"{n:>26s}" for n in names if n != "Adam fused")]
    for group, row in result["rows"].items():
        n = result["tensors"] if group == "whole network" else result["counts"][group]
        cells = [f"{row[k]['x_adam'][1]:5.2f} ({row[k]['x_adam'][0]:.2f}-{row[k]['x_adam'][2]:.2f}) "
                 f"{row[k]['min_x_adam']:5.2f}" for k in names if k != "Adam fused"]
        lines.append(f"{group:24s} {n:3d} {row['Adam fused']['median_ms']:8.3f} " + " ".join(f"{c:>26s}" for c in cells))
    return "\n".join(lines)


def _min_ns(step: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter_ns()
        step()
        best = min(best, time.perf_counter_ns() - t)
    return best


def bench_splits(repeats: int, log: Callable[[str], None] = print) -> None:
    """What :func:`sm3fn._kernels.layout.choose_split`'s cost model was set from (one thread, kernel alone).

    1. ns per element of the 2-D row kernel on ``(2^21 / cols, cols)`` by ``cols``;
    2. for some shapes, every split's sweep time over fused Adam's step on the
       same tensor (``*``: the split the model chooses).  Minimum over
       ``repeats`` (the least disturbed run, on a shared machine).
    """
    from sm3fn._kernels import fused_cpu
    from sm3fn._sm3_math import init_accumulators

    hyper = fused_cpu.hyperparameters(1e-6, 0.0, 0.0, 1e-30)
    row_problem = layout.row_problem

    def sweeper(p, g, split=None):
        accs = list(init_accumulators(p, torch.float32))
        kernel = fused_cpu.build(g, accs, None, 0.0)

        def sweep():
            with mock.patch.object(layout, "row_problem", lambda *a, **k: row_problem(*a, **{**k, "split": split})):
                fused_cpu.sweep_(kernel, p, g, accs, None, hyper)
        return sweep

    n = 1 << 21
    for dtype in (torch.float32, torch.bfloat16):
        cells = []
        for cols in (9, 16, 27, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 65536):
            p, g = torch.randn(n // cols, cols).to(dtype), torch.randn(n // cols, cols).to(dtype)
            cells.append(f"{cols}: {_min_ns(sweeper(p, g), repeats) / p.numel():.2f}")
        log(f"2-D row kernel, {str(dtype).split('.')[-1]}, ns/element by columns: " + ", ".join(cells))
    shapes = [(64, 64, 3, 3), (512, 512, 3, 3), (512, 1, 3, 3), (2048, 512, 1, 1), (64, 3, 7, 7),
              (256, 128, 5), (64, 32, 3, 3, 3), (8, 64, 64, 64), (4, 512, 512), (16, 16, 16, 16, 16)]
    for shape in shapes:
        for channels_last in (False, True) if len(shape) in (4, 5) else (False,):
            p = _formatted(torch.randn(shape), channels_last)
            g = _formatted(torch.randn(shape), channels_last)
            order = layout.physical_order(p)
            assert order is not None
            physical = [shape[d] for d in order]
            adam_p = torch.nn.Parameter(p.clone())
            adam_p.grad = g.clone()
            adam = torch.optim.Adam([adam_p], lr=1e-6, fused=True)
            adam.step()
            adam_ns = _min_ns(adam.step, repeats)
            chosen = layout.choose_split(physical)
            cells = [f"s={s}{'*' if s == chosen else ''} {_min_ns(sweeper(p, g, s), repeats) / adam_ns:.2f}"
                     for s in range(1, len(shape))]
            log(f"{str(shape):20s} {'channels_last' if channels_last else 'contiguous':13s} in memory "
                f"{physical}: x fused Adam ({adam_ns / 1e3:.0f} us): " + ", ".join(cells))


def main(argv: Optional[list[str]] = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=11, help="timed rounds")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--layouts", nargs="+", default=["contiguous", "channels_last"],
                    choices=["contiguous", "channels_last"])
    ap.add_argument("--no-per-shape", action="store_true", help="the whole network only")
    ap.add_argument("--splits", action="store_true", help="time each row/column split instead")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.splits:
        bench_splits(args.repeats)
        return []
    return run(args.repeats, args.dtypes, args.layouts, per_shape=not args.no_per_shape)


def run(repeats: int, dtypes=("float32", "bfloat16"), layouts=("contiguous", "channels_last"),
        per_shape: bool = True, log: Callable[[str], None] = print) -> list[dict]:
    results = []
    for dtype in dtypes:
        for lay in layouts:
            res = bench_conv(lay == "channels_last", getattr(torch, dtype), repeats, per_shape)
            log(format_conv(res))
            results.append(res)
    return results


if __name__ == "__main__":
    main()
