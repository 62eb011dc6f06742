"""sm3fn.optim.FunctionalOptimizer: any GradientTransformation as a torch.optim optimizer."""


import numpy as np
import pytest
import torch
from helpers import functional_run, param_groups_with_references, saved_and_loaded
from reference import random_gradient

import sm3fn
from sm3fn.optim import FunctionalOptimizer

SHAPES = [(), (6,), (5, 4), (3, 2, 4)]


def schedule(count):
    return 0.1 / (1.0 + 0.5 * count)  # a tensor count in, a tensor rate out


def scheduled_tx():
    return sm3fn.chain(sm3fn.scale_by_sm3(), sm3fn.trace(0.9), sm3fn.scale_by_learning_rate(schedule))


def test_sm3_factory_with_param_groups_and_scheduler_matches_reference():
    rng = np.random.default_rng(0)
    specs = [{"lr": 0.1, "momentum": 0.0}, {"lr": 0.02, "momentum": 0.9}]
    groups, params, refs = param_groups_with_references(specs, SHAPES, rng)
    opt = FunctionalOptimizer(groups, lambda lr, momentum: sm3fn.sm3(lr, momentum), lr=1.0, momentum=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, ((t + 1) / 3) ** 2))
    for t in range(5):
        for p, ref in zip(params, refs):
            g = random_gradient(rng, ref.shape)
            p.grad = torch.tensor(g)
            ref.lr = ref_lr = (0.1 if ref.momentum == 0 else 0.02) * min(1.0, ((t + 1) / 3) ** 2)
            ref.step(g)
        assert opt.param_groups[1]["lr"] == pytest.approx(ref_lr)
        opt.step()
        sched.step()
    for p, ref in zip(params, refs):
        np.testing.assert_allclose(p.detach().numpy(), ref.p, rtol=1e-12, atol=1e-14)
    w = params[len(SHAPES) + 2]  # the (5, 4) matrix of the momentum group
    assert set(opt.state[w]) == {"sm3.*.accumulator_0", "sm3.*.accumulator_1", "momentum.*"}
    np.testing.assert_allclose(opt.state[w]["sm3.*.accumulator_1"].numpy().reshape(-1), refs[len(SHAPES) + 2].acc[1])


def random_grads(steps, seed, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [{f"w{i}": torch.randn(s, generator=gen, dtype=torch.float64) for i, s in enumerate(shapes)}
            for _ in range(steps)]


def test_fixed_transform_runs_exactly_as_the_functional_loop_and_resumes_bit_identically():
    grads = random_grads(6, seed=1)
    init = {k: torch.randn(g.shape, dtype=torch.float64) for k, g in grads[0].items()}
    want_params, want_state = functional_run(scheduled_tx(), dict(init), grads)

    def fresh():
        ps = {k: torch.nn.Parameter(v.clone()) for k, v in init.items()}
        return ps, FunctionalOptimizer(list(ps.values()), scheduled_tx())

    def run(ps, opt, steps):
        for g in steps:
            for k, p in ps.items():
                p.grad = g[k].clone()
            opt.step()

    ps, opt = fresh()
    run(ps, opt, grads[:3])
    checkpoint = saved_and_loaded(opt.state_dict())
    ps2, opt2 = fresh()
    for k in ps:
        ps2[k].data.copy_(ps[k])
    opt2.load_state_dict(checkpoint)
    run(ps2, opt2, grads[3:])
    for k, p in ps2.items():
        assert torch.equal(p.detach(), want_params[k]), k
    # the per-parameter state is the transform's, named by path with '*' for the parameter
    m = ps2["w2"]
    assert set(opt2.state[m]) == {"0.*.accumulator_0", "0.*.accumulator_1", "1.*", "2.count"}
    assert torch.equal(opt2.state[m]["1.*"], want_state["1", "w2"])
    assert torch.equal(opt2.state[m]["0.*.accumulator_1"], want_state["0", "w2", "accumulator_1"])
    assert int(opt2.state[m]["2.count"]) == 6


def test_frozen_and_late_parameters():
    a, b, c = (torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64)) for _ in range(3))
    opt = FunctionalOptimizer([b, a, c], scheduled_tx())  # the late one first
    before_c = c.detach().clone()
    gen = torch.Generator().manual_seed(2)
    for t in range(4):
        a.grad = torch.randn(4, 3, generator=gen, dtype=torch.float64)
        b.grad = torch.randn(4, 3, generator=gen, dtype=torch.float64) if t >= 2 else None  # b: late
        opt.step()
    assert c not in opt.state and torch.equal(c, before_c)  # never trained: no state, not moved
    # the late parameter reads the group's count from the others, so both see the same schedule
    assert int(opt.state[a]["2.count"]) == int(opt.state[b]["2.count"]) == 4
    # a parameter with state and no gradient: kept as it was
    a_before = a.detach().clone()
    state_before = {k: v.clone() for k, v in opt.state[a].items() if k != "2.count"}
    a.grad = None
    b.grad = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    opt.step()
    assert torch.equal(a, a_before)
    for k, v in state_before.items():
        assert torch.equal(opt.state[a][k], v), k


