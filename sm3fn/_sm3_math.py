"""The SM3-II equations: the one definition every path of sm3fn calls.

Anil, Gupta, Koren, Singer, "Memory-Efficient Adaptive Optimization",
NeurIPS 2019 (arXiv:1901.11150), Algorithm SM3-II.  For a gradient ``g`` of
shape ``(n_1, ..., n_k)`` with one accumulator ``a_i`` per dimension, stored
with ``keepdim`` layout (``a_i`` has ``n_i`` in dim ``i`` and 1 elsewhere, so
it broadcasts against ``g`` and follows a DTensor's placements)::

    nu  = min_i a_i + g*g                          (beta == 0)
    nu  = beta * min_i a_i + (1 - beta) * g*g      (beta  > 0)
    u   = g / sqrt(nu + eps)   where nu > 0, else 0
    a_i <- max of nu over every dim but i

A 0-d or 1-d tensor keeps one full-size accumulator (diagonal Adagrad).

Each function takes optional ``out`` buffers.  With ``out=None`` they are
ordinary differentiable tensor expressions (the ``torch.func`` path); with
buffers they compute in place without allocating full-size temporaries (the
fast path, which calls :func:`sm3_block` on blocks of rows).  Both paths run
the same lines, so they cannot drift apart.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

Scalar = Union[float, torch.Tensor]


def accumulator_shapes(shape: Sequence[int]) -> list[tuple[int, ...]]:
    """The shape of each accumulator of a parameter of ``shape``."""
    k = len(shape)
    if k <= 1:
        return [tuple(shape)]
    return [tuple(n if d == i else 1 for d, n in enumerate(shape)) for i in range(k)]


def param_shape(accumulators: Sequence[torch.Tensor]) -> tuple[int, ...]:
    """The parameter shape that ``accumulators`` (as made by :func:`init_accumulators`) cover."""
    if len(accumulators) == 1:
        return tuple(accumulators[0].shape)
    return tuple(a.shape[i] for i, a in enumerate(accumulators))


def init_accumulators(param: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Zero accumulators for ``param``, each allocated at its own size.

    ``a_i`` is ``zeros_like`` of a view of ``param`` narrowed to one index in
    every dim but ``i``: no parameter-sized temporary (a 2048 x 4096 bf16
    parameter's first step would otherwise peak at 32 MiB for 24 KiB of
    state), while device and ``vmap`` batching still follow the parameter's
    (a view of a batched tensor is batched).  DTensors are placed by
    :func:`sm3fn._kernels.sharded.init_accumulators_sharded` around this.
    """
    if param.dim() <= 1:
        return (torch.zeros_like(param, dtype=dtype),)
    if param.numel() == 0:
        return tuple(param.new_zeros(s, dtype=dtype) for s in accumulator_shapes(param.shape))
    out = []
    for i in range(param.dim()):
        corner = param
        for d in range(param.dim()):
            if d != i:
                corner = corner.narrow(d, 0, 1)
        # contiguous: the narrowed view's strides are the parameter's
        out.append(torch.zeros_like(corner, dtype=dtype, memory_format=torch.contiguous_format))
    return tuple(out)


