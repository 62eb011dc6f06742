"""``scale_by_sm3``: gradients in, SM3-preconditioned gradients out."""

from __future__ import annotations

from typing import Optional

import torch

from sm3fn import _checks, _tree
from sm3fn._kernels import sharded as _sharded
from sm3fn._kernels import sm3_step
from sm3fn._kernels import sparse as _sparse
from sm3fn._sm3_math import init_accumulators, param_shape
from sm3fn.base import ACCUMULATOR_PREFIX, GradientTransformation, OptState, Tree

__all__ = ["scale_by_sm3"]


def accumulators_by_param(state: OptState) -> dict[_tree.Path, list[torch.Tensor]]:
    """``state`` of :func:`scale_by_sm3` as ``{param path: [a_0, ..., a_{k-1}]}``."""
    found: dict[_tree.Path, dict[int, torch.Tensor]] = {}
    for key, value in _tree.td_leaves(state):
        name = key[-1]
        if len(key) < 2 or not name.startswith(ACCUMULATOR_PREFIX):
            raise ValueError(f"scale_by_sm3 state has an unexpected entry {_tree.fmt(key)}")
        found.setdefault(key[:-1], {})[int(name[len(ACCUMULATOR_PREFIX):])] = value
    return {path: [accs[i] for i in range(len(accs))] for path, accs in found.items()}


def accumulator_state(per_param: dict[_tree.Path, list[torch.Tensor]]) -> OptState:
    """The inverse of :func:`accumulators_by_param`."""
    return _tree.state_tree(
        {
            path + (f"{ACCUMULATOR_PREFIX}{i}",): a
            for path, accs in per_param.items()
            for i, a in enumerate(accs)
        }
    )


