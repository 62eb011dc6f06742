"""Learning-rate schedules: plain callables ``step -> value``.

Every schedule here accepts the step count either as a Python ``int`` (it
then returns a Python ``float``: handy for ``torch.optim.lr_scheduler.LambdaLR``)
or as a 0-d integer tensor (it then returns a 0-d floating tensor on the
step's device: what :func:`sm3fn.scale_by_schedule` passes from its state).
The tensor path uses only torch ops (``clamp``, ``where``, ``minimum``), never
Python branches on the step's value, so a schedule traces under
``torch.compile(fullgraph=True)`` without recompiling as the step grows and
runs under ``torch.func.vmap`` on a batch of step counts.

The authors' advice (Anil et al. 2019 and their TensorFlow code; see the
PyTorch-SM3 README): ramp the learning rate up *quadratically* over the
first few percent of the steps, keep it constant afterwards, and either
average the parameters (:func:`sm3fn.parameter_averaging`) or cool the rate
down linearly to zero over the last 10% of the steps.  :func:`recipe` is that
advice in one call::

    lr = sm3fn.schedules.recipe(0.1, total_steps=10_000)   # 5% warm-up, power 2, 10% cool-down
    tx = sm3fn.sm3(learning_rate=lr)

The usual schedules come under optax's names and signatures, with optax's
formulas: :func:`polynomial_schedule`, :func:`linear_schedule`,
:func:`piecewise_constant_schedule`, :func:`exponential_decay`,
:func:`cosine_decay_schedule`, :func:`warmup_cosine_decay_schedule`, and the
aliases :data:`constant_schedule` (:func:`constant`) and
:data:`join_schedules` (:func:`join`).  Where optax silently falls back
(a negative ``transition_begin`` or ``transition_steps``), these raise a
``ValueError`` instead.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Mapping, Optional, Sequence, Union

import torch

from sm3fn import _checks
from sm3fn.base import Schedule

__all__ = [
    "constant",
    "polynomial_warmup",
    "linear_cooldown",
    "join",
    "recipe",
    # optax's names
    "constant_schedule",
    "join_schedules",
    "polynomial_schedule",
    "linear_schedule",
    "piecewise_constant_schedule",
    "exponential_decay",
    "cosine_decay_schedule",
    "warmup_cosine_decay_schedule",
]

Step = Union[int, torch.Tensor]
Value = Union[float, torch.Tensor]


# --- step handling --------------------------------------------------------------------------
def _step_as_tensor(step: Step) -> tuple[torch.Tensor, bool]:
    """``step`` as a 0-d float tensor, and whether it came in as a Python int.

    The branch is on the *type* of ``step``, which is static under tracing;
    the value is never read.
    """
    if isinstance(step, torch.Tensor):
        if step.is_floating_point() or step.is_complex() or step.dtype == torch.bool:
            raise TypeError(f"step must be an int or an integer tensor, got a tensor of dtype {step.dtype}")
        return step.to(torch.get_default_dtype()), False
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"step must be an int or an integer tensor, got {step!r} of type {type(step).__name__}")
    # float64 so that the int path is exact for any step count a run can reach
    return torch.tensor(float(step), dtype=torch.float64), True


def _schedule(shape: Callable[[torch.Tensor], torch.Tensor], value: Value) -> Schedule:
    """``step -> value * shape(step)`` with the int/tensor conventions above.

    ``shape`` maps a 0-d float step tensor to a 0-d factor tensor with torch ops only.
    """

    def schedule(step: Step) -> Value:
        s, was_int = _step_as_tensor(step)
        factor = shape(s)
        # a Python step gives a Python float (a tensor only if value is one)
        return factor.item() * value if was_int else factor * value

    return schedule


def _check_value(name: str, value: Value) -> None:
    # a value may be any real number or a floating tensor (e.g. a meta-learned peak rate)
    _checks.check_scalar(name, value, -float("inf"))


def _check_steps(name: str, steps: int, minimum: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {steps!r} of type {type(steps).__name__}")
    if steps < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {steps}")


# --- schedules ------------------------------------------------------------------------------
def constant(value: Value) -> Schedule:
    """``step -> value`` for every step.

    Args:
      value: a float or a 0-d floating tensor.

    Example::

        lr = sm3fn.schedules.constant(0.1)
        lr(7), lr(torch.tensor(7))   # 0.1, tensor(0.1000)
    """
    _check_value("value", value)
    return _schedule(torch.ones_like, value)


def polynomial_warmup(peak_value: Value, warmup_steps: int, power: float = 2.0) -> Schedule:
    """A polynomial ramp from 0 to ``peak_value``, then constant::

        value(t) = peak_value * min(1, t / warmup_steps) ** power        (t >= 0)

    ``power=2`` is the authors' quadratic warm-up (early gradients are large;
    a slow start keeps them from dominating the accumulators), ``power=1`` a
    linear one.  ``warmup_steps=0`` gives ``peak_value`` from step 0.

    Args:
      peak_value: the value reached at ``warmup_steps``.
      warmup_steps: int ``>= 0``.
      power: the exponent, ``> 0`` (1 and 2 are the usual ones).

    Example::

        lr = sm3fn.schedules.polynomial_warmup(0.1, warmup_steps=100)   # quadratic
        lr(50)   # 0.025
    """
    _check_value("peak_value", peak_value)
    _check_steps("warmup_steps", warmup_steps, 0)
    return _schedule(_warmup_shape(warmup_steps, power), peak_value)


def _warmup_shape(warmup_steps: int, power: float) -> Callable[[torch.Tensor], torch.Tensor]:
    if isinstance(power, torch.Tensor):
        raise TypeError("power must be a float, got a tensor")
    _checks.check_scalar("power", power, 0.0)
    if power == 0:
        raise ValueError(f"power must be > 0, got {power!r}")
    if warmup_steps == 0:
        return torch.ones_like
    return lambda t: torch.clamp(t / warmup_steps, 0.0, 1.0) ** power


def linear_cooldown(value: Value, total_steps: int, cooldown_steps: int) -> Schedule:
    """Constant ``value``, then a linear ramp to 0 over the last ``cooldown_steps`` steps::

        value(t) = value * clamp((total_steps - t) / cooldown_steps, 0, 1)

    so the rate is ``value`` until ``total_steps - cooldown_steps``, reaches 0
    at ``total_steps`` and stays 0 after.  ``cooldown_steps=0`` never cools.

    Args:
      value: the rate before the cool-down.
      total_steps: int ``>= 1``, the step at which the rate reaches 0.
      cooldown_steps: int in ``[0, total_steps]``.

    Example::

        lr = sm3fn.schedules.linear_cooldown(0.1, total_steps=1000, cooldown_steps=100)
        lr(950)   # 0.05
    """
    _check_value("value", value)
    _check_steps("total_steps", total_steps, 1)
    _check_steps("cooldown_steps", cooldown_steps, 0)
    if cooldown_steps > total_steps:
        raise ValueError(f"cooldown_steps must be <= total_steps={total_steps}, got {cooldown_steps}")
    return _schedule(_cooldown_shape(total_steps, cooldown_steps), value)


def _cooldown_shape(total_steps: int, cooldown_steps: int) -> Callable[[torch.Tensor], torch.Tensor]:
    if cooldown_steps == 0:
        return torch.ones_like
    return lambda t: torch.clamp((total_steps - t) / cooldown_steps, 0.0, 1.0)


def join(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Piecewise schedule: ``schedules[i]`` runs from ``boundaries[i-1]`` to ``boundaries[i]``.

    Each piece sees the steps counted from its own start (as optax's
    ``join_schedules``)::

        value(t) = schedules[i](t - boundaries[i-1])   for boundaries[i-1] <= t < boundaries[i]

    with ``boundaries[-1] = 0`` and ``boundaries[len] = inf``.  The pieces must
    be schedules that take tensor steps (every one in this module does); all
    are evaluated and the right one picked with ``torch.where``, so the join
    traces without branches.

    Args:
      schedules: ``n >= 1`` schedules.
      boundaries: ``n - 1`` increasing ints ``>= 0``.

    Example::

        lr = sm3fn.schedules.join(
            [sm3fn.schedules.polynomial_warmup(0.1, 100), sm3fn.schedules.constant(0.05)], [500])
        lr(600)   # 0.05
    """
    schedules, boundaries = list(schedules), list(boundaries)
    if not schedules:
        raise ValueError("schedules must hold at least one schedule, got none")
    for i, s in enumerate(schedules):
        if not callable(s):
            raise TypeError(f"schedules[{i}] must be callable, got {type(s).__name__}")
    if len(boundaries) != len(schedules) - 1:
        raise ValueError(
            f"boundaries must hold len(schedules) - 1 = {len(schedules) - 1} ints, got {boundaries}"
        )
    for i, b in enumerate(boundaries):
        _check_steps(f"boundaries[{i}]", b, 0)
    if any(b1 < b0 for b0, b1 in zip(boundaries, boundaries[1:])):
        raise ValueError(f"boundaries must be non-decreasing, got {boundaries}")

    def schedule(step: Step) -> Value:
        _, was_int = _step_as_tensor(step)  # rejects what is not a step
        if was_int:  # a Python step: pick the piece in Python, exactly
            start, piece = 0, schedules[0]
            for b, nxt in zip(boundaries, schedules[1:]):
                if step >= b:
                    start, piece = b, nxt
            return piece(step - start)
        assert isinstance(step, torch.Tensor)  # not was_int: a tensor step
        out = torch.as_tensor(schedules[0](step))
        for b, piece in zip(boundaries, schedules[1:]):
            out = torch.where(step >= b, torch.as_tensor(piece(step - b)), out)
        return out

    return schedule


