"""Non-finite values: ``apply_if_finite`` skips a step whose gradients or updates are not
finite; ``zero_nans`` replaces NaN entries by zeros."""

from __future__ import annotations

from typing import Any, Optional

import torch
from tensordict import TensorDict, TensorDictBase

from sm3fn import _tree
from sm3fn.base import GradientTransformation, OptState, Tree

__all__ = ["apply_if_finite", "zero_nans", "all_finite"]

INNER = "inner"
SKIPPED = "skipped"
CONSECUTIVE = "consecutive_nonfinite"
LAST_FINITE = "last_finite"
_KEYS = (INNER, SKIPPED, CONSECUTIVE, LAST_FINITE)


def apply_if_finite(
    inner: GradientTransformation, max_consecutive_errors: Optional[int] = None
) -> GradientTransformation:
    """Runs ``inner`` but drops the step when anything in it is NaN or inf.

    Each step the inner update is computed, then::

        finite = all(isfinite(grads)) and all(isfinite(inner updates))
        apply  = finite or consecutive_nonfinite > max_consecutive_errors
        updates = inner updates if apply else 0
        inner state = new inner state if apply else the old one, bit for bit

    The choice is made with ``torch.where`` on a 0-d boolean, never with a
    Python ``if`` on a tensor value, so a step runs under ``torch.compile``
    (no graph break) and ``torch.func.vmap`` (each task skips on its own).
    As in optax's ``apply_if_finite``, the updates of the inner transform are
    checked as well as the gradients, so a non-finite value made inside it
    (e.g. an overflowing schedule) is caught too.

    State: ``{"inner": inner state, "skipped": int64 (steps dropped so far),
    "consecutive_nonfinite": int64, "last_finite": bool}``.

    Args:
      inner: the transform to protect, e.g. ``sm3fn.sm3(0.1)``.
      max_consecutive_errors: ``None`` (default) drops every non-finite step;
        an int ``n >= 0`` applies the step anyway once more than ``n``
        non-finite steps came in a row, so a run that has truly diverged
        shows it instead of silently standing still.

    Example::

        tx = sm3fn.apply_if_finite(sm3fn.sm3(0.1))
        updates, state = tx.update(grads, state, params)
        int(state["skipped"])   # how many steps were dropped
    """
    if not isinstance(inner, GradientTransformation):
        raise TypeError(
            f"inner must be a GradientTransformation, got {type(inner).__name__}"
        )
    if max_consecutive_errors is not None and (
        isinstance(max_consecutive_errors, bool)
        or not isinstance(max_consecutive_errors, int)
        or max_consecutive_errors < 0
    ):
        raise ValueError(
            f"max_consecutive_errors must be None or an int >= 0, got {max_consecutive_errors!r}"
        )

    def init(params: Tree) -> OptState:
        leaves = _tree.flatten(params, "params")
        device = next((p.device for p in leaves.values() if p is not None), None)
        zero = torch.zeros((), dtype=torch.int64, device=device)
        return TensorDict(
            {
                INNER: inner.init(params),
                SKIPPED: zero,
                CONSECUTIVE: zero.clone(),
                LAST_FINITE: torch.ones((), dtype=torch.bool, device=device),
            },
            batch_size=[],
        )

    def update(updates: Tree, state: OptState, params: Optional[Tree] = None) -> tuple[Tree, OptState]:
        _tree.check_state_keys(state, _KEYS, "apply_if_finite")
        grads = _tree.flatten(updates, "updates")
        old_inner = state.get(INNER)
        new_updates, new_inner = inner.update(updates, old_inner, params)
        new_leaves = _tree.flatten(new_updates, "updates")

        counter = state.get(CONSECUTIVE)
        finite = all_finite([*grads.values(), *new_leaves.values()], counter.device)
        consecutive = torch.where(finite, torch.zeros_like(counter), counter + 1)
        apply = finite
        if max_consecutive_errors is not None:
            apply = finite | (consecutive > max_consecutive_errors)

        kept = {
            path: None if u is None else torch.where(apply, u, torch.zeros_like(u))
            for path, u in new_leaves.items()
        }
        new_state = TensorDict(
            {
                INNER: _select(apply, new_inner, old_inner, ()),
                SKIPPED: state.get(SKIPPED) + (~apply).to(torch.int64),
                CONSECUTIVE: consecutive,
                LAST_FINITE: finite,
            },
            batch_size=[],
        )
        return _tree.unflatten_like(new_updates, kept), new_state

    return GradientTransformation(init, update)


def all_finite(tensors, device) -> torch.Tensor:
    """A 0-d bool: every entry of every tensor is finite (True when there are none)."""
    checks = [torch.isfinite(t).all() for t in tensors if t is not None]
    if not checks:
        return torch.ones((), dtype=torch.bool, device=device)
    return torch.stack([c.to(device) for c in checks]).all()


def _select(apply: torch.Tensor, new: TensorDictBase, old: TensorDictBase, prefix) -> TensorDict:
    """``new`` where ``apply`` else ``old``, leaf by leaf; both must have the same layout."""
    if sorted(new.keys()) != sorted(old.keys()):
        raise ValueError(
            f"apply_if_finite: the inner state at {_tree.fmt(prefix)} changed its keys "
            f"from {sorted(old.keys())} to {sorted(new.keys())}; it cannot be rolled back"
        )
    out: dict[str, Any] = {}
    for key in new.keys():
        a, b = new.get(key), old.get(key)
        if isinstance(a, TensorDictBase):
            out[key] = _select(apply, a, b, prefix + (key,))
        else:
            out[key] = torch.where(apply, a, b)
    return TensorDict(out, batch_size=[])


def zero_nans() -> GradientTransformation:
    """optax's ``zero_nans``: NaN entries of the updates become 0; the rest pass unchanged.

    ``inf`` is left as it is (as in optax).  State: one 0-d bool per parameter,
    ``True`` when the last update of that parameter held a NaN (for
    monitoring; the transform does not read it).  A frozen parameter (``None``
    update) keeps its flag.  A sparse COO update is coalesced and stays sparse.

    Example::

        tx = sm3fn.chain(sm3fn.zero_nans(), sm3fn.sm3(0.1))
        updates, state = tx.update(grads, state, params)
        state["0", "w"]   # tensor(True) if grads["w"] held a NaN
    """

    def init(params: Tree) -> OptState:
        leaves = _tree.flatten(params, "params")
        return _tree.state_tree(
            {p: torch.zeros((), dtype=torch.bool, device=v.device) for p, v in leaves.items() if v is not None})

    def update(updates: Tree, state: OptState, params: Optional[Tree] = None):
        leaves = _tree.flatten(updates, "updates")
        flags = _tree.flatten(state, "state")
        _tree.check_same_keys(leaves, flags, "zero_nans")
        out: dict[_tree.Path, Optional[torch.Tensor]] = {}
        new_flags: dict[_tree.Path, torch.Tensor] = {}
        for path, u in leaves.items():
            if u is None:
                out[path], new_flags[path] = None, flags[path]
                continue
            values = u.coalesce().values() if u.layout == torch.sparse_coo else u
            nan = torch.isnan(values)
            new_flags[path] = nan.any().to(flags[path].device)
            cleaned = torch.where(nan, torch.zeros_like(values), values)
            if u.layout == torch.sparse_coo:
                cleaned = torch.sparse_coo_tensor(u.coalesce().indices(), cleaned, u.shape)
            out[path] = cleaned
        return _tree.unflatten_like(updates, out), _tree.state_tree(new_flags)

    return GradientTransformation(init, update)
