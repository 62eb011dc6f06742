"""The fused kernel reads lr, momentum, beta and eps at run time (issue 15, item 1).

A scheduler that changes a hyperparameter every step (``OneCycleLR`` cycles
momentum as well as lr) must build no kernel after the first step: the cache
key holds only what changes the generated code.  The step time against
``LambdaLR`` is a benchmark figure (``python -m benchmarks.schedule_step_time``),
not a timed test.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sm3fn._kernels import fused_cpu as _fused
from sm3fn.optim import SM3


@pytest.fixture
def builds(monkeypatch):
    """Counts the C++ builds (the code cache's loads: each is a compile or a disk read)."""
    from torch._inductor.codecache import CppPythonBindingsCodeCache

    calls = []
    original = CppPythonBindingsCodeCache.load_pybinding

    def counting(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(CppPythonBindingsCodeCache, "load_pybinding", counting)
    monkeypatch.setattr(_fused, "_kernels", type(_fused._kernels)())  # an empty in-process cache
    return calls


def _model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 3))
    x, y = torch.randn(32, 12), torch.randn(32, 3)
    return model, x, y


def _train(model, opt, sched, x, y, steps):
    seen = set()
    for _ in range(steps):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        sched.step()
        seen.add(opt.param_groups[0]["momentum"])
    return seen


def test_one_cycle_builds_no_kernel_after_the_first_step(builds):
    model, x, y = _model_and_data()
    opt = SM3(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=200)
    _train(model, opt, sched, x, y, 1)
    first = len(builds)
    assert first > 0 and len(_fused._kernels) == first
    momenta = _train(model, opt, sched, x, y, 199)
    assert len(momenta) > 150, "OneCycleLR changes momentum every step"
    assert len(builds) == first and len(_fused._kernels) == first


def test_changing_beta_and_eps_builds_nothing_and_steps_as_the_blocked_path(builds):
    """beta (> 0), eps and momentum change every step: no build after the first, and the numbers
    are the blocked path's (accumulators bit for bit: they depend on the gradients alone, not on
    the square root; parameters to rounding), so the run-time values are the ones used."""
    runs = {}
    for fused in (True, False):
        gen = torch.Generator().manual_seed(1)
        params = [nn.Parameter(torch.randn(s, generator=gen)) for s in [(9, 13), (4, 5, 6), (11,)]]
        opt = SM3(params, lr=0.05, momentum=0.5, beta=0.9, fused=fused)
        for step in range(12):
            for group in opt.param_groups:
                group["beta"] = 0.5 + 0.04 * step
                group["eps"] = 10.0 ** -(step + 1)
                group["momentum"] = 0.2 + 0.05 * step  # both sides of lerp's 0.5
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen) * 10.0 ** (step % 4 - 2)
            opt.step()
            if fused and step == 0:
                first = len(builds)
        runs[fused] = (params, opt)
    assert first > 0 and len(builds) == first
    (fps, fo), (bps, bo) = runs[True], runs[False]
    for p, q in zip(fps, bps):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for key in fo.state[p]:
            if key.startswith("accumulator_"):
                assert torch.equal(fo.state[p][key], bo.state[q][key]), key


def test_cache_is_bounded(monkeypatch):
    """More configurations than the bound: the least recently used are dropped."""
    monkeypatch.setattr(_fused, "_kernels", type(_fused._kernels)())
    monkeypatch.setattr(_fused, "MAX_KERNELS", 3)
    # every rank >= 2 shares the 2-D kernel (sm3fn._kernels.layout), so vary dtype and formula
    configs = [(dtype, beta) for dtype in (torch.float32, torch.float64) for beta in (0.0, 0.5)]
    for dtype, beta in configs:
        _fused.build(torch.zeros((2, 3), dtype=dtype), [torch.zeros(1, dtype=dtype)] * 2, None, beta)
    assert len(_fused._kernels) == 3
    assert [(key[0], key[4]) for key in _fused._kernels] == [(d, b == 0.0) for d, b in configs[1:]]
