"""The pure ``tx.update`` through the fused out-of-place CPU kernel (sm3fn/_kernels/fused_cpu.py, sweep).

When no gradient flows through the step, ``scale_by_sm3`` and ``sm3fn.sm3``
compute each CPU tensor's step in one sweep that writes fresh tensors.  Held
to the float64 reference (tests/reference.py), to the differentiable path
(the same call with gradients that require grad: accumulators bit for bit,
updates to the square root's rounding), to the stage-by-stage chain (bit for
bit: the same kernel arithmetic, the same roundings), and never writing its inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import ReferenceSM3, random_gradient

import sm3fn
from sm3fn._kernels import fused_cpu as _fused

SHAPES = [(), (1,), (9,), (40,), (3, 37), (17, 16), (5, 1), (2, 3, 19)]
LR = 0.07


def _exact(x: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    high = torch.finfo(dtype).max / 4
    return torch.tensor(np.clip(x, -high, high)).to(dtype).double().numpy()


def _modes_built() -> set:
    return {key[-1] for key in _fused._kernels}


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("momentum,beta", [(0.0, 0.0), (0.9, 0.0), (0.3, 0.5)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_pure_step_matches_float64_reference(shape, momentum, beta, dtype):
    """Five steps of sm3fn.sm3's tx.update + apply_updates, zero rows and columns included."""
    steps = 5
    rng = np.random.default_rng(abs(hash((shape, momentum, beta, str(dtype)))) % 2**32)
    p0 = _exact(rng.standard_normal(shape), dtype)
    ref = ReferenceSM3(p0, lr=LR, momentum=momentum, beta=beta)
    tx = sm3fn.sm3(LR, momentum=momentum, beta=beta)
    params = {"p": torch.tensor(p0).to(dtype)}
    state = tx.init(params)
    for _ in range(steps):
        g = _exact(random_gradient(rng, shape) * 10.0 ** rng.integers(-3, 3), dtype)
        ref.step(g)
        updates, state = tx.update({"p": torch.tensor(g).to(dtype)}, state, params)
        params = sm3fn.apply_updates(params, updates)
    assert "sm3" in _modes_built()
    p = params["p"].double().numpy()
    rtol, atol = (1e-10, 1e-12) if dtype == torch.float64 else (2e-5, 1e-6)
    if dtype in (torch.float32, torch.float64):
        np.testing.assert_allclose(p, ref.p, rtol=rtol, atol=atol)
    else:  # one rounding of the update and one of the parameter per step, in their dtype
        bound = 2 * steps * torch.finfo(dtype).eps * max(1.0, np.abs(ref.p).max())
        np.testing.assert_allclose(p, ref.p, rtol=0, atol=bound)
    for i, want in enumerate(ref.acc):
        a = state["sm3", "p", f"accumulator_{i}"]
        assert a.dtype == (dtype if dtype == torch.float64 else torch.float32)
        np.testing.assert_allclose(a.double().numpy().reshape(-1), want.reshape(-1), rtol=rtol, atol=0)
    if momentum:  # the chain hands ema u rounded to the parameter dtype (u.to(g.dtype))
        m = state["momentum", "p"].double().numpy()
        if dtype in (torch.float32, torch.float64):
            np.testing.assert_allclose(m, ref.m, rtol=rtol * 10, atol=atol)
        else:  # one rounding of u (|u| <= 1/sqrt(1 - beta)) per step
            bound = steps * torch.finfo(dtype).eps / np.sqrt(1 - beta)
            np.testing.assert_allclose(m, ref.m, rtol=0, atol=bound)


def _grads(gen, shapes, dtype, special):
    grads = {}
    for k, s in shapes.items():
        g = (torch.randn(s, generator=gen) * 10.0 ** torch.randint(-3, 3, (), generator=gen)).to(dtype)
        if len(s) >= 2:
            g[1] = 0  # a row with no gradient
        grads[k] = g
    if special:
        grads["huge"].view(-1)[2] = 1e20  # g*g overflows float32: the accumulators saturate
        grads["nan"].view(-1)[4] = float("nan")
    return grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("momentum,beta", [(0.0, 0.0), (0.9, 0.0), (0.5, 0.9)])
