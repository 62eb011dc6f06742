"""The SM3 step as ``torch.library`` custom ops, so that ``torch.compile`` sees one opaque op.

Traced by dynamo, the dispatcher (:mod:`sm3fn._kernels.dispatch`) would
unroll the step into its blocked or reference math (the fused C++ sweep
cannot be traced); behind a custom op the compiled graph calls the very
kernels the eager step runs, with no graph break.  Two ops, namespace ``sm3fn``:

* ``torch.ops.sm3fn.sm3_step_(params, grads, accumulators, momentum_buffers,
  counts, lr, momentum, beta, eps, fused)``: one in-place step of a list of
  parameters (``p -= lr * (m or u)``; accumulators and momentum buffers
  updated); returns nothing.  Its eager body is the dispatcher's
  :func:`~sm3fn._kernels.dispatch.sm3_step_`.
* ``torch.ops.sm3fn.sm3_step(grads, accumulators, momentum_buffers, counts,
  lr, momentum, beta, eps, fused) -> (updates, new_accumulators,
  new_momentum_buffers)``: the same step out of place; ``lr`` None makes the
  update ``u`` (``scale_by_sm3``), else ``-lr * (m or u)``.  Its eager body is
  :func:`~sm3fn._kernels.dispatch.sm3_step`.

Both take each parameter's accumulators flattened into one list
(``counts[j]`` of them for parameter ``j``), ``momentum_buffers`` empty (no
momentum) or one per parameter, and ``lr``, ``momentum`` and ``beta`` as
0-d tensors: a value that changes is a graph input, not a constant dynamo
guards on, so a scheduler does not recompile (:func:`hyperparameter` makes
such a tensor from a float).  ``eps`` is a float.  Each op has a fake (meta)
implementation for tracing; neither has an autograd formula (a step that
must be differentiable traces :mod:`sm3fn._sm3_math` instead).

The dispatcher calls :func:`step_` / :func:`step` (same arguments as its own
functions) when :func:`applies` says so: while compiling, on plain dense
tensors, with nothing that needs a gradient through the step.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

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


def _dispatch():
    from sm3fn._kernels import dispatch  # it imports this module

    return dispatch


def _fresh(outputs: list[Tensor], inputs: Sequence[Tensor]) -> list[Tensor]:
    """Outputs contiguous (as the fake implementation says) and sharing no storage with an input
    (a custom op's outputs must not alias its inputs)."""
    taken = {t.untyped_storage().data_ptr() for t in inputs}
    out = []
    for t in outputs:
        t = t.contiguous()
        out.append(t.clone() if t.untyped_storage().data_ptr() in taken else t)
    return out


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
    # the eager in-place step: the dispatcher's fused sweep or blocks, as an eager call takes
    _dispatch().sm3_step_(
        params, grads, _nested(accumulators, counts),
        list(momentum_buffers) if momentum_buffers else [None] * len(params),
        # a CPU lr as a float: the eager optimizer's float lr, bit for bit
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
    lr: Optional[Tensor],
    momentum: Optional[Tensor],
    beta: Tensor,
    eps: float,
    fused: Optional[bool],
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    _check_lists(len(grads), counts, accumulators, momentum_buffers)
    updates, new_accs, new_moms = _dispatch().sm3_step(
        grads, _nested(accumulators, counts),
        list(momentum_buffers) if momentum_buffers else None,
        beta=_as_float(beta), eps=eps,
        momentum=None if momentum is None else _as_float(momentum),
        lr=None if lr is None else (_as_float(lr) if lr.device.type == "cpu" else lr),
        fused=fused,
    )
    inputs = [*grads, *accumulators, *momentum_buffers]
    return (_fresh(updates, inputs), _fresh([a for accs in new_accs for a in accs], inputs),
            _fresh(new_moms, inputs) if momentum_buffers else [])


def _empty(t: Tensor) -> Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


@_sm3_step.register_fake
def _sm3_step_fake_out(grads, accumulators, momentum_buffers, counts, lr, momentum, beta, eps, fused):
    _check_lists(len(grads), counts, accumulators, momentum_buffers)
    return [_empty(g) for g in grads], [_empty(a) for a in accumulators], [_empty(m) for m in momentum_buffers]


def _calls(grads: Sequence[Optional[Tensor]], momentum_buffers: Sequence[Optional[Tensor]]) -> list[list[int]]:
    """The parameters one op call takes: those with a gradient, split by whether they keep a
    momentum buffer (an op call takes buffers for all its parameters or for none)."""
    live = [j for j, g in enumerate(grads) if g is not None]
    groups = [[j for j in live if momentum_buffers[j] is not None],
              [j for j in live if momentum_buffers[j] is None]]
    return [group for group in groups if group]


def step_(
    params: Sequence[Tensor],
    grads: Sequence[Optional[Tensor]],
    accumulators: Sequence[Sequence[Tensor]],
    momentum_buffers: Sequence[Optional[Tensor]],
    *,
    lr: _Number,
    momentum: _Number,
    beta: _Number,
    eps: float,
    fused: Optional[bool] = None,
) -> None:
    """``torch.ops.sm3fn.sm3_step_`` on :func:`sm3fn._kernels.sm3_step_`'s arguments.

    A ``None`` gradient skips its parameter; parameters with and without a
    momentum buffer take one op call each.
    """
    hyper = (hyperparameter(lr), hyperparameter(momentum), hyperparameter(beta), float(eps), fused)
    for js in _calls(grads, momentum_buffers):
        moms = [momentum_buffers[j] for j in js if momentum_buffers[j] is not None]
        torch.ops.sm3fn.sm3_step_([params[j] for j in js], [grads[j] for j in js],
                                  [a for j in js for a in accumulators[j]], moms,
                                  [len(accumulators[j]) for j in js], *hyper)


def step(
    grads: Sequence[Optional[Tensor]],
    accumulators: Sequence[Sequence[Tensor]],
    momentum_buffers: Optional[Sequence[Optional[Tensor]]] = None,
    *,
    lr: Optional[_Number] = None,
    momentum: Optional[_Number] = None,
    beta: _Number,
    eps: float,
    fused: Optional[bool] = None,
) -> tuple[list[Optional[Tensor]], list[list[Tensor]], list[Optional[Tensor]]]:
    """``torch.ops.sm3fn.sm3_step``, as :func:`sm3fn._kernels.sm3_step`: ``(updates, new
    accumulators, new momentum buffers)``; the inputs are not changed.

    ``lr`` None: the update is ``u``; else ``-lr * (ema of u where a buffer
    is given, else u)``.  A ``None`` gradient gives a ``None`` update and its
    state as it was.
    """
    n = len(grads)
    buffers = list(momentum_buffers) if momentum_buffers is not None else [None] * n
    updates: list[Optional[Tensor]] = [None] * n
    new_accs = [list(a) for a in accumulators]
    new_moms = list(buffers)
    hyper = (None if lr is None else hyperparameter(lr),
             None if momentum is None or lr is None else hyperparameter(momentum),
             hyperparameter(beta), float(eps), fused)
    for js in _calls(grads, buffers):
        counts = [len(accumulators[j]) for j in js]
        moms = [buffers[j] for j in js if buffers[j] is not None]
        us, flat, ms = torch.ops.sm3fn.sm3_step([grads[j] for j in js],
                                                [a for j in js for a in accumulators[j]], moms, counts, *hyper)
        for i, (j, accs) in enumerate(zip(js, _nested(flat, counts))):
            updates[j], new_accs[j] = us[i], accs
            if moms:
                new_moms[j] = ms[i]
    return updates, new_accs, new_moms


def applies(tensors: Sequence[Optional[Tensor]], *hyperparameters: object) -> bool:
    """Whether a step on ``tensors`` under ``torch.compile`` goes through the ops.

    Only while compiling (eager calls run the kernels directly), on plain
    dense tensors (no DTensor or other subclass, no sparse gradient), and
    when nothing needs a gradient through the step: no tensor (hyperparameters
    included) requires grad; tensor hyperparameters of one value each.
    Otherwise the caller traces the math as before.
    """
    if not torch.compiler.is_compiling():
        return False
    hyper = [h for h in hyperparameters if isinstance(h, Tensor)]
    if any(h.numel() != 1 for h in hyper):  # a batch of values (a vmapped sweep): traced math
        return False
    for t in list(tensors) + hyper:
        if t is None:
            continue
        if type(t) not in (Tensor, torch.nn.Parameter) or t.layout != torch.strided:
            return False
        if t.requires_grad and torch.is_grad_enabled():
            return False
    return True
