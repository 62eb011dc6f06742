"""sm3fn against the float64 NumPy reference of the paper's equations."""

import numpy as np
import pytest
import torch

import sm3fn
from reference import ReferenceSM3, random_gradient

SHAPES = [(), (7,), (5, 3), (4, 3, 2), (3, 2, 4, 2), (1, 6), (6, 1)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_matches_reference_float64(shape, beta, momentum):
    rng = np.random.default_rng(abs(hash((shape, beta, momentum))) % 2**32)
    p0 = rng.standard_normal(shape)
    lr = 0.05
    ref = ReferenceSM3(p0, lr=lr, momentum=momentum, beta=beta)
    tx = sm3fn.sm3(learning_rate=lr, momentum=momentum, beta=beta)
    params = {"p": torch.tensor(p0, dtype=torch.float64)}
    state = tx.init(params)
    for _ in range(6):
        g = random_gradient(rng, shape)
        ref.step(g)
        updates, state = tx.update({"p": torch.tensor(g)}, state, params)
        params = sm3fn.apply_updates(params, updates)
        got = params["p"].numpy()
        np.testing.assert_allclose(got, ref.p, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("shape", [(), (6,), (4, 5), (3, 2, 4)], ids=str)
@pytest.mark.parametrize("beta", [0.0, 0.9])
def test_preconditioned_gradient_and_accumulators(shape, beta):
    """scale_by_sm3 alone: u and each accumulator equal the reference's."""
    rng = np.random.default_rng(7)
    ref = ReferenceSM3(np.zeros(shape), beta=beta)
    tx = sm3fn.scale_by_sm3(beta=beta)
    state = tx.init({"p": torch.zeros(shape, dtype=torch.float64)})
    for _ in range(5):
        g = random_gradient(rng, shape)
        u_ref = ref.step(g)
        u, state = tx.update({"p": torch.tensor(g)}, state)
        np.testing.assert_allclose(u["p"].numpy(), u_ref, rtol=1e-12, atol=0)
        for i, a_ref in enumerate(ref.acc):
            a = state["p", f"accumulator_{i}"].numpy()
            np.testing.assert_allclose(a.reshape(a_ref.shape), a_ref, rtol=1e-12, atol=0)


def test_several_parameters_float32_close_to_reference():
    rng = np.random.default_rng(3)
    shapes = {"w": (8, 5), "b": (5,), "scale": (), "conv": (4, 3, 3, 3)}
    p0 = {k: rng.standard_normal(s) for k, s in shapes.items()}
    refs = {k: ReferenceSM3(v, lr=0.01, momentum=0.5) for k, v in p0.items()}
    tx = sm3fn.sm3(learning_rate=0.01, momentum=0.5)
    params = {k: torch.tensor(v, dtype=torch.float32) for k, v in p0.items()}
    state = tx.init(params)
    for _ in range(5):
        grads = {k: random_gradient(rng, s) for k, s in shapes.items()}
        for k, g in grads.items():
            refs[k].step(g)
        updates, state = tx.update({k: torch.tensor(g, dtype=torch.float32) for k, g in grads.items()}, state, params)
        params = sm3fn.apply_updates(params, updates)
    for k in shapes:
        np.testing.assert_allclose(params[k].double().numpy(), refs[k].p, rtol=1e-5, atol=1e-6)


def test_beta_accumulators_decay_when_gradients_shrink():
    """beta > 0 assigns the cover maxima; torch-SM3 0.1.0's running max never decays."""
    tx = sm3fn.scale_by_sm3(beta=0.5)
    state = tx.init({"w": torch.zeros(3, 4, dtype=torch.float64)})
    rng = np.random.default_rng(11)
    _, state = tx.update({"w": torch.tensor(rng.standard_normal((3, 4)) * 10)}, state)
    before = state["w", "accumulator_0"].clone()
    _, state = tx.update({"w": torch.tensor(rng.standard_normal((3, 4)) * 1e-3)}, state)
    after = state["w", "accumulator_0"]
    assert torch.all(after < before)
    np.testing.assert_allclose(after.numpy(), 0.5 * before.numpy(), rtol=1e-5)


def test_no_momentum_buffer_when_momentum_is_zero():
    state = sm3fn.sm3(momentum=0.0).init({"w": torch.randn(4, 3)})
    assert "momentum" not in state.keys()
    sizes = [t.numel() for t in state.values(include_nested=True, leaves_only=True)]
    assert sum(sizes) == 4 + 3
    state = sm3fn.sm3(momentum=0.9).init({"w": torch.randn(4, 3)})
    assert state["momentum", "w"].shape == (4, 3)
