"""Walking the trees sm3fn accepts: nested dicts and TensorDicts of tensors.

Every transform works on a flat view of a tree: a dict from a *path* (a tuple
of string keys, one per level of nesting) to a tensor, or to ``None`` for a
frozen parameter.  This module is the one place that knows how to take a tree
apart and put it back together in the container it came in.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping, Optional

import torch
from tensordict import TensorDict, TensorDictBase

Path = tuple  # tuple[str, ...]


def fmt(path: Path) -> str:
    """A path as a user would write it: ``'w'`` or ``'layer.weight'``."""
    return repr(".".join(path))


def td_leaves(td: TensorDictBase) -> Iterator[tuple[Path, Any]]:
    """``(path, leaf)`` of every leaf of a TensorDict, nested keys as path tuples."""
    for key, value in td.items(include_nested=True, leaves_only=True):
        yield ((key,) if isinstance(key, str) else tuple(key)), value


def flatten(tree: Any, argname: str) -> dict[Path, Optional[torch.Tensor]]:
    """The leaves of ``tree`` by path; ``argname`` names the tree in errors."""
    if isinstance(tree, TensorDictBase):
        out: dict[Path, Optional[torch.Tensor]] = {}
        for path, value in td_leaves(tree):
            if not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"{argname}[{fmt(path)}] must be a tensor, got {type(value).__name__}"
                )
            out[path] = value
        return out
    if isinstance(tree, Mapping):
        out = {}
        _flatten_mapping(tree, (), out, argname)
        return out
    raise TypeError(
        f"{argname} must be a dict of tensors or a TensorDict, got {type(tree).__name__}"
    )


def _flatten_mapping(tree: Mapping, prefix: Path, out: dict, argname: str) -> None:
    for key, value in tree.items():
        if not isinstance(key, str):
            raise TypeError(
                f"{argname} keys must be strings, got {key!r} of type {type(key).__name__}"
            )
        path = prefix + (key,)
        if isinstance(value, TensorDictBase):
            for sub, leaf in flatten(value, argname).items():
                out[path + sub] = leaf
        elif isinstance(value, Mapping):
            _flatten_mapping(value, path, out, argname)
        elif value is None or isinstance(value, torch.Tensor):
            out[path] = value
        else:
            raise TypeError(
                f"{argname}[{fmt(path)}] must be a tensor or None, got {type(value).__name__}"
            )


def nest(leaves: Mapping[Path, Any]) -> dict:
    """``{('a', 'b'): x}`` -> ``{'a': {'b': x}}``."""
    out: dict = {}
    for path, value in leaves.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def unflatten_like(template: Any, leaves: Mapping[Path, Optional[torch.Tensor]]) -> Any:
    """Rebuilds ``leaves`` in the container type and nesting of ``template``."""
    if isinstance(template, TensorDictBase):
        present = {p: v for p, v in leaves.items() if v is not None}
        return TensorDict(nest(present), batch_size=template.batch_size)
    return _rebuild_mapping(template, (), leaves)


def _rebuild_mapping(template: Mapping, prefix: Path, leaves: Mapping) -> dict:
    out = {}
    for key, value in template.items():
        path = prefix + (key,)
        if isinstance(value, TensorDictBase):
            sub = {p[len(path):]: v for p, v in leaves.items() if p[: len(path)] == path}
            out[key] = unflatten_like(value, sub)
        elif isinstance(value, Mapping):
            out[key] = _rebuild_mapping(value, path, leaves)
        else:
            out[key] = leaves.get(path)
    return out


def state_tree(per_param: Mapping[Path, Any]) -> TensorDict:
    """A state TensorDict that mirrors the parameter tree.

    ``per_param`` maps each parameter's path to its state: a tensor or a
    TensorDict of tensors (e.g. one accumulator per dimension).
    """
    return TensorDict(nest(per_param), batch_size=[])


def check_state_keys(state: Any, keys: Iterable[str], owner: str) -> None:
    """Raises a ValueError unless ``state`` is a TensorDict with exactly the top-level ``keys``."""
    keys = sorted(keys)
    if not isinstance(state, TensorDictBase) or sorted(state.keys()) != keys:
        got = sorted(state.keys()) if isinstance(state, TensorDictBase) else type(state).__name__
        raise ValueError(f"{owner} state must have keys {keys}, got {got}")


def check_same_keys(
    grads: Iterable[Path], state: Iterable[Path], owner: str
) -> None:
    """Raises a ValueError when the keys of ``grads`` and the state differ.

    A frozen parameter is one whose gradient is ``None`` (its state stays as
    it was) or one that was never passed to ``init``; a gradient for a key
    the state does not hold, or a state key with no entry in ``grads``, is a
    mistake worth stopping for.
    """
    grads, state = list(grads), set(state)
    gset = set(grads)
    for path in grads:
        if path not in state:
            raise ValueError(
                f"grads has key {fmt(path)}, which the {owner} state does not hold "
                f"(state keys: {sorted('.'.join(p) for p in state)[:8]})"
            )
    for path in state:
        if path not in gset:
            raise ValueError(
                f"grads is missing key {fmt(path)}, which the {owner} state holds; "
                "pass None as the gradient of a frozen parameter, or leave it out of init"
            )
