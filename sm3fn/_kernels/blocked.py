"""The in-place fast path: one SM3 step applied straight to parameters.

Used by :class:`sm3fn.optim.SM3` and by :func:`sm3fn.sm3_update_` (functional
users who need no gradient through the step).  It calls the same
:func:`~sm3fn._sm3_math.sm3_block` as the differentiable path, so the two
cannot drift apart, and it allocates nothing the size of a parameter:

* A tensor of 2 or more dims is processed in blocks of rows that fit in the
  L2 cache, with one reused scratch buffer.  The row accumulator ``a_0`` of a
  block depends only on that block's rows, so it is written as soon as the
  block is done; the other accumulators ``a_i`` (``i > 0``) are maxima over
  all rows, and every block still needs their old values, so their new
  values build up in small buffers and are copied in after the last block.
  (Rows longer than a block are split along a later dim; then every
  accumulator builds up that way.)
* 0-d and 1-d tensors (biases, norms: many, small) are packed into one flat
  buffer per ``block_elements`` elements and stepped together: their math is
  elementwise, so one call on the pack does the work of dozens of calls,
  and multi-tensor (``torch._foreach_*``) ops scatter the results back.
* Whether every ``nu > 0`` is read once per tensor from its (small)
  accumulators (:func:`~sm3fn._sm3_math.nu_positive`); then the blocks skip
  the preconditioner's masks and, without momentum, fold the division into
  ``p.addcdiv_(g, sqrt(nu + eps), value=-lr)``.
* ``compiled=True`` runs the same block step through ``torch.compile``
  (inductor fuses it into one C++/Triton kernel per block); compiling costs
  seconds once per configuration (dims, dtypes, momentum on/off, beta, eps).
* ``fused`` (the default ``None``: wherever it applies) hands CPU tensors
  (float32/float64, and bfloat16/float16 with float32 statistics) to
  :mod:`sm3fn._kernels.fused_cpu`, one C++ sweep per tensor whose arithmetic is traced
  from the same ``_sm3_math`` functions; every other tensor takes the blocks
  above.
"""

from __future__ import annotations

import itertools
from typing import Optional, Sequence, Union

import torch

from sm3fn._kernels import fused_cpu as _fused
from sm3fn._sm3_math import ema, nu_positive, sm3_block

#: elements per block (eager): a block's ~7 passes (min, addcmul, two maxima,
#: add eps, sqrt, addcdiv) re-read it from cache (L2/L3), while each op costs
#: ~5 us of dispatch, so smaller blocks pay overhead: on a 2-core EPYC (1 MiB
#: L2 per core) 2^19 beat 2^18 by ~9% and 2^17 by ~30% (GPT-2 shapes, 1 thread).
BLOCK_ELEMENTS = 1 << 19
#: elements per block (compiled, no momentum): a fused kernel makes 3 passes
#: over a block, and each call costs ~20 us of guards, so larger blocks pay off.
COMPILED_BLOCK_ELEMENTS = 1 << 20

_Number = Union[float, torch.Tensor]


def _block_step(
    p: torch.Tensor,
    g: torch.Tensor,
    accs: list[torch.Tensor],
    running: list[torch.Tensor],
    m: Optional[torch.Tensor],
    lr: _Number,
    momentum: float,
    beta: float,
    eps: float,
    nu_out: Optional[torch.Tensor] = None,
    u_out: Optional[torch.Tensor] = None,
    write_first: bool = True,
    positive: bool = False,
) -> None:
    """One step on a block: ``p -= lr * (ema of u if m else u)``, accumulators updated.

    ``accs`` are the block's slices of the accumulators (their old values).
    With ``write_first`` (the block holds whole slices of dim 0) the new
    ``accs[0]`` is written in place and the new values of ``accs[1:]`` are
    folded into ``running`` (max); without, all of them are.  With
    ``nu_out``/``u_out`` (eager) the work runs in those buffers; without
    (under ``torch.compile``) it is written out of place and inductor fuses it.
    ``positive``: every ``nu > 0`` is known (:func:`nu_positive`), so the
    masks are skipped, and without momentum the division is folded into the
    parameter update (``p.addcdiv_``: one pass less).
    """
    g = g.to(accs[0].dtype)
    fold = (positive and m is None and nu_out is not None and not isinstance(lr, torch.Tensor)
            and p.dtype == g.dtype)
    u, maxima = sm3_block(g, accs, beta, eps, nu_out=nu_out, u_out=u_out, positive=positive,
                          denominator_only=fold)
    if write_first:
        if maxima[0] is not accs[0]:
            accs[0].copy_(maxima[0])
        maxima = maxima[1:]
    for r, new in zip(running, maxima):
        torch.maximum(r, new, out=r)
    if fold:  # u is the denominator sqrt(nu + eps)
        p.addcdiv_(g, u, value=-lr)
        return
    if m is not None:
        u = ema(m, u.to(m.dtype), momentum, out=m)
    if isinstance(lr, torch.Tensor):
        p.sub_((u * lr).to(p.dtype))
    else:
        p.add_(u, alpha=-lr)


