"""The fused CPU kernel (sm3fn/_kernels/fused_cpu.py): one sweep per tensor, arithmetic traced from _sm3_math.

Held to the float64 coordinate-loop reference (tests/reference.py), to the
blocked path (accumulators bit for bit: nu has no square root in it), and to
itself across thread counts (bit for bit).  Its square root is IEEE's; ATen's
float32 sqrt is an ulp off now and then, so parameters and momentum agree
with the blocked path to rounding, not bit for bit.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from helpers import assert_kernel_matches_reference
from helpers import exact_in as _exact
from helpers import kernel_state as _state
from reference import ReferenceSM3, random_gradient

import sm3fn
from sm3fn._kernels import fused_cpu as _fused
from sm3fn._kernels import sm3_step_
from sm3fn._sm3_math import init_accumulators
from sm3fn.optim import SM3

SHAPES = [(), (1,), (7,), (40,), (3, 37), (17, 16), (1, 5), (5, 1), (2, 3, 19), (2, 1, 3, 5)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("momentum,beta", [(0.0, 0.0), (0.9, 0.0), (0.3, 0.5)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_fused_matches_float64_reference(shape, momentum, beta, dtype):
    """Six steps of random gradients (zero rows and columns included) against the reference.

    bfloat16/float16 parameters keep float32 statistics: their accumulators and
    momentum are held to float32 rounding (the reference sees the same rounded
    gradients), their values to one rounding of their own dtype per step."""
    steps = 6
    rng = np.random.default_rng(abs(hash((shape, momentum, beta))) % 2**32)
    p0 = _exact(rng.standard_normal(shape), dtype)
    ref = ReferenceSM3(p0, lr=0.07, momentum=momentum, beta=beta)
    p = torch.tensor(p0).to(dtype)
    assert _fused.supported(p, p, *_state(p, momentum))
    accs, m = _state(p, momentum)
    for _ in range(steps):
        g = _exact(random_gradient(rng, shape) * 10.0 ** rng.integers(-3, 3), dtype)
        ref.step(g)
        sm3_step_([p], [torch.tensor(g).to(dtype)], [accs], [m], lr=0.07, momentum=momentum,
                   beta=beta, eps=1e-30, fused=True)
    assert_kernel_matches_reference(p, accs, m, ref, steps)


def _run(fused, shapes, momentum, beta, dtype=torch.float32, steps=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    state = [_state(p, momentum) for p in params]
    for step in range(steps):
        grads = []
        for s in shapes:
            g = torch.randn(s, generator=gen, dtype=dtype) * 10.0 ** (step - 1)
            if len(s) >= 2:
                g[torch.randint(s[0], (), generator=gen)] = 0  # a row with no gradient
            grads.append(g)
        sm3_step_(params, grads, [a for a, _ in state], [m for _, m in state],
                   lr=0.05, momentum=momentum, beta=beta, eps=1e-30, fused=fused)
    return params, state


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("momentum,beta", [(0.0, 0.0), (0.9, 0.0), (0.5, 0.9)])
def test_fused_matches_blocked_path(momentum, beta, dtype):
    """Accumulators bit for bit; momentum to a few ulps of |u| (the square root);
    parameters to a few ulps of their dtype."""
    shapes = [(31, 29), (64, 48), (5, 6, 7), (33,), (), (1, 1)]
    fused_p, fused_s = _run(True, shapes, momentum, beta, dtype)
    blocked_p, blocked_s = _run(False, shapes, momentum, beta, dtype)
    u_max = 1 / np.sqrt(1 - beta)  # |u| <= 1/sqrt(1 - beta): a few of its ulps apart
    for (fa, fm), (ba, bm) in zip(fused_s, blocked_s):
        for a, b in zip(fa, ba):
            assert torch.equal(a, b)
        if momentum:
            torch.testing.assert_close(fm, bm, rtol=0, atol=4 * torch.finfo(torch.float32).eps * u_max)
    for a, b in zip(fused_p, blocked_p):
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(a.float(), b.float(), rtol=2 * eps, atol=2 * eps)


def test_threads_give_identical_numbers():
    """Rows split across threads, each with its own running maxima: the same bits as one thread."""
    shapes = [(300, 257), (4, 70, 90), (70000,)]  # above the size a thread team is used for
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(True, shapes, 0.9, 0.0, steps=2)
        torch.set_num_threads(3)
        three = _run(True, shapes, 0.9, 0.0, steps=2)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one[0], three[0]):
        assert torch.equal(a, b)
    for (aa, am), (ba, bm) in zip(one[1], three[1]):
        assert all(torch.equal(x, y) for x, y in zip(aa, ba)) and torch.equal(am, bm)


def test_nonfinite_gradients_spread_as_in_the_blocked_path():
    """A NaN gradient poisons its row and column accumulators; an overflowing g*g saturates
    them at the dtype's max (a zero step there): both exactly as the blocked path does."""
    results = []
    for fused in (True, False):
        p = torch.randn(6, 20, generator=torch.Generator().manual_seed(1))
        accs, _ = _state(p, 0)
        g = torch.randn(6, 20, generator=torch.Generator().manual_seed(2))
        g[1, 3] = float("nan")
        g[4, 17] = 1e20
        sm3_step_([p], [g], [accs], [None], lr=0.1, momentum=0.0, beta=0.0, eps=1e-30, fused=fused)
        results.append((p, accs))
    (pf, af), (pb, ab) = results
    assert torch.isnan(af[0][1]).all() and torch.isnan(af[1][0, 3])
    assert af[0][4].item() == torch.finfo(torch.float32).max
    for a, b in zip(af, ab):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(pf, pb, equal_nan=True)


