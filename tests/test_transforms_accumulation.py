"""sm3fn.MultiSteps (gradient accumulation) against the float64 reference and optax's definition."""

import copy

import numpy as np
import pytest
import torch

import sm3fn
from reference import ReferenceSM3, random_gradient


def _random_grads(rng, shapes, n):
    return [{k: random_gradient(rng, s) for k, s in shapes.items()} for _ in range(n)]


@pytest.mark.parametrize("use_grad_mean", [True, False])
def test_one_sm3_step_per_k_gradients_on_their_mean(use_grad_mean):
    rng = np.random.default_rng(0)
    k, lr, momentum = 3, 0.1, 0.5
    shapes = {"w": (4, 3), "b": (3,)}
    init = {n: rng.standard_normal(s) for n, s in shapes.items()}
    refs = {n: ReferenceSM3(v, lr=lr, momentum=momentum) for n, v in init.items()}
    tx = sm3fn.MultiSteps(sm3fn.sm3(lr, momentum=momentum), every_k_schedule=k, use_grad_mean=use_grad_mean)
    params = {n: torch.tensor(v) for n, v in init.items()}
    state = tx.init(params)
    grads = _random_grads(rng, shapes, 4 * k)
    for t, g in enumerate(grads):
        updates, state = tx.update({n: torch.tensor(v) for n, v in g.items()}, state, params)
        params = sm3fn.apply_updates(params, updates)
        emitted = (t + 1) % k == 0
        assert bool(tx.has_updated(state)) == emitted
        assert int(state["mini_step"]) == (t + 1) % k and int(state["gradient_step"]) == (t + 1) // k
        if emitted:
            for n, ref in refs.items():
                combined = sum(grads[s][n] for s in range(t + 1 - k, t + 1))
                ref.step(combined / k if use_grad_mean else combined)
        else:
            assert all(torch.equal(u, torch.zeros_like(u)) for u in updates.values())  # zero until the k-th
        for n, ref in refs.items():
            np.testing.assert_allclose(params[n].numpy(), ref.p, rtol=1e-10, atol=1e-12)


def test_every_k_schedule_varies_the_batch():
    # k = 1, 2, 3, 3, ...: the schedule sees the count of inner steps taken
    rng = np.random.default_rng(1)
    tx = sm3fn.MultiSteps(sm3fn.scale(-1.0), lambda step: torch.clamp(step + 1, max=3))
    params = {"w": torch.zeros(3, dtype=torch.float64)}
    state = tx.init(params)
    grads = [torch.tensor(rng.standard_normal(3)) for _ in range(9)]
    emitted = []
    for t, g in enumerate(grads):
        u, state = tx.update({"w": g}, state, params)
        if bool(tx.has_updated(state)):
            emitted.append((t, u["w"]))
    assert [t for t, _ in emitted] == [0, 2, 5, 8]
    for (t, u), (lo, hi) in zip(emitted, [(0, 1), (1, 3), (3, 6), (6, 9)]):
        torch.testing.assert_close(u, -torch.stack(grads[lo:hi]).mean(0))


def test_matches_optax_multisteps():
    optax = pytest.importorskip("optax", reason="optax not installed: the reference test above still runs")
    jnp = pytest.importorskip("jax.numpy")
    rng = np.random.default_rng(2)
    theirs = optax.MultiSteps(optax.sgd(0.1, momentum=0.9), every_k_schedule=lambda s: jnp.minimum(s + 2, 4))
    ours = sm3fn.MultiSteps(sm3fn.chain(sm3fn.trace(0.9), sm3fn.scale_by_learning_rate(0.1)),
                            lambda s: torch.clamp(s + 2, max=4))
    init = rng.standard_normal((3, 2)).astype(np.float32)
    p_ours, p_theirs = {"w": torch.tensor(init)}, {"w": jnp.asarray(init)}
    s_ours, s_theirs = ours.init(p_ours), theirs.init(p_theirs)
    for _ in range(14):
        g = rng.standard_normal((3, 2)).astype(np.float32)
        u, s_ours = ours.update({"w": torch.tensor(g)}, s_ours, p_ours)
        p_ours = sm3fn.apply_updates(p_ours, u)
        v, s_theirs = theirs.update({"w": jnp.asarray(g)}, s_theirs, p_theirs)
        p_theirs = optax.apply_updates(p_theirs, v)
        assert bool(ours.has_updated(s_ours)) == bool(theirs.has_updated(s_theirs))
        assert int(s_ours["mini_step"]) == int(s_theirs.mini_step)
        np.testing.assert_allclose(p_ours["w"].numpy(), np.asarray(p_theirs["w"]), rtol=1e-5, atol=1e-6)


