"""The small transforms against references: ema, trace (vs torch.optim.SGD), scaling, chain."""

import numpy as np
import pytest
import torch

import sm3fn


def _run(tx, grads_seq, params):
    state = tx.init(params)
    outs = []
    for grads in grads_seq:
        updates, state = tx.update(grads, state, params)
        outs.append(updates)
    return outs, state


def test_ema_matches_numpy():
    rng = np.random.default_rng(0)
    gs = [rng.standard_normal((3, 2)) for _ in range(5)]
    outs, _ = _run(sm3fn.ema(0.8), [{"w": torch.tensor(g)} for g in gs], {"w": torch.zeros(3, 2, dtype=torch.float64)})
    m = np.zeros((3, 2))
    for g, out in zip(gs, outs):
        m = 0.8 * m + 0.2 * g
        np.testing.assert_allclose(out["w"].numpy(), m, rtol=1e-13)


@pytest.mark.parametrize("nesterov", [False, True])
def test_trace_matches_torch_sgd(nesterov):
    gen = torch.Generator().manual_seed(1)
    p0 = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    grads = [torch.randn(4, 3, generator=gen, dtype=torch.float64) for _ in range(5)]
    ref = torch.nn.Parameter(p0.clone())
    opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9, nesterov=nesterov)
    tx = sm3fn.chain(sm3fn.trace(0.9, nesterov=nesterov), sm3fn.scale_by_learning_rate(0.1))
    params = {"w": p0.clone()}
    state = tx.init(params)
    for g in grads:
        ref.grad = g.clone()
        opt.step()
        updates, state = tx.update({"w": g}, state, params)
        params = sm3fn.apply_updates(params, updates)
    torch.testing.assert_close(params["w"], ref.detach(), rtol=1e-12, atol=1e-12)


def test_scale_and_learning_rate_tensor_gets_gradient():
    lr = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, dtype=torch.float64)
    tx = sm3fn.scale_by_learning_rate(lr)
    updates, _ = tx.update({"w": g}, tx.init({"w": g}))
    torch.testing.assert_close(updates["w"], -0.3 * g)
    (d_lr,) = torch.autograd.grad(updates["w"].sum(), lr)
    torch.testing.assert_close(d_lr, -g.sum())
    updates, _ = sm3fn.scale(2.5).update({"w": g}, sm3fn.scale(2.5).init({"w": g}))
    torch.testing.assert_close(updates["w"], 2.5 * g)


def test_schedule_sees_the_step_count_as_a_tensor():
    seen = []

    def schedule(count):
        seen.append(count)
        return 1.0 / (1.0 + count)

    g = torch.randn(3, dtype=torch.float64)
    outs, state = _run(sm3fn.scale_by_schedule(schedule), [{"w": g}] * 4, {"w": g})
    assert all(isinstance(c, torch.Tensor) and c.dtype == torch.int64 for c in seen)
    assert [int(c) for c in seen] == [0, 1, 2, 3]
    for i, out in enumerate(outs):
        torch.testing.assert_close(out["w"], g / (1 + i))
    assert int(state["count"]) == 4


def test_sm3_with_schedule_is_sm3_with_that_rate():
    rng = np.random.default_rng(2)
    gs = [{"w": torch.tensor(rng.standard_normal((4, 3)))} for _ in range(4)]
    params = {"w": torch.tensor(rng.standard_normal((4, 3)))}
    # 0.125 * (c + 1) is exact in the float32 a tensor schedule computes in
    scheduled, _ = _run(sm3fn.sm3(learning_rate=lambda c: 0.125 * (c + 1)), gs, params)
    for i in range(4):
        fixed, _ = _run(sm3fn.sm3(learning_rate=0.125 * (i + 1)), gs[: i + 1], params)
        torch.testing.assert_close(scheduled[i]["w"], fixed[i]["w"], rtol=1e-13, atol=0)


def test_chain_applies_left_to_right_and_names_state():
    g = {"w": torch.randn(3, dtype=torch.float64)}
    tx = sm3fn.chain(sm3fn.scale(2.0), sm3fn.ema(0.5))
    outs, state = _run(tx, [g], g)
    torch.testing.assert_close(outs[0]["w"], 0.5 * 2.0 * g["w"])  # scale, then EMA from zero
    assert set(state.keys()) == {"0", "1"}
    named = sm3fn.named_chain(("double", sm3fn.scale(2.0)), ("avg", sm3fn.ema(0.5)))
    _, state = _run(named, [g], g)
    assert set(state.keys()) == {"double", "avg"}
    torch.testing.assert_close(state["avg", "w"], g["w"])  # 0.5 * 0 + 0.5 * 2g


def test_identity_and_sm3_state_names():
    g = {"w": torch.randn(3, 2)}
    outs, _ = _run(sm3fn.identity(), [g], g)
    assert outs[0]["w"] is g["w"]
    state = sm3fn.sm3(momentum=0.9).init(g)
    assert set(state.keys()) == {"sm3", "momentum", "learning_rate"}
