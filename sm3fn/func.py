"""Small helpers where ``torch.func`` and tensordict do not meet.

* :func:`functional_call` -- ``torch.func.functional_call`` that also takes a
  ``TensorDict`` (``TensorDict.from_module(model)``) or a nested dict; the
  torch function takes only flat dicts keyed ``"layer.weight"``.
* :func:`stop_gradient` -- detach every tensor of a tree (params, updates or
  optimizer state), keeping its container and structure: the cut for
  truncated backpropagation through long inner loops.
* :func:`expand` -- give every leaf a leading batch dimension (a task batch
  for ``torch.func.vmap``); a TensorDict gets ``batch_size [n, ...]``.

The batch-size convention: a tree that goes *into* ``vmap`` with
``in_dims=0`` has the batch dimension first on every leaf, and a TensorDict
state carries it in its ``batch_size`` (``[T]`` for ``T`` tasks; every nested
TensorDict too).  Inside the vmapped function the same tree looks unbatched
(``batch_size []``), so the per-task code is the ordinary single-task code.
``vmap(tx.init)(params)`` on batched params returns a state of batch size
``[T]``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
from tensordict import TensorDictBase

from sm3fn import _tree
from sm3fn.base import Tree

__all__ = ["functional_call", "stop_gradient", "expand"]


def _map(tree: Any, fn: Callable[[torch.Tensor], torch.Tensor], td_fn: Callable, argname: str) -> Any:
    """Applies ``fn`` to the tensor leaves of a (nested) dict; ``td_fn`` to a TensorDict node.

    A TensorDict is handed to ``td_fn`` whole, so that its empty sub-TensorDicts
    (the state of a stateless stage, e.g. ``{"learning_rate": {}}``) and batch
    size survive; ``_tree.flatten`` keeps leaves only and would drop them.
    """
    if isinstance(tree, TensorDictBase):
        return td_fn(tree)
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if tree is None:
        return None
    if isinstance(tree, Mapping):
        return {k: _map(v, fn, td_fn, argname) for k, v in tree.items()}
    raise TypeError(
        f"{argname} must be a tensor, a dict of tensors or a TensorDict, got {type(tree).__name__}"
    )


def stop_gradient(tree: Tree) -> Tree:
    """``tree`` with every tensor detached: no gradient flows back through it.

    Works on params, updates and optimizer states (dicts or TensorDicts, also
    inside ``torch.func.grad``, where it cuts that transform's graph).  For
    truncated backpropagation through a long inner loop, cut params *and*
    state every ``K`` steps; the meta-gradient then sees only the last window
    and the autograd graph stays ``O(K)``::

        for t in range(steps):
            if t % K == 0:
                params, state = sm3fn.stop_gradient(params), sm3fn.stop_gradient(state)
            ...

    Cutting only the state (``stop_gradient(state)`` every step) treats the
    SM3 accumulators and momentum as constants in the meta-gradient, a
    first-order-style approximation that also keeps the statistics out of
    the graph.
    """
    return _map(tree, torch.Tensor.detach, lambda td: td.detach(), "tree")


def expand(tree: Tree, n: int) -> Tree:
    """Every leaf broadcast to a new leading dimension of size ``n`` (views, no copy).

    The shared initial parameters of a task batch: ``vmap`` over the result
    with ``in_dims=0`` gives each task its own copy to adapt.  A TensorDict
    comes back with ``batch_size [n, *old]``.  Gradients through the views
    sum over the batch, so ``expand(params, T)`` of meta-parameters that
    require grad gives them the sum of the per-task gradients.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    return _map(
        tree,
        lambda t: t.expand(n, *t.shape),
        lambda td: td.expand(n, *td.batch_size),
        "tree",
    )


def functional_call(
    module: torch.nn.Module,
    params: Tree,
    args: Any = (),
    kwargs: Optional[dict] = None,
    *,
    tie_weights: bool = True,
    strict: bool = False,
) -> Any:
    """``torch.func.functional_call`` that takes a TensorDict or a nested dict.

    ``params`` may be ``TensorDict.from_module(module)`` (nested by submodule),
    a nested dict, or the flat ``{"layer.weight": tensor}`` dict torch takes;
    keys are joined with ``"."``.  Buffers may be included the same way.
    Works under ``grad``, ``vmap`` and ``torch.compile``.
    """
    flat = {".".join(path): t for path, t in _tree.flatten(params, "params").items()}
    return torch.func.functional_call(
        module, flat, args, kwargs, tie_weights=tie_weights, strict=strict
    )
