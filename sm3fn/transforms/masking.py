"""Applying a transform to some parameters only: ``masked`` and ``partition``.

A *mask* says, for each parameter, whether a transform applies to it; a
*labelling* says which of several transforms applies.  Both come in two forms:

* a predicate ``fn(path, tensor)``, where ``path`` is the parameter's dotted
  name (``"encoder.0.bias"``) and ``tensor`` the parameter (in ``init``, and
  in ``update`` when ``params`` are passed) or else its update.  It should
  depend only on the name, shape and dtype, which are the same for both, e.g.
  ``lambda path, p: p.ndim > 1`` (no decay on biases and norm scales);
* a tree of the parameters' shape whose leaves are ``bool`` (a mask) or
  ``str`` (labels): a nested dict, or a TensorDict of 0-d bool tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

import torch
from tensordict import TensorDict, TensorDictBase

from sm3fn import _tree
from sm3fn.base import GradientTransformation, OptState, Tree

__all__ = ["Mask", "Labels", "masked", "partition"]

#: ``fn(path, tensor) -> bool`` or a tree of bools
Mask = Union[Callable[[str, Optional[torch.Tensor]], bool], Tree]
#: ``fn(path, tensor) -> label`` or a tree of labels
Labels = Union[Callable[[str, Optional[torch.Tensor]], str], Tree]


def _label_leaves(tree: Any, prefix: _tree.Path, out: dict, argname: str) -> None:
    """Flattens a tree whose leaves are Python scalars/strings or 0-d tensors."""
    if isinstance(tree, TensorDictBase):
        for key, value in _tree.td_leaves(tree):
            out[prefix + key] = value
        return
    for key, value in tree.items():
        path = prefix + (key,)
        if isinstance(value, (Mapping, TensorDictBase)):
            _label_leaves(value, path, out, argname)
        else:
            out[path] = value


def resolve(
    spec: Union[Mask, Labels],
    argname: str,
    leaves: Mapping[_tree.Path, Optional[torch.Tensor]],
    params: Optional[Mapping[_tree.Path, Optional[torch.Tensor]]] = None,
    kind: type = bool,
) -> dict[_tree.Path, Any]:
    """The mask (``kind=bool``) or labels (``kind=str``) of each path in ``leaves``.

    A predicate is called with the parameter from ``params`` when there is
    one, else with the leaf itself (which may be ``None`` for a frozen
    parameter).  A tree must name every path of ``leaves`` (extra keys are
    allowed: the tree may describe parameters left out of ``init``).
    """
    what = "a bool" if kind is bool else "a str"
    out = {}
    if callable(spec) and not isinstance(spec, (Mapping, TensorDictBase)):
        for path, leaf in leaves.items():
            p = params.get(path) if params is not None else None
            value = spec(".".join(path), leaf if p is None else p)
            out[path] = _coerce(value, kind, f"{argname}({'.'.join(path)!r}, ...)", what)
        return out
    if not isinstance(spec, (Mapping, TensorDictBase)):
        raise TypeError(
            f"{argname} must be a callable (path, tensor) -> {kind.__name__} or a tree of "
            f"{kind.__name__}s, got {type(spec).__name__}"
        )
    given: dict = {}
    _label_leaves(spec, (), given, argname)
    for path in leaves:
        if path not in given:
            raise ValueError(f"{argname} has no entry for key {_tree.fmt(path)}")
        out[path] = _coerce(given[path], kind, f"{argname}[{_tree.fmt(path)}]", what)
    return out


def _coerce(value: Any, kind: type, where: str, what: str) -> Any:
    if kind is bool:
        if isinstance(value, torch.Tensor) and value.dtype == torch.bool and value.numel() == 1:
            return bool(value)
        if isinstance(value, bool):
            return value
    elif isinstance(value, str):
        return value
    raise TypeError(f"{where} must be {what}, got {value!r}")


def subtree(template: Tree, leaves: Mapping[_tree.Path, Optional[torch.Tensor]]) -> Tree:
    """Only ``leaves``, in ``template``'s kind of container (a dict or a TensorDict).

    Unlike :func:`sm3fn._tree.unflatten_like` the keys not in ``leaves`` are
    left out, so an inner transform sees exactly its own parameters.
    """
    if isinstance(template, TensorDictBase):
        present = {p: v for p, v in leaves.items() if v is not None}
        return TensorDict(_tree.nest(present), batch_size=template.batch_size)
    return _tree.nest(leaves)


def partition(transforms: Mapping[str, GradientTransformation], labels: Labels) -> GradientTransformation:
    """Applies ``transforms[label]`` to the parameters with that label.

    Each inner transform sees only its own parameters (in ``init`` and
    ``update``); the updates are put back together in the incoming container.
    State: ``{label: that transform's state}``, addressable as ``state["decay"]``.
    Every parameter must get a label that ``transforms`` holds.

    Args:
      transforms: ``{label: GradientTransformation}``; labels are non-empty
        strings without ``'.'``.
      labels: ``fn(path, tensor) -> label`` or a tree of labels (see module doc).

    Example (a separate learning rate for the embeddings)::

        tx = sm3fn.partition(
            {"embed": sm3fn.sm3(0.01), "rest": sm3fn.sm3(0.1)},
            lambda path, p: "embed" if path.startswith("embed") else "rest")
    """
    if not isinstance(transforms, Mapping) or not transforms:
        raise TypeError(f"transforms must be a non-empty dict of label -> GradientTransformation, got {transforms!r}")
    for name, tx in transforms.items():
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"partition labels must be non-empty strings without '.', got {name!r}")
        if not isinstance(tx, GradientTransformation):
            raise TypeError(f"transforms[{name!r}] must be a GradientTransformation, got {type(tx).__name__}")
    names = list(transforms)

    def split(tree: Tree, argname: str, params: Optional[Tree]) -> dict[str, dict]:
        leaves = _tree.flatten(tree, argname)
        param_leaves = None if params is None else _tree.flatten(params, "params")
        by_label: dict[str, dict] = {n: {} for n in names}
        for path, label in resolve(labels, "labels", leaves, param_leaves, str).items():
            if label not in by_label:
                raise ValueError(
                    f"labels gives {_tree.fmt(path)} the label {label!r}, which transforms "
                    f"does not hold (labels: {names})"
                )
            by_label[label][path] = leaves[path]
        return by_label

    def init(params: Tree) -> OptState:
        groups = split(params, "params", None)
        return TensorDict(
            {n: transforms[n].init(subtree(params, groups[n])) for n in names}, batch_size=[]
        )

    def update(updates: Tree, state: OptState, params: Optional[Tree] = None) -> tuple[Tree, OptState]:
        if sorted(state.keys()) != sorted(names):
            raise ValueError(f"partition state has keys {sorted(state.keys())}, expected {sorted(names)}")
        groups = split(updates, "updates", params)
        param_groups = None if params is None else split(params, "params", params)
        outgoing, new_state = {}, {}
        for n in names:
            sub_params = None if param_groups is None else subtree(params, param_groups[n])
            new_updates, new_state[n] = transforms[n].update(
                subtree(updates, groups[n]), state.get(n), sub_params
            )
            outgoing.update(_tree.flatten(new_updates, "updates"))
        return _tree.unflatten_like(updates, outgoing), TensorDict(new_state, batch_size=[])

    return GradientTransformation(init, update)


def masked(inner: GradientTransformation, mask: Mask) -> GradientTransformation:
    """Applies ``inner`` to the parameters where ``mask`` is True; the others pass unchanged.

    ``inner`` sees only the masked parameters, so its state holds nothing for
    the others.  State: ``inner``'s state.

    Args:
      inner: any GradientTransformation.
      mask: ``fn(path, tensor) -> bool`` or a tree of bools (see module doc).

    Example (SM3 on matrices, plain SGD on vectors)::

        tx = sm3fn.chain(sm3fn.masked(sm3fn.scale_by_sm3(), lambda path, p: p.ndim >= 2),
                         sm3fn.scale_by_learning_rate(0.1))
    """
    if not isinstance(inner, GradientTransformation):
        raise TypeError(f"inner must be a GradientTransformation, got {type(inner).__name__}")

    def selected(tree: Tree, argname: str, params: Optional[Tree]) -> dict:
        leaves = _tree.flatten(tree, argname)
        param_leaves = None if params is None else _tree.flatten(params, "params")
        keep = resolve(mask, "mask", leaves, param_leaves, bool)
        return {p: v for p, v in leaves.items() if keep[p]}

    def init(params: Tree) -> OptState:
        return inner.init(subtree(params, selected(params, "params", None)))

    def update(updates: Tree, state: OptState, params: Optional[Tree] = None) -> tuple[Tree, OptState]:
        chosen = selected(updates, "updates", params)
        sub_params = None
        if params is not None:
            param_leaves = _tree.flatten(params, "params")
            sub_params = subtree(params, {p: param_leaves.get(p) for p in chosen})
        new_updates, new_state = inner.update(subtree(updates, chosen), state, sub_params)
        outgoing = dict(_tree.flatten(updates, "updates"))
        outgoing.update(_tree.flatten(new_updates, "updates"))
        return _tree.unflatten_like(updates, outgoing), new_state

    return GradientTransformation(init, update)
