"""The SM3 step as custom ops (sm3fn/_kernels/ops.py), tensor lr, and torch.compile(opt.step).

The ops are held to the float64 reference (tests/reference.py) and checked
with ``torch.library.opcheck`` (schema, fake implementation, aliasing);
the compiled optimizer step is held to the eager one, must call the op
(not the traced blocked math) and must not recompile while a scheduler
changes ``lr`` and ``momentum``.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from reference import ReferenceSM3, random_gradient
from torch._dynamo.utils import counters

import sm3fn
from sm3fn._kernels import ops
from sm3fn._sm3_math import init_accumulators
from sm3fn.optim import SM3, FunctionalOptimizer

SHAPES = [(), (7,), (5, 6), (2, 3, 4)]


def _state(p, momentum):
    accs = list(init_accumulators(p, p.dtype))
    return accs, (torch.zeros_like(p) if momentum else None)


@pytest.mark.parametrize("momentum,beta", [(0.0, 0.0), (0.9, 0.0), (0.5, 0.3)])
@pytest.mark.parametrize("fused", [None, False])
def test_ops_match_float64_reference(momentum, beta, fused):
    """Four steps of one call for several shapes at once: the in-place op moves the
    parameters, the out-of-place op returns the update, both as the reference does."""
    rng = np.random.default_rng(7)
    p0 = [rng.standard_normal(s) for s in SHAPES]
    refs = [ReferenceSM3(x, lr=0.05, momentum=momentum, beta=beta) for x in p0]
    params = [torch.tensor(x) for x in p0]
    states = [_state(p, momentum) for p in params]
    pure_p = [p.clone() for p in params]
    pure_accs = [[x.clone() for x in a] for a, _ in states]
    pure_moms = [None if m is None else m.clone() for _, m in states]
    for _ in range(4):
        grads = [torch.tensor(random_gradient(rng, s)) for s in SHAPES]
        for ref, g in zip(refs, grads):
            ref.step(g.numpy())
        before = [g.clone() for g in grads]
        ops.step_(params, grads, [a for a, _ in states], [m for _, m in states],
                  lr=0.05, momentum=momentum, beta=beta, eps=1e-30, fused=fused)
        inputs = [[a.clone() for a in accs] for accs in pure_accs]
        updates, pure_accs, pure_moms = ops.step(grads, pure_accs, pure_moms, lr=0.05,
                                                 momentum=momentum, beta=beta, eps=1e-30, fused=fused)
        for old, new in zip(inputs, pure_accs):
            assert all(a is not b for a, b in zip(old, new))
        pure_p = [p + u for p, u in zip(pure_p, updates)]
        for g, b in zip(grads, before):
            assert torch.equal(g, b)  # gradients are only read
    for ref, p, q, (accs, _), new_accs in zip(refs, params, pure_p, states, pure_accs):
        np.testing.assert_allclose(p.numpy(), ref.p, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(q.numpy(), ref.p, rtol=1e-12, atol=1e-14)
        for a, b, want in zip(accs, new_accs, ref.acc):
            np.testing.assert_allclose(a.reshape(-1).numpy(), np.reshape(want, -1), rtol=1e-12)
            assert torch.equal(a, b)


def test_out_of_place_op_without_lr_gives_u_and_leaves_its_inputs():
    """``lr`` None makes the update ``u`` itself, as scale_by_sm3's; the state it was given is
    not touched, and a None gradient keeps its state."""
    rng = np.random.default_rng(3)
    g = torch.tensor(random_gradient(rng, (4, 5)), dtype=torch.float32)
    accs = [a + 0.5 for a in init_accumulators(g, torch.float32)]
    kept = [a.clone() for a in accs]
    (u, none), (new, same), _ = ops.step([g, None], [accs, kept], beta=0.0, eps=1e-30)
    state = sm3fn.scale_by_sm3().init({"w": g})
    state["w", "accumulator_0"], state["w", "accumulator_1"] = accs
    want, want_state = sm3fn.scale_by_sm3().update({"w": g}, state)
    torch.testing.assert_close(u, want["w"])
    torch.testing.assert_close(new[1], want_state["w", "accumulator_1"])
    assert all(torch.equal(a, b) for a, b in zip(accs, kept))
    assert none is None and same[0] is kept[0]


def test_opcheck_both_ops():
    """torch.library.opcheck: schema (mutations declared), fake implementations, dispatch."""
    torch.manual_seed(0)
    params = [torch.randn(5, 7), torch.randn(3)]
    grads = [torch.randn_like(p) for p in params]
    flat = [a + 1.0 for p in params for a in init_accumulators(p, p.dtype)]
    moms = [torch.randn_like(p) for p in params]
    hyper = (torch.tensor(0.1, dtype=torch.float64), torch.tensor(0.5), torch.tensor(0.0), 1e-30, None)
    torch.library.opcheck(torch.ops.sm3fn.sm3_step_.default,
                          (params, grads, flat, moms, [2, 1], *hyper))
    torch.library.opcheck(torch.ops.sm3fn.sm3_step.default, (grads, flat, moms, [2, 1], *hyper))


def test_ops_refuse_mismatched_lists():
    p = torch.randn(3, 4)
    accs = list(init_accumulators(p, p.dtype))
    with pytest.raises(ValueError, match="counts"):
        torch.ops.sm3fn.sm3_step_([p], [p], accs, [], [1], torch.tensor(0.1), torch.tensor(0.0),
                                  torch.tensor(0.0), 1e-30, None)
    with pytest.raises(ValueError, match="momentum_buffers"):
        torch.ops.sm3fn.sm3_step([p, p], accs + accs, [torch.zeros_like(p)], [2, 2], None, None,
                                 torch.tensor(0.0), 1e-30, None)


# --------------------------------------------------------------------------- tensor lr


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _train(model, opt, steps, sched=None, data_seed=1, step=None):
    gen = torch.Generator().manual_seed(data_seed)
    for _ in range(steps):
        opt.zero_grad()
        x = torch.randn(16, 6, generator=gen)
        model(x).square().mean().backward()
        (step or opt.step)()
        if sched is not None:
            sched.step()


@pytest.mark.parametrize("lr", [torch.tensor(0.05), torch.tensor([0.05]), torch.tensor([[0.05]], dtype=torch.float64)],
                         ids=["0-d", "(1,)", "(1,1)-float64"])
def test_tensor_lr_with_a_scheduler_matches_float_lr(lr):
    """A one-element tensor lr gives the float lr's trajectory bit for bit, with a scheduler
    that fill_s it (the group keeps the very tensor it was given)."""
    m_float, m_tensor = _model(), _model()
    opt_f = SM3(m_float.parameters(), lr=0.05, momentum=0.5)
    opt_t = SM3(m_tensor.parameters(), lr=lr, momentum=0.5)
    sched_f = torch.optim.lr_scheduler.StepLR(opt_f, step_size=2, gamma=0.5)
    sched_t = torch.optim.lr_scheduler.StepLR(opt_t, step_size=2, gamma=0.5)
    _train(m_float, opt_f, 6, sched_f)
    _train(m_tensor, opt_t, 6, sched_t)
    assert opt_t.param_groups[0]["lr"] is lr
    assert float(lr.reshape(())) == pytest.approx(0.05 * 0.5 ** 3)
    for a, b in zip(m_float.parameters(), m_tensor.parameters()):
        assert a.shape == b.shape
        assert torch.equal(a, b)


@pytest.mark.parametrize("optimizer", ["SM3", "FunctionalOptimizer"])
def test_tensor_lr_with_several_values_is_refused(optimizer):
    """``lr=torch.tensor([0.1, 100.])`` would scale a parameter's columns differently:
    a ValueError naming lr and its shape, at construction and at step (nothing changes)."""
    make = {
        "SM3": lambda params, lr: SM3(params, lr=lr),
        "FunctionalOptimizer": lambda params, lr: FunctionalOptimizer(
            params, lambda lr: sm3fn.sm3(lr), lr=lr),
    }[optimizer]
    model = _model()
    with pytest.raises(ValueError, match=r"lr must be .*one-element tensor.*shape \(2,\)"):
        make(model.parameters(), torch.tensor([0.1, 100.0]))
    opt = make(model.parameters(), torch.tensor(0.1))
    opt.param_groups[0]["lr"] = torch.tensor([0.1, 100.0])
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        opt.step()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not opt.state


def test_functional_optimizer_one_element_lr_keeps_shapes():
    """A ``(1, 1)`` tensor lr on a 1-d parameter: the update keeps the parameter's shape
    (it used to broadcast it to 2-d, a shape error in the copy back)."""
    bias = torch.nn.Parameter(torch.randn(4))
    lr = torch.tensor([[0.1]])
    opt = FunctionalOptimizer([bias], lambda lr: sm3fn.sm3(lr), lr=lr)
    bias.grad = torch.randn(4)
    start = bias.detach().clone()
    opt.step()
    assert bias.shape == (4,)
    # a first SM3 step is -lr * sign(g)
    torch.testing.assert_close(bias.detach(), start - 0.1 * torch.sign(bias.grad))


# --------------------------------------------------------------------------- fused=True refusals


def _uncovered_cases():
    yield "meta", lambda: torch.nn.Parameter(torch.randn(3, 4, device="meta")), {}
    yield "a view with gaps", lambda: torch.nn.Parameter(torch.randn(3, 8)[:, ::2]), {}
    yield "float16 statistics", lambda: torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float16)), {
        "accumulator_dtype": torch.float16}


@pytest.mark.parametrize("case", list(_uncovered_cases()), ids=lambda c: c[0])
def test_fused_true_refuses_uncovered_tensors_and_none_chooses(case):
    """fused=True on a tensor the fused kernel does not cover: a ValueError naming it,
    raised before anything is written (a covered group listed first is not stepped
    either); fused=None steps the same tensor on the blocked path."""
    name, make, options = case
    covered = torch.nn.Parameter(torch.randn(5, 2))
    p = make()
    covered.grad, p.grad = torch.randn_like(covered), torch.ones_like(p)
    kept, start = covered.detach().clone(), p.detach().clone()
    opt = SM3([{"params": [covered]}, {"params": [p]}], fused=True, **options)
    refusal = r"fused=True, but no fused SM3 kernel covers parameter [01] of shape \(\d+, \d+\) \("
    with pytest.raises(ValueError, match=refusal):
        opt.step()
    assert torch.equal(covered.detach(), kept) and not opt.state
    opt = SM3([{"params": [covered]}, {"params": [p]}], fused=None, **options)
    opt.step()
    assert opt.state[p]["step"] == 1 and not torch.equal(covered.detach(), kept)
    if p.device.type == "cpu":  # a first step moves every coordinate by -lr * sign(g)
        torch.testing.assert_close(p.detach().float(), start.float() - 0.1, atol=1e-3, rtol=1e-3)


def test_fused_true_refusal_in_sm3_update_changes_nothing():
    params = {"w": torch.randn(3, 8)[:, ::2], "b": torch.randn(4)}
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    state = sm3fn.sm3(0.1).init(params)
    kept_p = {k: v.clone() for k, v in params.items()}
    kept_s = state.clone()
    with pytest.raises(ValueError, match=r"fused=True.*shape \(3, 4\).*strides \(8, 2\)"):
        sm3fn.sm3_update_(params, grads, state, learning_rate=0.1, fused=True)
    assert all(torch.equal(params[k], kept_p[k]) for k in params)
    assert all(torch.equal(state[k], kept_s[k]) for k in state.keys(True, True))


# --------------------------------------------------------------------------- torch.compile


class _Recorder:
    """A dynamo backend that records the call targets of each graph, then runs it eagerly.

    ``calls`` and ``traces_sm3_math`` look at the last graph compiled: the step as it
    runs once the state exists (the first graph also makes the state, with its own ops).
    """

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append([n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")])
        return gm.forward

    def calls(self, op) -> bool:
        """Whether the graph calls the custom op ``op`` (a packet; dynamo records it or its overload)."""
        return any(t is op or t is op.default for t in self.graphs[-1])

    def traces_sm3_math(self) -> bool:
        """Whether the graph holds the SM3 equations' own ops (the blocked math traced)."""
        math = {torch.amax, torch.addcmul, torch.minimum, torch.sqrt, "amax", "addcmul", "minimum",
                "sqrt", "addcdiv_", "addcmul_"}
        return any(t in math for t in self.graphs[-1] if isinstance(t, (str, type(torch.amax))))