def test_optimizer_fused_choices_agree_and_bump_versions():
    """SM3(fused=None/True/False) take the same steps to rounding; in-place writes through
    the kernel's pointers are announced to autograd (version counters), as ATen's are."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.Tanh(), torch.nn.Linear(30, 5))
    models = {f: copy.deepcopy(base) for f in (None, True, False)}
    opts = {f: SM3(m.parameters(), lr=0.05, momentum=0.9, fused=f) for f, m in models.items()}
    for _ in range(5):
        x = torch.randn(16, 20)
        for f, m in models.items():
            opts[f].zero_grad()
            m(x).square().mean().backward()
            opts[f].step()
    for f in (None, True):
        for a, b in zip(models[f].parameters(), models[False].parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    weight = models[True][0].weight
    version = weight._version
    models[True](torch.randn(2, 20)).sum().backward()
    opts[True].step()
    assert weight._version > version


def test_learning_rate_changes_do_not_rebuild():
    """lr is read at run time: a scheduler changes it without a new kernel."""
    p = torch.nn.Parameter(torch.randn(8, 9))
    opt = SM3([p], lr=0.1, fused=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    p.grad = torch.randn(8, 9)
    opt.step()
    sched.step()
    built = len(_fused._kernels)
    for _ in range(3):
        before = p.detach().clone()
        p.grad = torch.randn(8, 9)
        opt.step()
        sched.step()
        assert not torch.equal(before, p.detach())
    assert len(_fused._kernels) == built


def test_uncovered_tensors_take_the_blocked_path():
    """Statistics in another dtype than the kernel's, and views with gaps (not a permutation
    of a contiguous tensor; a transpose is one, see tests/test_kernels_layout.py): fused=None steps
    them exactly as fused=False does; fused=True refuses them (as Adam(fused=True) does),
    with nothing written."""
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(9, 24, generator=gen)
    cases = [
        (torch.randn(6, 7, generator=gen).bfloat16(), torch.bfloat16),  # bf16 statistics
        (base[:, ::2], torch.float32),  # every other column: not dense
        (torch.randn(5, 4, generator=gen, dtype=torch.float64), torch.float32),  # float32 stats
    ]
    for p, stats in cases:
        assert not _fused.supported(p, p, list(init_accumulators(p, stats)), None)
        got = []
        for fused in (True, None, False):
            q = p.clone() if p.is_contiguous() else base.clone()[:, ::2]
            accs = list(init_accumulators(q, stats))
            g = torch.randn(q.shape, generator=torch.Generator().manual_seed(6)).to(q.dtype)
            if fused:
                kept = q.clone()
                with pytest.raises(ValueError, match="fused=True, but no fused SM3 kernel covers"):
                    sm3_step_([q], [g], [accs], [None], lr=0.1, momentum=0.0, beta=0.0, eps=1e-30,
                               fused=fused)
                assert torch.equal(q, kept) and not any(a.any() for a in accs)
                continue
            sm3_step_([q], [g], [accs], [None], lr=0.1, momentum=0.0, beta=0.0, eps=1e-30, fused=fused)
            got.append((q, accs))
        assert torch.equal(got[0][0], got[1][0])
        assert all(torch.equal(a, b) for a, b in zip(got[0][1], got[1][1]))


def test_fused_and_compiled_exclude_each_other_and_bad_values_are_named():
    p = torch.nn.Parameter(torch.randn(3, 4))
    with pytest.raises(ValueError, match="fused=True and compiled=True"):
        SM3([p], fused=True, compiled=True)
    with pytest.raises(TypeError, match="fused must be a bool or None, got 'yes'"):
        SM3([p], fused="yes")
    params = {"w": torch.randn(3, 4)}
    state = sm3fn.sm3(0.1).init(params)
    with pytest.raises(TypeError, match="fused must be a bool or None, got 1"):
        sm3fn.sm3_update_(params, {"w": torch.randn(3, 4)}, state, learning_rate=0.1, fused=1)


@pytest.fixture
def no_compiler(monkeypatch):
    """Kernels cannot be built: the code cache raises as it does without a C++ compiler."""
    from torch._inductor.codecache import CppPythonBindingsCodeCache

    def fail(*args, **kwargs):
        raise OSError("no C++ compiler")

    monkeypatch.setattr(CppPythonBindingsCodeCache, "load_pybinding", fail)
    monkeypatch.setattr(_fused, "_kernels", {})
    monkeypatch.setattr(_fused, "unavailable", None)


def test_build_failure_with_fused_true_raises_and_writes_nothing(no_compiler):
    # a bias first: a tensor the step would reach before the one whose kernel fails
    params = {"b": torch.randn(5), "w": torch.randn(4, 5)}
    state = sm3fn.sm3(0.1).init(params)
    before_p = {k: v.clone() for k, v in params.items()}
    before_s = state.clone()
    grads = {k: torch.randn(v.shape) for k, v in params.items()}
    with pytest.raises(_fused.BuildError, match="pass fused=False"):
        sm3fn.sm3_update_(params, grads, state, learning_rate=0.1, fused=True)
    for k in params:
        assert torch.equal(params[k], before_p[k])
    assert (state == before_s).all()


def test_build_failure_in_a_later_group_with_weight_decay_writes_nothing(monkeypatch):
    """SM3(fused=True): a kernel of the second group that cannot be built raises before the first
    group is stepped and before any group's weight decay is applied."""
    real_build = _fused.build

    def build(g, accs, m, beta, *args, **kwargs):
        if g.dtype == torch.float64:
            raise _fused.BuildError("no float64 kernel here; pass fused=False")
        return real_build(g, accs, m, beta, *args, **kwargs)

    monkeypatch.setattr(_fused, "build", build)
    gen = torch.Generator().manual_seed(5)
    first = [torch.nn.Parameter(torch.randn(4, 5, generator=gen)), torch.nn.Parameter(torch.randn(5, generator=gen))]
    second = [torch.nn.Parameter(torch.randn(3, 4, generator=gen, dtype=torch.float64))]
    opt = SM3([{"params": first}, {"params": second}], lr=0.1, momentum=0.5, weight_decay=0.1, fused=True)
    for p in first + second:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    before = [p.detach().clone() for p in first + second]
    with pytest.raises(_fused.BuildError, match="no float64 kernel"):
        opt.step()
    for p, b in zip(first + second, before):
        assert torch.equal(p.detach(), b)
    for p in first + second:  # state made for the step, but nothing stepped: all zero
        assert all(torch.count_nonzero(v) == 0 for k, v in opt.state[p].items())


