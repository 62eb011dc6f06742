"""sm3fn.optim.SM3: the torch.optim adapter, against the float64 reference and torch-SM3."""

import warnings

import numpy as np
import pytest
import torch
from helpers import param_groups_with_references, saved_and_loaded
from reference import ReferenceSM3, random_gradient

from sm3fn.optim import SM3

TorchSM3 = pytest.importorskip("SM3").SM3  # torch-SM3, in the "test" extra


def seed_lambda(warm_up, total):
    """The authors' recipe from torch-SM3's README: quadratic warm-up, linear cool-down over the last 10%."""
    return lambda epoch: min(1.0, (epoch / warm_up) ** 2, (total - epoch) / (0.1 * total))


def make_model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.LayerNorm(4 * 6 * 6),
        torch.nn.Linear(4 * 6 * 6, 5),
    ).to(dtype)


def batches(n, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 3, 8, 8, generator=gen, dtype=dtype) * 3, torch.randint(0, 5, (8,), generator=gen))
        for _ in range(n)
    ]


def train(model, opt, data, sched=None):
    for x, y in data:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()


def assert_states_close(ours, theirs, rtol, atol):
    for p_ours, p_theirs in zip(ours, theirs):
        torch.testing.assert_close(p_ours, p_theirs, rtol=rtol, atol=atol)


# -- the same trajectory as torch-SM3 (dense, beta = 0) ---------------------------------


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_matches_torch_sm3_on_a_model_with_a_scheduler(dtype, tol, momentum):
    data = batches(20, dtype)
    ours_model, their_model = make_model(dtype), make_model(dtype)
    ours = SM3(ours_model.parameters(), lr=0.05, momentum=momentum)
    theirs = TorchSM3(their_model.parameters(), lr=0.05, momentum=momentum)
    lam = seed_lambda(warm_up=4, total=20)
    train(ours_model, ours, data, torch.optim.lr_scheduler.LambdaLR(ours, lam))
    train(their_model, theirs, data, torch.optim.lr_scheduler.LambdaLR(theirs, lam))
    moved = [not torch.equal(p, q) for p, q in zip(ours_model.parameters(), make_model(dtype).parameters())]
    assert all(moved)
    assert_states_close(list(ours_model.parameters()), list(their_model.parameters()), tol, tol)
    ours_sd, their_sd = ours.state_dict(), theirs.state_dict()
    # the same groups, plus our weight_decay (torch-SM3 has none), left at 0
    assert [g.pop("weight_decay") for g in ours_sd["param_groups"]] == [0.0] * len(ours_sd["param_groups"])
    assert ours_sd["param_groups"] == their_sd["param_groups"]
    for i, theirs_state in their_sd["state"].items():
        ours_state = ours_sd["state"][i]
        assert int(ours_state["step"]) == theirs_state["step"] == 20
        keys = {k for k in theirs_state if k.startswith("accumulator_")}
        assert keys == {k for k in ours_state if k.startswith("accumulator_")}
        for k in keys:
            assert ours_state[k].shape == theirs_state[k].shape
            torch.testing.assert_close(ours_state[k], theirs_state[k], rtol=tol, atol=0)
        if momentum:
            torch.testing.assert_close(ours_state["momentum_buffer"], theirs_state["momentum_buffer"],
                                       rtol=tol, atol=tol)
        else:
            assert "momentum_buffer" not in ours_state  # torch-SM3 keeps the float 0. here


# -- the float64 reference: a model, shapes, param groups, beta > 0, momentum -----------


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_model_with_scheduler_matches_reference(momentum):
    model = make_model()
    opt = SM3(model.parameters(), lr=0.05, momentum=momentum)
    lam = seed_lambda(warm_up=2, total=6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)
    refs = [ReferenceSM3(p.detach().numpy(), momentum=momentum) for p in model.parameters()]
    for t, (x, y) in enumerate(batches(6)):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        for p, ref in zip(model.parameters(), refs):
            ref.lr = 0.05 * lam(t)
            ref.step(p.grad.numpy())  # the same gradient: the parameters agreed so far
        opt.step()
        sched.step()
        for p, ref in zip(model.parameters(), refs):
            np.testing.assert_allclose(p.detach().numpy(), ref.p, rtol=1e-11, atol=1e-13)