_compiled_step = None


def _compiled():
    global _compiled_step
    if _compiled_step is None:
        # dynamic: one graph serves every block height and tensor width
        _compiled_step = torch.compile(_block_step, dynamic=True)
    return _compiled_step


@torch.no_grad()
def sm3_apply_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    accumulators: Sequence[Sequence[torch.Tensor]],
    momentum_buffers: Sequence[Optional[torch.Tensor]],
    *,
    lr: _Number,
    momentum: float,
    beta: float,
    eps: float,
    block_elements: Optional[int] = None,
    compiled: bool = False,
    fused: Optional[bool] = False,
) -> None:
    """In place: ``p -= lr * (ema of u if momentum else u)`` for each parameter.

    ``accumulators[j]`` are parameter ``j``'s accumulators (keepdim layout,
    statistics dtype) and are updated in place, as is
    ``momentum_buffers[j]`` (``None`` when ``momentum == 0``).  Gradients are
    only read.  ``lr`` may be a float or a 0-d tensor.  Scratch memory: a
    few buffers of ``block_elements`` elements (fewer when every tensor is
    smaller), never a parameter-sized one (default: :data:`BLOCK_ELEMENTS`,
    or :data:`COMPILED_BLOCK_ELEMENTS` when compiled).  ``compiled=True``
    fuses each block's step with ``torch.compile`` (opt-in: the first call
    compiles, seconds per configuration).  ``fused=True`` sweeps each CPU
    tensor the kernel of :mod:`sm3fn._kernels.fused_cpu` covers (float32/float64, and
    bfloat16/float16 with float32 statistics) once with it (the
    first call per configuration builds it, about a second); ``None`` does
    so where the kernel can be built and falls back, with one warning, where
    it cannot.  Tensors it does not cover (other dtypes and devices,
    non-contiguous) take the blocked path with ``fused=None``, and are a
    ``ValueError`` with ``fused=True`` (:func:`refuse_uncovered`, before any
    write); every step under tracing takes the blocked path.
    """
    use_fused = _use_fused(fused, compiled)
    if fused is True:
        for j, (p, g, accs, m) in enumerate(zip(params, grads, accumulators, momentum_buffers)):
            refuse_uncovered(p, g, accs, m, f"parameter {j}")
    if block_elements is None:
        # compiled with momentum, inductor keeps a block-sized copy of the new
        # buffer, so the block stays at the eager size there
        with_momentum = any(m is not None for m in momentum_buffers)
        block_elements = COMPILED_BLOCK_ELEMENTS if compiled and not with_momentum else BLOCK_ELEMENTS
    if not isinstance(block_elements, int) or block_elements < 1:
        raise ValueError(f"block_elements must be a positive int, got {block_elements!r}")
    if compiled and not isinstance(lr, torch.Tensor):
        # a tensor, so that a new lr (a scheduler) does not recompile
        lr = torch.tensor(float(lr), device=params[0].device if len(params) else None)
    step = _compiled() if compiled else _block_step
    scratch = _Scratch(block_elements, compiled)
    small: dict[tuple, list[int]] = {}
    swept = _fused_kernels(use_fused, fused is True, params, grads, accumulators, momentum_buffers,
                           momentum, beta, eps)
    if swept:
        # a float lr stays a double (as_tensor alone would round it to float32)
        lr64 = (lr.detach().to("cpu", torch.float64) if isinstance(lr, torch.Tensor)
                else torch.tensor(float(lr), dtype=torch.float64))
    for j, (p, g, accs, m) in enumerate(zip(params, grads, accumulators, momentum_buffers)):
        if g.numel() == 0:
            continue  # nothing to step, and its accumulators cover nothing
        if j in swept:
            _fused.sweep_(swept[j], p, g, accs, m, lr64)
            continue
        if g.dim() <= 1 and g.numel() <= block_elements:
            key = (g.device, g.dtype, p.dtype, accs[0].dtype, None if m is None else m.dtype)
            small.setdefault(key, []).append(j)
        elif g.dim() <= 1:
            _apply_flat(p, g, accs[0], m, scratch, step, lr, momentum, beta, eps, block_elements)
        else:
            _apply_rows(p, g, accs, m, scratch, step, lr, momentum, beta, eps, block_elements)
    for members in small.values():
        for pack in _packs(members, [grads[j].numel() for j in members], block_elements):
            _apply_packed(
                [params[j] for j in pack], [grads[j] for j in pack],
                [accumulators[j][0] for j in pack], [momentum_buffers[j] for j in pack],
                scratch, step, lr, momentum, beta, eps,
            )