def scale_by_sm3(
    beta: float | torch.Tensor = 0.0,
    eps: float = 1e-30,
    accumulator_dtype: Optional[torch.dtype] = None,
    *,
    sparse: _sparse.SparseSpec = None,
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

    Extreme values: a coordinate whose ``g*g`` overflows the statistics dtype
    takes a zero step and its accumulators saturate at ``finfo(dtype).max``
    (never inf, so ``beta > 0`` decays back); a NaN gradient gives a NaN step
    and NaN accumulators for its row and column.  Wrap the optimizer in
    :func:`sm3fn.apply_if_finite` to drop such steps (README, "Guarantees").

    Sparse gradients (``torch.sparse_coo``, e.g. from
    ``nn.Embedding(sparse=True)``) update only the rows they touch, with the
    row accumulator ``a_0`` as the only cover (``nu[r] = a_0[r] + g[r]**2``,
    ``a_0[r] = max of nu[r]``); the other rows keep their accumulator
    exactly, and the update comes back as a sparse COO tensor on the touched
    rows.  Any parameter accepts them (its other accumulators are then left
    as they were); a parameter declared in ``sparse`` keeps only ``a_0``
    (``n_1`` numbers), and a dense gradient for it is a row-cover step on
    every row.  Sparse gradients cannot run under ``torch.compile``.

    Args:
      beta: 0 (the paper's default) sums squared gradients; ``0 < beta < 1``
        keeps their exponential moving average, so accumulators decay when
        gradients shrink.  May be a tensor.
      eps: added to ``nu`` under the square root; ``>= 0``.
      accumulator_dtype: dtype of the accumulators; default: the parameter's
        for float32/float64, float32 for narrower floats.
      sparse: the parameters that get sparse gradients: a collection of
        dotted names (``{"emb.weight"}``, as ``named_parameters`` spells
        them; nested TensorDict keys are joined with ``"."``) or a predicate
        ``name -> bool``.  They keep only the row accumulator.

    Reference: Anil, Gupta, Koren, Singer, "Memory-Efficient Adaptive
    Optimization", NeurIPS 2019, arXiv:1901.11150.
    """
    _checks.check_scalar("beta", beta, 0.0, 1.0)
    _checks.check_scalar("eps", eps, 0.0, finite=True)
    if isinstance(eps, torch.Tensor):
        raise TypeError("eps must be a float, got a tensor")
    _checks.check_dtype_arg("accumulator_dtype", accumulator_dtype)
    declared_sparse = _sparse.check_spec(sparse)

    def init(params: Tree) -> OptState:
        per_param = {}
        for path, p in _tree.flatten(params, "params").items():
            if p is None:
                continue
            _checks.check_floating("params", path, p)
            dtype = _checks.statistics_dtype(p.dtype, accumulator_dtype)
            if declared_sparse(path):
                if p.dim() == 0:
                    raise ValueError(f"params[{_tree.fmt(path)}] is declared sparse but is 0-d")
                if _sharded.is_dtensor(p):  # the row accumulator, placed like a full cover's a_0
                    per_param[path] = list(_sharded.init_accumulators_sharded(p, dtype, path=path))[:1]
                else:
                    per_param[path] = [_sparse.row_accumulator(p, dtype)]
            elif _sharded.is_dtensor(p):  # placements follow the parameter's, never Partial
                per_param[path] = list(_sharded.init_accumulators_sharded(p, dtype, path=path))
            else:
                per_param[path] = list(init_accumulators(p, dtype))
        return accumulator_state(per_param)

    def update(updates: Tree, state: OptState, params: Optional[Tree] = None) -> tuple[Tree, OptState]:
        # a tensor beta may have been changed in place since the factory checked it
        _checks.check_scalar("beta", beta, 0.0, 1.0)
        grads, accs_by_path = checked_inputs(updates, state, declared_sparse)
        live = list(grads)
        new_updates, new_accs, _ = sm3_step(
            [grads[path] for path in live], [accs_by_path[path] for path in live],
            beta=beta, eps=eps, paths=live,
        )
        return (_tree.unflatten_like(updates, dict(zip(live, new_updates))),
                accumulator_state(dict(zip(live, new_accs))))

    return GradientTransformation(init, update)


def checked_inputs(
    updates: Tree, state: OptState, declared_sparse, owner: str = "scale_by_sm3"
) -> tuple[dict[_tree.Path, Optional[torch.Tensor]], dict[_tree.Path, list[torch.Tensor]]]:
    """``(gradients by path, accumulators by path)``, every gradient checked against its state.

    ``declared_sparse`` is ``path -> bool`` (:func:`sm3fn._kernels.sparse.check_spec`).
    Runs before any gradient is read under ``torch.compile``, which rejects a
    sparse one on sight.
    """
    accs_by_path = accumulators_by_param(state)
    _sparse.check_not_compiling(
        [f"parameter {_tree.fmt(p)}" for p in accs_by_path if declared_sparse(p)],
        owner, "; or leave it out of sparse= and give it dense gradients",
    )
    grads = _tree.flatten(updates, "grads")
    _tree.check_same_keys(grads, accs_by_path, owner)
    for path, g in grads.items():
        if g is not None:
            _sharded.check_same_kind(
                owner, path, grad=g, **{f"{ACCUMULATOR_PREFIX}{i}": a for i, a in enumerate(accs_by_path[path])},
            )
            check_grad(path, g, accs_by_path[path])
    return grads, accs_by_path


def check_grad(path: _tree.Path, g: torch.Tensor, accs: list[torch.Tensor]) -> None:
    """A gradient must be real floating point, dense or sparse COO, and of the parameter's shape."""
    _checks.check_floating("grads", path, g)
    if g.layout not in (torch.strided, torch.sparse_coo):
        raise TypeError(
            f"grads[{_tree.fmt(path)}] has layout {g.layout}; scale_by_sm3 takes dense "
            "(torch.strided) or torch.sparse_coo gradients"
        )
    if _sparse.is_sparse(g) and (g.dim() == 0 or g.sparse_dim() == 0):
        raise ValueError(
            f"grads[{_tree.fmt(path)}] is a sparse tensor with no sparse dimension "
            f"(shape {tuple(g.shape)}); pass it dense"
        )
    expected = param_shape(accs)
    if _sparse.is_row_cover(accs) and g.dim() == accs[0].dim():
        expected = (expected[0], *g.shape[1:])  # the row cover does not record the other sizes
    if tuple(g.shape) != expected:
        raise ValueError(
            f"grads[{_tree.fmt(path)}] has shape {tuple(g.shape)}, but the scale_by_sm3 "
            f"state was made for a parameter of shape {expected}"
        )
