"""The one SM3 step behind every entry point: which backend steps which tensor.

``scale_by_sm3.update``, ``sm3fn.sm3``'s update (and so ``FunctionalOptimizer``),
``sm3fn.optim.SM3.step`` and ``sm3fn.sm3_update_`` all call one of two
functions here, as ``torch.optim.adagrad.adagrad()`` routes its single-tensor,
multi-tensor and fused variants:

* :func:`sm3_step_` -- in place: parameters, accumulators and momentum buffers
  are written; nothing comes back.
* :func:`sm3_step` -- out of place, pure: returns ``(updates, new
  accumulators, new momentum buffers)``; no input is written.

Each decides once per tensor, in this order:

======================  ==========================  ==============================
tensor                  in place (``sm3_step_``)     out of place (``sm3_step``)
======================  ==========================  ==============================
``None`` gradient       skipped                      ``None`` update, state kept
sparse COO gradient     ``sparse.sparse_apply_``     ``sparse.sparse_update``
DTensor                 its local shards, below      ``sharded.sm3_block_sharded``
                        (+ one all-reduce per step)
a gradient must flow    --                           ``reference`` (differentiable)
covered CPU tensor      ``fused_cpu`` (in place)     ``fused_cpu`` (out of place)
covered CUDA tensor     ``triton_gpu`` (in place)    ``triton_gpu`` (float32/64)
anything else           ``blocked`` (eager blocks)   ``reference`` under no_grad
======================  ==========================  ==============================

"A gradient must flow" (:func:`needs_autograd`): grad mode is on and an input
requires grad, or a ``torch.func`` transform is active, or the step is being
traced (``torch.compile``).  Sparse updates get no momentum (as in torch-SM3).

A backend is a module with, for the tensors it covers:

* ``supported(p, g, accumulators, m) -> bool`` (``p`` may be None out of place);
* an in-place sweep ``(p, g, accumulators, m, hyperparameters)`` and/or an
  out-of-place one returning ``(update, new accumulators, new m)``;
* for a backend that builds code, a ``build(...)`` run for every tensor before
  any tensor is written (so a failed build changes nothing).

Plugging a backend in is one branch in :func:`_route_dense` (in place) or
:func:`_pure_one` (out of place).  Sparse and DTensor routing stays here, so a
new dense backend gets them for free.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from sm3fn import _checks
from sm3fn._kernels import blocked as _blocked
from sm3fn._kernels import fused_cpu as _fused
from sm3fn._kernels import ops as _ops
from sm3fn._kernels import reference as _reference
from sm3fn._kernels import sharded as _sharded
from sm3fn._kernels import sparse as _sparse
from sm3fn._kernels import triton_gpu as _triton
from sm3fn._sm3_math import Scalar

_Number = Union[float, torch.Tensor]


def check_kernel_choice(fused: Optional[bool], compiled: bool) -> None:
    """``fused`` (None or a bool) and ``compiled`` (a bool), not both True."""
    if fused is not None and not isinstance(fused, bool):
        raise TypeError(f"fused must be a bool or None, got {fused!r}")
    if not isinstance(compiled, bool):
        raise TypeError(f"compiled must be a bool, got {compiled!r}")
    if fused and compiled:
        raise ValueError("fused=True and compiled=True exclude each other: pick one kernel")


def _check_block_elements(block_elements: Optional[int]) -> None:
    if block_elements is not None and (isinstance(block_elements, bool)
                                       or not isinstance(block_elements, int) or block_elements < 1):
        raise ValueError(f"block_elements must be a positive int, got {block_elements!r}")


def needs_autograd(*tensors: object) -> bool:
    """Whether the step must be differentiable: tracing, a ``torch.func`` transform, or grad mode
    with an input that requires grad (``tensors`` may hold floats and None, which never do)."""
    if torch.compiler.is_compiling() or _checks.functorch_transform_active():
        return True
    return torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _use_fused(fused: Optional[bool], compiled: bool) -> bool:
    """Whether to try the fused kernel: not under tracing, nor once ``None`` gave up building it."""
    if fused is False or compiled or torch.compiler.is_compiling():
        return False
    return fused is True or _fused.unavailable is None


def _built(use: bool, strict: bool, items: list, build) -> dict:
    """``{index: kernel}`` for the items the fused kernel covers, every kernel built now.

    A failed build raises with ``strict`` (``fused=True``); otherwise the
    other backends take every item and later steps do not try again.
    """
    if not use:
        return {}
    try:
        return {j: build(*item) for j, item in enumerate(items) if item[1].numel()
                and _fused.supported(*item[:4])}
    except _fused.BuildError as e:
        if strict:
            raise
        _fused.give_up(e)
        return {}


def refuse_uncovered(p: torch.Tensor, g: torch.Tensor, accs: Sequence[torch.Tensor],
                     m: Optional[torch.Tensor], name: str = "a parameter") -> None:
    """``fused=True`` on a tensor no fused kernel covers: a ``ValueError`` naming it.

    As ``torch.optim.Adam(fused=True)`` refuses what its kernel cannot step,
    rather than taking another path unasked; ``fused=None`` chooses per
    tensor.  Asks the kernels' own ``supported`` (the CPU sweep's, and the
    Triton kernel's for CUDA tensors); called before anything is written.
    """
    if g.numel() == 0 or _fused.supported(p, g, accs, m) or _triton.supported(p, g, accs, m):
        return
    raise ValueError(
        f"fused=True, but no fused SM3 kernel covers {name} of shape {tuple(p.shape)} "
        f"({type(p).__name__}, dtype {p.dtype}, device {p.device}, layout {g.layout}, strides "
        f"{p.stride()} (gradient {g.stride()}), gradient dtype {g.dtype}, statistics dtype "
        f"{accs[0].dtype}); they step plain dense tensors on a CPU (contiguous or a permutation of "
        "it, the gradient laid out as the parameter) or, with Triton, contiguous CUDA ones; "
        "float32/float64 with statistics of their dtype, bfloat16/float16 with float32 statistics. "
        "Pass fused=None to let each tensor take the path that covers it."
    )


def build_kernels(
    params: Sequence[torch.Tensor],
    grads: Sequence[Optional[torch.Tensor]],
    accumulators: Sequence[Sequence[torch.Tensor]],
    momentum_buffers: Sequence[Optional[torch.Tensor]],
    *,
    beta: float,
) -> None:
    """Builds now (or finds cached) the fused CPU kernels a ``fused=True`` in-place step of these
    plain dense tensors needs, raising :class:`~sm3fn._kernels.fused_cpu.BuildError` if one
    cannot be built.

    For a caller that writes something before its :func:`sm3_step_` calls (an optimizer's
    weight decay, several param groups stepped in turn): calling this first for every group
    keeps "a failing step writes nothing".  The step itself then finds the kernels cached.
    """
    items = [(p, g, list(accs), m) for p, g, accs, m in zip(params, grads, accumulators, momentum_buffers)
             if g is not None and g.layout == torch.strided and not _sharded.is_dtensor(p)]
    _built(_use_fused(True, False), True, items, lambda p, g, accs, m: _fused.build(g, accs, m, beta))


# --------------------------------------------------------------------------- in place


@torch.no_grad()
def sm3_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[Optional[torch.Tensor]],
    accumulators: Sequence[Sequence[torch.Tensor]],
    momentum_buffers: Sequence[Optional[torch.Tensor]],
    *,
    lr: _Number,
    momentum: _Number,  # a tensor only under torch.compile, for the custom op
    beta: _Number,
    eps: float,
    fused: Optional[bool] = None,
    compiled: bool = False,
    block_elements: Optional[int] = None,
) -> None:
    """In place, for each parameter: ``p -= lr * (ema of u if its buffer else u)``.

    ``accumulators[j]`` (keepdim layout, statistics dtype) and
    ``momentum_buffers[j]`` (None: no momentum) are updated in place;
    gradients are only read; a ``None`` gradient skips its parameter.
    ``lr`` is a float or a 0-d tensor.  ``fused``: the fused CPU kernel for
    the tensors it covers (``None``: where it can be built, falling back with
    one warning; ``True``: an error if it cannot be built; ``False``:
    never).  ``compiled``: the blocked path's blocks through
    ``torch.compile``.  ``block_elements``: the blocked path's block size.
    Every argument is checked, and every kernel built, before anything is written.
    """
    check_kernel_choice(fused, compiled)
    _check_block_elements(block_elements)
    if _ops.applies(list(params) + [g for g in grads if g is not None], lr):
        # under torch.compile: one custom op whose eager body is this function (sm3fn/_kernels/ops.py)
        return _ops.step_(params, grads, accumulators, momentum_buffers, lr=lr, momentum=momentum,
                          beta=beta, eps=eps, fused=fused)
    reducer = _sharded.MaxReducer()
    dense, sparse = [], []
    for p, g, accs, m in zip(params, grads, accumulators, momentum_buffers):
        if g is None:
            continue
        if _sparse.is_sparse(g):
            sparse.append((p, g, accs))
        elif _sharded.is_dtensor(p):
            local = _sharded.local_shards(p, g, accs, m, reducer)
            if local is not None:
                dense.append(local)
        elif g.numel():
            dense.append((p, g, list(accs), m))
    _route_dense(dense, lr=lr, momentum=momentum, beta=beta, eps=eps,
                 fused=fused, compiled=compiled, block_elements=block_elements)
    for p, g, accs in sparse:
        _sparse.sparse_apply_(p, g, accs[0], lr=lr, beta=beta, eps=eps)
    reducer.flush()


def _route_dense(items, *, lr, momentum, beta, eps, fused, compiled, block_elements) -> None:
    """Plain dense tensors ``(p, g, accs, m)``: the fused kernel where it applies, else the blocks."""
    if fused is True:
        for item in items:
            refuse_uncovered(*item)
    swept = _built(_use_fused(fused, compiled), fused is True, items,
                   lambda p, g, accs, m: _fused.build(g, accs, m, beta))
    rest = [item for j, item in enumerate(items) if j not in swept]
    # the GPU's sweeps first: a Triton build that fails (fused=True) raises with nothing written
    rest = _triton_step_(rest, fused, compiled, lr=lr, momentum=momentum, beta=beta, eps=eps)
    if swept:
        hyper = _fused.hyperparameters(lr, momentum, beta, eps)
        for j, kernel in swept.items():
            p, g, accs, m = items[j]
            _fused.sweep_(kernel, p, g, accs, m, hyper)
    if rest:
        _blocked.sm3_apply_(*map(list, zip(*rest)), lr=lr, momentum=momentum, beta=beta, eps=eps,
                            compiled=compiled, block_elements=block_elements)


def _use_triton(fused: Optional[bool], compiled: bool, *hyperparameters) -> bool:
    """Whether to try the Triton kernel: float hyperparameters but ``lr`` (read on the device),
    not under tracing, nor once ``None`` gave up building it."""
    if fused is False or compiled or torch.compiler.is_compiling():
        return False
    if any(isinstance(x, torch.Tensor) for x in hyperparameters):
        return False
    return fused is True or _triton.unavailable is None


def _triton_step_(items, fused, compiled, *, lr, momentum, beta, eps) -> list:
    """Steps the items ``(p, g, accs, m)`` the Triton kernel covers (CUDA tensors) in place,
    all in a few launches; returns the others."""
    if not _use_triton(fused, compiled, momentum, beta, eps):
        return items
    covered = [item for item in items if _triton.supported(*item)]
    if not covered:
        return items
    try:
        _triton.sweep_many_(*map(list, zip(*covered)), lr=lr, momentum=momentum, beta=beta, eps=eps)
    except _triton.BuildError as e:
        if fused is True:
            raise
        _triton.give_up(e)
        return items
    return [item for item in items if not any(item is c for c in covered)]


# --------------------------------------------------------------------------- out of place


def sm3_step(
    grads: Sequence[Optional[torch.Tensor]],
    accumulators: Sequence[Sequence[torch.Tensor]],
    momentum_buffers: Optional[Sequence[Optional[torch.Tensor]]] = None,
    *,
    beta: Scalar,
    eps: float,
    momentum: Optional[Scalar] = None,
    lr: Optional[Scalar] = None,
    fused: Optional[bool] = None,
    owner: str = "scale_by_sm3",
    paths: Optional[Sequence[tuple]] = None,
) -> tuple[list[Optional[torch.Tensor]], list[list[torch.Tensor]], list[Optional[torch.Tensor]]]:
    """Out of place, pure: ``(updates, new accumulators, new momentum buffers)``.

    With ``lr`` None the update is ``u`` in the gradient's dtype (``scale_by_sm3``);
    with ``lr`` it is ``-lr * (ema of u, where a buffer is given, else u)``, the
    whole ``sm3fn.sm3`` step.  A ``None`` gradient gives a ``None`` update and
    its state as it was; a sparse gradient a sparse update (no momentum).
    Tensors through which a gradient must flow (:func:`needs_autograd`) take
    the differentiable reference math; covered CPU tensors the fused
    out-of-place kernel (``fused``: as in :func:`sm3_step_`); the rest the
    reference math under ``no_grad``.  ``owner`` and ``paths`` name the
    parameters in errors.
    """
    n = len(grads)
    buffers = list(momentum_buffers) if momentum_buffers is not None else [None] * n
    if _ops.applies([g for g in grads if g is not None] + [a for accs in accumulators for a in accs],
                    beta, momentum, lr):
        # under torch.compile, nothing to differentiate: one custom op whose eager body is this function
        return _ops.step(grads, accumulators, buffers, lr=lr, momentum=momentum, beta=beta, eps=eps,
                         fused=fused)
    paths = list(paths) if paths is not None else [()] * n
    updates: list = [None] * n
    new_accs = [list(a) for a in accumulators]
    new_ms = list(buffers)
    reducer = _sharded.MaxReducer()
    fusable = []  # indices a fused kernel may take
    for j, (g, accs, m) in enumerate(zip(grads, accumulators, buffers)):
        # the state a tensor keeps comes back as copies: a pure step's result shares no
        # memory with its input (an in-place step on it must not change a kept snapshot)
        if g is None:
            new_accs[j], new_ms[j] = [a.clone() for a in accs], None if m is None else m.clone()
            continue
        if _sparse.is_sparse(g):
            u, a0 = _sparse.sparse_update(g, accs[0], beta, eps)
            updates[j], new_accs[j] = (u if lr is None else u * -lr), [a0, *(a.clone() for a in accs[1:])]
            new_ms[j] = None if m is None else m.clone()
            continue
        if _sharded.is_dtensor(g):
            u, maxima = _sharded.sm3_block_sharded(g, accs, beta, eps, reducer, owner=owner, path=paths[j])
            u = u.to(g.dtype)
            new_accs[j] = list(maxima[: len(accs)])
            updates[j], new_ms[j] = _reference.finish(u, m, momentum, lr)
            continue
        if needs_autograd(g, *accs, m, beta, momentum, lr) or isinstance(beta, torch.Tensor):
            updates[j], new_accs[j], new_ms[j] = _pure_reference(g, accs, m, beta, eps, momentum, lr)
            continue
        fusable.append(j)
    _pure_dense(fusable, grads, accumulators, buffers, updates, new_accs, new_ms,
                beta=beta, eps=eps, momentum=momentum, lr=lr, fused=fused)
    reducer.flush()
    return updates, new_accs, new_ms


def _pure_reference(g, accs, m, beta, eps, momentum, lr):
    u, maxima = _reference.preconditioned(g, accs, beta, eps)
    update, new_m = _reference.finish(u, m, momentum, lr)
    return update, list(maxima), new_m


def _pure_dense(indices, grads, accumulators, buffers, updates, new_accs, new_ms, *,
                beta, eps, momentum, lr, fused) -> None:
    """Plain dense tensors no gradient flows through: the fused kernel, else the reference math."""
    # the kernel reads its hyperparameters as doubles (lr may be a one-number CPU tensor,
    # as a schedule gives), and momentum only on the way to an lr
    floats = not isinstance(momentum, torch.Tensor) and (
        not isinstance(lr, torch.Tensor) or (lr.numel() == 1 and lr.device.type == "cpu"))
    items = [(None, grads[j], list(accumulators[j]), buffers[j]) for j in indices]
    mode = "u" if lr is None else "sm3"
    use = _use_fused(fused, False) and floats and (lr is not None or all(m is None for *_, m in items))
    swept = _built(use, fused is True, items, lambda p, g, accs, m: _fused.build(g, accs, m, beta, mode))
    if swept:
        hyper = _fused.hyperparameters(0.0 if lr is None else lr, momentum or 0.0, beta, eps)
    on_gpu = _pure_triton([i for i in range(len(items)) if i not in swept], items, beta=beta, eps=eps,
                          momentum=momentum, lr=lr, fused=fused)
    with torch.no_grad():
        for i, j in enumerate(indices):
            g, accs, m = grads[j], accumulators[j], buffers[j]
            if i in swept:
                updates[j], new_accs[j], new_ms[j] = _fused.sweep(swept[i], g, accs, m, hyper)
            elif i in on_gpu:
                updates[j], new_accs[j], new_ms[j] = on_gpu[i]
            else:
                updates[j], new_accs[j], new_ms[j] = _pure_reference(g, accs, m, beta, eps, momentum, lr)


def _pure_triton(candidates, items, *, beta, eps, momentum, lr, fused) -> dict:
    """``{index: (update, new accs, new m)}`` for the items the Triton kernel covers, out of place.

    float32/float64 only: for bfloat16/float16 ``sm3fn.sm3``'s chain rounds ``u`` to the
    gradient's dtype between its stages, which the kernel does not (the reference math does).
    """
    if lr is None and any(items[i][3] is not None for i in candidates):
        return {}  # momentum is applied only on the way to an lr
    if not _use_triton(fused, False, momentum, beta, eps):
        return {}
    covered = [i for i in candidates if items[i][1].dtype in (torch.float32, torch.float64)
               and _triton.supported(*items[i])]
    if not covered:
        return {}
    try:
        # lr = -1: the kernel's -lr * u is u itself (scale_by_sm3's update)
        results = _triton.step_many(*map(list, zip(*(items[i] for i in covered))),
                                    lr=-1.0 if lr is None else lr, momentum=momentum or 0.0,
                                    beta=beta, eps=eps)
    except _triton.BuildError as e:
        if fused is True:
            raise
        _triton.give_up(e)
        return {}
    return {i: (update, list(accs), m) for i, (update, accs, m) in zip(covered, results)}