def test_build_failure_with_fused_none_warns_once_and_falls_back(no_compiler):
    gen = torch.Generator().manual_seed(3)
    p = torch.nn.Parameter(torch.randn(4, 5, generator=gen))
    q = torch.nn.Parameter(p.detach().clone())
    auto, blocked = SM3([p], lr=0.1), SM3([q], lr=0.1, fused=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            g = torch.randn(4, 5, generator=gen)
            p.grad, q.grad = g, g.clone()
            auto.step()
            blocked.step()
    assert sum("blocked path" in str(w.message) for w in caught) == 1
    assert torch.equal(p, q)


def test_tracer_refuses_what_it_cannot_express():
    """A call outside the traced vocabulary fails loudly instead of generating other math."""
    trace = _fused._Trace(torch.float32)
    x = trace.input("x_")
    with pytest.raises(NotImplementedError, match="exp"):
        torch.exp(x)
    with pytest.raises(NotImplementedError, match="out-of-place"):
        torch.sqrt(x, out=torch.empty(1))
    with pytest.raises(NotImplementedError, match="branch"):
        bool(x != 0)


def test_generated_source_comes_from_the_math_functions(monkeypatch):
    """The kernel's arithmetic is traced from _sm3_math: change precondition there and
    the generated C++ changes with it (no second copy to forget)."""
    plain = _fused.source(torch.float32, torch.float32, 2, False, True)
    monkeypatch.setattr(_fused, "precondition", lambda g, nu, eps: torch.div(g, torch.sqrt(nu)))
    changed = _fused.source(torch.float32, torch.float32, 2, False, True)
    assert plain != changed and "blendv" in plain and "blendv" not in changed
