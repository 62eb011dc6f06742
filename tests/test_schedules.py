"""sm3fn.schedules against plain-Python references written from the formulas and the seed README."""

import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import sm3fn
from reference import ReferenceSM3, random_gradient
from sm3fn import schedules


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
    """The seed README's combined LambdaLR lambda (floored at 0 once past the end)."""
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
