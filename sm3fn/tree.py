"""Helpers on trees of tensors (a nested dict or a TensorDict), after ``optax.tree``.

Every helper takes and returns sm3fn's trees: a (nested) ``dict`` of tensors
or a ``TensorDict``; what comes back has the container and nesting of the
first tree passed in.  A ``None`` leaf (a frozen parameter) stays ``None``.
All are pure torch ops with no branch on a value, so they trace under
``torch.compile(fullgraph=True)`` and run under ``torch.func.vmap``::

    zeros = sm3fn.tree.zeros_like(params)
    moved = sm3fn.tree.sub(new_params, params)
    sm3fn.tree.norm(moved)                      # the global norm, a 0-d tensor
    half = sm3fn.tree.tree_map(lambda u: u / 2, updates)
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from sm3fn import _tree
from sm3fn.base import Tree

__all__ = [
    "tree_map",
    "zeros_like",
    "ones_like",
    "full_like",
    "add",
    "sub",
    "scale",
    "vdot",
    "norm",
    "clip",
    "cast",
]


def tree_map(fn: Callable[..., Optional[torch.Tensor]], tree: Tree, *rest: Tree) -> Tree:
    """``fn`` applied leaf by leaf: ``fn(tree[k], rest[0][k], ...)`` for every key ``k`` of ``tree``.

    The trees in ``rest`` must hold the same keys as ``tree`` (a ``ValueError``
    names the first that differs).  A key that is ``None`` in any of them is
    ``None`` in the result and ``fn`` is not called for it.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    leaves = _tree.flatten(tree, "tree")
    others = [_tree.flatten(t, f"rest[{i}]") for i, t in enumerate(rest)]
    for i, other in enumerate(others):
        if set(other) != set(leaves):
            diff = sorted(set(other) ^ set(leaves))[0]
            raise ValueError(f"rest[{i}] and tree differ at key {_tree.fmt(diff)}: they must hold the same keys")
    out = {}
    for path, leaf in leaves.items():
        args = [leaf] + [o[path] for o in others]
        out[path] = None if any(a is None for a in args) else fn(*args)
    return _tree.unflatten_like(tree, out)


def zeros_like(tree: Tree, dtype: Optional[torch.dtype] = None) -> Tree:
    """A tree of zeros shaped (and placed) like ``tree``'s leaves, in ``dtype`` or theirs."""
    return tree_map(lambda t: torch.zeros_like(t, dtype=dtype), tree)


def ones_like(tree: Tree, dtype: Optional[torch.dtype] = None) -> Tree:
    """A tree of ones shaped (and placed) like ``tree``'s leaves, in ``dtype`` or theirs."""
    return tree_map(lambda t: torch.ones_like(t, dtype=dtype), tree)


def full_like(tree: Tree, fill_value: Any, dtype: Optional[torch.dtype] = None) -> Tree:
    """A tree of ``fill_value`` shaped (and placed) like ``tree``'s leaves."""
    return tree_map(lambda t: torch.full_like(t, fill_value, dtype=dtype), tree)


def add(tree: Tree, *others: Tree) -> Tree:
    """The leafwise sum of ``tree`` and ``others``."""
    return tree_map(lambda *xs: sum(xs[1:], xs[0]), tree, *others)


def sub(tree_x: Tree, tree_y: Tree) -> Tree:
    """``tree_x - tree_y``, leaf by leaf."""
    return tree_map(torch.sub, tree_x, tree_y)


def scale(scalar: Any, tree: Tree) -> Tree:
    """``scalar * tree``, leaf by leaf (``scalar`` a number or a tensor; optax's argument order)."""
    return tree_map(lambda t: scalar * t, tree)


def vdot(tree_x: Tree, tree_y: Tree) -> torch.Tensor:
    """``sum over leaves of sum(x * y)``, a 0-d tensor (0 for a tree with no tensors)."""
    products = _tree.flatten(tree_map(lambda x, y: (x * y).sum(), tree_x, tree_y), "tree")
    terms = [t for t in products.values() if t is not None]
    if not terms:
        return torch.zeros(())
    return torch.stack([t.to(terms[0].device) for t in terms]).sum()


def norm(tree: Tree) -> torch.Tensor:
    """The global L2 norm of all leaves: :func:`sm3fn.global_norm`."""
    # imported here: sm3fn.transforms.clipping imports this module for clip
    from sm3fn.transforms.clipping import global_norm

    return global_norm(tree)


def clip(tree: Tree, min_value: Any = None, max_value: Any = None) -> Tree:
    """Every entry clamped to ``[min_value, max_value]`` (either may be ``None``, or a tensor).

    A sparse COO leaf is coalesced and its stored values clamped (it stays sparse).
    """
    def clamp(t: torch.Tensor) -> torch.Tensor:
        lo = None if min_value is None else torch.as_tensor(min_value, dtype=t.dtype, device=t.device)
        hi = None if max_value is None else torch.as_tensor(max_value, dtype=t.dtype, device=t.device)
        if t.layout == torch.sparse_coo:
            t = t.coalesce()
            return torch.sparse_coo_tensor(t.indices(), torch.clamp(t.values(), lo, hi), t.shape)
        return torch.clamp(t, lo, hi)

    return tree_map(clamp, tree)


def cast(tree: Tree, dtype: torch.dtype) -> Tree:
    """Every leaf converted to ``dtype``."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    return tree_map(lambda t: t.to(dtype), tree)