SHAPES = [(), (7,), (6, 5), (3, 4, 2), (1, 9)]


def run_against_reference(groups_spec, steps, rng, lrs=None):
    """groups_spec: list of hyperparameter dicts; each group gets every shape in SHAPES."""
    groups, params, refs = param_groups_with_references(groups_spec, SHAPES, rng)
    opt = SM3(groups, lr=123.0, momentum=0.5, beta=0.25)  # defaults every group overrides
    for t in range(steps):
        for p, ref in zip(params, refs):
            g = random_gradient(rng, ref.shape)
            p.grad = torch.tensor(g)
            if lrs is not None:
                ref.lr = lrs[t]
            ref.step(g)
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs[t]
        opt.step()
    return opt, params, refs


@pytest.mark.parametrize("beta", [0.0, 0.6])
def test_param_groups_match_reference(beta):
    rng = np.random.default_rng(3)
    spec = [
        {"lr": 0.1, "momentum": 0.0, "beta": beta, "eps": 1e-30},
        {"lr": 0.03, "momentum": 0.9, "beta": beta, "eps": 1e-8},
    ]
    opt, params, refs = run_against_reference(spec, steps=6, rng=rng)
    for p, ref in zip(params, refs):
        np.testing.assert_allclose(p.detach().numpy(), ref.p, rtol=1e-12, atol=1e-14)
        accs = [opt.state[p][f"accumulator_{i}"] for i in range(max(1, p.dim()))]
        for a, ref_a in zip(accs, ref.acc):
            np.testing.assert_allclose(a.numpy().reshape(-1), ref_a.reshape(-1), rtol=1e-12)
        if ref.momentum:
            np.testing.assert_allclose(opt.state[p]["momentum_buffer"].numpy(), ref.m, rtol=1e-12, atol=1e-300)
        else:
            assert "momentum_buffer" not in opt.state[p]


def test_beta_accumulators_decay_unlike_torch_sm3():
    """beta > 0: nu = beta*min a + (1-beta) g^2 is assigned, so small gradients shrink it."""
    torch.manual_seed(0)
    init = torch.randn(4, 3, dtype=torch.float64)
    grads = [torch.randn(4, 3, dtype=torch.float64) * s for s in (100.0, 0.01, 0.01, 0.01)]
    p, q = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    ours, theirs = SM3([p], beta=0.5), TorchSM3([q], beta=0.5)
    ref = ReferenceSM3(init.numpy(), beta=0.5)
    history, their_history = [], []
    for g in grads:
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
        ref.step(g.numpy())
        history.append(ours.state[p]["accumulator_0"].clone())
        their_history.append(theirs.state[q]["accumulator_0"].clone())
    assert (history[-1] < 0.5 * history[0]).all()  # it decays ...
    np.testing.assert_allclose(history[-1].numpy().reshape(-1), ref.acc[0], rtol=1e-12)
    np.testing.assert_allclose(p.detach().numpy(), ref.p, rtol=1e-12)
    assert torch.equal(their_history[-1], their_history[0])  # ... torch-SM3's running max does not


