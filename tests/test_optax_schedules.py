"""The schedules under optax's names, against plain-Python references written from optax's
documented formulas, optax's documented examples, and optax itself where it is installed."""

import math
import random

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from sm3fn import schedules as S


# --- references: plain Python floats, branches allowed, from optax's docstrings -------------
def ref_polynomial(i, e, power, steps, begin, t):
    if steps <= 0:
        return i
    if t < begin:
        return i
    if t >= begin + steps:
        return e
    return (i - e) * (1 - (t - begin) / steps) ** power + e


def ref_piecewise(i, bounds, t):
    v = i
    for b, scale in sorted(bounds.items()):
        if t >= b:
            v *= scale
    return v


def ref_exponential(i, steps, rate, begin, staircase, end, t):
    if t <= begin:
        v = i
    else:
        p = (t - begin) / steps
        v = i * rate ** (math.floor(p) if staircase else p)
    if end is not None:
        v = max(v, end) if rate < 1 else min(v, end)
    return v


def ref_cosine(i, steps, alpha, exponent, t):
    c = 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps))
    return i * ((1 - alpha) * c**exponent + alpha)


def ref_warmup_cosine(i, peak, warmup, decay, end, exponent, t):
    if t < warmup:
        return i + (peak - i) * t / warmup
    return ref_cosine(peak, decay - warmup, end / peak if peak else 0.0, exponent, t - warmup)


def _random_cases():
    rng = random.Random(11)
    u = rng.uniform
    cases = []
    for _ in range(3):
        i, e, peak = u(0.01, 1), u(0, 0.01), u(0.05, 2)
        steps, begin, warm = rng.randint(5, 80), rng.randint(0, 20), rng.randint(1, 30)
        decay = warm + rng.randint(5, 80)
        bounds = {rng.randint(0, 60): u(0, 1), rng.randint(61, 120): u(0, 2)}
        rate, power, alpha = u(0.1, 0.99), u(0.5, 3), u(0, 0.5)
        cases += [
            (f"polynomial{len(cases)}", S.polynomial_schedule(i, e, power, steps, begin),
             lambda t, a=(i, e, power, steps, begin): ref_polynomial(*a, t)),
            (f"linear{len(cases)}", S.linear_schedule(i, e, steps, begin),
             lambda t, a=(i, e, 1, steps, begin): ref_polynomial(*a, t)),
            (f"piecewise{len(cases)}", S.piecewise_constant_schedule(i, bounds),
             lambda t, a=(i, bounds): ref_piecewise(*a, t)),
            (f"exponential{len(cases)}", S.exponential_decay(i, steps, rate, begin),
             lambda t, a=(i, steps, rate, begin, False, None): ref_exponential(*a, t)),
            (f"staircase{len(cases)}", S.exponential_decay(i, steps, rate, begin, True, i * rate**2),
             lambda t, a=(i, steps, rate, begin, True, i * rate**2): ref_exponential(*a, t)),
            (f"growth{len(cases)}", S.exponential_decay(i, steps, 1 / rate, begin, False, i * 3),
             lambda t, a=(i, steps, 1 / rate, begin, False, i * 3): ref_exponential(*a, t)),
            (f"cosine{len(cases)}", S.cosine_decay_schedule(i, steps, alpha, power),
             lambda t, a=(i, steps, alpha, power): ref_cosine(*a, t)),
            (f"warmup_cosine{len(cases)}", S.warmup_cosine_decay_schedule(i, peak, warm, decay, e, power),
             lambda t, a=(i, peak, warm, decay, e, power): ref_warmup_cosine(*a, t)),
        ]
    return cases


CASES = _random_cases()
STEPS = list(range(0, 200, 3)) + [199, 200, 1000]


@pytest.mark.parametrize("name, schedule, ref", CASES, ids=[c[0] for c in CASES])
def test_against_optax_formulas(name, schedule, ref):
    for t in STEPS:
        got = schedule(t)
        assert isinstance(got, float)
        assert got == pytest.approx(ref(t), rel=1e-12, abs=1e-15), t
        as_tensor = schedule(torch.tensor(t))
        assert isinstance(as_tensor, torch.Tensor) and as_tensor.dim() == 0
        assert float(as_tensor) == pytest.approx(ref(t), rel=1e-5, abs=1e-7), t


def test_optax_documented_examples():
    poly = S.polynomial_schedule(1.0, 0.01, power=2, transition_steps=100, transition_begin=5)
    assert [round(poly(t), 4) for t in (0, 5, 6, 104, 105, 110)] == [1.0, 1.0, 0.9803, 0.0101, 0.01, 0.01]
    lin = S.linear_schedule(1.0, 0.01, transition_steps=100)
    assert lin(0) == 1.0 and lin(100) == pytest.approx(0.01)
    pw = S.piecewise_constant_schedule(1.0, {100: 0.1, 200: 0.01})
    assert [pw(50), pw(150), pw(250)] == pytest.approx([1.0, 0.1, 0.001])


