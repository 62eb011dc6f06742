"""``inject_hyperparams``: hyperparameters kept as tensors in the optimizer state.

After optax's ``inject_hyperparams``.  The wrapped factory is rebuilt on every
``update`` from tensors held in the state, so

* changing a value (``state["hyperparams", "learning_rate"] = ...``) changes
  no Python constant: a ``torch.compile``-d step does not recompile;
* a value that requires grad (a meta-learned learning rate) gets gradients
  through every step that used it;
* a batch of values (a state with ``batch_size [n]``) is a hyperparameter
  sweep under ``torch.func.vmap``.

State: TensorDict ``{"count": int64, "hyperparams": {name: tensor},
"inner_state": the factory's state}``.
"""

from __future__ import annotations

import inspect
import numbers
from typing import Any, Callable, Iterable, Optional

import torch
from tensordict import TensorDict

from sm3fn import _checks, _tree
from sm3fn.base import COUNT, GradientTransformation, OptState, Tree

__all__ = ["inject_hyperparams"]

HYPERPARAMS, INNER_STATE = "hyperparams", "inner_state"


def inject_hyperparams(
    factory: Callable[..., GradientTransformation],
    static_args: Iterable[str] = (),
    dtype: Optional[torch.dtype] = None,
) -> Callable[..., GradientTransformation]:
    """Wraps ``factory`` so that its numeric arguments live in the state as tensors.

    ``inject_hyperparams(sm3fn.sm3)(learning_rate=0.1, momentum=0.9)`` is
    ``sm3fn.sm3(learning_rate=0.1, momentum=0.9)`` with the two values held in
    ``state["hyperparams"]``.  Which arguments are injected:

    * a real number or a floating-point tensor: stored as a 0-d tensor (a
      tensor is stored as given, so one that requires grad keeps its graph);
    * a callable (a schedule ``step -> value``): called with the state's
      ``count`` every update; its current value is stored for inspection
      (a callable that is not a schedule, e.g. ``sm3``'s ``sparse=``
      predicate, belongs in ``static_args``);
    * names in ``static_args`` and non-numeric values (dtypes, bools, None):
      passed to ``factory`` as they are.  ``eps`` of :func:`sm3fn.sm3` must
      be static (it is a Python float in the math).

    Arguments left out keep the factory's defaults and are not injected.

    Args:
      factory: returns a :class:`GradientTransformation`, e.g. ``sm3fn.sm3``.
      static_args: names passed through unchanged.
      dtype: dtype of the tensors made from numbers; default: the statistics
        dtype of the first parameter (its own for float32/float64).
    """
    if not callable(factory):
        raise TypeError(f"factory must be callable, got {type(factory).__name__}")
    if isinstance(static_args, str):
        static_args = (static_args,)
    static_names = set(static_args)
    _checks.check_dtype_arg("dtype", dtype)
    signature = inspect.signature(factory)

    def wrapped(*args: Any, **kwargs: Any) -> GradientTransformation:
        try:
            bound = signature.bind_partial(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"inject_hyperparams({_name(factory)}): {e}") from None
        static, numeric, schedules = {}, {}, {}
        for name, value in bound.arguments.items():
            if name in static_names:
                static[name] = value
            elif callable(value) and not isinstance(value, torch.Tensor):
                schedules[name] = value
            elif isinstance(value, torch.Tensor) or (
                isinstance(value, numbers.Real) and not isinstance(value, bool)
            ):
                numeric[name] = value
            else:
                static[name] = value
        # build once with the values as given (their range checks), once with
        # tensors as init will make them: bad arguments fail here, not in init
        _build(factory, static, {**numeric, **{n: _call_schedule(s, 0) for n, s in schedules.items()}})
        _build(factory, static, {
            **{n: _as_tensor(v, None, None) for n, v in numeric.items()},
            **{n: _as_tensor(_call_schedule(s, 0), None, None) for n, s in schedules.items()},
        })

        def init(params: Tree) -> OptState:
            leaves = [p for p in _tree.flatten(params, "params").values() if p is not None]
            device = leaves[0].device if leaves else None
            hp_dtype = _checks.statistics_dtype(leaves[0].dtype, dtype) if leaves else (dtype or torch.get_default_dtype())
            count = torch.zeros((), dtype=torch.int64, device=device)
            # a given tensor is stored as it is (its dtype, its graph)
            hyperparams = {
                n: v if isinstance(v, torch.Tensor) else _as_tensor(v, hp_dtype, device)
                for n, v in numeric.items()
            }
            for n, s in schedules.items():
                hyperparams[n] = _as_tensor(_call_schedule(s, count), hp_dtype, device)
            inner = _build(factory, static, hyperparams)
            return TensorDict(
                {COUNT: count, HYPERPARAMS: hyperparams, INNER_STATE: inner.init(params)},
                batch_size=[],
            )

        def update(updates: Tree, state: OptState, params: Optional[Tree] = None) -> tuple[Tree, OptState]:
            keys = set(state.keys())
            if keys != {COUNT, HYPERPARAMS, INNER_STATE}:
                raise ValueError(
                    f"inject_hyperparams state must have keys {[COUNT, HYPERPARAMS, INNER_STATE]}, "
                    f"got {sorted(keys)}"
                )
            count, stored = state.get(COUNT), state.get(HYPERPARAMS)
            expected = set(numeric) | set(schedules)
            if set(stored.keys()) != expected:
                raise ValueError(
                    f"state['hyperparams'] has keys {sorted(stored.keys())}, expected {sorted(expected)}"
                )
            hyperparams = {n: stored.get(n) for n in numeric}
            for n, v in hyperparams.items():
                # under vmap a swept value looks 0-d; outside, a batch of values
                # would silently broadcast against every update
                if v.dim() != 0:
                    raise ValueError(
                        f"state['hyperparams', {n!r}] must be a 0-d tensor, got shape {tuple(v.shape)}; "
                        "to sweep values, give the whole state a batch dimension and vmap over it"
                    )
            for n, s in schedules.items():
                old = stored.get(n)
                hyperparams[n] = _as_tensor(_call_schedule(s, count), old.dtype, old.device)
            inner = _build(factory, static, hyperparams)
            updates, inner_state = inner.update(updates, state.get(INNER_STATE), params)
            # copies (differentiable): the new state shares no memory with the old one
            new_state = TensorDict(
                {COUNT: count + 1, HYPERPARAMS: {n: v.clone() for n, v in hyperparams.items()},
                 INNER_STATE: inner_state},
                batch_size=[],
            )
            return updates, new_state

        return GradientTransformation(init, update)

    wrapped.__name__ = f"inject_hyperparams({_name(factory)})"
    wrapped.__doc__ = f"{_name(factory)} with its numeric hyperparameters kept in the state."
    return wrapped


def _name(factory: Callable) -> str:
    return getattr(factory, "__name__", type(factory).__name__)


def _build(factory: Callable, static: dict, hyperparams: dict) -> GradientTransformation:
    try:
        tx = factory(**static, **hyperparams)
    except TypeError as e:
        raise TypeError(
            f"{e} (inject_hyperparams passes numbers as tensors; "
            "name arguments that must stay Python values in static_args)"
        ) from None
    if not isinstance(tx, GradientTransformation):
        raise TypeError(f"factory must return a GradientTransformation, got {type(tx).__name__}")
    return tx


def _call_schedule(schedule: Callable, count: Any) -> Any:
    if not isinstance(count, torch.Tensor):
        count = torch.tensor(count, dtype=torch.int64)
    return schedule(count)


def _as_tensor(value: Any, dtype: Optional[torch.dtype], device: Optional[torch.device]) -> torch.Tensor:
    """A value as a tensor of ``dtype`` (a tensor keeps its graph; None: leave a tensor's dtype)."""
    if isinstance(value, torch.Tensor):
        return value if dtype is None else value.to(dtype)
    return torch.tensor(float(value), dtype=dtype or torch.get_default_dtype(), device=device)