def test_learning_rate_schedule_matches_reference():
    """LambdaLR with torch-SM3's README warm-up + cool-down: each step uses the scheduled rate."""
    rng = np.random.default_rng(4)
    total, warm = 12, 3
    lam = seed_lambda(warm, total)
    lrs = [0.2 * lam(t) for t in range(total)]
    assert lrs[0] == 0.0 and max(lrs) == 0.2 and lrs[-1] < lrs[-2]
    spec = [{"lr": 0.2, "momentum": 0.9, "beta": 0.0, "eps": 1e-30}]
    # the reference and a manual lr per step ...
    _, ref_params, refs = run_against_reference(spec, total, rng, lrs=lrs)
    # ... against LambdaLR driving SM3 on the same gradients
    rng = np.random.default_rng(4)
    params = [torch.nn.Parameter(torch.tensor(rng.standard_normal(s))) for s in SHAPES]
    opt = SM3(params, lr=0.2, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)
    for t in range(total):
        assert opt.param_groups[0]["lr"] == pytest.approx(lrs[t])
        for p, ref in zip(params, refs):
            p.grad = torch.tensor(random_gradient(rng, ref.shape))
        opt.step()
        sched.step()
    for p, ref in zip(params, refs):
        np.testing.assert_allclose(p.detach().numpy(), ref.p, rtol=1e-12, atol=1e-14)


def test_momentum_switched_on_mid_run_matches_reference():
    rng = np.random.default_rng(5)
    init = rng.standard_normal((5, 4))
    p = torch.nn.Parameter(torch.tensor(init))
    opt, ref = SM3([p]), ReferenceSM3(init)
    for t in range(6):
        if t == 3:
            opt.param_groups[0]["momentum"] = ref.momentum = 0.8
        g = random_gradient(rng, (5, 4))
        p.grad = torch.tensor(g)
        with warnings.catch_warnings():  # the warning of a momentum leaving 0 (tests/test_sm3_ecosystem.py)
            warnings.simplefilter("ignore")
            opt.step()
        ref.step(g)
        assert ("momentum_buffer" in opt.state[p]) == (t >= 3)
    np.testing.assert_allclose(p.detach().numpy(), ref.p, rtol=1e-12)


# -- what torch-SM3 gets wrong ----------------------------------------------------------


def test_frozen_parameters_are_skipped():
    model = make_model()
    model[0].requires_grad_(False)  # a frozen conv: .grad stays None
    opt = SM3(model.parameters(), momentum=0.9)
    frozen_before = [p.clone() for p in model[0].parameters()]
    train(model, opt, batches(2))
    for p, before in zip(model[0].parameters(), frozen_before):
        assert torch.equal(p, before)
        assert p not in opt.state  # no memory spent on it
    # a parameter with state that gets no gradient this step: unchanged, state kept
    last = model[4].weight
    state_before = {k: v.clone() for k, v in opt.state[last].items()}
    weight_before = last.detach().clone()
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(batches(1)[0][0]), batches(1)[0][1]).backward()
    last.grad = None
    opt.step()
    assert torch.equal(last, weight_before)
    for k, v in opt.state[last].items():
        assert torch.equal(v, state_before[k]), k
    assert not torch.equal(model[4].bias, make_model()[4].bias)
    # torch-SM3 crashes on the frozen layer
    their_model = make_model()
    their_model[0].requires_grad_(False)
    with pytest.raises(AttributeError):
        train(their_model, TorchSM3(their_model.parameters()), batches(1))


def test_empty_parameters_are_skipped():
    empty, w = torch.nn.Parameter(torch.zeros(0, 3)), torch.nn.Parameter(torch.randn(2, 3))
    opt = SM3([empty, w])
    empty.grad, w.grad = torch.zeros(0, 3), torch.randn(2, 3)
    before = w.detach().clone()
    opt.step()
    assert empty not in opt.state and not torch.equal(w, before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_zero_gradient_gives_no_nan(dtype):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6, 5).to(dtype))
    q = torch.nn.Parameter(torch.randn(7).to(dtype))
    before = [p.detach().clone(), q.detach().clone()]
    opt = SM3([p, q], momentum=0.5)
    p.grad, q.grad = torch.zeros_like(p), torch.zeros_like(q)
    opt.step()
    assert torch.equal(p, before[0]) and torch.equal(q, before[1])
    # partly zero gradients: finite, and the zero rows do not move
    g = torch.randn(6, 5).to(dtype)
    g[2] = 0
    p.grad, q.grad = g, torch.randn(7).to(dtype)
    opt.step()
    assert torch.isfinite(p).all() and torch.isfinite(q).all()
    assert torch.equal(p[2], before[0][2])
    for key, value in opt.state[p].items():
        if key != "step":
            assert value.dtype == torch.float32, key  # statistics in float32 by default
    # the accumulators hold the float32 squares of the gradient (no rounding to `dtype`)
    torch.testing.assert_close(opt.state[p]["accumulator_0"].squeeze(1), (g.float() ** 2).amax(1))
    if dtype == torch.float16:  # torch-SM3: eps = 1e-30 underflows, rsqrt(0) * 0 = NaN
        r = torch.nn.Parameter(before[0].clone())
        r.grad = torch.zeros_like(r)
        TorchSM3([r]).step()
        assert torch.isnan(r).all()