def test_held_values_as_optax():
    # transition_steps=0 and decay_rate=0 hold init_value, as optax does
    assert S.linear_schedule(0.3, 0.0, 0)(50) == pytest.approx(0.3)
    assert S.exponential_decay(0.3, 0, 0.5)(50) == pytest.approx(0.3)
    assert S.exponential_decay(0.3, 10, 0.0)(50) == pytest.approx(0.3)
    assert S.piecewise_constant_schedule(0.3)(50) == pytest.approx(0.3)
    assert S.warmup_cosine_decay_schedule(0.0, 0.0, 5, 10, end_value=0.1)(20) == 0.0  # alpha 0 at peak 0
    assert S.constant_schedule is S.constant and S.join_schedules is S.join


@pytest.mark.parametrize("name, schedule, ref", CASES, ids=[c[0] for c in CASES])
def test_against_optax_itself(name, schedule, ref):
    optax = pytest.importorskip("optax", reason="optax not installed: the formula tests above still run")
    pytest.importorskip("jax")
    # rebuild the same schedule in optax from the reference's bound arguments
    args = ref.__defaults__[0]
    kind = name.rstrip("0123456789")
    theirs = {
        "polynomial": lambda: optax.polynomial_schedule(*args),
        "linear": lambda: optax.linear_schedule(args[0], args[1], args[3], args[4]),
        "piecewise": lambda: optax.piecewise_constant_schedule(*args),
        "exponential": lambda: optax.exponential_decay(*args),
        "staircase": lambda: optax.exponential_decay(*args),
        "growth": lambda: optax.exponential_decay(*args),
        "cosine": lambda: optax.cosine_decay_schedule(*args),
        "warmup_cosine": lambda: optax.warmup_cosine_decay_schedule(*args),
    }[kind]()
    for t in STEPS:
        assert schedule(t) == pytest.approx(float(theirs(t)), rel=2e-6, abs=1e-7), t  # optax: float32


@pytest.mark.parametrize("name, schedule, ref", CASES[:8], ids=[c[0] for c in CASES[:8]])
def test_compiles_once_and_vmaps(name, schedule, ref):
    counter = CompileCounter()
    compiled = torch.compile(schedule, backend=counter, fullgraph=True)
    for t in (0, 7, 150):
        assert float(compiled(torch.tensor(t))) == pytest.approx(ref(t), rel=1e-5, abs=1e-7)
    assert counter.frame_count == 1  # the step is a tensor: no recompile as it grows
    steps = torch.arange(0, 120, 7)
    batched = torch.func.vmap(schedule)(steps)
    assert torch.allclose(batched, torch.stack([torch.as_tensor(schedule(s)) for s in steps]))


def test_tensor_values_keep_their_gradient():
    peak = torch.tensor(0.1, requires_grad=True)
    lr = S.warmup_cosine_decay_schedule(0.0, peak, 10, 100)
    value = lr(50)  # a Python step and a tensor value: a tensor out
    value.backward()
    assert peak.grad is not None and float(peak.grad) == pytest.approx(ref_warmup_cosine(0, 1, 10, 100, 0, 1, 50))


@pytest.mark.parametrize("make, match", [
    (lambda: S.linear_schedule(1.0, 0.0, -1), "transition_steps"),
    (lambda: S.linear_schedule(1.0, 0.0, 10, transition_begin=-2), "transition_begin"),
    (lambda: S.polynomial_schedule(1.0, 0.0, 2, 10.5), "transition_steps"),
    (lambda: S.exponential_decay(1.0, 10, -0.5), "decay_rate"),
    (lambda: S.exponential_decay(1.0, 10, 0.5, staircase="yes"), "staircase"),
    (lambda: S.piecewise_constant_schedule(1.0, {10: -0.1}), "boundaries_and_scales"),
    (lambda: S.piecewise_constant_schedule(1.0, {-10: 0.1}), "boundaries_and_scales"),
    (lambda: S.cosine_decay_schedule(1.0, 0), "decay_steps"),
    (lambda: S.cosine_decay_schedule(float("nan"), 10), "init_value"),
    (lambda: S.warmup_cosine_decay_schedule(0.0, 1.0, 10, 10), "decay_steps"),
])
def test_bad_arguments_name_themselves(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_schedules_exports_only_its_schedules():
    exported = {}
    exec("from sm3fn.schedules import *", exported)
    names = set(exported) - {"__builtins__"}
    assert names == set(S.__all__)
    assert not names & {"torch", "numbers", "math", "Callable", "Union", "Sequence", "Mapping", "Optional"}
    assert all(callable(getattr(S, n)) for n in S.__all__)
