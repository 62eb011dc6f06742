"""Hyperparameters as tensors: meta-learned, kept in the state, swept with vmap."""

import pytest
import torch
from torch.func import grad, vmap

import diff_reference as ref
import sm3fn
from test_func_meta import F64, adapt_reference, mlp_loss, mlp_params, task_data


def run(tx, p, x, y, steps, state=None):
    state = tx.init(p) if state is None else state
    for _ in range(steps):
        updates, state = tx.update(grad(mlp_loss)(p, x, y), state, p)
        p = sm3fn.apply_updates(p, updates)
    return p, state


def reference_hyper_gradient(p0, x, y, xq, yq, steps, lr, momentum, beta):
    hp = [torch.tensor(v, dtype=F64, requires_grad=True) for v in (lr, momentum, beta)]
    leaves = {k: v.clone().requires_grad_(True) for k, v in p0.items()}
    adapted = adapt_reference(leaves, x, y, steps, lr=hp[0], momentum=hp[1], beta=hp[2])
    return torch.autograd.grad(mlp_loss(adapted, xq, yq), hp, allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("how", ["arguments", "injected"])
def test_meta_gradient_wrt_learning_rate_momentum_beta(how):
    """d(query loss)/d(lr, momentum, beta) through 4 steps equals the reference's autograd."""
    gen = torch.Generator().manual_seed(11)
    p0 = mlp_params(gen)
    (x, y), (xq, yq) = task_data(gen), task_data(gen)
    values = (0.05, 0.6, 0.8)

    if how == "arguments":
        def outer(lr, momentum, beta):
            tx = sm3fn.sm3(learning_rate=lr, momentum=momentum, beta=beta)
            return mlp_loss(run(tx, p0, x, y, 4)[0], xq, yq)
    else:
        tx = sm3fn.inject_hyperparams(sm3fn.sm3)(learning_rate=1.0, momentum=0.0, beta=0.0)

        def outer(lr, momentum, beta):
            state = tx.init(p0)
            # values set in the state after init: what a meta-learner does
            state["hyperparams", "learning_rate"] = lr
            state["hyperparams", "momentum"] = momentum
            state["hyperparams", "beta"] = beta
            return mlp_loss(run(tx, p0, x, y, 4, state)[0], xq, yq)

    ours = grad(outer, argnums=(0, 1, 2))(*(torch.tensor(v, dtype=F64) for v in values))
    theirs = reference_hyper_gradient(p0, x, y, xq, yq, 4, *values)
    for name, a, b in zip(("lr", "momentum", "beta"), ours, theirs):
        assert b != 0
        torch.testing.assert_close(a, b, rtol=1e-9, atol=0, msg=name)


def test_meta_learned_learning_rate_requires_grad_plain_autograd():
    """A leaf lr tensor that requires grad, stored in the injected state, gets .grad."""
    gen = torch.Generator().manual_seed(12)
    p0 = mlp_params(gen)
    (x, y), (xq, yq) = task_data(gen), task_data(gen)
    lr = torch.tensor(0.05, dtype=F64, requires_grad=True)
    tx = sm3fn.inject_hyperparams(sm3fn.sm3)(learning_rate=lr, momentum=0.6)
    state = tx.init(p0)
    assert state["hyperparams", "learning_rate"] is lr
    assert state["hyperparams", "momentum"].dtype == F64  # numbers take the params' dtype
    params = {k: v.clone().requires_grad_(True) for k, v in p0.items()}
    p = params
    for _ in range(3):
        gs = torch.autograd.grad(mlp_loss(p, x, y), list(p.values()), create_graph=True)
        updates, state = tx.update(dict(zip(p, gs)), state, p)
        p = sm3fn.apply_updates(p, updates)
    mlp_loss(p, xq, yq).backward()
    expected = reference_hyper_gradient(p0, x, y, xq, yq, 3, 0.05, 0.6, 0.0)[0]
    torch.testing.assert_close(lr.grad, expected, rtol=1e-9, atol=0)
    assert state["count"] == 3


def test_vmap_sweep_over_hyperparameter_values():
    """A vmapped sweep (tensor arguments, or a state with batch_size [n]) equals a loop of float runs."""
    gen = torch.Generator().manual_seed(13)
    p0 = mlp_params(gen)
    x, y = task_data(gen)
    lrs = torch.tensor([0.003, 0.03, 0.1, 0.3], dtype=F64)
    moms = torch.tensor([0.0, 0.5, 0.9, 0.3], dtype=F64)

    def final_loss(lr, momentum):
        return mlp_loss(run(sm3fn.sm3(learning_rate=lr, momentum=momentum), p0, x, y, 3)[0], x, y)

    looped = torch.stack([
        mlp_loss(run(sm3fn.sm3(learning_rate=float(a), momentum=float(b)), p0, x, y, 3)[0], x, y)
        for a, b in zip(lrs, moms)
    ])
    torch.testing.assert_close(vmap(final_loss)(lrs, moms), looped, rtol=1e-12, atol=0)

    tx = sm3fn.inject_hyperparams(sm3fn.sm3)(learning_rate=0.1, momentum=0.5)
    states = sm3fn.func.expand(tx.init(p0), len(lrs)).clone()
    states["hyperparams", "learning_rate"] = lrs
    states["hyperparams", "momentum"] = moms

    def final_loss_from_state(state):
        return mlp_loss(run(tx, p0, x, y, 3, state)[0], x, y)

    torch.testing.assert_close(vmap(final_loss_from_state)(states), looped, rtol=1e-12, atol=0)
    assert len(set(looped.tolist())) == len(lrs)  # the sweep really varies


def test_injected_schedule_is_evaluated_on_the_count():
    gen = torch.Generator().manual_seed(14)
    p0 = mlp_params(gen)
    x, y = task_data(gen)
    schedule = lambda count: 0.1 / (1.0 + count.to(F64))  # noqa: E731
    tx = sm3fn.inject_hyperparams(sm3fn.sm3)(learning_rate=schedule)
    p, state = run(tx, p0, x, y, 3)
    assert state["count"] == 3
    torch.testing.assert_close(state["hyperparams", "learning_rate"], torch.tensor(0.1 / 3, dtype=F64))
    # the same three steps with the rates written out
    q, s = p0, ref.init(p0)
    for t in range(3):
        gs = grad(mlp_loss)(q, x, y)
        q, s = ref.step(q, gs, s, lr=0.1 / (1 + t))
    for k in p:
        torch.testing.assert_close(p[k], q[k], rtol=1e-12, atol=1e-14)


def test_inject_hyperparams_bad_arguments():
    with pytest.raises(TypeError, match="static_args"):
        sm3fn.inject_hyperparams(sm3fn.sm3)(learning_rate=0.1, eps=1e-30)
    with pytest.raises(ValueError, match="learning_rate must be in"):
        sm3fn.inject_hyperparams(sm3fn.sm3)(learning_rate=-0.1)
    with pytest.raises(TypeError, match="unexpected keyword|got an unexpected"):
        sm3fn.inject_hyperparams(sm3fn.sm3)(lr=0.1)
    with pytest.raises(TypeError, match="factory must be callable"):
        sm3fn.inject_hyperparams(0.1)
    # eps static: accepted and passed through as a float
    tx = sm3fn.inject_hyperparams(sm3fn.sm3, static_args=("eps",))(learning_rate=0.1, eps=1e-8)
    state = tx.init({"w": torch.randn(3, 2)})
    assert set(state["hyperparams"].keys()) == {"learning_rate"}
    bad = state.clone()
    del bad["hyperparams", "learning_rate"]
    before = state.clone()
    with pytest.raises(ValueError, match="hyperparams"):
        tx.update({"w": torch.randn(3, 2)}, bad)
    swept_without_vmap = state.clone()
    swept_without_vmap["hyperparams", "learning_rate"] = torch.tensor([0.1, 0.2])
    with pytest.raises(ValueError, match="must be a 0-d tensor"):
        tx.update({"w": torch.randn(3, 2)}, swept_without_vmap)
    assert (state == before).all()


def test_injected_state_saves_and_loads(tmp_path):
    tx = sm3fn.inject_hyperparams(sm3fn.sm3)(learning_rate=0.1, momentum=0.9)
    params = {"w": torch.randn(4, 3)}
    _, state = tx.update({"w": torch.randn(4, 3)}, tx.init(params), params)
    torch.save(state, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    assert (loaded == state).all() and loaded["count"] == 1
    g = {"w": torch.randn(4, 3)}
    a, _ = tx.update(g, state, params)
    b, _ = tx.update(g, loaded, params)
    assert torch.equal(a["w"], b["w"])


def test_tensor_learning_rate_changed_in_place_applies():
    """sm3(learning_rate=lr_tensor) reads the tensor at every update, as torch.optim does."""
    gen = torch.Generator().manual_seed(15)
    p0 = mlp_params(gen)
    x, y = task_data(gen)
    lr = torch.tensor(0.05, dtype=F64)
    tx = sm3fn.sm3(learning_rate=lr)
    p, state = p0, tx.init(p0)
    q, s = p0, ref.init(p0)
    for value in (0.05, 0.2, 0.0, 0.01):
        lr.fill_(value)
        updates, state = tx.update(grad(mlp_loss)(p, x, y), state, p)
        p = sm3fn.apply_updates(p, updates)
        q, s = ref.step(q, grad(mlp_loss)(q, x, y), s, lr=value)
    for k in p:
        torch.testing.assert_close(p[k], q[k], rtol=1e-12, atol=1e-14)


def test_inject_hyperparams_static_callable_and_list():
    """Non-schedule arguments pass through: sm3's sparse= as a list, or a predicate named static."""
    params = {"emb": torch.randn(6, 3), "w": torch.randn(3, 2)}
    for sparse, static in ((["emb"], ()), (lambda name: name == "emb", ("sparse",))):
        tx = sm3fn.inject_hyperparams(sm3fn.sm3, static_args=static)(learning_rate=0.1, sparse=sparse)
        state = tx.init(params)
        assert set(state["hyperparams"].keys()) == {"learning_rate"}
        assert set(state["inner_state", "sm3", "emb"].keys()) == {"accumulator_0"}  # rows only