def test_accumulator_dtype_option():
    p = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.bfloat16))
    opt = SM3([p], momentum=0.9, accumulator_dtype=torch.bfloat16, momentum_dtype=torch.bfloat16)
    p.grad = torch.randn(4, 3, dtype=torch.bfloat16)
    opt.step()
    assert {v.dtype for k, v in opt.state[p].items() if k != "step"} == {torch.bfloat16}
    with pytest.raises(TypeError, match="accumulator_dtype"):
        SM3([p], accumulator_dtype=torch.int32)


# -- torch.optim machinery --------------------------------------------------------------


def test_closure_zero_grad_and_step_hooks():
    model = make_model()
    opt = SM3(model.parameters())
    x, y = batches(1)[0]
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    seen = []
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: seen.append("pre"))
    post = opt.register_step_post_hook(lambda o, args, kwargs: seen.append("post"))
    first = opt.step(closure)
    assert calls == [True] and seen == ["pre", "post"]
    assert isinstance(first, torch.Tensor)
    pre.remove()
    post.remove()
    opt.step(closure)
    assert seen == ["pre", "post"]
    assert opt.step(closure) < first  # it trains
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    before = [p.clone() for p in model.parameters()]
    opt.step()  # no gradients: nothing moves
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    opt.zero_grad(set_to_none=False)
    opt.step()  # zero gradients: a zero step
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_argument_checks_match_torch_sm3():
    p = [torch.nn.Parameter(torch.randn(2))]
    bad = ({"lr": -0.1}, {"lr": float("nan")}, {"momentum": 1.0}, {"momentum": -0.1}, {"beta": 1.0},
           {"beta": -1e-3}, {"eps": -1e-8})
    for kwargs in bad:
        with pytest.raises(ValueError):
            TorchSM3(p, **kwargs)
        name = next(iter(kwargs))
        with pytest.raises(ValueError, match=name):
            SM3(p, **kwargs)
        with pytest.raises(ValueError, match=name):  # a group's own value is checked too (torch-SM3 does not)
            SM3([{"params": p, **kwargs}])
    for ok in ({"lr": 0.0}, {"momentum": 0.0}, {"beta": 0.0}, {"eps": 0.0}, {"momentum": 0.99}):
        SM3(p, **ok)
        TorchSM3(p, **ok)
    with pytest.raises(TypeError, match="lr"):
        SM3(p, lr="0.1")
    # torch-SM3's defaults, plus weight_decay=0 (no decay: its trajectory)
    assert TorchSM3(p).defaults == {"lr": 0.1, "momentum": 0.0, "beta": 0.0, "eps": 1e-30}
    assert SM3(p).defaults == {**TorchSM3(p).defaults, "weight_decay": 0.0}


def test_bad_hyperparameter_at_step_changes_nothing():
    model = make_model()
    opt = SM3([{"params": model[0].parameters()}, {"params": model[4].parameters()}])
    train(model, opt, batches(1))
    before = [p.clone() for p in model.parameters()]
    state_before = {k: v.clone() if isinstance(v, torch.Tensor) else v
                     for s in opt.state.values() for k, v in s.items()}
    opt.param_groups[1]["momentum"] = 1.5  # e.g. a scheduler gone wrong
    with pytest.raises(ValueError, match="momentum"):
        train(model, opt, batches(1, seed=9))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    after = {k: v for s in opt.state.values() for k, v in s.items()}
    assert all(torch.equal(after[k], v) for k, v in state_before.items())


