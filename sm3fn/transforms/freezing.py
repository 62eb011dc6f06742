"""Freezing parameters: ``set_to_zero`` and ``freeze``."""

from __future__ import annotations

from typing import Optional

from sm3fn import _tree
from sm3fn import tree as _tree_ops
from sm3fn.base import GradientTransformation, OptState, Tree, empty_state
from sm3fn.transforms.masking import Mask, masked

__all__ = ["set_to_zero", "freeze"]


def set_to_zero() -> GradientTransformation:
    """optax's ``set_to_zero``: every update becomes zeros of its shape; keeps no state.

    With :func:`sm3fn.partition` or :func:`sm3fn.masked` it freezes some
    parameters while the others train, and no optimizer state is kept for
    the frozen ones::

        tx = sm3fn.partition({"train": sm3fn.sm3(0.1), "frozen": sm3fn.set_to_zero()},
                             lambda path, p: "frozen" if path.startswith("encoder.") else "train")
    """

    def init(params: Tree) -> OptState:
        _tree.flatten(params, "params")
        return empty_state()

    def update(updates: Tree, state: OptState, params: Optional[Tree] = None):
        return _tree_ops.zeros_like(updates), state

    return GradientTransformation(init, update)


def freeze(mask: Mask) -> GradientTransformation:
    """Zeros the updates of the parameters where ``mask`` is True (optax's ``freeze``).

    Put it after the optimizer: ``chain(sm3fn.sm3(0.1), sm3fn.freeze(mask))``
    (the optimizer still keeps state for the frozen parameters; use
    :func:`sm3fn.partition` with :func:`set_to_zero` to keep none).

    Args:
      mask: ``fn(path, tensor) -> bool`` or a tree of bools (see :mod:`sm3fn.transforms.masking`).
    """
    return masked(set_to_zero(), mask)
