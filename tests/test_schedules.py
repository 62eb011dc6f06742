"""sm3fn.schedules against plain-Python references written from the formulas and torch-SM3's README;
the schedules under optax's names against optax's documented formulas and examples, and optax itself
where it is installed."""

import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import ReferenceSM3, random_gradient
from torch._dynamo.testing import CompileCounter

import sm3fn
from sm3fn import schedules
from sm3fn import schedules as S


# --- independent references: plain Python floats, branches allowed ----------------------------
def ref_warmup(peak, warmup, power, t):
    if warmup == 0:
        return peak
    return peak * (min(1.0, t / warmup) ** power)


def ref_cooldown(value, total, cooldown, t):
    if cooldown == 0:
        return value
    if t <= total - cooldown:
        return value
    return value * max(0.0, (total - t) / cooldown)


def ref_readme(peak, total, warmup, t):
    """torch-SM3's README's combined LambdaLR lambda (floored at 0 once past the end)."""
    return peak * max(0.0, min(1.0, (t / warmup) ** 2, (total - t) / (0.1 * total)))


def ref_join(pieces, boundaries, t):
    start, piece = 0, pieces[0]
    for b, nxt in zip(boundaries, pieces[1:]):
        if t >= b:
            start, piece = b, nxt
    return piece(t - start)


def _cases():
    rng = random.Random(7)
    peak = rng.uniform(0.01, 1.0)
    total = rng.randint(40, 300)
    warm = rng.randint(1, total // 3)
    cool = rng.randint(1, total // 3)
    return peak, total, warm, cool


PEAK, TOTAL, WARM, COOL = _cases()
STEPS = list(range(0, TOTAL + 10))


def _pairs():
    """(schedule under test, reference t -> value)."""
    piece_a = schedules.polynomial_warmup(PEAK, WARM, 1.0)
    piece_b = schedules.linear_cooldown(PEAK, TOTAL - 2 * WARM, COOL)
    return {
        "constant": (schedules.constant(PEAK), lambda t: PEAK),
        "warmup_p1": (schedules.polynomial_warmup(PEAK, WARM, 1.0), lambda t: ref_warmup(PEAK, WARM, 1.0, t)),
        "warmup_p2": (schedules.polynomial_warmup(PEAK, WARM, 2.0), lambda t: ref_warmup(PEAK, WARM, 2.0, t)),
        "warmup_0": (schedules.polynomial_warmup(PEAK, 0), lambda t: PEAK),
        "cooldown": (schedules.linear_cooldown(PEAK, TOTAL, COOL), lambda t: ref_cooldown(PEAK, TOTAL, COOL, t)),
        "join": (
            schedules.join([piece_a, schedules.constant(0.5 * PEAK), piece_b], [WARM, 2 * WARM]),
            lambda t: ref_join(
                [
                    lambda s: ref_warmup(PEAK, WARM, 1.0, s),
                    lambda s: 0.5 * PEAK,
                    lambda s: ref_cooldown(PEAK, TOTAL - 2 * WARM, COOL, s),
                ],
                [WARM, 2 * WARM],
                t,
            ),
        ),
        "recipe": (
            schedules.recipe(PEAK, 1000),
            lambda t: ref_readme(PEAK, 1000, 50, t),  # 5% of 1000 = 50, 10% cool-down
        ),
    }


PAIRS = _pairs()


@pytest.mark.parametrize("name", list(PAIRS))
def test_python_int_steps_match_reference(name):
    sched, ref = PAIRS[name]
    steps = STEPS + [950, 999, 1000, 1001, 5000]
    for t in steps:
        got = sched(t)
        assert isinstance(got, float), (name, t, type(got))
        assert math.isclose(got, ref(t), rel_tol=1e-12, abs_tol=1e-15), (name, t, got, ref(t))


@pytest.mark.parametrize("name", list(PAIRS))
def test_tensor_steps_match_reference(name):
    sched, ref = PAIRS[name]
    for t in STEPS + [950, 1000, 1001]:
        got = sched(torch.tensor(t, dtype=torch.int64))
        assert isinstance(got, torch.Tensor) and got.shape == () and got.is_floating_point()
        assert math.isclose(got.item(), ref(t), rel_tol=1e-5, abs_tol=1e-7), (name, t, got, ref(t))


def test_recipe_fractions_and_power():
    total = 437
    lr = schedules.recipe(0.3, total, warmup_fraction=0.1, power=1.0, cooldown_fraction=0.2)
    w, c = round(0.1 * total), round(0.2 * total)
    for t in range(total + 3):
        want = 0.3 * min(min(1.0, t / w), max(0.0, min(1.0, (total - t) / c)))
        assert math.isclose(lr(t), want, rel_tol=1e-12, abs_tol=1e-15)
    # no cool-down: constant after the warm-up, forever
    flat = schedules.recipe(0.3, 100, cooldown_fraction=0.0)
    assert flat(5) == 0.3 and flat(100) == 0.3 and flat(10_000) == 0.3
    assert flat(2) == pytest.approx(0.3 * (2 / 5) ** 2)


def test_schedules_vmap_over_a_batch_of_steps():
    counts = torch.tensor(STEPS + [950, 1000], dtype=torch.int64)
    for name, (sched, ref) in PAIRS.items():
        got = torch.func.vmap(sched)(counts)
        want = torch.tensor([ref(int(t)) for t in counts], dtype=got.dtype)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.slow
def test_schedules_compile_fullgraph_without_recompiling():
    names = list(PAIRS)

    def all_values(count):
        return torch.stack([torch.as_tensor(PAIRS[n][0](count)) for n in names])

    compiled = torch.compile(all_values, fullgraph=True, dynamic=False)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for t in [0, 3, WARM, 2 * WARM + 1, 960, 1000, 4000]:
            got = compiled(torch.tensor(t))
            want = torch.tensor([PAIRS[n][1](t) for n in names], dtype=got.dtype)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_recipe_drives_sm3_like_the_reference():
    """sm3(learning_rate=recipe) moves the params as the reference with lr set per step."""
    rng = np.random.default_rng(3)
    p0 = rng.standard_normal((4, 3))
    total = 40
    ref = ReferenceSM3(p0, momentum=0.5)
    tx = sm3fn.sm3(learning_rate=schedules.recipe(0.2, total), momentum=0.5)
    params = {"w": torch.tensor(p0)}
    state = tx.init(params)
    for t in range(total + 2):
        g = random_gradient(rng, (4, 3))
        ref.lr = ref_readme(0.2, total, 2, t)
        ref.step(g)
        updates, state = tx.update({"w": torch.tensor(g)}, state, params)
        params = sm3fn.apply_updates(params, updates)
        # the tensor path computes the rate in the default dtype (float32): ~1e-7 relative
        np.testing.assert_allclose(params["w"].numpy(), ref.p, rtol=1e-6, atol=1e-7)
    assert int(state["learning_rate", "count"]) == total + 2


def test_recipe_with_lambdalr():
    """The int path is a plain float, so the recipe plugs into LambdaLR as a factor."""
    peak, total = 0.4, 60
    lr = schedules.recipe(peak, total)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.randn(3))], lr=peak)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lr(t) / peak)
    for t in range(total + 1):
        assert opt.param_groups[0]["lr"] == pytest.approx(ref_readme(peak, total, 3, t), abs=1e-12)
        opt.step()
        sched.step()


