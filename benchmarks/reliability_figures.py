"""Prints the figures quoted in docs/guarantees.md: sm3fn next to torch-SM3 where it breaks.

    OMP_NUM_THREADS=1 python benchmarks/reliability_figures.py
"""

import numpy as np
import torch

import sm3fn
from sm3fn.optim import SM3

try:
    from SM3 import SM3 as TorchSM3  # torch-SM3, for comparison
except ImportError:  # pragma: no cover
    TorchSM3 = None


def constant_gradient(steps=1000):
    """bf16 parameter, one gradient repeated: accumulator and step after `steps` steps."""
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(64, 32, generator=gen).to(torch.bfloat16)
    rows = {}
    for name, make in [
        ("sm3fn (float32 statistics, default)", lambda p: SM3([p], lr=0.0)),
        ("sm3fn, accumulator_dtype=bfloat16", lambda p: SM3([p], lr=0.0, accumulator_dtype=torch.bfloat16)),
        ("torch-SM3", lambda p: TorchSM3([p], lr=0.0) if TorchSM3 else None),
    ]:
        p = torch.nn.Parameter(torch.zeros(64, 32, dtype=torch.bfloat16))
        opt = make(p)
        if opt is None:
            continue
        for _ in range(steps):
            p.grad = g.clone()
            opt.step()
        a0 = opt.state[p]["accumulator_0"].double().reshape(-1)
        rows[name] = a0
    # float64 reference: for a constant gradient, a_0[i] = steps * max_j g[i, j]^2 exactly
    # (by induction: the column of row i's largest entry always covers it with a_1 >= a_0[i])
    ref = steps * (g.double() ** 2).amax(dim=1)
    print(f"{steps} steps of a constant bf16 gradient (64x32): row accumulator / float64 reference")
    for name, a in rows.items():
        ratio = a / ref
        print(f"  {name:40s} min {ratio.min():.6f}  max {ratio.max():.6f}  (max value {a.max():.1f})")


def fp16_zero_gradient():
    for name, make in [("sm3fn.optim.SM3", SM3), ("torch-SM3", TorchSM3)]:
        if make is None:
            continue
        p = torch.nn.Parameter(torch.randn(4, 3).half())
        opt = make([p], lr=0.1)
        p.grad = torch.zeros_like(p)
        opt.step()
        print(f"float16 zero gradient, {name:16s}: NaN entries in the parameter: {int(torch.isnan(p).sum())} / 12")


def overflow_recovery(beta=0.5, steps=300):
    """|g| = 1e20 once in float32, then unit gradients: steps until that coordinate moves again."""
    for name, make in [("sm3fn.optim.SM3", SM3), ("torch-SM3", TorchSM3)]:
        if make is None:
            continue
        gen = torch.Generator().manual_seed(4)
        p = torch.nn.Parameter(torch.zeros(4, 3))
        opt = make([p], lr=1.0, beta=beta)
        recovered = None
        for step in range(steps):
            g = torch.randn(4, 3, generator=gen)
            if step == 0:
                g[1, 2] = 1e20
            p.grad = g
            before = p[1, 2].item()
            opt.step()
            moved = abs(p[1, 2].item() - before)
            if step > 0 and moved > 0.1 and recovered is None:
                recovered = step
        finite = bool(torch.isfinite(p).all())
        acc = opt.state[p]["accumulator_0"][1].item() if "accumulator_0" in opt.state[p] else float("nan")
        print(f"|g| = 1e20 (float32), beta={beta}, {name:16s}: row accumulator after {steps} steps {acc:.3g}, "
              f"coordinate moves again at step {recovered}, parameters finite: {finite}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    constant_gradient()
    fp16_zero_gradient()
    overflow_recovery()