@pytest.mark.slow
def test_compiled_step_is_one_op_fullgraph_and_lr_momentum_changes_do_not_recompile(fresh_dynamo):
    """torch.compile(opt.step, fullgraph=True): no graph break, the step is the custom op
    (no traced SM3 math), results equal the eager optimizer's, and 20 steps with a new
    tensor lr (fill_) and a new float momentum each step compile nothing new."""
    m_eager, m_comp = _model(), _model()
    lr_e, lr_c = torch.tensor(0.05), torch.tensor(0.05)
    opt_e = SM3(m_eager.parameters(), lr=lr_e, momentum=0.5)
    opt_c = SM3(m_comp.parameters(), lr=lr_c, momentum=0.5)
    backend = _Recorder()
    step = torch.compile(opt_c.step, fullgraph=True, backend=backend)

    def schedule(i):
        for lr, opt in ((lr_e, opt_e), (lr_c, opt_c)):
            lr.fill_(0.05 / (1 + i))
            # two values (each a kernel to build until momentum is a run-time kernel argument)
            opt.param_groups[0]["momentum"] = 0.5 + 0.1 * ((i + 1) % 2)

    # warm-up: the first step makes the state (one graph), the second steps it, with
    # momentum already changed (dynamo then takes it as an input, not a constant)
    for i in range(2):
        _train(m_eager, opt_e, 1, data_seed=i)
        _train(m_comp, opt_c, 1, data_seed=i, step=step)
        schedule(i)
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(2, 22):
            _train(m_eager, opt_e, 1, data_seed=i)
            _train(m_comp, opt_c, 1, data_seed=i, step=step)
            schedule(i)
    assert counters["stats"]["unique_graphs"] == graphs
    assert backend.calls(torch.ops.sm3fn.sm3_step_) and not backend.traces_sm3_math()
    for a, b in zip(m_eager.parameters(), m_comp.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for p_e, p_c in zip(m_eager.parameters(), m_comp.parameters()):
        for key, value in opt_e.state[p_e].items():
            torch.testing.assert_close(opt_c.state[p_c][key], value, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_compiled_step_with_float_lr_and_momentum_recompiles_once(fresh_dynamo):
    """Float lr and momentum changed every step: the first change compiles once more (dynamo
    then takes the floats as inputs, not constants), and nothing after it (issue 19 saw a
    recompile on every new float lr)."""
    model = _model()
    opt = SM3(model.parameters(), lr=0.1, momentum=0.5)
    step = torch.compile(opt.step, fullgraph=True, backend="aot_eager")

    def schedule(i):
        opt.param_groups[0]["lr"] = 0.1 / (2 + i)
        opt.param_groups[0]["momentum"] = 0.5 + 0.01 * (i + 1)

    for i in range(2):  # the state made, then both floats changed before the second step
        _train(model, opt, 1, data_seed=i, step=step)
        schedule(i)
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(2, 12):
            _train(model, opt, 1, data_seed=i, step=step)
            schedule(i)
    assert counters["stats"]["unique_graphs"] == graphs == 2


@pytest.mark.slow
def test_compiled_step_with_torch_scheduler_does_not_recompile(fresh_dynamo):
    """The issue's case: tensor lr, OneCycleLR (lr and momentum each step), torch.compile(opt.step)
    with inductor: no recompilation over 20 steps after the first two, eager's numbers."""
    m_eager, m_comp = _model(), _model()
    opt_e = SM3(m_eager.parameters(), lr=torch.tensor(0.01), momentum=0.9)
    opt_c = SM3(m_comp.parameters(), lr=torch.tensor(0.01), momentum=0.9)
    sched_e = torch.optim.lr_scheduler.OneCycleLR(opt_e, max_lr=0.1, total_steps=30)
    sched_c = torch.optim.lr_scheduler.OneCycleLR(opt_c, max_lr=0.1, total_steps=30)
    # after the scheduler wraps opt.step (its wrapper is a frame dynamo skips: SM3.step
    # itself is compiled)
    step = torch.compile(opt_c.step)
    for i in range(2):
        _train(m_eager, opt_e, 1, sched_e, data_seed=i)
        _train(m_comp, opt_c, 1, sched_c, data_seed=i, step=step)
    graphs = counters["stats"]["unique_graphs"]
    momenta = set()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(2, 22):
            _train(m_eager, opt_e, 1, sched_e, data_seed=i)
            _train(m_comp, opt_c, 1, sched_c, data_seed=i, step=step)
            momenta.add(opt_c.param_groups[0]["momentum"])
    assert counters["stats"]["unique_graphs"] == graphs
    assert len(momenta) == 20  # the scheduler really moved momentum (and lr) every step
    for a, b in zip(m_eager.parameters(), m_comp.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _tree_pair(seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = {"w": torch.randn(6, 5, generator=gen), "v": torch.randn(2, 3, 4, generator=gen),
              "b": torch.randn(5, generator=gen)}
    grads = [{k: torch.randn(v.shape, generator=gen) for k, v in params.items()} for _ in range(4)]
    return params, grads


def _assert_same_trees(p_c, p_e, s_c, s_e):
    """Compiled and eager parameters (dicts) and states (TensorDicts) agree, to rounding."""
    for k in p_e:
        torch.testing.assert_close(p_c[k], p_e[k], rtol=1e-6, atol=1e-7)
    for k in s_e.keys(True, True):
        torch.testing.assert_close(s_c[k], s_e[k], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_compiled_sm3_update_is_one_op_and_a_new_lr_does_not_recompile(fresh_dynamo):
    """sm3fn.sm3_update_ under torch.compile(fullgraph=True): the in-place op, eager's numbers,
    one graph while a tensor lr changes."""
    params, grads = _tree_pair()
    p_e, p_c = {k: v.clone() for k, v in params.items()}, {k: v.clone() for k, v in params.items()}
    s_e, s_c = sm3fn.sm3(0.1, momentum=0.9).init(params), sm3fn.sm3(0.1, momentum=0.9).init(params)
    lr = torch.tensor(0.1)

    def step(p, g, s):
        sm3fn.sm3_update_(p, g, s, learning_rate=lr, momentum=0.9)

    backend = _Recorder()
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    for i, g in enumerate(grads):
        lr.fill_(0.1 / (1 + i))
        step(p_e, g, s_e)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            compiled(p_c, g, s_c)
    assert counters["stats"]["unique_graphs"] == 1
    assert backend.calls(torch.ops.sm3fn.sm3_step_) and not backend.traces_sm3_math()
    _assert_same_trees(p_c, p_e, s_c, s_e)


@pytest.mark.slow
def test_compiled_pure_update_is_one_op_and_matches_eager(fresh_dynamo):
    """tx.update of sm3fn.sm3 under torch.compile(fullgraph=True) with nothing requiring grad:
    the out-of-place op computes u (momentum and lr stay traced), eager's numbers, the
    inputs untouched, one graph while a tensor lr changes."""
    params, grads = _tree_pair(1)
    lr = torch.tensor(0.1)
    tx = sm3fn.sm3(lr, momentum=0.9)

    def step(p, s, g):
        updates, s = tx.update(g, s, p)
        return sm3fn.apply_updates(p, updates), s

    backend = _Recorder()
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    p_e, s_e = params, tx.init(params)
    p_c, s_c = params, tx.init(params)
    for i, g in enumerate(grads):
        lr.fill_(0.1 / (1 + i))
        s_in, kept = s_c, s_c.clone()
        p_e, s_e = step(p_e, s_e, g)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            p_c, s_c = compiled(p_c, s_in, g)
        assert all(torch.equal(s_in[k], v) for k, v in kept.items(True, True))  # pure: not written
    assert counters["stats"]["unique_graphs"] == 1
    assert backend.calls(torch.ops.sm3fn.sm3_step) and not backend.traces_sm3_math()
    _assert_same_trees(p_c, p_e, s_c, s_e)