def recipe(
    peak_value: Value,
    total_steps: int,
    warmup_fraction: float = 0.05,
    power: float = 2.0,
    cooldown_fraction: float = 0.1,
) -> Schedule:
    """The SM3 authors' schedule: polynomial warm-up, constant, linear cool-down to 0::

        value(t) = peak_value * min( min(1, t / W) ** power, clamp((T - t) / C, 0, 1) )
        W = round(warmup_fraction * T), C = round(cooldown_fraction * T), T = total_steps

    This is the PyTorch-SM3 README's combined ``LambdaLR`` lambda
    ``min(1, (t / W) ** 2, (T - t) / (0.1 T))``, floored at 0 past ``T``.
    Set ``cooldown_fraction=0`` to keep the rate constant after the warm-up
    (then average the parameters instead, as the authors also suggest).

    Args:
      peak_value: the rate between warm-up and cool-down.
      total_steps: int ``>= 1``: the rate is 0 from this step on (when cooling down).
      warmup_fraction: fraction of ``total_steps`` spent warming up, in ``[0, 1]``.
      power: warm-up exponent (2: quadratic, the authors' choice; 1: linear).
      cooldown_fraction: fraction of ``total_steps`` spent cooling down, in ``[0, 1]``.

    Example::

        lr = sm3fn.schedules.recipe(0.1, total_steps=1000)
        [lr(t) for t in (0, 25, 50, 500, 950, 1000)]   # [0.0, 0.025, 0.1, 0.1, 0.05, 0.0]
        tx = sm3fn.sm3(learning_rate=lr)
    """
    _check_value("peak_value", peak_value)
    _check_steps("total_steps", total_steps, 1)
    _checks.check_scalar("warmup_fraction", warmup_fraction, 0.0, 1.0, high_inclusive=True)
    _checks.check_scalar("cooldown_fraction", cooldown_fraction, 0.0, 1.0, high_inclusive=True)
    warmup_steps = int(round(warmup_fraction * total_steps))
    cooldown_steps = int(round(cooldown_fraction * total_steps))
    warm = _warmup_shape(warmup_steps, power)
    cool = _cooldown_shape(total_steps, cooldown_steps)

    def shape(t: torch.Tensor) -> torch.Tensor:
        return torch.minimum(warm(t), cool(t))

    return _schedule(shape, peak_value)