def test_tensor_peak_value_gets_gradients():
    peak = torch.tensor(0.1, requires_grad=True)
    lr = schedules.recipe(peak, 100)
    value = lr(torch.tensor(3))
    value.backward()
    torch.testing.assert_close(peak.grad, torch.tensor((3 / 5) ** 2))


@pytest.mark.parametrize(
    "make, err, word",
    [
        (lambda: schedules.polynomial_warmup(0.1, -1), ValueError, "warmup_steps"),
        (lambda: schedules.polynomial_warmup(0.1, 2.5), TypeError, "warmup_steps"),
        (lambda: schedules.polynomial_warmup(0.1, 10, power=0), ValueError, "power"),
        (lambda: schedules.polynomial_warmup(float("nan"), 10), ValueError, "peak_value"),
        (lambda: schedules.linear_cooldown(0.1, 10, 11), ValueError, "cooldown_steps"),
        (lambda: schedules.linear_cooldown(0.1, 0, 0), ValueError, "total_steps"),
        (lambda: schedules.recipe(0.1, 100, warmup_fraction=1.5), ValueError, "warmup_fraction"),
        (lambda: schedules.recipe(0.1, 100, cooldown_fraction=-0.1), ValueError, "cooldown_fraction"),
        (lambda: schedules.join([schedules.constant(1.0)], [3]), ValueError, "boundaries"),
        (lambda: schedules.join([schedules.constant(1.0)] * 3, [5, 2]), ValueError, "boundaries"),
        (lambda: schedules.join([schedules.constant(1.0), 3], [5]), TypeError, "schedules[1]"),
        (lambda: schedules.constant(0.1)(1.5), TypeError, "step"),
        (lambda: schedules.constant(0.1)(torch.tensor(1.5)), TypeError, "step"),
    ],
)
def test_bad_arguments_are_named(make, err, word):
    with pytest.raises(err, match=word.replace("[", r"\[").replace("]", r"\]")):
        make()


@settings(max_examples=60, deadline=None)
@given(
    total=st.integers(1, 5000),
    warm=st.floats(0.0, 1.0),
    cool=st.floats(0.0, 1.0),
    power=st.sampled_from([1.0, 2.0, 3.0]),
    peak=st.floats(1e-4, 10.0),
    frac_t=st.floats(0.0, 1.5),
)
def test_recipe_property(total, warm, cool, power, peak, frac_t):
    """Int and tensor paths agree with the reference, and the value stays in [0, peak]."""
    lr = schedules.recipe(peak, total, warmup_fraction=warm, power=power, cooldown_fraction=cool)
    w, c = round(warm * total), round(cool * total)
    t = int(frac_t * total)
    up = 1.0 if w == 0 else min(1.0, t / w) ** power
    down = 1.0 if c == 0 else max(0.0, min(1.0, (total - t) / c))
    want = peak * min(up, down)
    assert math.isclose(lr(t), want, rel_tol=1e-12, abs_tol=1e-15)
    assert math.isclose(lr(torch.tensor(t)).item(), want, rel_tol=1e-5, abs_tol=1e-6 * peak)
    assert 0.0 <= lr(t) <= peak * (1 + 1e-12)


# === The schedules under optax's names ===========================================================

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
OPTAX_STEPS = list(range(0, 200, 3)) + [199, 200, 1000]


@pytest.mark.parametrize("name, schedule, ref", CASES, ids=[c[0] for c in CASES])
def test_against_optax_formulas(name, schedule, ref):
    for t in OPTAX_STEPS:
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
    for t in OPTAX_STEPS:
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
