"""torch.compile(fullgraph=True) of whole functional SM3 training steps.

No graph breaks (fullgraph raises on one), results equal to eager, and no
recompilation (``error_on_recompile``) while the step count, the scheduled
learning rate and hyperparameters kept in the state change.
"""

import pytest
import torch
from tensordict import TensorDict
from torch._dynamo.utils import counters
from torch.func import grad

import sm3fn

pytestmark = pytest.mark.slow


def warmup_decay(count: torch.Tensor) -> torch.Tensor:
    """Torch-op schedule: linear warm-up over 3 steps, then linear decay to 0 at step 20."""
    c = count.to(torch.float32)
    return 0.1 * torch.clamp(torch.minimum((c + 1) / 3, (20 - c) / 18), min=0.0)


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))


def batches(n):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 4, generator=gen), torch.randn(32, 2, generator=gen)) for _ in range(n)]


def assert_trees_close(a, b, **tol):
    a = a if isinstance(a, TensorDict) else TensorDict(a, batch_size=[])
    b = b if isinstance(b, TensorDict) else TensorDict(b, batch_size=[])
    assert set(a.keys(include_nested=True, leaves_only=True)) == set(b.keys(include_nested=True, leaves_only=True))
    for key, leaf in a.items(include_nested=True, leaves_only=True):
        torch.testing.assert_close(leaf, b[key], **tol, msg=str(key))


def test_compiled_training_step_fullgraph_inductor(fresh_dynamo):
    """functional_call + grad + sm3 (momentum, scheduled lr) + apply_updates in one graph."""
    model = make_model()
    params = {k: v.detach() for k, v in model.named_parameters()}
    tx = sm3fn.sm3(learning_rate=warmup_decay, momentum=0.9)

    def loss_fn(p, x, y):
        return ((torch.func.functional_call(model, p, (x,)) - y) ** 2).mean()

    def train_step(p, state, x, y):
        g, loss = torch.func.grad_and_value(loss_fn)(p, x, y)
        updates, state = tx.update(g, state, p)
        return sm3fn.apply_updates(p, updates), state, loss

    compiled = torch.compile(train_step, fullgraph=True)
    data = batches(8)
    p_eager, s_eager = params, tx.init(params)
    p_comp, s_comp = params, tx.init(params)
    p_comp, s_comp, _ = compiled(p_comp, s_comp, *data[0])  # compiles once here
    p_eager, s_eager, _ = train_step(p_eager, s_eager, *data[0])
    with torch._dynamo.config.patch(error_on_recompile=True):
        for x, y in data[1:]:
            p_comp, s_comp, loss_c = compiled(p_comp, s_comp, x, y)
            p_eager, s_eager, loss_e = train_step(p_eager, s_eager, x, y)
            torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    assert s_comp["learning_rate", "count"] == 8
    assert_trees_close(p_comp, p_eager, rtol=1e-5, atol=1e-6)
    assert_trees_close(s_comp, s_eager, rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    # the schedule really moved: eight different rates were used
    assert len({round(float(warmup_decay(torch.tensor(i))), 6) for i in range(8)}) == 8


@pytest.mark.parametrize("backend", ["aot_eager"])
def test_compiled_step_with_injected_hyperparams_does_not_recompile(fresh_dynamo, backend):
    """Hyperparameters in the state, params as a TensorDict with sm3fn.func.functional_call:
    changing lr, momentum and beta between steps reuses the one graph."""
    model = make_model()
    params = TensorDict.from_module(model).detach()
    tx = sm3fn.inject_hyperparams(sm3fn.sm3)(learning_rate=0.05, momentum=0.5, beta=0.0)

    def loss_fn(p, x, y):
        return ((sm3fn.func.functional_call(model, p, (x,)) - y) ** 2).mean()

    def train_step(p, state, x, y):
        updates, state = tx.update(grad(loss_fn)(p, x, y), state, p)
        return sm3fn.apply_updates(p, updates), state

    compiled = torch.compile(train_step, fullgraph=True, backend=backend)
    data = batches(6)
    p_c, s_c = compiled(params, tx.init(params), *data[0])
    p_e, s_e = train_step(params, tx.init(params), *data[0])
    values = [(0.1, 0.9, 0.0), (0.02, 0.0, 0.5), (0.3, 0.7, 0.99), (0.0, 0.2, 0.1), (0.05, 0.5, 0.0)]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for (x, y), (lr, mom, beta) in zip(data[1:], values):
            for s in (s_c, s_e):
                s["hyperparams", "learning_rate"] = torch.tensor(lr)
                s["hyperparams", "momentum"] = torch.tensor(mom)
                s["hyperparams", "beta"] = torch.tensor(beta)
            p_c, s_c = compiled(p_c, s_c, x, y)
            p_e, s_e = train_step(p_e, s_e, x, y)
            assert_trees_close(p_c, p_e, rtol=1e-5, atol=1e-6)
    assert_trees_close(s_c, s_e, rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1


def test_compiled_step_closure_tensor_lr_changes_without_recompile(fresh_dynamo):
    """A tensor learning rate given to sm3() and changed in place: same graph, new value used."""
    params = {"w": torch.randn(5, 3), "b": torch.randn(3)}
    lr = torch.tensor(0.1)
    tx = sm3fn.sm3(learning_rate=lr)

    def step(p, s, g):
        updates, s = tx.update(g, s, p)
        return sm3fn.apply_updates(p, updates), s

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    g = {"w": torch.randn(5, 3), "b": torch.randn(3)}
    compiled(params, tx.init(params), g)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for value in (0.5, 0.0, 2.0):
            lr.fill_(value)
            got, _ = compiled(params, tx.init(params), g)
            want, _ = step(params, tx.init(params), g)
            assert_trees_close(got, want, rtol=1e-6, atol=1e-7)
    # the new value was used: a first SM3 step is u = g / |g| = sign(g)
    torch.testing.assert_close(got["w"], params["w"] - 2.0 * torch.sign(g["w"]))


def test_compiled_meta_gradient_step(fresh_dynamo):
    """The meta-learning step itself (grad of an outer loss through 3 inner SM3 steps w.r.t.
    the learning rate and the initial params) compiles to one graph and matches eager."""
    model = make_model()
    params = {k: v.detach() for k, v in model.named_parameters()}
    (xs, ys), (xq, yq) = batches(2)

    def loss_fn(p, x, y):
        return ((torch.func.functional_call(model, p, (x,)) - y) ** 2).mean()

    def outer(p, lr):
        tx = sm3fn.sm3(learning_rate=lr, momentum=0.5)
        state = tx.init(p)
        for _ in range(3):
            updates, state = tx.update(grad(loss_fn)(p, xs, ys), state, p)
            p = sm3fn.apply_updates(p, updates)
        return loss_fn(p, xq, yq)

    meta_step = grad(outer, argnums=(0, 1))
    compiled = torch.compile(meta_step, fullgraph=True, backend="aot_eager")
    lr = torch.tensor(0.05)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for value in (0.05, 0.01):
            got = compiled(params, lr.fill_(value).clone())
            want = meta_step(params, lr.fill_(value).clone())
            assert_trees_close(got[0], want[0], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-7)
    assert counters["stats"]["unique_graphs"] == 1