# --- optax's schedules ----------------------------------------------------------------------
#: optax's name for :func:`constant`
constant_schedule = constant
#: optax's name for :func:`join`
join_schedules = join


def _formula_schedule(formula: Callable[[torch.Tensor], torch.Tensor], *values: Value) -> Schedule:
    """``step -> formula(step)``, the step a 0-d float tensor, with this module's conventions:
    a Python step gives a Python float unless one of ``values`` is a tensor."""
    tensor_values = [v for v in values if isinstance(v, torch.Tensor)]

    def schedule(step: Step) -> Value:
        s, was_int = _step_as_tensor(step)
        if not was_int:
            return formula(s)
        if tensor_values:  # a tensor value (gradients may flow to it): a tensor out, in its dtype
            return formula(s.to(tensor_values[0].dtype))
        return formula(s).item()

    return schedule


def _check_begin(transition_begin: int) -> None:
    _check_steps("transition_begin", transition_begin, 0)


def polynomial_schedule(
    init_value: Value, end_value: Value, power: float, transition_steps: int, transition_begin: int = 0
) -> Schedule:
    """optax's ``polynomial_schedule``: from ``init_value`` to ``end_value`` along a power::

        value(t) = I                                          t < B
                   (I - E) * (1 - (t - B) / T) ** power + E   B <= t < B + T
                   E                                          t >= B + T

    ``I = init_value, E = end_value, T = transition_steps, B = transition_begin``.
    ``transition_steps=0`` holds ``init_value`` for ever (as optax).

    Example::

        sm3fn.schedules.polynomial_schedule(1.0, 0.01, power=2, transition_steps=100, transition_begin=5)(6)
        # 0.980299...
    """
    _check_value("init_value", init_value)
    _check_value("end_value", end_value)
    _checks.check_scalar("power", power, -float("inf"))
    _check_steps("transition_steps", transition_steps, 0)
    _check_begin(transition_begin)
    if transition_steps == 0:
        return _formula_schedule(lambda t: torch.ones_like(t) * init_value, init_value)

    def formula(t: torch.Tensor) -> torch.Tensor:
        frac = 1 - torch.clamp(t - transition_begin, 0, transition_steps) / transition_steps
        return (init_value - end_value) * frac**power + end_value

    return _formula_schedule(formula, init_value, end_value)