def test_frozen_parameter_keeps_its_accumulator_and_tensordict_in_and_out():
    from tensordict import TensorDict

    params = TensorDict({"a": torch.randn(2, 2), "b": torch.randn(3)}, batch_size=[])
    tx = sm3fn.MultiSteps(sm3fn.sm3(0.1), 2)
    state = tx.init(params)
    updates, state = tx.update({"a": torch.ones(2, 2), "b": None}, state, params.to_dict())
    assert updates["b"] is None and torch.equal(state["acc_grads", "b"], torch.zeros(3))
    updates, state = tx.update(TensorDict({"a": torch.ones(2, 2), "b": torch.ones(3)}, []), state, params)
    assert isinstance(updates, TensorDict) and not torch.equal(updates["a"], torch.zeros(2, 2))


def test_bad_input():
    with pytest.raises(ValueError, match="every_k_schedule"):
        sm3fn.MultiSteps(sm3fn.sm3(), 0)
    with pytest.raises(TypeError, match="every_k_schedule"):
        sm3fn.MultiSteps(sm3fn.sm3(), 2.5)
    with pytest.raises(TypeError, match="inner"):
        sm3fn.MultiSteps(lambda g: g, 2)
    tx = sm3fn.MultiSteps(sm3fn.sm3(), 2)
    state = tx.init({"w": torch.zeros(2, 2)})
    before = state.clone()
    with pytest.raises(ValueError, match="'v'"):
        tx.update({"v": torch.ones(2, 2)}, state)
    with pytest.raises(ValueError, match="shape"):
        tx.update({"w": torch.ones(3, 2)}, state)
    assert (state == before).all()


def test_copies_and_is_a_gradient_transformation():
    tx = sm3fn.MultiSteps(sm3fn.identity(), 4)
    assert isinstance(tx, sm3fn.GradientTransformation)
    assert isinstance(tx.gradient_transformation(), sm3fn.GradientTransformation)
    assert tx.inner_opt is tx._args[0]
    # copy.deepcopy (e.g. of an optimizer holding it) rebuilds it from its arguments, not from (init, update)
    again = copy.deepcopy(tx)
    assert isinstance(again, sm3fn.MultiSteps) and again.inner_opt == tx.inner_opt
    state = again.init({"w": torch.zeros(2)})
    for _ in range(4):
        u, state = again.update({"w": torch.ones(2)}, state)
    assert torch.equal(u["w"], torch.ones(2)) and bool(again.has_updated(state))


# compile (fullgraph) and vmap: tests/test_transforms.py, with the other transforms


def test_as_a_torch_optimizer():
    # FunctionalOptimizer keeps the counters as group state and acc_grads per parameter
    torch.manual_seed(3)
    p = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    opt = sm3fn.optim.FunctionalOptimizer([p], sm3fn.MultiSteps(sm3fn.sm3(0.1), 2))
    params = {"w": p.detach().clone()}
    tx = sm3fn.MultiSteps(sm3fn.sm3(0.1), 2)
    state = tx.init(params)
    for _ in range(4):
        g = torch.randn(4, 3, dtype=torch.float64)
        p.grad = g.clone()
        opt.step()
        updates, state = tx.update({"w": g}, state, params)
        params = sm3fn.apply_updates(params, updates)
        torch.testing.assert_close(p.detach(), params["w"], rtol=0, atol=0)
    saved = opt.state_dict()
    again = sm3fn.optim.FunctionalOptimizer([torch.nn.Parameter(p.detach().clone())],
                                            sm3fn.MultiSteps(sm3fn.sm3(0.1), 2))
    again.load_state_dict(saved)