def test_pure_kernel_matches_differentiable_path(momentum, beta, dtype):
    """The same steps, once with plain gradients (the fused sweep) and once with gradients that
    require grad (the differentiable math): accumulators bit for bit, NaN and saturation in the
    same places, updates to a few ulps (the kernel's square root is IEEE's, ATen's an ulp off
    at times), and the inputs of the pure step never written."""
    shapes = {"w": (31, 29), "t": (5, 6, 7), "b": (33,), "s": (), "huge": (4, 3), "nan": (3, 4)}
    gen = torch.Generator().manual_seed(7)
    params = {k: torch.randn(s, generator=gen).to(dtype) for k, s in shapes.items()}
    tx = sm3fn.sm3(LR, momentum=momentum, beta=beta)
    fast_state = slow_state = tx.init(params)
    for step in range(3):
        grads = _grads(gen, shapes, dtype, special=step == 1)
        before = [t.clone() for t in [*grads.values(), *fast_state.values(True, True)]]
        fast_u, fast_state_new = tx.update(grads, fast_state, params)
        after = [*grads.values(), *fast_state.values(True, True)]
        assert all(torch.equal(a, b) for a, b in zip(before, after) if not a.isnan().any())
        with torch.enable_grad():
            slow_u, slow_state = tx.update({k: g.clone().requires_grad_() for k, g in grads.items()},
                                           slow_state, params)
        slow_state = slow_state.detach()
        fast_state = fast_state_new
        # a few ulps of |u| <= 1/sqrt(1 - beta) (the momentum buffer), times lr (the update)
        u_ulps = 8 * torch.finfo(dtype).eps / np.sqrt(1 - beta)
        for k in shapes:
            torch.testing.assert_close(fast_u[k], slow_u[k].detach(), rtol=0, atol=LR * u_ulps, equal_nan=True)
        for (key, a), b in zip(fast_state.items(True, True), slow_state.values(True, True)):
            if key[0] == "sm3":
                assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), key
            else:
                torch.testing.assert_close(a, b, rtol=0, atol=8 * 1.2e-7 / np.sqrt(1 - beta), equal_nan=True)
    saturated = fast_state["sm3", "huge", "accumulator_1"]  # capped at float32's max, decayed by beta
    assert torch.isfinite(saturated).all() and saturated.max() > 0.8 * torch.finfo(torch.float32).max
    assert fast_state["sm3", "nan", "accumulator_0"].isnan().any()


@pytest.mark.parametrize("momentum", [0.0, 0.3, 0.9])
def test_one_sweep_and_chain_continue_each_others_state(momentum):
    """sm3fn.sm3's one-sweep update and the chain of its stages keep the same state: a state
    made by either continues on the other, bit for bit, with a schedule's count too.  (Momentum
    below and above 0.5: the kernel's run-time choice of lerp's nearer end, as ATen's.)"""
    sched = lambda count: 0.1 / (1 + count)  # noqa: E731
    one = sm3fn.sm3(sched, momentum=momentum)
    stages = [("sm3", sm3fn.scale_by_sm3())]
    if momentum:
        stages.append(("momentum", sm3fn.ema(momentum)))
    chain = sm3fn.named_chain(*stages, ("learning_rate", sm3fn.scale_by_learning_rate(sched)))
    gen = torch.Generator().manual_seed(3)
    params = {"w": torch.randn(6, 21, generator=gen), "b": torch.randn(13, generator=gen)}
    grads = [{k: torch.randn(v.shape, generator=gen) for k, v in params.items()} for _ in range(4)]

    def run(order):
        p, state = dict(params), one.init(params)
        for tx, g in zip(order, grads):
            u, state = tx.update(g, state, p)
            p = sm3fn.apply_updates(p, u)
        return p, state

    runs = [run([one] * 4), run([chain] * 4), run([one, one, chain, chain]), run([chain, one, chain, one])]
    p0, s0 = runs[0]
    for p, s in runs[1:]:
        assert all(torch.equal(p[k], p0[k]) for k in p0)
        assert sorted(s.keys(True, True)) == sorted(s0.keys(True, True))
        assert all(torch.equal(s[k], s0[k]) for k in s0.keys(True, True))
    assert s0["learning_rate", "count"] == 4


def test_scale_by_sm3_alone_is_swept_too():
    """scale_by_sm3's pure update (u, no learning rate) takes the kernel's "u" mode, and equals
    the differentiable math's accumulators bit for bit."""
    gen = torch.Generator().manual_seed(4)
    params = {"w": torch.randn(12, 9, generator=gen)}
    tx = sm3fn.scale_by_sm3()
    g = {"w": torch.randn(12, 9, generator=gen)}
    u, state = tx.update(g, tx.init(params))
    assert "u" in _modes_built()
    with torch.enable_grad():
        u_slow, state_slow = tx.update({"w": g["w"].clone().requires_grad_()}, tx.init(params))
    torch.testing.assert_close(u["w"], u_slow["w"].detach(), rtol=4e-7, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(state.values(True, True), state_slow.values(True, True)))