def linear_schedule(
    init_value: Value, end_value: Value, transition_steps: int, transition_begin: int = 0
) -> Schedule:
    """optax's ``linear_schedule``: :func:`polynomial_schedule` with ``power=1``::

        value(t) = I + clamp((t - B) / T, 0, 1) * (E - I)

    Example::

        lr = sm3fn.schedules.linear_schedule(1.0, 0.01, transition_steps=100)
        lr(0), lr(50), lr(100)   # 1.0, 0.505, 0.01
    """
    return polynomial_schedule(init_value, end_value, 1, transition_steps, transition_begin)


def piecewise_constant_schedule(
    init_value: Value, boundaries_and_scales: Optional[Mapping[int, float]] = None
) -> Schedule:
    """optax's ``piecewise_constant_schedule``: ``init_value`` times every scale whose step is reached::

        value(t) = init_value * prod(scale for boundary, scale in boundaries_and_scales.items()
                                     if t >= boundary)

    Args:
      init_value: the value before the first boundary.
      boundaries_and_scales: ``{step: scale}``, steps ints ``>= 0``, scales ``>= 0``.

    Example::

        lr = sm3fn.schedules.piecewise_constant_schedule(1.0, {100: 0.1, 200: 0.01})
        lr(50), lr(150), lr(250)   # 1.0, 0.1, 0.001
    """
    _check_value("init_value", init_value)
    items = sorted((boundaries_and_scales or {}).items())
    for b, scale in items:
        _check_steps(f"boundaries_and_scales key {b!r}", b, 0)
        _checks.check_scalar(f"boundaries_and_scales[{b}]", scale, 0.0)

    def formula(t: torch.Tensor) -> torch.Tensor:
        out = torch.ones_like(t) * init_value
        for b, scale in items:
            out = torch.where(t >= b, out * scale, out)
        return out

    return _formula_schedule(formula, init_value)


