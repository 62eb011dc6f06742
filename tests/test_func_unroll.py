"""Long unrolls: stop_gradient keeps truncated backpropagation through SM3 bounded."""

import gc

import torch
from tensordict import TensorDict
from torch.func import grad

import sm3fn

F64 = torch.float64


def graph_size(t: torch.Tensor) -> int:
    """Number of autograd nodes reachable from ``t``: the graph a backward would walk."""
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(n for n, _ in node.next_functions)
    return len(seen)


def live_tensors() -> int:
    gc.collect()
    # issubclass(type(o)) rather than isinstance: no __class__ lookups on odd module objects
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


def loss_fn(p, x, y):
    return ((torch.tanh(x @ p["w"] + p["b"]) - y) ** 2).mean()


def truncated_unroll(steps, window, cut_params=True, cut_state=True, record_tensors_at=()):
    """Meta-learns a learning rate with truncated backprop through ``steps`` SM3 steps.

    Returns the autograd graph size at the end of each window, and live tensor
    counts at the steps in ``record_tensors_at``.
    """
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 4, generator=gen), torch.randn(8, 3, generator=gen)
    params = {"w": torch.randn(4, 3, generator=gen), "b": torch.zeros(3)}
    log_lr = torch.tensor(-3.0, requires_grad=True)
    tx = sm3fn.inject_hyperparams(sm3fn.sm3)(learning_rate=0.05, momentum=0.9)
    state = tx.init(params)
    sizes, tensors = [], {}
    for t in range(steps):
        if t % window == 0:
            if cut_params:
                params = sm3fn.stop_gradient(params)
            if cut_state:
                state = sm3fn.stop_gradient(state)
            state["hyperparams", "learning_rate"] = log_lr.exp()
            params = {k: v.requires_grad_(True) if not v.requires_grad else v for k, v in params.items()}
        gs = torch.autograd.grad(loss_fn(params, x, y), list(params.values()), create_graph=True)
        updates, state = tx.update(dict(zip(params, gs)), state, params)
        params = sm3fn.apply_updates(params, updates)
        if (t + 1) % window == 0:
            meta_loss = loss_fn(params, x, y)
            sizes.append(graph_size(meta_loss))
            meta_loss.backward(retain_graph=not (cut_params and cut_state))
        if t + 1 in record_tensors_at:
            tensors[t + 1] = live_tensors()
    return sizes, tensors, log_lr.grad


def test_truncated_backprop_graph_and_tensors_stay_bounded_over_1000_steps():
    sizes, tensors, g = truncated_unroll(1000, window=10, record_tensors_at=(200, 1000))
    assert len(sizes) == 100
    assert max(sizes) == min(sizes), "every window's graph has the same size"
    # no growth (other tests' garbage may be freed meanwhile, so a drop is fine)
    assert tensors[1000] - tensors[200] <= 5, tensors
    assert g is not None and torch.isfinite(g)


def test_without_stop_gradient_the_graph_grows():
    """The measure can fail: keeping the state (or params) attached chains the windows."""
    sizes, _, _ = truncated_unroll(40, window=10, cut_state=False)
    assert sizes[-1] > 3 * sizes[0]
    sizes, _, _ = truncated_unroll(40, window=10, cut_params=False)
    assert sizes[-1] > 3 * sizes[0]


def test_stop_gradient_cuts_inside_torch_func_grad():
    """Inside grad, the gradient of a window after the cut equals a fresh run from the cut values."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 4, generator=gen, dtype=F64), torch.randn(8, 3, generator=gen, dtype=F64)
    p0 = {"w": torch.randn(4, 3, generator=gen, dtype=F64), "b": torch.zeros(3, dtype=F64)}

    def run(lr, p, state, steps):
        tx = sm3fn.sm3(learning_rate=lr, momentum=0.5)
        state = tx.init(p) if state is None else state
        for _ in range(steps):
            updates, state = tx.update(grad(loss_fn)(p, x, y), state, p)
            p = sm3fn.apply_updates(p, updates)
        return p, state

    def truncated(lr):
        p, s = run(lr, p0, None, 5)
        p, s = sm3fn.stop_gradient(p), sm3fn.stop_gradient(s)
        return loss_fn(run(lr, p, s, 5)[0], x, y)

    lr = torch.tensor(0.05, dtype=F64)
    p_cut, s_cut = run(lr, p0, None, 5)  # computed outside: no graph at all
    fresh = grad(lambda lr: loss_fn(run(lr, p_cut, s_cut, 5)[0], x, y))(lr)
    full = grad(lambda lr: loss_fn(run(lr, *run(lr, p0, None, 5), 5)[0], x, y))(lr)
    got = grad(truncated)(lr)
    torch.testing.assert_close(got, fresh, rtol=1e-12, atol=0)
    assert not torch.allclose(got, full)  # the cut changed the meta-gradient


def test_stop_gradient_keeps_structure():
    params = {"w": torch.randn(3, 2, requires_grad=True), "nested": {"b": torch.randn(2, requires_grad=True)}, "frozen": None}
    out = sm3fn.stop_gradient(params)
    assert set(out) == {"w", "nested", "frozen"} and out["frozen"] is None
    assert not out["w"].requires_grad and not out["nested"]["b"].requires_grad
    assert torch.equal(out["w"], params["w"]) and params["w"].requires_grad
    state = sm3fn.func.expand(sm3fn.sm3(momentum=0.9).init({"w": torch.randn(3, 2)}), 4)
    cut = sm3fn.stop_gradient(state)
    assert isinstance(cut, TensorDict) and cut.batch_size == (4,)
    assert "learning_rate" in cut.keys()  # empty stage state survives
    assert set(cut.keys(include_nested=True)) == set(state.keys(include_nested=True))
    try:
        sm3fn.stop_gradient([torch.ones(1)])
    except TypeError as e:
        assert "list" in str(e)
    else:
        raise AssertionError("a list is not a tree")
