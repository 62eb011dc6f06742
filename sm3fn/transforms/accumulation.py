"""Gradient accumulation: ``MultiSteps`` (optax's name, state and semantics)."""

from __future__ import annotations

import numbers
from typing import Any, Callable, Optional, Union

import torch
from tensordict import TensorDict

from sm3fn import _checks, _tree
from sm3fn.base import GradientTransformation, OptState, Tree
from sm3fn.transforms.finite import _select

__all__ = ["MultiSteps"]

MINI_STEP = "mini_step"
GRADIENT_STEP = "gradient_step"
INNER = "inner_opt_state"
ACC_GRADS = "acc_grads"
_KEYS = (MINI_STEP, GRADIENT_STEP, INNER, ACC_GRADS)


class MultiSteps(GradientTransformation):
    """Accumulates ``k`` gradients, then takes one step of ``inner`` on their mean (optax's ``MultiSteps``).

    Each ``update``::

        acc   = acc + (g - acc) / (mini_step + 1)        (the running mean; a sum with use_grad_mean=False)
        emit  = mini_step == k - 1,   k = every_k_schedule(gradient_step)
        updates = inner.update(acc) if emit else zeros
        inner state advances only if emit; acc resets to 0 if emit
        mini_step = (mini_step + 1) % k;   gradient_step += emit

    so the update is zero until the ``k``-th gradient, which brings the step
    of ``inner`` on the mean of the ``k`` gradients.  As in optax, ``inner``
    runs at every call and its result is selected with ``torch.where`` (no
    Python branch on a tensor), so a step traces under
    ``torch.compile(fullgraph=True)`` and each task of a ``torch.func.vmap``
    keeps its own counters; the price is one inner computation per
    mini-step.  For the eager ``torch.optim`` loop, accumulating ``.grad``
    over ``k`` backward passes and calling ``step`` once costs less.

    State (a TensorDict): ``mini_step`` and ``gradient_step`` (0-d int64),
    ``inner_opt_state``, and ``acc_grads`` (one tensor per parameter, in
    ``accumulator_dtype``).  A frozen parameter (``None`` gradient) keeps its
    accumulator and gets a ``None`` update.  Sparse gradients are accumulated
    dense.

    Args:
      inner: the transform to run every ``k`` steps, e.g. ``sm3fn.sm3(0.1)``.
      every_k_schedule: ``k``, an int ``>= 1``, or ``fn(gradient_step) -> k``
        (called with the 0-d int64 count of inner steps taken) to vary the
        effective batch size over training.
      use_grad_mean: average the ``k`` gradients (default) or sum them.
      accumulator_dtype: dtype of ``acc_grads``; default: the parameter's for
        float32/float64, float32 for bfloat16/float16.

    Example::

        tx = sm3fn.MultiSteps(sm3fn.sm3(0.1), every_k_schedule=4)
        state = tx.init(params)
        updates, state = tx.update(grads, state, params)   # zeros 3 times in 4
        tx.has_updated(state)                              # tensor(True) after every 4th
    """

    _args: tuple[Any, ...]  # (inner, every_k_schedule, use_grad_mean, accumulator_dtype)

    def __new__(
        cls,
        inner: GradientTransformation,
        every_k_schedule: Union[int, Callable[[torch.Tensor], Union[int, torch.Tensor]]],
        use_grad_mean: bool = True,
        accumulator_dtype: Optional[torch.dtype] = None,
    ) -> MultiSteps:
        if not isinstance(inner, GradientTransformation):
            raise TypeError(f"inner must be a GradientTransformation, got {type(inner).__name__}")
        if isinstance(every_k_schedule, numbers.Integral) and not isinstance(every_k_schedule, bool):
            if every_k_schedule < 1:
                raise ValueError(f"every_k_schedule must be >= 1, got {every_k_schedule}")
            k_of = lambda gradient_step: int(every_k_schedule)  # noqa: E731
        elif callable(every_k_schedule):
            k_of = every_k_schedule
        else:
            raise TypeError(
                f"every_k_schedule must be an int >= 1 or a callable step -> k, got {every_k_schedule!r}")
        if not isinstance(use_grad_mean, bool):
            raise TypeError(f"use_grad_mean must be a bool, got {use_grad_mean!r}")
        _checks.check_dtype_arg("accumulator_dtype", accumulator_dtype)

        def init(params: Tree) -> OptState:
            leaves = _tree.flatten(params, "params")
            device = next((p.device for p in leaves.values() if p is not None), None)
            acc = {
                path: torch.zeros_like(p, dtype=_checks.statistics_dtype(p.dtype, accumulator_dtype),
                                       layout=torch.strided)
                for path, p in leaves.items() if p is not None
            }
            zero = torch.zeros((), dtype=torch.int64, device=device)
            return TensorDict(
                {MINI_STEP: zero, GRADIENT_STEP: zero.clone(), INNER: inner.init(params),
                 ACC_GRADS: _tree.state_tree(acc)},
                batch_size=[],
            )

        def update(updates: Tree, state: OptState, params: Optional[Tree] = None):
            _tree.check_state_keys(state, _KEYS, "MultiSteps")
            grads = _tree.flatten(updates, "updates")
            accs = _tree.flatten(state.get(ACC_GRADS), "state")
            _tree.check_same_keys(grads, accs, "MultiSteps")
            for path, g in grads.items():
                if g is not None:
                    _checks.check_floating("updates", path, g)
                    if g.shape != accs[path].shape:
                        raise ValueError(f"updates[{_tree.fmt(path)}] has shape {tuple(g.shape)}, but the "
                                         f"MultiSteps state holds {tuple(accs[path].shape)}")
            mini, gradient_step = state.get(MINI_STEP), state.get(GRADIENT_STEP)
            k = k_of(gradient_step)

            new_acc = {}
            for path, acc in accs.items():
                g = grads[path]
                if g is None:
                    new_acc[path] = acc
                    continue
                g = (g.to_dense() if g.layout == torch.sparse_coo else g).to(acc.dtype)
                new_acc[path] = acc + (g - acc) / (mini + 1).to(acc.dtype) if use_grad_mean else acc + g
            inner_grads = {p: None if g is None else new_acc[p].to(g.dtype) for p, g in grads.items()}
            old_inner = state.get(INNER)
            inner_updates, new_inner = inner.update(_tree.unflatten_like(updates, inner_grads), old_inner, params)

            emit = mini == k - 1
            out = {
                path: None if u is None else torch.where(emit, u, torch.zeros_like(u))
                for path, u in _tree.flatten(inner_updates, "updates").items()
            }
            new_state = TensorDict(
                {
                    MINI_STEP: (mini + 1) % k,
                    GRADIENT_STEP: gradient_step + emit.to(gradient_step.dtype),
                    INNER: _select(emit, new_inner, old_inner, ()),
                    ACC_GRADS: _tree.state_tree(
                        {p: torch.where(emit, torch.zeros_like(a), a) for p, a in new_acc.items()}),
                },
                batch_size=[],
            )
            return _tree.unflatten_like(inner_updates, out), new_state

        self = super().__new__(cls, init, update)
        self._args = (inner, every_k_schedule, use_grad_mean, accumulator_dtype)
        return self

    def __reduce__(self):  # a NamedTuple would pickle (init, update); rebuild from the arguments
        return (type(self), self._args)

    def __repr__(self) -> str:
        return f"MultiSteps(every_k_schedule={self._args[1]!r}, use_grad_mean={self._args[2]})"

    @property
    def inner_opt(self) -> GradientTransformation:
        """The wrapped transform."""
        return self._args[0]

    @staticmethod
    def has_updated(state: OptState) -> torch.Tensor:
        """A 0-d bool: the last ``update`` emitted a step of the inner transform."""
        return (state.get(MINI_STEP) == 0) & (state.get(GRADIENT_STEP) > 0)

    def gradient_transformation(self) -> GradientTransformation:
        """``(init, update)`` as a plain :class:`GradientTransformation`."""
        return GradientTransformation(self.init, self.update)