def check_kernel_choice(fused: Optional[bool], compiled: bool) -> None:
    """``fused`` (None or a bool) and ``compiled`` (a bool), not both True."""
    if fused is not None and not isinstance(fused, bool):
        raise TypeError(f"fused must be a bool or None, got {fused!r}")
    if not isinstance(compiled, bool):
        raise TypeError(f"compiled must be a bool, got {compiled!r}")
    if fused and compiled:
        raise ValueError("fused=True and compiled=True exclude each other: pick one kernel")


def refuse_uncovered(p: torch.Tensor, g: torch.Tensor, accs: Sequence[torch.Tensor],
                     m: Optional[torch.Tensor], name: str = "a parameter") -> None:
    """``fused=True`` on a tensor the fused kernel does not cover: a ``ValueError`` naming it.

    As ``torch.optim.Adam(fused=True)`` refuses what its kernel cannot step,
    rather than taking another path unasked; ``fused=None`` chooses per
    tensor.  Asks :func:`fused_cpu.supported` (what the kernel covers is its
    business); runs before anything is written.
    """
    if g.numel() == 0 or _fused.supported(p, g, accs, m):
        return
    raise ValueError(
        f"fused=True, but the fused SM3 kernel does not cover {name}: "
        f"{type(p).__name__} of shape {tuple(p.shape)}, dtype {p.dtype}, device {p.device}, "
        f"layout {g.layout}, {'' if p.is_contiguous() and g.is_contiguous() else 'non-'}contiguous, "
        f"gradient dtype {g.dtype}, statistics dtype {accs[0].dtype}; it steps plain contiguous CPU "
        "tensors (float32/float64 with statistics of their dtype, bfloat16/float16 with float32 "
        "statistics). Pass fused=None to let each tensor take the path that covers it."
    )


def _use_fused(fused: Optional[bool], compiled: bool) -> bool:
    """Whether to try the fused kernel: False under tracing, or once ``None`` gave up building it."""
    check_kernel_choice(fused, compiled)
    if fused is False or compiled or torch.compiler.is_compiling():
        return False
    return fused is True or _fused.unavailable is None


def _fused_kernels(use, strict, params, grads, accumulators, momentum_buffers, momentum, beta, eps) -> dict:
    """The tensors the fused kernel steps: index -> its kernel, built.

    Every kernel is built before any tensor is written, so a build that fails
    (``strict``: ``fused=True``) raises with everything as it was; otherwise
    the blocked path takes every tensor, and later steps do not try again.
    """
    if not use:
        return {}
    try:
        return {j: _fused.build(g, accs, m, momentum, beta, eps)
                for j, (p, g, accs, m) in enumerate(zip(params, grads, accumulators, momentum_buffers))
                if g.numel() and _fused.supported(p, g, accs, m)}
    except _fused.BuildError as e:
        if strict:
            raise
        _fused.give_up(e)
        return {}


