"""Composing transforms: ``chain`` and ``named_chain``."""

from __future__ import annotations

from typing import Optional

from tensordict import TensorDict

from sm3fn.base import GradientTransformation, OptState, Tree

__all__ = ["chain", "named_chain"]


def named_chain(*named: tuple[str, GradientTransformation]) -> GradientTransformation:
    """Applies transforms left to right; the state is ``{name: that transform's state}``."""
    names = [n for n, _ in named]
    for n, tx in named:
        if not isinstance(n, str) or not n or "." in n:
            raise ValueError(f"named_chain names must be non-empty strings without '.', got {n!r}")
        if not isinstance(tx, GradientTransformation):
            raise TypeError(f"named_chain entry {n!r} must be a GradientTransformation, got {type(tx).__name__}")
    if len(set(names)) != len(names):
        raise ValueError(f"named_chain names must be unique, got {names}")

    def init(params: Tree) -> OptState:
        return TensorDict({n: tx.init(params) for n, tx in named}, batch_size=[])

    def update(updates: Tree, state: OptState, params: Optional[Tree] = None) -> tuple[Tree, OptState]:
        check_chain_state(state, names)
        new_state = {}
        for n, tx in named:
            updates, new_state[n] = tx.update(updates, state.get(n), params)
        return updates, TensorDict(new_state, batch_size=[])

    return GradientTransformation(init, update)


def check_chain_state(state: OptState, names: list[str]) -> None:
    """A chain's state must hold exactly one entry per stage."""
    missing = [n for n in names if n not in state.keys()]
    extra = [k for k in state.keys() if k not in names]
    if missing or extra:
        raise ValueError(f"chain state has keys {sorted(state.keys())}, expected {names}")


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Applies ``transforms`` left to right; the state is ``{"0": ..., "1": ..., ...}``."""
    return named_chain(*((str(i), tx) for i, tx in enumerate(transforms)))
