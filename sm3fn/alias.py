"""``sm3``: the whole optimizer as one transform, with its arguments checked here."""

from __future__ import annotations

from typing import Optional

import torch
from tensordict import TensorDict

from sm3fn import _checks, _tree
from sm3fn._kernels import sm3_step
from sm3fn._kernels.sparse import SparseSpec, check_spec
from sm3fn.base import GradientTransformation, OptState, ScalarOrSchedule, Tree
from sm3fn.transforms.combine import check_chain_state, named_chain
from sm3fn.transforms.momentum import checked_buffers, ema
from sm3fn.transforms.preconditioner import accumulator_state, checked_inputs, scale_by_sm3
from sm3fn.transforms.scaling import COUNT, scale_by_learning_rate

__all__ = ["sm3"]


def sm3(
    learning_rate: ScalarOrSchedule = 0.1,
    momentum: float | torch.Tensor = 0.0,
    beta: float | torch.Tensor = 0.0,
    eps: float = 1e-30,
    *,
    accumulator_dtype: Optional[torch.dtype] = None,
    momentum_dtype: Optional[torch.dtype] = None,
    sparse: SparseSpec = None,
) -> GradientTransformation:
    """SM3-II with torch-SM3's momentum and a learning rate.

    ``named_chain(("sm3", scale_by_sm3(beta, eps)), ("momentum", ema(momentum)),
    ("learning_rate", scale_by_learning_rate(learning_rate)))``; the momentum
    stage (and its buffer) is left out when ``momentum`` is the float 0.  With
    float hyperparameters (``learning_rate`` a float or a schedule) ``update``
    computes the three stages in one call of the dispatcher: one sweep per CPU
    tensor the fused kernel covers, when no gradient flows through the step
    (the differentiable math otherwise), with the chain's numbers and state.

    Args:
      learning_rate: a float >= 0, a tensor, or a schedule ``step -> rate``
        (see :mod:`sm3fn.schedules`; the authors recommend a quadratic
        warm-up and a linear cool-down over the last 10% of steps).
      momentum: EMA decay of the preconditioned gradient, in ``[0, 1)``.
      beta: 0 for the paper's sum of squares, ``0 < beta < 1`` for its moving average.
      eps: added to the second moment under the square root, ``>= 0``.
      accumulator_dtype: dtype of the accumulators; default: the
        parameter's for float32/float64, float32 for narrower floats.
      momentum_dtype: dtype of the momentum buffer; the same default.
      sparse: the parameters that get sparse gradients (e.g. from
        ``nn.Embedding(sparse=True)``): dotted names or a predicate
        ``name -> bool``.  They keep only the row accumulator, no momentum
        buffer, and their sparse updates touch only the rows in the
        gradient; momentum is not applied to them.  Undeclared parameters
        accept sparse gradients too, but keep their full state.

    Example::

        tx = sm3fn.sm3(learning_rate=0.1, momentum=0.9)
        state = tx.init(params)
        updates, state = tx.update(grads, state)
        params = sm3fn.apply_updates(params, updates)
    """
    _checks.check_sm3_hyperparameters(learning_rate, momentum, beta, eps)
    # checked here too, so that the error names sm3's own argument, not ema's "dtype"
    _checks.check_dtype_arg("accumulator_dtype", accumulator_dtype)
    _checks.check_dtype_arg("momentum_dtype", momentum_dtype)
    stages = [("sm3", scale_by_sm3(beta, eps, accumulator_dtype, sparse=sparse))]
    with_momentum = isinstance(momentum, torch.Tensor) or momentum > 0
    if with_momentum:
        stages.append(("momentum", ema(momentum, momentum_dtype, sparse=sparse)))
    stages.append(("learning_rate", scale_by_learning_rate(learning_rate)))
    chain = named_chain(*stages)
    if any(isinstance(h, torch.Tensor) for h in (learning_rate, momentum, beta)):
        return chain  # tensor hyperparameters (meta-learned, swept): the stages one by one
    return GradientTransformation(chain.init, _one_sweep_update(
        [n for n, _ in stages], learning_rate, momentum if with_momentum else None, beta, eps,
        check_spec(sparse)))


def _one_sweep_update(names, learning_rate, momentum, beta, eps, declared_sparse):
    """``sm3``'s update as one call of the dispatcher: ``scale_by_sm3``, the momentum and
    ``-lr`` in one sweep per tensor where the fused kernel applies (the pure path at in-place
    speed), the differentiable math otherwise.  Same checks, numbers and state as the chain."""
    schedule = callable(learning_rate)

    def update(updates: Tree, state: OptState, params: Optional[Tree] = None):
        check_chain_state(state, names)
        grads, accs_by_path = checked_inputs(updates, state.get("sm3"), declared_sparse)
        buffers = {}
        if momentum is not None:
            buffers, _ = checked_buffers("ema", grads, state.get("momentum"), declared_sparse)
        lr_state = state.get("learning_rate")
        lr = learning_rate
        if schedule:
            if COUNT not in lr_state.keys():
                raise ValueError(f"scale_by_schedule state must hold {COUNT!r}, got keys {list(lr_state.keys())}")
            count = lr_state.get(COUNT)
            lr = learning_rate(count)
            lr_state = TensorDict({COUNT: count + 1}, batch_size=[])
        live = list(grads)
        new_updates, new_accs, new_ms = sm3_step(
            [grads[p] for p in live], [accs_by_path[p] for p in live], [buffers.get(p) for p in live],
            beta=beta, eps=eps, momentum=momentum, lr=lr, paths=live, owner="sm3",
        )
        new_state = {"sm3": accumulator_state(dict(zip(live, new_accs)))}
        if momentum is not None:
            new_state["momentum"] = _tree.state_tree(
                {p: m for p, m in zip(live, new_ms) if p in buffers})
        new_state["learning_rate"] = lr_state
        return _tree.unflatten_like(updates, dict(zip(live, new_updates))), TensorDict(new_state, batch_size=[])

    return update
