"""``scale_by_sm3``: gradients in, SM3-preconditioned gradients out."""

from __future__ import annotations

from typing import Optional

import torch

from sm3fn import _checks, _sharded, _tree
from sm3fn._sm3_math import init_accumulators, param_shape, sm3_block
from sm3fn.base import GradientTransformation, OptState, Tree

ACCUMULATOR = "accumulator_{}"


def accumulators_by_param(state: OptState) -> dict[_tree.Path, list[torch.Tensor]]:
    """``state`` of :func:`scale_by_sm3` as ``{param path: [a_0, ..., a_{k-1}]}``."""
    found: dict[_tree.Path, dict[int, torch.Tensor]] = {}
    for key, value in state.items(include_nested=True, leaves_only=True):
        key = (key,) if isinstance(key, str) else tuple(key)
        name = key[-1]
        if len(key) < 2 or not name.startswith("accumulator_"):
            raise ValueError(f"scale_by_sm3 state has an unexpected entry {_tree.fmt(key)}")
        found.setdefault(key[:-1], {})[int(name[len("accumulator_"):])] = value
    return {path: [accs[i] for i in range(len(accs))] for path, accs in found.items()}


def accumulator_state(per_param: dict[_tree.Path, list[torch.Tensor]]) -> OptState:
    """The inverse of :func:`accumulators_by_param`."""
    return _tree.state_tree(
        {
            path + (ACCUMULATOR.format(i),): a
            for path, accs in per_param.items()
            for i, a in enumerate(accs)
        }
    )


def scale_by_sm3(
    beta: float | torch.Tensor = 0.0,
    eps: float = 1e-30,
    accumulator_dtype: Optional[torch.dtype] = None,
) -> GradientTransformation:
    """Scales gradients by SM3-II's adaptive, memory-efficient preconditioner.

    For a gradient ``g`` of shape ``(n_1, ..., n_k)`` with accumulators
    ``a_i`` of shape ``(n_i,)`` (stored broadcastable along dim ``i``)::

        nu  = min_i a_i + g**2            (beta == 0; beta * min_i a_i + (1 - beta) * g**2 else)
        u   = g / sqrt(nu + eps)          (0 where nu == 0)
        a_i = max of nu over all dims but i

    A 0-d or 1-d gradient keeps one full accumulator (diagonal Adagrad).
    State: ``{param path: {"accumulator_0": a_0, ...}}``, ``n_1 + ... + n_k``
    numbers per parameter instead of ``n_1 * ... * n_k``.

    Args:
      beta: 0 (the paper's default) sums squared gradients; ``0 < beta < 1``
        keeps their exponential moving average, so accumulators decay when
        gradients shrink.  May be a tensor.
      eps: added to ``nu`` under the square root; ``>= 0``.
      accumulator_dtype: dtype of the accumulators; default: the parameter's
        for float32/float64, float32 for narrower floats.

    Reference: Anil, Gupta, Koren, Singer, "Memory-Efficient Adaptive
    Optimization", NeurIPS 2019, arXiv:1901.11150.
    """
    _checks.check_scalar("beta", beta, 0.0, 1.0)
    _checks.check_scalar("eps", eps, 0.0)
    if isinstance(eps, torch.Tensor):
        raise TypeError("eps must be a float, got a tensor")
    _checks.check_dtype_arg("accumulator_dtype", accumulator_dtype)

    def init(params: Tree) -> OptState:
        per_param = {}
        for path, p in _tree.flatten(params, "params").items():
            if p is None:
                continue
            _checks.check_floating("params", path, p)
            dtype = _checks.statistics_dtype(p.dtype, accumulator_dtype)
            if _sharded.is_dtensor(p):  # placements follow the parameter's, never Partial
                per_param[path] = list(_sharded.init_accumulators_sharded(p, dtype, path=path))
            else:
                per_param[path] = list(init_accumulators(p, dtype))
        return accumulator_state(per_param)

    def update(updates: Tree, state: OptState, params: Optional[Tree] = None):
        grads = _tree.flatten(updates, "grads")
        accs_by_path = accumulators_by_param(state)
        _tree.check_same_keys(grads, accs_by_path, "scale_by_sm3")
        for path, g in grads.items():
            if g is not None:
                _sharded.check_same_kind(
                    "scale_by_sm3", path, grad=g,
                    **{f"accumulator_{i}": a for i, a in enumerate(accs_by_path[path])},
                )
                check_grad(path, g, accs_by_path[path])

        # DTensors: local maxima of all parameters are all-reduced together, after the loop
        reducer = _sharded.MaxReducer()
        new_updates, new_accs = {}, {}
        for path, g in grads.items():
            accs = accs_by_path[path]
            if g is None:  # frozen: no update, state kept
                new_updates[path], new_accs[path] = None, accs
                continue
            if _sharded.is_dtensor(g):
                u, new_accs[path] = _sharded.sm3_block_sharded(g, accs, beta, eps, reducer, path=path)
            else:
                u, new_accs[path] = sm3_block(g.to(accs[0].dtype), accs, beta, eps)
            new_updates[path] = u.to(g.dtype)
        reducer.flush()
        return _tree.unflatten_like(updates, new_updates), accumulator_state(new_accs)

    return GradientTransformation(init, update)


def check_grad(path: _tree.Path, g: torch.Tensor, accs: list[torch.Tensor]) -> None:
    """A gradient must be real floating point, dense, and of the parameter's shape."""
    _checks.check_floating("grads", path, g)
    if g.layout != torch.strided:
        raise TypeError(
            f"grads[{_tree.fmt(path)}] has layout {g.layout}; scale_by_sm3 takes dense gradients"
        )
    expected = param_shape(accs)
    if tuple(g.shape) != expected:
        raise ValueError(
            f"grads[{_tree.fmt(path)}] has shape {tuple(g.shape)}, but the scale_by_sm3 "
            f"state was made for a parameter of shape {expected}"
        )