class _Scratch:
    """Block-sized buffers, made on first use and shared by every tensor of a step."""

    def __init__(self, block_elements: int, compiled: bool):
        self.size, self.compiled, self.bufs = block_elements, compiled, {}

    def get(self, name: str, n: int, like: torch.Tensor, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """A flat buffer of ``n`` elements, or None under compile (which needs none)."""
        if self.compiled and name in ("nu", "u"):
            return None
        key = (name, like.device, dtype)
        buf = self.bufs.get(key)
        if buf is None or buf.numel() < n:
            buf = self.bufs[key] = torch.empty(max(n, min(self.size, 1 << 12)), dtype=dtype, device=like.device)
        return buf[:n]


def _packs(members: list[int], sizes: list[int], capacity: int):
    """Consecutive groups of ``members`` whose sizes add up to at most ``capacity``."""
    pack, used = [], 0
    for j, n in zip(members, sizes):
        if pack and used + n > capacity:
            yield pack
            pack, used = [], 0
        pack.append(j)
        used += n
    if pack:
        yield pack


def _apply_packed(ps, gs, accs, ms, scratch, step, lr, momentum, beta, eps):
    """Small 0-d/1-d tensors stepped together in one flat buffer (the math is elementwise)."""
    sizes = [g.numel() for g in gs]
    n = sum(sizes)
    if n == 0:
        return
    dtype = accs[0].dtype
    # views (a 0-d/1-d tensor of any stride has a 1-d view), so the copies back land in place
    flat = lambda ts: [t.view(-1) for t in ts]  # noqa: E731
    g_pack = torch.cat(flat(gs), out=scratch.get("g_pack", n, gs[0], gs[0].dtype))
    a_pack = torch.cat(flat(accs), out=scratch.get("a_pack", n, gs[0], dtype))
    p_pack = torch.cat(flat(ps), out=scratch.get("p_pack", n, gs[0], ps[0].dtype))
    m_pack = None
    if ms[0] is not None:
        m_pack = torch.cat(flat(ms), out=scratch.get("m_pack", n, gs[0], ms[0].dtype))
    step(p_pack, g_pack, [a_pack], [], m_pack, lr, momentum, beta, eps,
         nu_out=None if scratch.compiled else a_pack, u_out=scratch.get("u", n, gs[0], dtype),
         positive=nu_positive([a_pack], beta))
    torch._foreach_copy_(flat(accs), list(a_pack.split(sizes)))
    torch._foreach_copy_(flat(ps), list(p_pack.split(sizes)))
    if m_pack is not None:
        torch._foreach_copy_(flat(ms), list(m_pack.split(sizes)))


def _apply_flat(p, g, acc, m, scratch, step, lr, momentum, beta, eps, block_elements):
    """A large 1-d tensor: its accumulator is full-size; each block's nu is written into it."""
    p, g, acc = p.view(-1), g.view(-1), acc.view(-1)
    m = None if m is None else m.view(-1)
    positive = nu_positive([acc], beta)  # old values: read before any block writes
    for start in range(0, g.numel(), block_elements):
        end = min(g.numel(), start + block_elements)
        acc_blk = acc[start:end]
        step(p[start:end], g[start:end], [acc_blk], [], None if m is None else m[start:end],
             lr, momentum, beta, eps,
             nu_out=None if scratch.compiled else acc_blk, u_out=scratch.get("u", end - start, g, acc.dtype),
             positive=positive)


def _apply_rows(p, g, accs, m, scratch, step, lr, momentum, beta, eps, block_elements):
    """A tensor of 2+ dims, in blocks of at most ``block_elements`` elements.

    The split dim ``d`` is the first whose trailing sub-tensor (dims after ``d``)
    fits a block; a block is one index of every dim before ``d``, a run of
    indices of dim ``d``, and all of the dims after it.  With ``d == 0`` (the
    usual case: rows fit) the row accumulator is written per block; otherwise
    every accumulator's new value builds up in a small running buffer.
    """
    shape = tuple(g.shape)
    d, inner = 0, g[0].numel()
    while inner > block_elements and d < len(shape) - 1:
        d += 1
        inner //= shape[d]
    height = max(1, block_elements // inner)
    running = [torch.full_like(a, -float("inf")) for a in (accs[1:] if d == 0 else accs)]
    positive = nu_positive(accs, beta)  # old values: read before any block writes
    for outer in itertools.product(*(range(n) for n in shape[:d])):
        lead = tuple(slice(i, i + 1) for i in outer)
        for start in range(0, shape[d], height):
            end = min(shape[d], start + height)
            sl = lead + (slice(start, end),)
            blk_shape = (1,) * d + (end - start,) + shape[d + 1:]
            nu = scratch.get("nu", (end - start) * inner, g, accs[0].dtype)
            nu = None if nu is None else nu.view(blk_shape)
            blk_accs = [a.narrow(i, *_span(sl[i])) if i <= d else a for i, a in enumerate(accs)]
            if d == 0:
                blk_running = running
            else:
                blk_running = [r.narrow(i, *_span(sl[i])) if i <= d else r for i, r in enumerate(running)]
            step(p[sl], g[sl], blk_accs, blk_running, None if m is None else m[sl], lr, momentum,
                 beta, eps, nu_out=nu, u_out=nu, write_first=d == 0, positive=positive)
    for a, new in zip(accs[1:] if d == 0 else accs, running):
        a.copy_(new)


def _span(sl: slice) -> tuple[int, int]:
    return sl.start, sl.stop - sl.start
