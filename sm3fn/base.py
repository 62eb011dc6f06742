"""The shape every sm3fn transform has, after optax's ``base.py``.

A :class:`GradientTransformation` is a pair of pure functions::

    state = tx.init(params)
    updates, state = tx.update(grads, state, params)

``params``, ``grads`` and ``updates`` are trees: a plain (possibly nested)
``dict`` of tensors or a (possibly nested) ``tensordict.TensorDict``.  What
``update`` returns has the container type of the ``grads`` that came in, so a
dict from ``torch.func.grad`` flows straight into
``torch.func.functional_call``.  ``state`` is always a ``TensorDict``: it
saves with ``torch.save``, loads with ``torch.load(..., weights_only=True)``
and carries a batch dimension under ``torch.func.vmap``.

``update`` never mutates its arguments; new state comes back as new tensors.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional, Protocol, Union

import torch
from tensordict import TensorDict, TensorDictBase

from sm3fn import _tree
from sm3fn._kernels import needs_autograd
from sm3fn._kernels import sharded as _sharded
from sm3fn._kernels.fused_cpu import fresh_like

__all__ = [
    "Tree",
    "OptState",
    "Schedule",
    "ScalarOrSchedule",
    "GradientTransformation",
    "identity",
    "apply_updates",
]

# State keys that more than one module reads or writes, named once here.
COUNT = "count"
"""The step-count entry of a transform's state (schedules, averaging, inject_hyperparams)."""
ACCUMULATOR_PREFIX = "accumulator_"
"""SM3's accumulators are stored as ``accumulator_0`` ... ``accumulator_{k-1}`` per parameter."""

# (the string under each alias is its documentation, which the API reference shows)
Tree = Union[Mapping[str, Any], TensorDictBase]
"""A dict (possibly nested) or a TensorDict of tensors; dict leaves may be None."""
OptState = TensorDictBase
"""The state of a transform."""
Schedule = Callable[[Union[int, torch.Tensor]], Union[float, torch.Tensor]]
"""A schedule maps the step count (an int or a 0-d integer tensor) to a value."""
ScalarOrSchedule = Union[float, torch.Tensor, Schedule]
"""A hyperparameter given as a number, a tensor or a schedule."""


class InitFn(Protocol):
    def __call__(self, params: Tree) -> OptState: ...


class UpdateFn(Protocol):
    def __call__(
        self, updates: Tree, state: OptState, params: Optional[Tree] = None
    ) -> tuple[Tree, OptState]: ...


class GradientTransformation(NamedTuple):
    """A pure gradient transformation: ``init(params)`` and ``update(updates, state, params)``."""

    init: InitFn
    update: UpdateFn


def empty_state() -> TensorDict:
    """The state of a transform that keeps none."""
    return TensorDict({}, batch_size=[])


def identity() -> GradientTransformation:
    """Leaves the updates as they are and keeps no state."""

    def init(params: Tree) -> OptState:
        _tree.flatten(params, "params")  # rejects what is not a tree
        return empty_state()

    def update(updates: Tree, state: OptState, params: Optional[Tree] = None) -> tuple[Tree, OptState]:
        _tree.flatten(updates, "updates")
        return updates, state

    return GradientTransformation(init, update)


def apply_updates(params: Tree, updates: Tree) -> Tree:
    """Returns ``params + updates``, out of place, in the container of ``params``.

    A parameter whose update is ``None`` or absent (a frozen parameter) comes
    back as it was.  An update for a key that ``params`` lacks, or of another
    shape, is a ``ValueError``.  The sum is taken in the parameter's dtype.
    A sparse COO update (from a sparse gradient) adds to the rows it holds;
    the result is dense and the other rows are copied bit for bit.
    """
    param_leaves = _tree.flatten(params, "params")
    update_leaves = _tree.flatten(updates, "updates")
    extra = [p for p in update_leaves if p not in param_leaves]
    if extra:
        raise ValueError(
            f"updates has key {_tree.fmt(extra[0])} that params does not have"
        )
    new = {}
    for path, p in param_leaves.items():
        u = update_leaves.get(path)
        if u is None or p is None:
            new[path] = p
            continue
        _sharded.check_same_kind("apply_updates", path, param=p, update=u)
        if u.shape != p.shape:
            raise ValueError(
                f"updates[{_tree.fmt(path)}] has shape {tuple(u.shape)}, "
                f"but params[{_tree.fmt(path)}] has shape {tuple(p.shape)}"
            )
        new[path] = _add(p, u.to(p.dtype))
    return _tree.unflatten_like(params, new)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _add(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``p + u``; a large result on a CPU, outside autograd, is made with huge pages.

    The new parameters are fresh memory every step; without huge pages their
    page faults cost more than the optimizer's sweep (see
    :func:`sm3fn._kernels.fused_cpu.fresh_like`).  Same numbers either way.
    """
    if (type(p) in _PLAIN and type(u) in _PLAIN and p.device.type == "cpu" and u.device.type == "cpu"
            and u.layout == torch.strided and p.is_contiguous() and u.is_contiguous()
            and not needs_autograd(p, u)):
        return torch.add(p, u, out=fresh_like(p))
    return p + u
