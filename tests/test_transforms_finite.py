"""Non-finite gradients: apply_if_finite drops the step; without it, what happens is pinned here."""

import math

import pytest
import torch
from helpers import assert_trees_bit_equal, bit_equal

import sm3fn


def _problem(seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    params = {"w": torch.randn(5, 4, generator=gen, dtype=dtype), "b": torch.randn(4, generator=gen, dtype=dtype),
              "s": torch.randn((), generator=gen, dtype=dtype)}
    grads = [{k: torch.randn(v.shape, generator=gen, dtype=dtype) * 10 ** (i % 3) for k, v in params.items()}
             for i in range(8)]
    return params, grads


def _inner():
    # a schedule, momentum and SM3: every kind of state (count, buffers, accumulators)
    return sm3fn.sm3(lambda count: 0.1 / (1.0 + count), momentum=0.9)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("key", ["w", "b", "s"])
def test_nonfinite_step_is_dropped_bit_for_bit(bad, key):
    params, grads = _problem(0)
    tx = sm3fn.apply_if_finite(_inner())
    state = tx.init(params)
    updates, state = tx.update(grads[0], state, params)
    params = sm3fn.apply_updates(params, updates)
    g = {k: v.clone() for k, v in grads[1].items()}
    g[key].view(-1)[-1] = bad
    before = state.clone()
    updates, after = tx.update(g, state, params)
    for u in updates.values():
        assert torch.count_nonzero(u) == 0
    assert_trees_bit_equal(after["inner"], before["inner"])
    assert int(after["skipped"]) == 1 and not bool(after["last_finite"])
    assert int(after["consecutive_nonfinite"]) == 1


def test_skipping_equals_never_seeing_the_bad_steps():
    """A run with NaN/inf steps mixed in ends bit-identical to a run without them."""
    params, grads = _problem(1)
    bad_steps = {2, 3, 6}
    tx = sm3fn.apply_if_finite(_inner())
    clean_tx = _inner()
    p, s = params, tx.init(params)
    cp, cs = params, clean_tx.init(params)
    for i, g in enumerate(grads):
        if i in bad_steps:
            g = {k: v.clone() for k, v in g.items()}
            g["w"][i % 5, 1] = math.nan if i % 2 else math.inf
        else:
            u, cs = clean_tx.update(g, cs, cp)
            cp = sm3fn.apply_updates(cp, u)
        u, s = tx.update(g, s, p)
        p = sm3fn.apply_updates(p, u)
    assert_trees_bit_equal(p, cp)
    assert_trees_bit_equal(s["inner"], cs)
    assert int(s["skipped"]) == len(bad_steps)
    assert bool(s["last_finite"]) and int(s["consecutive_nonfinite"]) == 0


def test_nonfinite_updates_from_inside_the_chain_are_caught():
    """Finite gradients, but a schedule that returns inf at step 1."""
    params, grads = _problem(2)
    inner = sm3fn.chain(sm3fn.scale_by_sm3(), sm3fn.scale_by_schedule(
        lambda c: torch.where(c == 1, torch.tensor(math.inf), torch.tensor(1.0))))
    tx = sm3fn.apply_if_finite(inner)
    state = tx.init(params)
    _, state = tx.update(grads[0], state)
    updates, state = tx.update(grads[1], state)
    assert int(state["skipped"]) == 1
    assert all(torch.count_nonzero(u) == 0 for u in updates.values())
    # the count did not move, so the next step hits the inf again: a schedule bug is not hidden
    assert int(state["inner", "1", "count"]) == 1


def test_max_consecutive_errors_lets_a_diverged_run_show():
    params, grads = _problem(3)
    tx = sm3fn.apply_if_finite(_inner(), max_consecutive_errors=2)
    state = tx.init(params)
    nan = {k: torch.full_like(v, math.nan) for k, v in params.items()}
    for i in range(3):
        updates, state = tx.update(nan, state, params)
        applied = all(torch.isnan(u).all() for u in updates.values())
        assert applied == (i == 2), i  # the third in a row (> 2) goes through
    assert int(state["skipped"]) == 2 and int(state["consecutive_nonfinite"]) == 3


def test_frozen_parameters_stay_none():
    params, grads = _problem(4)
    tx = sm3fn.apply_if_finite(_inner())
    state = tx.init(params)
    g = dict(grads[0], b=None)
    g["w"] = g["w"].clone()
    g["w"][0, 0] = math.nan
    updates, new_state = tx.update(g, state, params)
    assert updates["b"] is None and int(new_state["skipped"]) == 1
    assert_trees_bit_equal(new_state["inner"], state["inner"])


def test_vmap_each_task_skips_on_its_own():
    params, grads = _problem(5)
    tasks = 3
    batch_p = {k: torch.stack([v * (t + 1) for t in range(tasks)]) for k, v in params.items()}
    batch_g = {k: torch.stack([v * (t - 1) for t in range(tasks)]) for k, v in grads[0].items()}
    batch_g["w"][1, 2, 3] = math.nan  # task 1 only
    tx = sm3fn.apply_if_finite(_inner())
    batch_s = torch.func.vmap(tx.init)(batch_p)
    updates, new_s = torch.func.vmap(tx.update)(batch_g, batch_s, batch_p)
    assert new_s["skipped"].tolist() == [0, 1, 0]
    for t in range(tasks):
        p = {k: v[t] for k, v in batch_p.items()}
        u, s = tx.update({k: v[t] for k, v in batch_g.items()}, tx.init(p), p)
        for k in p:
            torch.testing.assert_close(updates[k][t], u[k], rtol=1e-6, atol=0)
        assert int(s["skipped"]) == int(new_s["skipped"][t])


@pytest.mark.slow
def test_compiled_fullgraph_step_skips():
    params, grads = _problem(6)
    tx = sm3fn.apply_if_finite(sm3fn.sm3(0.1, momentum=0.9))

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return sm3fn.apply_updates(p, u), s

    compiled = torch.compile(step, fullgraph=True)
    p, s = params, tx.init(params)
    cp, cs = params, tx.init(params)
    for i, g in enumerate(grads[:4]):
        if i == 2:
            g = {k: v.clone() for k, v in g.items()}
            g["b"][1] = math.inf
        p, s = step(p, s, g)
        cp, cs = compiled(cp, cs, g)
    assert int(cs["skipped"]) == int(s["skipped"]) == 1
    for k in p:
        torch.testing.assert_close(cp[k], p[k], rtol=1e-6, atol=1e-7)


def _plain_first_step_with(seed, index, value):
    """Plain ``sm3(0.1)``'s first step on ``_problem(seed)`` with ``w[index] = value`` in the gradient;
    returns ``(tx, params, grads, updates, state)``."""
    params, grads = _problem(seed)
    tx = sm3fn.sm3(0.1)
    g = {k: v.clone() for k, v in grads[0].items()}
    g["w"][index] = value
    updates, state = tx.update(g, tx.init(params), params)
    return tx, params, grads, updates, state


def test_without_skipping_nan_poisons_its_row_and_column():
    """Documented behaviour of plain sm3: a NaN gradient entry makes that
    parameter entry NaN and, through the covers, the accumulators of its row
    and column; the next step spreads NaN along that row and column only."""
    tx, params, grads, updates, state = _plain_first_step_with(7, (2, 1), math.nan)
    params = sm3fn.apply_updates(params, updates)
    nan = torch.isnan(params["w"])
    assert nan.sum() == 1 and nan[2, 1]
    assert torch.isnan(state["sm3", "w", "accumulator_0"]).flatten().tolist() == [False, False, True, False, False]
    assert torch.isnan(state["sm3", "w", "accumulator_1"]).flatten().tolist() == [False, True, False, False]
    updates, state = tx.update(grads[1], state, params)
    cross = torch.zeros(5, 4, dtype=torch.bool)
    cross[2, :] = True
    cross[:, 1] = True
    assert torch.equal(torch.isnan(updates["w"]), cross)
    assert torch.isfinite(updates["b"]).all()  # other parameters are not touched


def test_without_skipping_inf_makes_a_nan_entry_but_finite_statistics():
    """inf * inf = inf, inf / sqrt(inf) = NaN: that entry is lost; the accumulators saturate (finite)."""
    _, _, _, updates, state = _plain_first_step_with(8, (0, 3), math.inf)
    assert torch.isnan(updates["w"]).sum() == 1 and torch.isnan(updates["w"][0, 3])
    assert all(torch.isfinite(a).all() for a in state.values(include_nested=True, leaves_only=True))


# -- the torch.optim adapter -------------------------------------------------------------


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 4))