def test_checks_and_a_failed_step_change_nothing():
    p = torch.nn.Parameter(torch.randn(3, 2))
    with pytest.raises(TypeError, match="tx must be"):
        FunctionalOptimizer([p], 0.1)
    with pytest.raises(TypeError, match=r"hyperparameters \['lr'\]"):
        FunctionalOptimizer([p], sm3fn.sm3(), lr=0.1)
    with pytest.raises(TypeError, match="must return a GradientTransformation"):
        p.grad = torch.ones(3, 2)
        FunctionalOptimizer([p], lambda lr: None, lr=0.1).step()
    with pytest.raises(ValueError, match="learning_rate"):  # a factory's checks run per group, at once
        FunctionalOptimizer([p], lambda lr: sm3fn.sm3(lr), lr=-1.0)
    q = torch.nn.Parameter(torch.randn(5))
    opt = FunctionalOptimizer([{"params": [p]}, {"params": [q]}], lambda lr: sm3fn.sm3(lr), lr=0.1)
    p.grad, q.grad = torch.randn(3, 2), torch.randn(5)
    opt.step()
    opt.param_groups[1]["lr"] = -1.0
    before = [p.detach().clone(), q.detach().clone()]
    state_before = {k: v.clone() for k, v in opt.state[p].items()}
    with pytest.raises(ValueError, match="learning_rate"):
        opt.step()
    assert torch.equal(p, before[0]) and torch.equal(q, before[1])  # group 0 was not applied either
    for k, v in state_before.items():
        assert torch.equal(opt.state[p][k], v)


def test_load_state_dict_mismatch_raises_and_changes_nothing():
    ps = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in SHAPES]
    opt = FunctionalOptimizer(ps, scheduled_tx())
    for g in random_grads(2, seed=3):
        for p, v in zip(ps, g.values()):
            p.grad = v
        opt.step()
    good = opt.state_dict()
    snapshot = {i: {k: v.clone() for k, v in s.items()} for i, s in good["state"].items()}

    def unchanged():
        sd = opt.state_dict()
        return all(torch.equal(v, snapshot[i][k]) for i, s in sd["state"].items() for k, v in s.items())

    bad = saved_and_loaded(good)
    bad["state"][2]["0.*.accumulator_1"] = torch.zeros(1, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"parameter 2 \(shape \(5, 4\)\).*0\.\*\.accumulator_1.*\(1, 5\).*\(1, 4\)"):
        opt.load_state_dict(bad)
    assert unchanged()
    bad = saved_and_loaded(good)
    del bad["state"][3]["1.*"]
    with pytest.raises(ValueError, match=r"parameter 3 \(shape \(3, 2, 4\)\).*missing \['1\.\*'\]"):
        opt.load_state_dict(bad)
    assert unchanged()
    bad = saved_and_loaded(good)
    bad["state"][9] = bad["state"][0]
    with pytest.raises(ValueError, match="parameter 9"):
        opt.load_state_dict(bad)
    assert unchanged()
    opt.load_state_dict(saved_and_loaded(good))
    assert unchanged()


def test_named_parameters_reach_masks_by_name():
    """Given model.named_parameters(), tx sees the names, so a mask can skip biases."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).double()
    tx = sm3fn.chain(
        sm3fn.add_decayed_weights(0.5, mask=lambda path, p: not path.endswith("bias")),
        sm3fn.scale_by_learning_rate(0.1),
    )
    opt = sm3fn.optim.FunctionalOptimizer(model.named_parameters(), tx)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    grads = {k: torch.randn_like(v) for k, v in before.items()}
    for k, p in model.named_parameters():
        p.grad = grads[k].clone()
    opt.step()
    for k, p in model.named_parameters():
        decay = 0.0 if k.endswith("bias") else 0.5
        expected = before[k] - 0.1 * (grads[k] + decay * before[k])
        torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-12)
