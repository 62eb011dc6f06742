"""The out-of-place, differentiable SM3 step of one tensor: the math of ``_sm3_math`` as it is.

This is the backend a gradient flows through (meta-gradients, ``vmap`` over
tasks, ``torch.compile`` of a whole training step, ``gradgradcheck``): plain
tensor expressions, nothing written in place, any tensor hyperparameter.  It
is also the eager path of the pure step where no faster backend covers a
tensor (it then runs under ``no_grad``).

The order of the roundings is the one ``sm3fn.sm3``'s chain of transforms
takes (``scale_by_sm3`` -> ``ema`` -> ``scale_by_learning_rate``), so that
its one-sweep ``update`` and the chain give the same numbers.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from sm3fn._sm3_math import Scalar, ema, sm3_block


def preconditioned(
    grad: torch.Tensor, accumulators: Sequence[torch.Tensor], beta: Scalar, eps: float
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """``(u in the gradient's dtype, new accumulators)``; a row-cover state keeps its one accumulator."""
    u, maxima = sm3_block(grad.to(accumulators[0].dtype), accumulators, beta, eps)
    return u.to(grad.dtype), tuple(maxima[: len(accumulators)])


def finish(
    u: torch.Tensor,
    momentum_buffer: Optional[torch.Tensor],
    momentum: Optional[Scalar],
    lr: Optional[Scalar],
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(update, new momentum buffer)`` from ``u``: torch-SM3's EMA (with a buffer), then ``* -lr``.

    ``lr`` None: no learning-rate stage (``scale_by_sm3`` alone).  Works on
    DTensors as on plain tensors.
    """
    new_m = momentum_buffer
    if momentum_buffer is not None:
        assert momentum is not None, "a momentum buffer comes with a momentum"
        new_m = ema(momentum_buffer, u.to(momentum_buffer.dtype), momentum)
        u = new_m.to(u.dtype)
    if lr is not None:
        u = u * -lr
    return u, new_m
