"""Scaling: by a constant, by a schedule of the step count, by a learning rate."""

from __future__ import annotations

from typing import Optional

import torch
from tensordict import TensorDict

from sm3fn import _checks, _tree
from sm3fn.base import COUNT, GradientTransformation, OptState, ScalarOrSchedule, Schedule, Tree, empty_state

__all__ = ["scale", "scale_by_schedule", "scale_by_learning_rate"]



def _scaled(updates: Tree, factor) -> Tree:
    leaves = _tree.flatten(updates, "updates")
    return _tree.unflatten_like(
        updates, {p: None if u is None else u * factor for p, u in leaves.items()}
    )


def scale(factor: float | torch.Tensor) -> GradientTransformation:
    """Multiplies every update by ``factor`` (a float, or a tensor that may require grad)."""
    if isinstance(factor, torch.Tensor):
        if not factor.is_floating_point():
            raise TypeError(f"factor must be a float or a floating-point tensor, got dtype {factor.dtype}")
    else:
        _checks.check_scalar("factor", factor, -float("inf"))

    def init(params: Tree) -> OptState:
        _tree.flatten(params, "params")
        return empty_state()

    def update(updates: Tree, state: OptState, params: Optional[Tree] = None) -> tuple[Tree, OptState]:
        return _scaled(updates, factor), state

    return GradientTransformation(init, update)


def scale_by_schedule(schedule: Schedule) -> GradientTransformation:
    """Multiplies the updates by ``schedule(count)``, ``count`` = steps taken so far.

    State: ``{"count": 0-d int64 tensor}``.  The schedule is called with that
    tensor, so it must accept one (every schedule in :mod:`sm3fn.schedules`
    does); keeping the count a tensor means a compiled step does not
    recompile as it grows.
    """
    if not callable(schedule):
        raise TypeError(f"schedule must be callable, got {type(schedule).__name__}")

    def init(params: Tree) -> OptState:
        leaves = _tree.flatten(params, "params")
        device = next((p.device for p in leaves.values() if p is not None), None)
        return TensorDict({COUNT: torch.zeros((), dtype=torch.int64, device=device)}, batch_size=[])

    def update(updates: Tree, state: OptState, params: Optional[Tree] = None) -> tuple[Tree, OptState]:
        if COUNT not in state.keys():
            raise ValueError(f"scale_by_schedule state must hold {COUNT!r}, got keys {list(state.keys())}")
        count = state.get(COUNT)
        factor = schedule(count)
        return _scaled(updates, factor), TensorDict({COUNT: count + 1}, batch_size=[])

    return GradientTransformation(init, update)


def scale_by_learning_rate(learning_rate: ScalarOrSchedule) -> GradientTransformation:
    """Multiplies the updates by ``-learning_rate`` (descent).

    ``learning_rate`` is a float, a tensor (gradients flow to it: a
    meta-learned rate) or a schedule ``step -> rate``.
    """
    _checks.check_scalar("learning_rate", learning_rate, 0.0, allow_callable=True, finite=True)
    if callable(learning_rate) and not isinstance(learning_rate, torch.Tensor):
        return scale_by_schedule(lambda count: -learning_rate(count))
    if isinstance(learning_rate, torch.Tensor):
        # negated at every update, not once here: an in-place change of the
        # tensor (lr.fill_(...)) then applies, eagerly and in a compiled step,
        # and is checked again wherever its value can be read
        def update(updates: Tree, state: OptState, params: Optional[Tree] = None) -> tuple[Tree, OptState]:
            _checks.check_scalar("learning_rate", learning_rate, 0.0, finite=True)
            return _scaled(updates, -learning_rate), state

        return GradientTransformation(scale(learning_rate).init, update)
    return scale(-learning_rate)
