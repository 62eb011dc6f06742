"""The SM3 step as ``torch.library`` custom ops, so that ``torch.compile`` sees one opaque op.

Traced by dynamo, the eager in-place step (:func:`sm3fn._kernels.blocked.sm3_apply_`)
would be unrolled into its blocked math (the fused C++ sweep cannot be traced);
behind a custom op the compiled graph calls the very kernel the eager step
runs, with no graph break.  Two ops, namespace ``sm3fn``:

* ``torch.ops.sm3fn.sm3_step_(params, grads, accumulators, momentum_buffers,
  counts, lr, momentum, beta, eps, fused)``: one in-place step of a whole
  list of parameters (``p -= lr * (m or u)``; accumulators and momentum
  buffers updated), returns nothing;
* ``torch.ops.sm3fn.sm3_step(grads, accumulators, momentum_buffers, counts,
  lr, momentum, beta, eps, fused) -> (updates, new_accumulators,
  new_momentum_buffers)``: the same step out of place; ``updates[j]`` is
  ``-lr * (m or u)`` in the gradient's dtype (``lr = -1`` gives ``u``).

Both take each parameter's accumulators flattened into one list
(``counts[j]`` of them for parameter ``j``), ``momentum_buffers`` empty (no
momentum) or one per parameter, and ``lr``, ``momentum`` and ``beta`` as
0-d tensors: a value that changes is a graph input, not a constant dynamo
guards on, so a scheduler does not recompile (:func:`hyperparameter` makes
such a tensor from a float).  ``eps`` is a float (it selects a kernel).
Each op has a fake (meta) implementation for tracing; there is no autograd
formula (the differentiable path traces :mod:`sm3fn._sm3_math` instead).

:func:`step_` and :func:`step` are the Python entry points, on the nested
lists the rest of sm3fn uses; :func:`applies` says whether the ops take a
call under ``torch.compile`` (plain dense tensors, nothing that needs a
gradient through the step).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from sm3fn._kernels import blocked as _blocked

_Number = Union[float, Tensor]


def hyperparameter(value: _Number) -> Tensor:
    """``value`` as a 0-d tensor that a compiled graph takes as an input.

    A tensor passes through unchanged (as ``torch.optim`` treats a tensor
    ``lr``).  A float becomes a float64 tensor by arithmetic, on purpose:
    dynamo turns a float used in tensor arithmetic into a graph input (after
    the first change of value, one recompile), whereas ``torch.tensor(x)``
    or a float handed to an op would bake the value in and guard on it.
    """
    if isinstance(value, Tensor):
        return value
    return torch.zeros((), dtype=torch.float64) + value


def _as_float(t: Tensor) -> float:
    return float(t.item())


def _nested(flat: Sequence[Tensor], counts: Sequence[int]) -> list[list[Tensor]]:
    out, start = [], 0
    for n in counts:
        out.append(list(flat[start:start + n]))
        start += n
    if start != len(flat):
        raise ValueError(f"counts {list(counts)} cover {start} accumulators, got {len(flat)}")
    return out


def _check_lists(n: int, counts: Sequence[int], accumulators: Sequence[Tensor],
                 momentum_buffers: Sequence[Tensor]) -> None:
    if len(counts) != n:
        raise ValueError(f"counts has {len(counts)} entries for {n} parameters")
    if momentum_buffers and len(momentum_buffers) != n:
        raise ValueError(f"momentum_buffers has {len(momentum_buffers)} entries for {n} parameters "
                         "(pass none, or one per parameter)")
    if sum(counts) != len(accumulators):
        raise ValueError(f"counts {list(counts)} cover {sum(counts)} accumulators, got {len(accumulators)}")


@torch.library.custom_op("sm3fn::sm3_step_", mutates_args=("params", "accumulators", "momentum_buffers"))
def _sm3_step_(
    params: list[Tensor],
    grads: list[Tensor],
    accumulators: list[Tensor],
    momentum_buffers: list[Tensor],
    counts: list[int],
    lr: Tensor,
    momentum: Tensor,
    beta: Tensor,
    eps: float,
    fused: Optional[bool],
) -> None:
    _check_lists(len(params), counts, accumulators, momentum_buffers)
    # the eager in-place step: the fused sweep where it covers a tensor, the blocks elsewhere
    _blocked.sm3_apply_(
        params, grads, _nested(accumulators, counts),
        list(momentum_buffers) if momentum_buffers else [None] * len(params),
        # a CPU lr as a float: the numbers of the eager optimizer's float lr, bit for bit
        lr=_as_float(lr) if lr.device.type == "cpu" else lr,
        momentum=_as_float(momentum), beta=_as_float(beta), eps=eps, fused=fused,
    )


@_sm3_step_.register_fake
def _sm3_step_fake(params, grads, accumulators, momentum_buffers, counts, lr, momentum, beta, eps, fused):
    _check_lists(len(params), counts, accumulators, momentum_buffers)


@torch.library.custom_op("sm3fn::sm3_step", mutates_args=())
def _sm3_step(
    grads: list[Tensor],
    accumulators: list[Tensor],
    momentum_buffers: list[Tensor],
    counts: list[int],
    lr: Tensor,
    momentum: Tensor,
    beta: Tensor,
    eps: float,
    fused: Optional[bool],
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    _check_lists(len(grads), counts, accumulators, momentum_buffers)
    # the in-place step on fresh buffers: a zero "parameter" ends up holding -lr * (m or u)
    updates = [torch.zeros_like(g) for g in grads]
    new_accs = [a.clone() for a in accumulators]
    new_moms = [m.clone() for m in momentum_buffers]
    _sm3_step_(updates, grads, new_accs, new_moms, counts, lr, momentum, beta, eps, fused)
    return updates, new_accs, new_moms


@_sm3_step.register_fake
def _sm3_step_fake_out(grads, accumulators, momentum_buffers, counts, lr, momentum, beta, eps, fused):
    _check_lists(len(grads), counts, accumulators, momentum_buffers)
    return ([torch.empty_like(g) for g in grads], [torch.empty_like(a) for a in accumulators],
            [torch.empty_like(m) for m in momentum_buffers])


def _flatten(accumulators: Sequence[Sequence[Tensor]], momentum_buffers: Sequence[Optional[Tensor]]):
    counts = [len(accs) for accs in accumulators]
    flat = [a for accs in accumulators for a in accs]
    present = [m is not None for m in momentum_buffers]
    if any(present) and not all(present):
        raise ValueError("momentum_buffers must be all tensors or all None for one op call")
    return flat, (list(momentum_buffers) if any(present) else []), counts


def step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    accumulators: Sequence[Sequence[Tensor]],
    momentum_buffers: Sequence[Optional[Tensor]],
    *,
    lr: _Number,
    momentum: _Number,
    beta: _Number,
    eps: float,
    fused: Optional[bool] = None,
) -> None:
    """``torch.ops.sm3fn.sm3_step_`` on :func:`sm3fn._kernels.blocked.sm3_apply_`'s arguments.

    ``momentum_buffers`` must be all tensors or all ``None``.
    """
    flat, moms, counts = _flatten(accumulators, momentum_buffers)
    torch.ops.sm3fn.sm3_step_(list(params), list(grads), flat, moms, counts, hyperparameter(lr),
                              hyperparameter(momentum), hyperparameter(beta), float(eps), fused)


def step(
    grads: Sequence[Tensor],
    accumulators: Sequence[Sequence[Tensor]],
    momentum_buffers: Sequence[Optional[Tensor]],
    *,
    lr: _Number,
    momentum: _Number,
    beta: _Number,
    eps: float,
    fused: Optional[bool] = None,
) -> tuple[list[Tensor], list[list[Tensor]], list[Optional[Tensor]]]:
    """``torch.ops.sm3fn.sm3_step``: ``(updates, new accumulators per parameter, new momentum buffers)``.

    ``updates[j] = -lr * (m or u)``; the inputs are not changed.
    """
    flat, moms, counts = _flatten(accumulators, momentum_buffers)
    updates, new_flat, new_moms = torch.ops.sm3fn.sm3_step(
        list(grads), flat, moms, counts, hyperparameter(lr), hyperparameter(momentum),
        hyperparameter(beta), float(eps), fused)
    return updates, _nested(new_flat, counts), (list(new_moms) if moms else [None] * len(grads))


def applies(tensors: Sequence[Optional[Tensor]], *hyperparameters: object) -> bool:
    """Whether a step on ``tensors`` under ``torch.compile`` goes through the ops.

    Only while compiling (eager calls run the kernels directly), on plain
    dense tensors (no DTensor or other subclass, no sparse gradient), and
    when nothing needs a gradient through the step: no tensor (hyperparameters
    included) requires grad.  Otherwise the caller traces the math as before.
    """
    if not torch.compiler.is_compiling():
        return False
    for t in list(tensors) + [h for h in hyperparameters if isinstance(h, Tensor)]:
        if t is None:
            continue
        if type(t) not in (Tensor, torch.nn.Parameter) or t.layout != torch.strided:
            return False
        if t.requires_grad and torch.is_grad_enabled():
            return False
    return True
