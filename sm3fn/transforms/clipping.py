"""Clipping: ``clip`` (by value), ``clip_by_global_norm`` and the ``global_norm`` it uses."""

from __future__ import annotations

from typing import Optional

import torch

from sm3fn import _checks, _tree
from sm3fn import tree as _tree_ops
from sm3fn.base import GradientTransformation, OptState, Tree, empty_state

__all__ = ["clip", "clip_by_global_norm", "global_norm"]


def global_norm(tree: Tree) -> torch.Tensor:
    """``sqrt(sum over all leaves of sum(u ** 2))``, a 0-d tensor (float32 at least).

    ``None`` leaves (frozen parameters) count as zero.  Low-precision leaves
    are summed in float32 so that the square does not overflow float16.
    A sparse COO leaf counts with its coalesced values (repeated indices summed).

    Example::

        sm3fn.global_norm({"w": torch.tensor([3.0]), "b": torch.tensor([4.0])})   # tensor(5.)
    """
    leaves = [u for u in _tree.flatten(tree, "updates").values() if u is not None]
    if not leaves:
        return torch.zeros(())
    dtype = torch.promote_types(torch.float32, leaves[0].dtype)
    norms = [torch.linalg.vector_norm(_values(u), dtype=torch.promote_types(dtype, u.dtype)) for u in leaves]
    device = leaves[0].device  # leaves may sit on several devices (model parallel)
    return torch.linalg.vector_norm(torch.stack([n.to(device=device, dtype=dtype) for n in norms]))


def _values(u: torch.Tensor) -> torch.Tensor:
    return u.coalesce().values() if u.layout == torch.sparse_coo else u


def clip_by_global_norm(max_norm: float | torch.Tensor) -> GradientTransformation:
    """Scales all updates together so that their global norm is at most ``max_norm``.

        n = sqrt(sum_i ||u_i||^2),   u_i <- u_i * max_norm / max(n, max_norm)

    Updates whose norm is already at most ``max_norm`` pass unchanged (the
    factor is exactly 1), and a zero update stays zero (no division by 0).
    The factor is a tensor, so there is no data-dependent branch and the
    transform traces under ``torch.compile(fullgraph=True)``.  Sparse COO
    updates stay sparse.  Keeps no state.

    Args:
      max_norm: ``> 0``; a float or a tensor.

    Example::

        tx = sm3fn.chain(sm3fn.clip_by_global_norm(1.0), sm3fn.sm3(0.1))
    """
    _checks.check_scalar("max_norm", max_norm, 0.0)
    if not isinstance(max_norm, torch.Tensor) and max_norm == 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm!r}")

    def init(params: Tree) -> OptState:
        _tree.flatten(params, "params")
        return empty_state()

    def update(updates: Tree, state: OptState, params: Optional[Tree] = None) -> tuple[Tree, OptState]:
        leaves = _tree.flatten(updates, "updates")
        for path, u in leaves.items():
            if u is not None:
                _checks.check_floating("updates", path, u)
        norm = global_norm(updates)
        factor = max_norm / torch.clamp(norm, min=max_norm)
        out = {p: None if u is None else u * factor.to(device=u.device, dtype=u.dtype) for p, u in leaves.items()}
        return _tree.unflatten_like(updates, out), state

    return GradientTransformation(init, update)


def clip(max_delta: float | torch.Tensor) -> GradientTransformation:
    """optax's ``clip``: every entry of every update clamped to ``[-max_delta, max_delta]``.

    Keeps no state.  A sparse COO update is coalesced and its stored values
    clamped (it stays sparse).

    Args:
      max_delta: ``>= 0``; a float or a tensor.

    Example::

        tx = sm3fn.chain(sm3fn.clip(1.0), sm3fn.sm3(0.1))   # clip the raw gradients
    """
    _checks.check_scalar("max_delta", max_delta, 0.0)

    def init(params: Tree) -> OptState:
        _tree.flatten(params, "params")
        return empty_state()

    def update(updates: Tree, state: OptState, params: Optional[Tree] = None):
        return _tree_ops.clip(updates, -max_delta, max_delta), state

    return GradientTransformation(init, update)
