"""The in-place fast path: one SM3 step applied straight to parameters.

One backend of the dispatcher :func:`sm3fn._kernels.sm3_step_` (which
:class:`sm3fn.optim.SM3` and :func:`sm3fn.sm3_update_` call).  It calls the same
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
* CPU tensors the fused kernel covers do not come here: the dispatcher
  (:func:`sm3fn._kernels.sm3_step_`) hands them to :mod:`sm3fn._kernels.fused_cpu`;
  this module is the path for every other dense tensor (any device, dtype,
  layout) and for every step under tracing.
"""

from __future__ import annotations

import itertools
from typing import Optional, Sequence, Union

import torch

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
        # a 0-d tensor lr (the compiled path's) is a valid Scalar at run time; torch's stubs say Number only
        p.addcdiv_(g, u, value=-lr)  # type: ignore[arg-type]
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
    compiles, seconds per configuration).  Plain dense tensors only: the
    dispatcher routes sparse gradients, DTensors and the fused kernel's tensors.
    """
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
    for j, (p, g, accs, m) in enumerate(zip(params, grads, accumulators, momentum_buffers)):
        if g.numel() == 0:
            continue  # nothing to step, and its accumulators cover nothing
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


class _Scratch:
    """Block-sized buffers, made on first use and shared by every tensor of a step."""

    def __init__(self, block_elements: int, compiled: bool):
        self.size, self.compiled = block_elements, compiled
        self.bufs: dict[tuple, torch.Tensor] = {}

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
    pack: list[int] = []
    used = 0
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
