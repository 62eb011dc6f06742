"""Momentum: ``ema`` (torch-SM3's, on the preconditioned gradient) and ``trace`` (heavy ball)."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from sm3fn import _checks, _tree
from sm3fn._kernels import sharded as _sharded
from sm3fn._kernels import sparse as _sparse
from sm3fn._sm3_math import ema as ema_step
from sm3fn.base import GradientTransformation, OptState, Tree

__all__ = ["ema", "trace"]

# (buffer, update) -> (new buffer, outgoing update)
_BufferStep = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _buffered(
    owner: str, dtype: Optional[torch.dtype], step: _BufferStep, sparse: _sparse.SparseSpec = None,
    decay: float | torch.Tensor = 0.0,
) -> GradientTransformation:
    """A transform that keeps one buffer per parameter, shaped like it.

    State: ``{param path: buffer}``.  A ``None`` update (frozen parameter)
    leaves its buffer as it was.  A sparse update passes through unchanged,
    buffer kept (momentum is not applied to sparse updates); a parameter
    declared in ``sparse`` keeps no buffer and all its updates pass through.
    """
    _checks.check_dtype_arg("dtype", dtype)
    declared_sparse = _sparse.check_spec(sparse)
    _checks.check_scalar("decay", decay, 0.0, 1.0)

    def init(params: Tree) -> OptState:
        buffers = {}
        for path, p in _tree.flatten(params, "params").items():
            if p is None or declared_sparse(path):
                continue
            _checks.check_floating("params", path, p)
            buffers[path] = torch.zeros_like(p, dtype=_checks.statistics_dtype(p.dtype, dtype))
        return _tree.state_tree(buffers)

    def update(updates: Tree, state: OptState, params: Optional[Tree] = None) -> tuple[Tree, OptState]:
        # a tensor decay may have been changed in place since the factory checked it
        _checks.check_scalar("decay", decay, 0.0, 1.0)
        incoming = _tree.flatten(updates, "updates")
        buffers, passed = checked_buffers(owner, incoming, state, declared_sparse)
        outgoing, new_buffers = {}, {}
        for path, u in incoming.items():
            if path in passed:
                outgoing[path] = u
                continue
            if u is None or _sparse.is_sparse(u):  # buffer kept, as a copy: the new state shares nothing
                outgoing[path], new_buffers[path] = u, buffers[path].clone()
                continue
            new_buffers[path], out = step(buffers[path], u.to(buffers[path].dtype))
            outgoing[path] = out.to(u.dtype)
        return _tree.unflatten_like(updates, outgoing), _tree.state_tree(new_buffers)

    return GradientTransformation(init, update)


def checked_buffers(owner: str, incoming: dict, state: OptState, declared_sparse):
    """``(buffers by path, paths passed through)``: the state of a buffered transform checked
    against the incoming updates (keys, dtype, shape, DTensor or not).  A parameter declared
    sparse keeps no buffer; its updates pass through."""
    buffers = _tree.flatten(state, f"{owner} state")
    passed = {p for p in incoming if declared_sparse(p) and p not in buffers}
    _tree.check_same_keys([p for p in incoming if p not in passed], buffers, owner)
    for path, u in incoming.items():
        if u is None or path in passed:
            continue
        _checks.check_floating("updates", path, u)
        _sharded.check_same_kind(owner, path, update=u, state=buffers[path])
        if u.shape != buffers[path].shape:
            raise ValueError(
                f"updates[{_tree.fmt(path)}] has shape {tuple(u.shape)}, but the {owner} "
                f"state was made for shape {tuple(buffers[path].shape)}"
            )
    return buffers, passed


def ema(
    decay: float | torch.Tensor,
    dtype: Optional[torch.dtype] = None,
    *,
    sparse: _sparse.SparseSpec = None,
) -> GradientTransformation:
    """Exponential moving average of the updates: the momentum of torch-SM3 and the authors' code.

    ``m <- decay * m + (1 - decay) * u``, and ``m`` is the update.  ``m``
    starts at zero, with no bias correction (as in torch-SM3).

    Args:
      decay: in ``[0, 1)``; may be a tensor.
      dtype: the buffer's dtype; default: the parameter's for float32/float64,
        float32 for narrower floats (``torch.bfloat16`` halves the memory).
      sparse: parameters with sparse gradients (names or a predicate, as in
        :func:`scale_by_sm3`): they keep no buffer and get no momentum.  A
        sparse update passes through unchanged in any case.
    """

    def step(m: torch.Tensor, u: torch.Tensor):
        new = ema_step(m, u, decay)
        return new, new  # the new buffer is also the outgoing update

    return _buffered("ema", dtype, step, sparse, decay)


def trace(
    decay: float | torch.Tensor,
    nesterov: bool = False,
    dtype: Optional[torch.dtype] = None,
    *,
    sparse: _sparse.SparseSpec = None,
) -> GradientTransformation:
    """Heavy-ball momentum: ``m <- decay * m + u``; the update is ``m``
    (or ``u + decay * m`` with ``nesterov``), as ``torch.optim.SGD`` does.

    Args:
      decay: in ``[0, 1)``; may be a tensor.
      nesterov: use Nesterov's look-ahead.
      dtype: the buffer's dtype (as in :func:`ema`).
      sparse: parameters with sparse gradients, kept out of the momentum (as in :func:`ema`).
    """
    if not isinstance(nesterov, bool):
        raise TypeError(f"nesterov must be a bool, got {nesterov!r}")

    def step(m: torch.Tensor, u: torch.Tensor):
        new = m * decay + u
        return new, (u + new * decay) if nesterov else new

    return _buffered("trace", dtype, step, sparse, decay)