def exponential_decay(
    init_value: Value,
    transition_steps: int,
    decay_rate: float,
    transition_begin: int = 0,
    staircase: bool = False,
    end_value: Optional[Value] = None,
) -> Schedule:
    """optax's ``exponential_decay``::

        p = (t - B) / T                     (floor(p) with staircase=True)
        value(t) = I                        t <= B
                   I * decay_rate ** p      t > B
        then clipped at end_value: a floor when decay_rate < 1, a ceiling when > 1

    ``I = init_value, T = transition_steps, B = transition_begin``.  As in
    optax, ``transition_steps=0`` or ``decay_rate=0`` hold ``init_value``.

    Example::

        lr = sm3fn.schedules.exponential_decay(1.0, transition_steps=10, decay_rate=0.5)
        lr(20)   # 0.25
    """
    _check_value("init_value", init_value)
    _check_steps("transition_steps", transition_steps, 0)
    _checks.check_scalar("decay_rate", decay_rate, 0.0)
    if isinstance(decay_rate, torch.Tensor):
        raise TypeError("decay_rate must be a float, got a tensor")
    _check_begin(transition_begin)
    if not isinstance(staircase, bool):
        raise TypeError(f"staircase must be a bool, got {staircase!r}")
    if end_value is not None:
        _check_value("end_value", end_value)
    if transition_steps == 0 or decay_rate == 0:
        return _formula_schedule(lambda t: torch.ones_like(t) * init_value, init_value)
    clip = torch.maximum if decay_rate < 1.0 else torch.minimum

    def formula(t: torch.Tensor) -> torch.Tensor:
        since = t - transition_begin
        p = since / transition_steps
        if staircase:
            p = torch.floor(p)
        out = torch.where(since <= 0, torch.ones_like(t), torch.pow(decay_rate, p)) * init_value
        if end_value is not None:
            out = clip(out, torch.as_tensor(end_value, dtype=out.dtype, device=out.device))
        return out

    return _formula_schedule(formula, init_value, *([] if end_value is None else [end_value]))


def cosine_decay_schedule(
    init_value: Value, decay_steps: int, alpha: Value = 0.0, exponent: float = 1.0
) -> Schedule:
    """optax's ``cosine_decay_schedule`` (Loshchilov & Hutter, SGDR, 2017)::

        c = 0.5 * (1 + cos(pi * min(t, T) / T))
        value(t) = init_value * ((1 - alpha) * c ** exponent + alpha)

    so it falls from ``init_value`` at 0 to ``alpha * init_value`` at ``T =
    decay_steps`` and stays there.

    Example::

        lr = sm3fn.schedules.cosine_decay_schedule(0.1, decay_steps=1000, alpha=0.1)
        lr(500)   # 0.055
    """
    _check_value("init_value", init_value)
    _check_steps("decay_steps", decay_steps, 1)
    _check_value("alpha", alpha)
    _checks.check_scalar("exponent", exponent, -float("inf"))

    def formula(t: torch.Tensor) -> torch.Tensor:
        c = 0.5 * (1 + torch.cos(math.pi * torch.clamp(t, max=decay_steps) / decay_steps))
        return init_value * ((1 - alpha) * c**exponent + alpha)

    return _formula_schedule(formula, init_value, alpha)


def warmup_cosine_decay_schedule(
    init_value: Value,
    peak_value: Value,
    warmup_steps: int,
    decay_steps: int,
    end_value: Value = 0.0,
    exponent: float = 1.0,
) -> Schedule:
    """optax's ``warmup_cosine_decay_schedule``: a linear warm-up, then a cosine decay::

        value(t) = I + (P - I) * t / W                          t < W
                   cosine_decay_schedule(P, D - W, alpha=E / P)(t - W)   t >= W

    ``I = init_value, P = peak_value, W = warmup_steps, D = decay_steps`` (the
    whole length, warm-up included), ``E = end_value`` (``alpha = 0`` when
    ``P == 0``, as optax).

    Example::

        lr = sm3fn.schedules.warmup_cosine_decay_schedule(0.0, 0.1, warmup_steps=100, decay_steps=1000)
        lr(50), lr(100), lr(1000)   # 0.05, 0.1, 0.0
    """
    _check_value("peak_value", peak_value)
    _check_value("end_value", end_value)
    _check_steps("warmup_steps", warmup_steps, 0)
    _check_steps("decay_steps", decay_steps, 1)
    if decay_steps <= warmup_steps:
        raise ValueError(f"decay_steps must be > warmup_steps={warmup_steps} (it includes the warm-up), "
                         f"got {decay_steps}")
    alpha: Value
    if isinstance(peak_value, torch.Tensor) or isinstance(end_value, torch.Tensor):
        peak = torch.as_tensor(peak_value)
        alpha = torch.where(peak == 0, torch.zeros_like(peak), end_value / torch.where(peak == 0, 1.0, peak))
    else:
        alpha = 0.0 if peak_value == 0 else end_value / peak_value
    return join(
        [linear_schedule(init_value, peak_value, warmup_steps),
         cosine_decay_schedule(peak_value, decay_steps - warmup_steps, alpha, exponent)],
        [warmup_steps],
    )
