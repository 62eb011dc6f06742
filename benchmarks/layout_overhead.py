"""The fused CPU step's fixed cost per tensor: the layout step (tables, views, checks) apart from the kernel.

    python benchmarks/layout_overhead.py

Prints, on one thread with momentum 0.9: (1) the median µs of one tensor's
``supported()`` + ``sweep_`` for a few conv and matrix shapes; (2) for the
conv preset's float32 contiguous parameters (``sm3fn.benchmark_conv``), the
median ms per ``SM3.step`` split into the kernels, the rest of ``sweep_``
(the layout step) and the rest of the step (optimizer and dispatch checks).
Timings only (nothing written); run it with the old and the new code back to
back to compare (figures are noisy on a shared machine).
"""

from __future__ import annotations

import statistics
import time

import torch

from sm3fn import benchmark_conv
from sm3fn._kernels import fused_cpu
from sm3fn.optim import SM3

SHAPES = [(64, 64, 1, 1), (1024, 256, 1, 1), (1024, 256), (256, 256, 3, 3)]


def per_tensor_us(shape: tuple[int, ...], calls: int = 400) -> float:
    """Median µs of ``supported()`` + the in-place ``sweep_`` of one float32 tensor."""
    p, g, m = torch.randn(shape), torch.randn(shape), torch.zeros(shape)
    accs = [torch.rand([n if j == i else 1 for j, n in enumerate(shape)]) for i in range(len(shape))]
    kernel = fused_cpu.build(g, accs, m, 0.5)
    hyper = fused_cpu.hyperparameters(0.0, 0.9, 0.5, 1e-30)  # lr 0: the weights stay put

    def once() -> None:
        assert fused_cpu.supported(p, g, accs, m)
        fused_cpu.sweep_(kernel, p, g, accs, m, hyper)

    times = []
    for i in range(calls + 20):
        start = time.perf_counter()
        once()
        if i >= 20:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def preset_breakdown_ms(steps: int = 30) -> tuple[float, float, float, float]:
    """Median ms per ``SM3.step`` on the conv preset: (total, kernels, layout, rest)."""
    opt = SM3(benchmark_conv.make_params(False, torch.float32), lr=0.1, momentum=0.9, beta=0.5)
    spent = {"kernel": 0.0, "sweep": 0.0}
    sweep = fused_cpu.sweep_

    def timed_sweep(kernel, *args) -> None:
        def timed_kernel(*kargs) -> None:
            start = time.perf_counter()
            kernel(*kargs)
            spent["kernel"] += time.perf_counter() - start

        start = time.perf_counter()
        sweep(timed_kernel, *args)
        spent["sweep"] += time.perf_counter() - start

    fused_cpu.sweep_ = timed_sweep  # type: ignore[assignment]
    try:
        rows = []
        for i in range(steps + 3):
            spent.update(kernel=0.0, sweep=0.0)
            start = time.perf_counter()
            opt.step()
            total = time.perf_counter() - start
            if i >= 3:
                rows.append((total, spent["kernel"], spent["sweep"] - spent["kernel"], total - spent["sweep"]))
    finally:
        fused_cpu.sweep_ = sweep
    return tuple(statistics.median(r[i] for r in rows) * 1e3 for i in range(4))  # type: ignore[return-value]


def main() -> None:
    torch.set_num_threads(1)
    print("per tensor, supported() + sweep_, µs (median):")
    for shape in SHAPES:
        print(f"  {str(shape):20s} {per_tensor_us(shape):8.1f}")
    total, kernels, layout, rest = preset_breakdown_ms()
    print(f"conv preset (float32, contiguous), ms per SM3.step (medians): total {total:.2f}, "
          f"kernels {kernels:.2f}, layout (sweep_ less kernel) {layout:.2f}, rest {rest:.2f}")


if __name__ == "__main__":
    main()
