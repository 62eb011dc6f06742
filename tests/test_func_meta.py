"""Differentiating through SM3 inner loops: torch.func.grad, gradcheck, vmap, zero gradients.

Meta-gradients are checked against an independent SM3 written in the test
(``diff_reference``) differentiated with plain autograd (``create_graph=True``).
"""

import pytest
import torch
from tensordict import TensorDict
from torch.func import functional_call, grad, vmap

import diff_reference as ref
import sm3fn

F64 = torch.float64


def mlp_params(gen, dtype=F64):
    return {
        "w1": torch.randn(3, 16, dtype=dtype, generator=gen) * 0.7,
        "b1": torch.randn(16, dtype=dtype, generator=gen) * 0.1,
        "w2": torch.randn(16, 1, dtype=dtype, generator=gen) * 0.3,
        "s": torch.tensor(1.3, dtype=dtype),
    }


def mlp_loss(p, x, y):
    out = p["s"] * (torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"])
    return ((out - y) ** 2).mean()


def task_data(gen, n=12, dtype=F64):
    x = torch.rand(n, 3, dtype=dtype, generator=gen) * 4 - 2
    y = torch.sin(x.sum(1, keepdim=True)) + 0.1 * torch.randn(n, 1, dtype=dtype, generator=gen)
    return x, y


def adapt_sm3fn(tx, params, x, y, steps):
    state = tx.init(params)
    for _ in range(steps):
        g = grad(mlp_loss)(params, x, y)
        updates, state = tx.update(g, state, params)
        params = sm3fn.apply_updates(params, updates)
    return params, state


def adapt_reference(params, x, y, steps, **hp):
    state = ref.init(params)
    for _ in range(steps):
        loss = mlp_loss(params, x, y)
        gs = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        params, state = ref.step(params, dict(zip(params, gs)), state, **hp)
    return params


@pytest.mark.parametrize("momentum,beta", [(0.0, 0.0), (0.6, 0.0), (0.5, 0.9)])
def test_maml_meta_gradient_matches_autograd_reference(momentum, beta):
    """grad of the post-adaptation query loss w.r.t. the initial params, k = 4 SM3 steps."""
    gen = torch.Generator().manual_seed(1)
    p0 = mlp_params(gen)
    (xs, ys), (xq, yq) = task_data(gen), task_data(gen)
    lr, k = 0.05, 4
    tx = sm3fn.sm3(learning_rate=lr, momentum=momentum, beta=beta)

    def outer(p):
        adapted, _ = adapt_sm3fn(tx, p, xs, ys, k)
        return mlp_loss(adapted, xq, yq)

    ours = grad(outer)(p0)

    leaves = {n: t.clone().requires_grad_(True) for n, t in p0.items()}
    adapted = adapt_reference(leaves, xs, ys, k, lr=lr, momentum=momentum, beta=beta)
    theirs = torch.autograd.grad(mlp_loss(adapted, xq, yq), list(leaves.values()))
    for name, t in zip(leaves, theirs):
        assert t.abs().max() > 0  # the meta-gradient is not trivially zero
        torch.testing.assert_close(ours[name], t, rtol=1e-9, atol=1e-12, msg=name)


def test_gradcheck_and_gradgradcheck_of_one_update():
    """One sm3 update (2-d and 1-d parameter, momentum), differentiated w.r.t. every input:
    gradients, accumulators, momentum buffers, params and the tensor hyperparameters."""
    gen = torch.Generator().manual_seed(2)

    def one_update(w, b, gw, gb, a0, a1, ab, mw, mb, lr, momentum, beta):
        tx = sm3fn.sm3(learning_rate=lr, momentum=momentum, beta=beta)
        state = TensorDict(
            {
                "sm3": {"w": {"accumulator_0": a0, "accumulator_1": a1}, "b": {"accumulator_0": ab}},
                "momentum": {"w": mw, "b": mb},
                "learning_rate": {},
            },
            batch_size=[],
        )
        params = {"w": w, "b": b}
        updates, state = tx.update({"w": gw, "b": gb}, state, params)
        new = sm3fn.apply_updates(params, updates)
        return (new["w"], new["b"], state["sm3", "w", "accumulator_0"],
                state["sm3", "w", "accumulator_1"], state["sm3", "b", "accumulator_0"],
                state["momentum", "w"])

    def r(*shape, positive=False):
        t = torch.randn(*shape, dtype=F64, generator=gen)
        return (t.abs() + 0.1 if positive else t).requires_grad_(True)

    inputs = (
        r(4, 3), r(3), r(4, 3), r(3),
        r(4, 1, positive=True), r(1, 3, positive=True), r(3, positive=True),
        r(4, 3), r(3),
        torch.tensor(0.1, dtype=F64, requires_grad=True),
        torch.tensor(0.7, dtype=F64, requires_grad=True),
        torch.tensor(0.3, dtype=F64, requires_grad=True),
    )
    assert torch.autograd.gradcheck(one_update, inputs)
    assert torch.autograd.gradgradcheck(one_update, inputs)


def test_vmap_tasks_share_initial_params():
    """vmap over per-task data with shared initial params equals a loop over tasks."""
    gen = torch.Generator().manual_seed(3)
    p0 = mlp_params(gen)
    T = 5
    data = [task_data(gen) for _ in range(T)]
    xs, ys = torch.stack([d[0] for d in data]), torch.stack([d[1] for d in data])
    tx = sm3fn.sm3(learning_rate=0.05, momentum=0.5)

    def post_loss(p, x, y):
        adapted, _ = adapt_sm3fn(tx, p, x, y, 3)
        return mlp_loss(adapted, x, y)

    batched = vmap(post_loss, in_dims=(None, 0, 0))(p0, xs, ys)
    looped = torch.stack([post_loss(p0, x, y) for x, y in data])
    torch.testing.assert_close(batched, looped, rtol=1e-12, atol=0)

    # and the meta-gradient of the mean over tasks, through vmap
    meta = grad(lambda p: vmap(post_loss, in_dims=(None, 0, 0))(p, xs, ys).mean())(p0)
    meta_loop = grad(lambda p: torch.stack([post_loss(p, x, y) for x, y in data]).mean())(p0)
    for k in p0:
        torch.testing.assert_close(meta[k], meta_loop[k], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("container", ["dict", "tensordict"])
def test_vmap_per_task_params_and_state(container):
    """Per-task params and optimizer state carry a task dim; state TensorDicts have batch_size [T]."""
    gen = torch.Generator().manual_seed(4)
    T = 4
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    per_task = [{k: torch.randn(v.shape, dtype=F64, generator=gen) for k, v in model.named_parameters()}
                for _ in range(T)]
    params = {k: torch.stack([p[k] for p in per_task]) for k in per_task[0]}
    if container == "tensordict":
        params = TensorDict(params, batch_size=[T])
    data = [task_data(gen) for _ in range(T)]
    xs, ys = torch.stack([d[0] for d in data]), torch.stack([d[1] for d in data])
    tx = sm3fn.sm3(learning_rate=0.1, momentum=0.9, beta=0.5)

    def loss(p, x, y):
        return ((sm3fn.func.functional_call(model, p, (x,)) - y) ** 2).mean()

    def step(p, s, x, y):
        updates, s = tx.update(grad(loss)(p, x, y), s, p)
        return sm3fn.apply_updates(p, updates), s

    state = vmap(tx.init)(params)
    assert state.batch_size == (T,)
    assert state["sm3"].batch_size == (T,) and state["sm3", "0.weight"].batch_size == (T,)
    assert state["sm3", "0.weight", "accumulator_0"].shape == (T, 8, 1)
    for _ in range(3):
        params, state = vmap(step)(params, state, xs, ys)
    assert type(params) is (dict if container == "dict" else TensorDict)
    assert state.batch_size == (T,)

    for t in range(T):  # each task on its own, unbatched
        p, s = dict(per_task[t]), tx.init(per_task[t])
        for _ in range(3):
            p, s = step(p, s, *data[t])
        for k in p:
            torch.testing.assert_close(params[k][t], p[k], rtol=1e-12, atol=1e-14)
        for key, leaf in s.items(include_nested=True, leaves_only=True):
            torch.testing.assert_close(state[t][key], leaf, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- zero gradients


def sparse_use_params(gen, dtype):
    p = {
        "emb": torch.randn(10, 4, generator=gen) * 0.5,
        "w1": torch.randn(4, 6, generator=gen) * 0.5,
        "b1": torch.randn(6, generator=gen) * 0.1,
        "w2": torch.randn(6, 1, generator=gen) * 0.5,
    }
    p["b1"][:3] = -50.0  # three ReLU units that never fire: dead
    return {k: v.to(dtype) for k, v in p.items()}


MASK = torch.tensor([[1.0], [1.0], [1.0], [1.0], [0.0], [1.0]])  # w2[4] is used with weight 0


def sparse_use_loss(p, idx, y):
    h = torch.relu(p["emb"][idx] @ p["w1"] + p["b1"])  # rows 6..9 of emb never looked up
    out = h @ (p["w2"] * MASK.to(h.dtype))
    return ((out - y) ** 2).mean()


@pytest.mark.parametrize("beta", [0.0, 0.9])
def test_meta_gradient_finite_with_exactly_zero_gradients_float32(beta):
    """Dead ReLUs, a weight-zero parameter and unused embedding rows give exact zeros in
    the inner gradients; with eps = 1e-30 in float32 the naive rsqrt form's meta-gradient
    is NaN, sm3fn's is finite and matches the float64 reference."""
    gen = torch.Generator().manual_seed(5)
    idx = torch.randint(0, 6, (16,), generator=gen)
    y = torch.randn(16, 1, generator=gen)
    k, lr = 3, 0.05

    def outer_ours(p):
        tx = sm3fn.sm3(learning_rate=lr, momentum=0.5, beta=beta)  # eps defaults to 1e-30
        state = tx.init(p)
        for _ in range(k):
            updates, state = tx.update(grad(sparse_use_loss)(p, idx, y), state, p)
            p = sm3fn.apply_updates(p, updates)
        return sparse_use_loss(p, idx, y) + (p["emb"] ** 2).sum() + (p["w2"] ** 2).sum()

    def outer_reference(dtype):
        leaves = {n: t.requires_grad_(True) for n, t in sparse_use_params(torch.Generator().manual_seed(5), dtype).items()}
        p, s = dict(leaves), ref.init(leaves)
        for _ in range(k):
            gs = torch.autograd.grad(sparse_use_loss(p, idx, y.to(dtype)), list(p.values()), create_graph=True)
            p, s = ref.step(p, dict(zip(p, gs)), s, lr=lr, momentum=0.5, beta=beta)
        loss = sparse_use_loss(p, idx, y.to(dtype)) + (p["emb"] ** 2).sum() + (p["w2"] ** 2).sum()
        return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))

    p0 = sparse_use_params(torch.Generator().manual_seed(5), torch.float32)
    g0 = grad(sparse_use_loss)(p0, idx, y)
    assert (g0["emb"][6:] == 0).all() and (g0["w2"][4] == 0).all()
    assert (g0["w1"][:, :3] == 0).all() and (g0["b1"][:3] == 0).all()

    naive = outer_reference(torch.float32)
    assert any(torch.isnan(t).any() for t in naive.values()), "the naive rsqrt form should give NaN"

    ours = grad(outer_ours)(p0)
    exact = outer_reference(F64)
    for name in p0:
        assert torch.isfinite(ours[name]).all(), name
        assert torch.isfinite(exact[name]).all(), name
        torch.testing.assert_close(ours[name].double(), exact[name], rtol=1e-4, atol=1e-5, msg=name)