def test_bad_sparse_gradient_is_refused_clearly():
    # SM3._check_sparse (the sparse kernel's check; tests/test_optim_sm3_sparse.py has the
    # rest): a clear error, raised before the dense parameters move
    emb, lin = torch.nn.Embedding(10, 3, sparse=True), torch.nn.Linear(3, 2)
    opt = SM3([{"params": lin.parameters()}, {"params": emb.parameters()}])
    lin(emb(torch.tensor([1, 2]))).sum().backward()
    emb.weight.grad = torch.sparse_coo_tensor(  # a sparse tensor with no sparse dim
        torch.zeros(0, 1, dtype=torch.long), torch.randn(1, 10, 3), (10, 3), check_invariants=True
    )
    before = lin.weight.detach().clone()
    with pytest.raises(ValueError, match="parameter 2 of shape \\(10, 3\\).*sparse"):
        opt.step()
    assert not opt.state and torch.equal(lin.weight, before)


# -- checkpoints ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_resume_is_bit_identical(dtype):
    data = batches(10, dtype)
    lam = seed_lambda(3, 10)

    def fresh():
        model = make_model(dtype)
        opt = SM3([{"params": model[0].parameters(), "momentum": 0.9},
                   {"params": list(model[3].parameters()) + list(model[4].parameters()), "lr": 0.05}])
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lam)

    straight = fresh()
    train(*straight[:2], data, straight[2])

    first = fresh()
    train(*first[:2], data[:5], first[2])
    checkpoint = saved_and_loaded({"model": first[0].state_dict(), "opt": first[1].state_dict(),
                                   "sched": first[2].state_dict()})
    resumed = fresh()
    resumed[0].load_state_dict(checkpoint["model"])
    resumed[1].load_state_dict(checkpoint["opt"])
    resumed[2].load_state_dict(checkpoint["sched"])
    for p in resumed[0].parameters():
        for k, v in resumed[1].state[p].items():
            if k != "step":
                assert v.dtype == torch.float32  # bf16 params keep float32 statistics through a load
    train(*resumed[:2], data[5:], resumed[2])
    for p, q in zip(straight[0].parameters(), resumed[0].parameters()):
        assert torch.equal(p, q)
    a, b = straight[1].state_dict(), resumed[1].state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        assert a["state"][i].keys() == b["state"][i].keys()
        for k in a["state"][i]:
            assert torch.equal(a["state"][i][k], b["state"][i][k]), (i, k)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_torch_sm3_checkpoint_loads_and_continues(momentum):
    data = batches(10)
    theirs_model = make_model()
    theirs = TorchSM3(theirs_model.parameters(), lr=0.05, momentum=momentum)
    train(theirs_model, theirs, data[:5])
    checkpoint = saved_and_loaded({"model": theirs_model.state_dict(), "opt": theirs.state_dict()})
    assert isinstance(checkpoint["opt"]["state"][0]["step"], int)
    ours_model = make_model()
    ours_model.load_state_dict(checkpoint["model"])
    ours = SM3(ours_model.parameters())
    ours.load_state_dict(checkpoint["opt"])
    assert ours.param_groups[0]["momentum"] == momentum
    train(theirs_model, theirs, data[5:])
    train(ours_model, ours, data[5:])
    assert_states_close(list(ours_model.parameters()), list(theirs_model.parameters()), 1e-10, 1e-10)
    assert int(ours.state_dict()["state"][0]["step"]) == 10
    # and back: torch-SM3 continues from ours
    back_model = make_model()
    back_model.load_state_dict(ours_model.state_dict())
    back = TorchSM3(back_model.parameters())
    back.load_state_dict(saved_and_loaded(ours.state_dict()))
    train(back_model, back, data[:3])
    train(ours_model, ours, data[:3])
    assert_states_close(list(ours_model.parameters()), list(back_model.parameters()), 1e-10, 1e-10)