def cover_minimum(
    accumulators: Sequence[torch.Tensor], out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``min_i a_i``, broadcast to the parameter's shape (the accumulator itself for 0-d/1-d)."""
    if len(accumulators) == 1:
        return accumulators[0]
    first = accumulators[0]
    if out is not None:  # expanded, so that ``out`` is written at its full shape at once (k > 2)
        first = first.expand(out.shape)
    low = torch.minimum(first, accumulators[1], out=out)
    for a in accumulators[2:]:
        low = torch.minimum(low, a, out=out)
    return low


def second_moment(
    grad: torch.Tensor,
    cover_min: torch.Tensor,
    beta: Scalar,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``nu``: the cover minimum plus ``g*g`` (beta == 0), or their moving average.

    ``beta`` may be a tensor (a meta-learned or swept value); a tensor equal to
    0 selects the sum, as the float 0 does.
    """
    if isinstance(beta, torch.Tensor):
        is_sum = beta == 0
        decay = torch.where(is_sum, torch.ones_like(beta), beta)
        fresh = torch.where(is_sum, torch.ones_like(beta), 1 - beta)
        nu = torch.mul(cover_min, decay, out=out)
        return torch.add(nu, fresh * grad * grad, out=out)
    if beta == 0:
        return torch.addcmul(cover_min, grad, grad, out=out)
    nu = torch.mul(cover_min, beta, out=out)
    return torch.addcmul(nu, grad, grad, value=1 - beta, out=out)


def denominator(nu: torch.Tensor, eps: float, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``sqrt(nu + eps)``: the preconditioner's denominator where ``nu > 0``.

    :func:`precondition` divides by it; the fast path, where every ``nu > 0``
    is known, folds the division into the parameter update
    (``p.addcdiv_(g, denominator(nu, eps), value=-lr)``).  ``out`` may be ``nu``.
    """
    return torch.sqrt(torch.add(nu, eps, out=out), out=out)


def precondition(
    grad: torch.Tensor,
    nu: torch.Tensor,
    eps: float,
    out: Optional[torch.Tensor] = None,
    positive: bool = False,
) -> torch.Tensor:
    """``u = g / sqrt(nu + eps)`` where ``nu > 0``, else 0.

    The inner ``where`` keeps the square root away from 0, so the gradient
    of ``u`` is finite at ``g = 0`` (``g * rsqrt(nu + eps)`` is NaN there in
    float32 with eps = 1e-30); the outer one makes a zero gradient a zero
    step even where ``eps`` underflows.  ``out`` may be ``nu`` itself.

    The test is ``nu != 0`` rather than ``nu > 0`` (the same for ``nu >= 0``)
    so that a NaN ``nu`` gives a NaN step that shows, not a silent zero
    step that would freeze the rows and columns whose accumulators it
    poisoned (see ``apply_if_finite``).

    ``positive=True`` (fast path only, eager or compiled: the caller knows
    every ``nu > 0``, see :func:`nu_positive`) skips both masks: both
    ``where``s would pick their first branch, so the numbers are the same.
    """
    if positive or (out is not None and _positive_everywhere(nu)):
        # every nu > 0 (and none is NaN): three plain passes give the same
        # numbers as the masked expression below, which costs ~4x more on a
        # CPU (bool masks).
        return torch.div(grad, denominator(nu, eps, out=out), out=out)
    positive_mask = nu != 0
    if out is None:
        den = torch.where(positive_mask, nu, 1.0)
    else:  # where(..., out=) takes no Python scalar
        den = torch.where(positive_mask, nu, torch.ones((), dtype=nu.dtype, device=nu.device), out=out)
    u = torch.div(grad, denominator(den, eps, out=out), out=out)
    if out is None:
        return torch.where(positive_mask, u, 0.0)
    return u.masked_fill_(~positive_mask, 0.0)


def nu_positive(accumulators: Sequence[torch.Tensor], beta: Scalar) -> bool:
    """Whether every ``nu`` of the next step is ``> 0``, read from the (small) accumulators.

    ``nu = min_i a_i + g*g`` (or ``beta * min_i a_i + (1 - beta) * g*g``) is
    at least ``min_i a_i`` (times ``beta``), whatever ``g`` is, so it is
    ``> 0`` wherever every accumulator entry is (and ``beta * a`` does not
    underflow to 0; rounding is monotonic, so checking the smallest ``a``
    suffices).  A NaN gradient makes a NaN ``nu``, for which both branches
    of :func:`precondition` give NaN.  False whenever the answer would cost a
    device sync or is asked under tracing (the masked path then runs).
    """
    if isinstance(beta, torch.Tensor) or torch.compiler.is_compiling():
        return False
    for a in accumulators:
        if a.device.type != "cpu":
            return False
        if a.numel() == 0:
            continue
        low = a.amin()
        if beta != 0:
            low = low * beta  # in the accumulator's dtype, as second_moment computes it
        if not low.item() > 0:  # NaN answers False too
            return False
    return any(a.numel() for a in accumulators)


def _positive_everywhere(nu: torch.Tensor) -> bool:
    """``all(nu > 0)``, asked only where the answer is cheap: on a CPU, outside tracing.

    ``amin`` propagates NaN, so a NaN in ``nu`` answers False.  On other
    devices reading the answer would synchronise, so the masked path runs.
    """
    if nu.device.type != "cpu" or nu.numel() == 0 or torch.compiler.is_compiling():
        return False
    return bool(nu.amin() > 0)


def cover_maxima(nu: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``a_i = max of nu over every dim but i`` (``nu`` itself for 0-d/1-d)."""
    k = nu.dim()
    if k <= 1:
        return (nu,)
    if nu.numel() == 0:  # a max over nothing: 0, the neutral value (nu >= 0), as init_accumulators
        return tuple(nu.new_zeros(s) for s in accumulator_shapes(nu.shape))
    dims = list(range(k))
    return tuple(nu.amax(dim=dims[:i] + dims[i + 1 :], keepdim=True) for i in range(k))


def sm3_block(
    grad: torch.Tensor,
    accumulators: Sequence[torch.Tensor],
    beta: Scalar,
    eps: float,
    *,
    nu_out: Optional[torch.Tensor] = None,
    u_out: Optional[torch.Tensor] = None,
    positive: bool = False,
    denominator_only: bool = False,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """One SM3 step on ``grad`` (a whole tensor or a block of its rows).

    Returns ``(u, maxima)``: the preconditioned gradient and the cover
    maxima of ``nu`` over this block.  On a whole tensor ``maxima`` are the
    new accumulators.  On a block of rows, ``maxima[0]`` are the new row
    accumulators of those rows and ``maxima[i > 0]`` are partial maxima the
    caller combines across blocks.  A gradient with no elements gives an
    empty ``u`` and the accumulators unchanged (there is nothing to cover).

    ``accumulators`` and ``grad`` must be in the statistics dtype.  With
    ``nu_out``/``u_out`` the work is done in those buffers (they may be one
    buffer, or ``nu_out`` may be a 1-d accumulator, which then holds the new
    accumulator afterwards); without, everything is out of place and
    differentiable.  Fast path only: ``positive=True`` promises every
    ``nu > 0`` (:func:`nu_positive`), and ``denominator_only=True`` (which
    needs it) returns ``sqrt(nu + eps)`` in place of ``u``, for the caller
    to divide by (``p.addcdiv_``: one pass less).
    """
    if nu_out is not None and nu_out is u_out and grad.dim() <= 1:
        raise ValueError("for a 0-d/1-d block nu is the new accumulator; u_out must differ")
    if denominator_only and not positive:
        raise ValueError("denominator_only needs positive=True (a masked u has no denominator)")
    if grad.numel() == 0 and grad.dim() >= 2:
        return torch.zeros_like(grad), tuple(accumulators)
    nu = second_moment(grad, cover_minimum(accumulators, out=nu_out), beta, out=nu_out)
    maxima = cover_maxima(nu)
    if denominator_only:
        u = denominator(nu, eps, out=u_out)
    else:
        u = precondition(grad, nu, eps, out=u_out, positive=positive)
    # after u: for a 0-d/1-d block on the fast path ``nu`` is the accumulator itself
    return u, tuple(saturate(a, inplace=nu_out is not None) for a in maxima)


def saturate(accumulator: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Caps an accumulator at the largest finite value of its dtype.

    A gradient whose square overflows (``|g| > 1.8e19`` in float32) makes
    ``nu`` inf; ``u = g / sqrt(inf)`` is then a zero (finite) step on that
    coordinate for that step.  Kept as inf, the accumulator could never
    come back: ``beta * inf`` is inf, so the coordinate would be frozen
    forever.  Capped, it is the closest representable value to the true
    sum, the next steps are ``g / sqrt(max)`` (what Adagrad's exact sum
    gives, to within the cap), and with ``beta > 0`` it decays again.  NaN
    passes through unchanged (skip such steps with ``apply_if_finite``).
    Costs one pass over the accumulators, which are small for k >= 2.
    """
    cap = torch.finfo(accumulator.dtype).max
    if inplace:
        return accumulator.clamp_(max=cap)
    return torch.clamp(accumulator, max=cap)


def ema(
    buffer: torch.Tensor, value: torch.Tensor, decay: Scalar, out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``decay * buffer + (1 - decay) * value``: torch-SM3's momentum on ``u``."""
    return torch.lerp(value, buffer, decay, out=out)
