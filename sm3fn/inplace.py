"""``sm3_update_``: the whole :func:`sm3fn.sm3` step, in place, for users who need no gradient through it.

``tx.update`` + ``apply_updates`` are pure: every step allocates new
parameters, updates and state (what ``torch.func`` and meta-learning need).
When nothing differentiates through the step, :func:`sm3_update_` does the
same step on the same state TensorDict in place, through the dispatcher's
in-place step (:func:`sm3fn._kernels.sm3_step_`: the fused kernel on a CPU,
blocks that stay in cache elsewhere; sparse gradients and DTensors as in
every other entry point), with no parameter-sized temporaries.
"""

from __future__ import annotations

from typing import Optional

import torch

from sm3fn import _checks, _tree
from sm3fn._kernels import check_kernel_choice, sm3_step_
from sm3fn._kernels import sharded as _sharded
from sm3fn._kernels import sparse as _sparse
from sm3fn.base import ACCUMULATOR_PREFIX, COUNT, OptState, ScalarOrSchedule, Tree
from sm3fn.transforms.preconditioner import accumulators_by_param, check_grad

__all__ = ["sm3_update_"]


def _as_float(name: str, value) -> float | torch.Tensor:
    """A hyperparameter as a Python float (the fast path specialises on it)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.requires_grad:
            raise ValueError(
                f"{name} must be a float or a one-element tensor that does not require grad "
                f"for sm3_update_ (use tx.update to differentiate through it), got shape "
                f"{tuple(value.shape)}, requires_grad={value.requires_grad}"
            )
        if torch.compiler.is_compiling():
            return value.reshape(())  # a graph input (float() would break the graph)
        return float(value)
    return float(value)


def _row_cover_only(accs, buffers, path) -> bool:
    """A parameter declared sparse in ``sm3fn.sm3(sparse=...)``: the row cover and no buffer."""
    return _sparse.is_row_cover(accs) and path not in buffers


@torch.no_grad()
def sm3_update_(
    params: Tree,
    grads: Tree,
    state: OptState,
    *,
    learning_rate: ScalarOrSchedule = 0.1,
    momentum: float | torch.Tensor = 0.0,
    beta: float | torch.Tensor = 0.0,
    eps: float = 1e-30,
    compiled: bool = False,
    fused: Optional[bool] = None,
    block_elements: Optional[int] = None,
) -> None:
    """One :func:`sm3fn.sm3` step, in place: ``params``, and ``state``, are updated; nothing is returned.

    Equal (to float rounding) to::

        tx = sm3fn.sm3(learning_rate, momentum, beta, eps)
        updates, state = tx.update(grads, state, params)
        params = sm3fn.apply_updates(params, updates)

    with ``state = tx.init(params)`` made by that same ``tx`` (pass the same
    hyperparameters here).  A ``None`` gradient (frozen parameter) leaves
    its parameter and state as they were.  A schedule ``learning_rate`` reads
    and increments the state's step count.  Every argument and key is
    checked before anything is written.  Sparse gradients (the touched rows
    only, no momentum) and DTensor parameters (FSDP2; one all-reduce per
    step) are stepped as ``tx.update`` steps them: every entry point goes
    through one dispatcher, :func:`sm3fn._kernels.sm3_step_`.  No gradient flows through this
    function; use ``tx.update`` for that.

    Args:
      params: dict or TensorDict of parameters, updated in place.
      grads: the same keys (``None`` for frozen ones); only read.
      state: the state TensorDict of ``sm3fn.sm3(...)``, updated in place.
      learning_rate: as in :func:`sm3fn.sm3`.
      momentum: as in :func:`sm3fn.sm3`.
      beta: as in :func:`sm3fn.sm3`.
      eps: as in :func:`sm3fn.sm3`.
      fused: one C++ sweep per CPU tensor it covers (``None``, the
        default: where it can be built; see :class:`sm3fn.optim.SM3`).
      compiled: fuse each block with ``torch.compile`` instead (the first
        call compiles for a few seconds; later calls are faster).
      block_elements: elements per block of the fast path (default: tuned).
    """
    _checks.check_sm3_hyperparameters(learning_rate, momentum, beta, eps)
    check_kernel_choice(fused, compiled)
    momentum_f, beta_f = _as_float("momentum", momentum), _as_float("beta", beta)
    schedule = callable(learning_rate) and not isinstance(learning_rate, torch.Tensor)
    if not schedule:
        lr = _as_float("learning_rate", learning_rate)

    p_leaves = _tree.flatten(params, "params")
    g_leaves = _tree.flatten(grads, "grads")
    for stage in ("sm3", "learning_rate"):
        if stage not in state.keys():
            raise ValueError(f"state has keys {sorted(state.keys())}; expected the state of sm3fn.sm3(...)")
    with_momentum = isinstance(momentum, torch.Tensor) or momentum > 0
    if with_momentum != ("momentum" in state.keys()):
        raise ValueError(
            f"momentum={momentum!r}, but the state {'lacks' if with_momentum else 'holds'} momentum "
            "buffers; pass the hyperparameters the state was made with"
        )
    accs_by_path = accumulators_by_param(state.get("sm3"))
    _tree.check_same_keys(g_leaves, accs_by_path, "sm3")
    buffers = _tree.flatten(state.get("momentum"), "momentum state") if with_momentum else {}
    if with_momentum:
        # parameters declared sparse (sm3fn.sm3(sparse=...)) keep no buffer: the row cover
        _tree.check_same_keys([p for p in g_leaves if not _row_cover_only(accs_by_path[p], buffers, p)],
                              buffers, "momentum")
    live = [path for path, g in g_leaves.items() if g is not None]
    for path in live:
        g = g_leaves[path]
        check_grad(path, g, accs_by_path[path])
        p = p_leaves.get(path)
        if p is None or tuple(p.shape) != tuple(g.shape):
            raise ValueError(
                f"params[{_tree.fmt(path)}] is {'missing' if p is None else f'of shape {tuple(p.shape)}'}, "
                f"but grads[{_tree.fmt(path)}] has shape {tuple(g.shape)}"
            )
        _sharded.check_same_kind(
            "sm3_update_", path, param=p, grad=g, momentum_buffer=buffers.get(path),
            **{f"{ACCUMULATOR_PREFIX}{i}": a for i, a in enumerate(accs_by_path[path])},
        )
        if _sparse.is_sparse(g) and _sharded.is_dtensor(p):
            raise TypeError(f"grads[{_tree.fmt(path)}] is sparse and params[{_tree.fmt(path)}] a DTensor; "
                            "sm3_update_ takes sparse gradients of plain tensors only")
        if path in buffers and tuple(buffers[path].shape) != tuple(g.shape):
            raise ValueError(
                f"the momentum buffer of {_tree.fmt(path)} has shape {tuple(buffers[path].shape)}, "
                f"but grads[{_tree.fmt(path)}] has shape {tuple(g.shape)}"
            )
    if schedule:
        lr_state = state.get("learning_rate")
        if COUNT not in lr_state.keys():
            raise ValueError(f"a schedule learning_rate needs state['learning_rate'][{COUNT!r}]; "
                             "the state was made without a schedule")
        count = lr_state.get(COUNT)
        assert callable(learning_rate)  # what `schedule` says, spelled so that mypy sees it
        scheduled = learning_rate(count)
        _checks.check_scalar("learning_rate(count)", scheduled, 0.0)
        lr = _as_float("learning_rate(count)", scheduled) if isinstance(scheduled, torch.Tensor) else float(scheduled)
    state_tensors = [(f"state['sm3'][{_tree.fmt(path)}]['{ACCUMULATOR_PREFIX}{i}']", a)
                     for path in live for i, a in enumerate(accs_by_path[path])]
    state_tensors += [(f"state['momentum'][{_tree.fmt(path)}]", buffers[path])
                      for path in live if path in buffers]
    named_params = [(f"params[{_tree.fmt(path)}]", p_leaves[path]) for path in live]
    _checks.check_in_place_step(named_params, [accs_by_path[path][0].dtype for path in live], lr, eps,
                                state_tensors)
    _checks.check_no_aliasing(named_params)

    sm3_step_(
        [p_leaves[path] for path in live],
        [g_leaves[path] for path in live],
        [accs_by_path[path] for path in live],
        [buffers.get(path) for path in live],
        lr=lr, momentum=momentum_f, beta=beta_f, eps=eps,
        compiled=compiled, block_elements=block_elements, fused=fused,
    )
    if schedule:
        count.add_(1)