def _snapshot(opt):
    sd = opt.state_dict()
    return {i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
            for i, s in sd["state"].items()}, [dict(g) for g in sd["param_groups"]]


def _assert_unchanged(opt, snapshot):
    state, groups = _snapshot(opt)
    assert groups == snapshot[1]
    assert state.keys() == snapshot[0].keys()
    for i in state:
        assert state[i].keys() == snapshot[0][i].keys()
        for k, v in state[i].items():
            assert torch.equal(v, snapshot[0][i][k]) if isinstance(v, torch.Tensor) else v == snapshot[0][i][k]


def test_load_state_dict_mismatch_raises_and_changes_nothing():
    model = make_model()
    opt = SM3(model.parameters(), momentum=0.9)
    train(model, opt, batches(2))
    good = opt.state_dict()
    snapshot = _snapshot(opt)

    def corrupted(fn):
        sd = saved_and_loaded(good)
        fn(sd)
        return sd

    cases = [
        # another accumulator shape (conv weight, parameter 0)
        (lambda sd: sd["state"][0].__setitem__("accumulator_1", torch.zeros(1, 4, 1, 1, dtype=torch.float64)),
         r"parameter 0 \(shape \(4, 3, 3, 3\)\).*accumulator_1.*shape \(1, 4, 1, 1\).*expected shape \(1, 3, 1, 1\)"),
        # too few accumulators for a matrix (parameter 4: the linear weight)
        (lambda sd: sd["state"][4].pop("accumulator_1"), r"parameter 4 \(shape \(5, 144\)\).*missing \['accumulator_1'\]"),
        # a momentum buffer of another shape
        (lambda sd: sd["state"][5].__setitem__("momentum_buffer", torch.zeros(6, dtype=torch.float64)),
         r"parameter 5 \(shape \(5,\)\).*momentum_buffer.*\(6,\).*expected \(5,\)"),
        # state for a parameter the optimizer does not have
        (lambda sd: sd["state"].__setitem__(17, dict(sd["state"][0])), r"parameter 17.*6 parameters"),
        # another parameter count in the group
        (lambda sd: sd["param_groups"][0]["params"].append(6), r"group 0 has 6 parameters, the loaded one 7"),
        # another group count
        (lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0])), r"2 parameter groups, the optimizer 1"),
        # a bad hyperparameter
        (lambda sd: sd["param_groups"][0].__setitem__("beta", 2.0), r"beta"),
    ]
    for fn, message in cases:
        with pytest.raises(ValueError, match=message):
            opt.load_state_dict(corrupted(fn))
        _assert_unchanged(opt, snapshot)
    # state from a model whose parameters are shaped otherwise
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 2), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.LayerNorm(4 * 7 * 7), torch.nn.Linear(4 * 7 * 7, 5)).double()
    other_opt = SM3(other.parameters())
    train(other, other_opt, batches(1))
    with pytest.raises(ValueError, match=r"parameter 0 \(shape \(4, 3, 3, 3\)\).*expected shape"):
        opt.load_state_dict(other_opt.state_dict())
    _assert_unchanged(opt, snapshot)
    opt.load_state_dict(good)  # and the good one still loads


def test_deepcopy_and_pickle_keep_the_options():
    import copy
    import pickle

    model = make_model(torch.float32)
    opt = SM3(model.parameters(), momentum=0.9, accumulator_dtype=torch.float64)
    train(model, opt, batches(1, torch.float32))
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.accumulator_dtype == torch.float64
        params = [p for g in clone.param_groups for p in g["params"]]
        for p, q in zip(params, model.parameters()):
            p.grad = q.grad.clone()
        clone.step()
        assert all(int(clone.state[p]["step"]) == 2 for p in params)
        assert clone.state[params[0]]["accumulator_0"].dtype == torch.float64