def _batches(n, bad=()):
    gen = torch.Generator().manual_seed(9)
    out = []
    for i in range(n):
        x = torch.randn(5, 2, 6, 6, generator=gen)
        if i in bad:
            x[0, 0, 0, 0] = math.nan if i % 2 else math.inf
        out.append((x, torch.randn(5, 4, generator=gen)))
    return out


def _train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _opt_state(opt):
    return {(i, k): v for i, s in opt.state_dict()["state"].items() for k, v in s.items()}


def test_adapter_skip_nonfinite_equals_never_seeing_the_bad_steps():
    from sm3fn.optim import SM3

    bad = {0, 3, 4}  # a bad first step: no state may be created by it
    model, clean = _model(), _model()
    opt = SM3(model.parameters(), lr=0.05, momentum=0.9, beta=0.5, skip_nonfinite=True)
    clean_opt = SM3(clean.parameters(), lr=0.05, momentum=0.9, beta=0.5)
    data = _batches(8, bad)
    for i, batch in enumerate(data):
        before = [p.clone() for p in model.parameters()], _opt_state(opt)
        _train(model, opt, [batch])
        if i in bad:
            assert all(bit_equal(p, q) for p, q in zip(model.parameters(), before[0]))
            after = _opt_state(opt)
            assert after.keys() == before[1].keys() and all(bit_equal(after[k], before[1][k]) for k in after)
        else:
            _train(clean, clean_opt, [batch])
    assert opt.skipped_steps == len(bad) and opt.state_dict()["skipped_steps"] == len(bad)
    assert all(bit_equal(p, q) for p, q in zip(model.parameters(), clean.parameters()))
    ours, theirs = _opt_state(opt), _opt_state(clean_opt)
    assert ours.keys() == theirs.keys() and all(bit_equal(ours[k], theirs[k]) for k in ours)


def test_adapter_without_skip_nonfinite_turns_parameters_nan():
    """Documented: without the option an inf/NaN input reaches the parameters."""
    from sm3fn.optim import SM3

    model = _model()
    opt = SM3(model.parameters(), lr=0.05)
    _train(model, opt, _batches(3, bad={1}))
    assert any(torch.isnan(p).any() for p in model.parameters())
    assert "skipped_steps" not in opt.state_dict()


def test_functional_optimizer_composes_with_apply_if_finite():
    """Any chain through FunctionalOptimizer: the counter lives in the (group) state."""
    from sm3fn.optim import FunctionalOptimizer

    model = _model()
    opt = FunctionalOptimizer(model.parameters(), lambda lr: sm3fn.apply_if_finite(sm3fn.sm3(lr)), lr=0.05)
    _train(model, opt, _batches(4, bad={2}))
    first = next(iter(model.parameters()))
    assert int(opt.state[first]["skipped"]) == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
