"""One optimizer step on the GPT-2 124M shapes on one GPU: SM3's Triton kernel against fused Adam.

    python benchmarks/gpu_step.py                 # CUDA, GPT-2 124M (float32), 50 rounds
    python benchmarks/gpu_step.py --rounds 200 --preset 16m
    python benchmarks/gpu_step.py --dry-run       # no GPU: tiny shapes, Triton's interpreter, CPU

Timed, interleaved round-robin (the order rotates each round) with CUDA
events around each step:

* ``SM3.step`` (``sm3fn.optim.SM3``, whatever kernel it picks for CUDA tensors),
  momentum 0 and 0.9;
* the Triton kernel called directly, in place (``triton_gpu.sweep_many_``) and
  out of place (``triton_gpu.step_many``, the pure ``tx.update``'s kernel);
* the pure ``tx.update`` of ``sm3fn.sm3`` (whatever kernel it picks);
* ``torch.optim.Adam(fused=True)``, the yardstick.

Printed per contender: the median step time (and its interquartile range), the
median over rounds of its time divided by fused Adam's in the same round, and
the peak memory allocated during a step above what was live before it
(``torch.cuda.max_memory_allocated``): a one-sweep kernel needs no
parameter-sized scratch.  The goal on a data-centre GPU: momentum 0 at most
0.6x fused Adam's step, momentum 0.9 at most 1.0x.

``--dry-run`` runs the same code on CPU tensors with ``TRITON_INTERPRET=1``
and a wall clock, on shapes small enough for the interpreter: it shows the
script executes, and its figures mean nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Optional

#: name -> (n_embd, n_layer, vocab, n_ctx), as sm3fn.benchmark's presets; "dry" for --dry-run
PRESETS = {"dry": (16, 1, 64, 32), "16m": (256, 4, 50257, 1024), "124m": (768, 12, 50257, 1024)}


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="parameter shapes (default: 124m; dry with --dry-run)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 50; 2 with --dry-run)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each contender first")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU tensors through Triton's interpreter, tiny shapes: checks the script runs")
    args = parser.parse_args(argv)
    args.preset = args.preset or ("dry" if args.dry_run else "124m")
    args.rounds = args.rounds or (2 if args.dry_run else 50)
    return args


class _Clock:
    """Times one call: CUDA events on a GPU, the wall clock on the CPU (--dry-run)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def time_ms(self, fn: Callable[[], object]) -> float:
        import torch

        if not self.cuda:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end)

    def extra_peak_bytes(self, fn: Callable[[], object]) -> Optional[int]:
        """Peak allocated during ``fn`` above what was allocated before it (None on the CPU)."""
        import torch

        if not self.cuda:
            fn()
            return None
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before


def _contenders(shapes: dict, device) -> dict[str, Callable[[], object]]:
    """name -> one step, each on its own copy of the parameters and its own state."""
    import torch

    import sm3fn
    from sm3fn._kernels import triton_gpu
    from sm3fn._sm3_math import init_accumulators
    from sm3fn.optim import SM3

    gen = torch.Generator(device=device).manual_seed(0)

    def params():
        return [torch.nn.Parameter(torch.randn(s, device=device, generator=gen) * 0.02) for s in shapes.values()]

    def with_grads(ps):
        for p in ps:
            p.grad = torch.randn(p.shape, device=device, generator=gen)
        return ps

    steps = {}
    for momentum in (0.0, 0.9):
        opt = SM3(with_grads(params()), lr=0.1, momentum=momentum)
        steps[f"SM3.step m={momentum:g}"] = opt.step

        ps = with_grads(params())
        accs = [list(init_accumulators(p, torch.float32)) for p in ps]
        moms = [torch.zeros_like(p) if momentum else None for p in ps]
        grads = [p.grad for p in ps]
        steps[f"triton in place m={momentum:g}"] = (
            lambda ps=ps, grads=grads, accs=accs, moms=moms, momentum=momentum: triton_gpu.sweep_many_(
                [p.data for p in ps], grads, accs, moms, lr=0.1, momentum=momentum, beta=0.0, eps=1e-30))
        steps[f"triton out of place m={momentum:g}"] = (
            lambda ps=ps, grads=grads, accs=accs, moms=moms, momentum=momentum: triton_gpu.step_many(
                ps, grads, accs, moms, lr=0.1, momentum=momentum, beta=0.0, eps=1e-30))

    tx = sm3fn.sm3(learning_rate=0.1, momentum=0.9)
    named = {name: p.detach() for name, p in zip(shapes, params())}
    grads = {name: torch.randn(p.shape, device=device, generator=gen) for name, p in named.items()}
    state = tx.init(named)
    steps["tx.update m=0.9"] = lambda: tx.update(grads, state, named)

    adam = torch.optim.Adam(with_grads(params()), lr=1e-3, fused=True)
    steps["Adam fused"] = adam.step
    return steps


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


def main(argv: Optional[list[str]] = None) -> dict:
    args = _parse(argv)
    if args.dry_run:
        # before triton is imported (tensordict, and so sm3fn, import it)
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    if args.dry_run:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_step.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                         "--dry-run runs it on the CPU through Triton's interpreter")
    else:
        device = torch.device("cuda")
    from sm3fn._kernels import triton_gpu
    from sm3fn.benchmark import gpt2_shapes

    if not triton_gpu.available():
        raise SystemExit("benchmarks/gpu_step.py needs triton (pip install triton)")
    shapes = gpt2_shapes(*PRESETS[args.preset])
    n_params = sum(torch.Size(s).numel() for s in shapes.values())
    steps = _contenders(shapes, device)
    clock = _Clock(device)
    torch.set_grad_enabled(False)
    for fn in steps.values():
        for _ in range(args.warmup):
            fn()
    peaks = {name: clock.extra_peak_bytes(fn) for name, fn in steps.items()}
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    ratios: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        this_round = {name: clock.time_ms(steps[name]) for name in order}
        for name in names:
            times[name].append(this_round[name])
            ratios[name].append(this_round[name] / this_round["Adam fused"])
    what = "CPU, Triton interpreter (dry run: figures mean nothing)" if args.dry_run else torch.cuda.get_device_name()
    print(f"one step, {args.preset} ({n_params / 1e6:.1f}M parameters, float32), {args.rounds} rounds, {what}")
    print(f"{'':32} {'median ms':>10} {'IQR ms':>16} {'/ Adam fused':>13} {'extra peak MiB':>15}")
    result = {}
    for name in names:
        lo, med, hi = _quartiles(times[name])
        ratio = statistics.median(ratios[name])
        peak = peaks[name]
        peak_text = "n/a" if peak is None else f"{peak / 2**20:.1f}"
        print(f"{name:32} {med:10.3f} {f'{lo:.3f}-{hi:.3f}':>16} {ratio:12.2f}x {peak_text:>15}")
        result[name] = dict(median_ms=med, ratio_to_adam=ratio, extra_peak_bytes=peak)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
