"""Decoupled weight decay: ``add_decayed_weights``."""

from __future__ import annotations

from typing import Optional

import torch

from sm3fn import _checks, _tree
from sm3fn.base import GradientTransformation, OptState, Tree, empty_state
from sm3fn.transforms.masking import Mask, resolve

__all__ = ["add_decayed_weights"]


def add_decayed_weights(
    weight_decay: float | torch.Tensor = 1e-4, mask: Optional[Mask] = None
) -> GradientTransformation:
    """Adds ``weight_decay * param`` to the update of each (masked) parameter.

        u <- u + weight_decay * p            (where mask(p) is True)

    Placed *after* the preconditioner and *before* the learning rate, the
    decay is decoupled from the adaptive scaling (Loshchilov & Hutter,
    "Decoupled Weight Decay Regularization", ICLR 2019, arXiv:1711.05101):
    the step is ``-lr * (sm3(g) + wd * p)``, so every weight shrinks by the
    same fraction ``lr * wd`` whatever its gradient history.  Needs
    ``params`` in ``update``.  Keeps no state.  A sparse update of a decayed
    parameter becomes dense (every row decays); mask sparse embeddings out to
    keep their updates sparse.

    Args:
      weight_decay: ``>= 0``; a float or a tensor (which may require grad).
      mask: which parameters decay: ``fn(path, tensor) -> bool`` or a tree of
        bools (see :mod:`sm3fn.transforms.masking`); ``None``: all of them.
        The usual choice leaves biases and norm scales alone:
        ``mask=lambda path, p: p.ndim > 1``.

    Example::

        tx = sm3fn.chain(sm3fn.scale_by_sm3(),
                         sm3fn.add_decayed_weights(1e-4, mask=lambda path, p: p.ndim > 1),
                         sm3fn.scale_by_learning_rate(0.1))
    """
    _checks.check_scalar("weight_decay", weight_decay, 0.0)

    def init(params: Tree) -> OptState:
        _tree.flatten(params, "params")
        return empty_state()

    def update(updates: Tree, state: OptState, params: Optional[Tree] = None) -> tuple[Tree, OptState]:
        if params is None:
            raise ValueError("add_decayed_weights needs params: call tx.update(grads, state, params)")
        leaves = _tree.flatten(updates, "updates")
        param_leaves = _tree.flatten(params, "params")
        keep = {p: True for p in leaves} if mask is None else resolve(mask, "mask", leaves, param_leaves)
        for path, u in leaves.items():
            if u is None or not keep[path]:
                continue
            p = param_leaves.get(path)
            if p is None:
                raise ValueError(f"params has no tensor for key {_tree.fmt(path)}, which updates has")
            if p.shape != u.shape:
                raise ValueError(
                    f"params[{_tree.fmt(path)}] has shape {tuple(p.shape)}, "
                    f"but updates[{_tree.fmt(path)}] has shape {tuple(u.shape)}"
                )
        out = {
            # p-term first: dense + sparse is defined (a sparse update becomes dense), sparse + dense is not
            path: u if u is None or not keep[path] else weight_decay * param_leaves[path].to(u.dtype) + u
            for path, u in leaves.items()
        }
        return _tree.unflatten_like(updates, out), state

    return GradientTransformation(init, update)
