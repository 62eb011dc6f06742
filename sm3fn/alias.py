"""``sm3``: the whole optimizer as one transform, with its arguments checked here."""

from __future__ import annotations

from typing import Optional

import torch

from sm3fn import _checks
from sm3fn._kernels.sparse import SparseSpec
from sm3fn.base import GradientTransformation, ScalarOrSchedule
from sm3fn.transforms.combine import named_chain
from sm3fn.transforms.momentum import ema
from sm3fn.transforms.scaling import scale_by_learning_rate
from sm3fn.transforms.sm3 import scale_by_sm3

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
    stage (and its buffer) is left out when ``momentum`` is the float 0.

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
    if isinstance(momentum, torch.Tensor) or momentum > 0:
        stages.append(("momentum", ema(momentum, momentum_dtype, sparse=sparse)))
    stages.append(("learning_rate", scale_by_learning_rate(learning_rate)))
    return named_chain(*stages)
