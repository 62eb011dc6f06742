"""The in-place fast path: one SM3 step applied straight to parameters.

Used by :class:`sm3fn.optim.SM3` and by functional users who need no
gradient through the step.  It calls the same :func:`sm3_block` as the
differentiable path, on blocks of rows with a reused scratch buffer, so no
full-size temporary is allocated per step:

* the row accumulator ``a_0`` of a block depends only on that block's rows,
  so it is written as soon as the block is done;
* the other accumulators ``a_i`` (``i > 0``) are maxima over all rows, and
  every block still needs their old values, so their new values build up in
  small buffers and are copied in after the last block.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from sm3fn._sm3_math import ema, sm3_block

#: elements per block: small enough that a block's passes stay in cache.
BLOCK_ELEMENTS = 1 << 16


def _row_blocks(shape: torch.Size, block_elements: int):
    rows = shape[0]
    per_row = max(1, int(torch.Size(shape[1:]).numel()))
    step = max(1, block_elements // per_row)
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


@torch.no_grad()
def sm3_apply_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    accumulators: Sequence[Sequence[torch.Tensor]],
    momentum_buffers: Sequence[Optional[torch.Tensor]],
    *,
    lr: float,
    momentum: float,
    beta: float,
    eps: float,
    block_elements: int = BLOCK_ELEMENTS,
) -> None:
    """In place: ``p -= lr * (ema of u if momentum else u)`` for each parameter.

    ``accumulators[j]`` are parameter ``j``'s accumulators (keepdim layout,
    statistics dtype) and are updated in place, as is
    ``momentum_buffers[j]`` (``None`` when ``momentum == 0``).  Gradients are
    only read.
    """
    scratch: dict[torch.dtype, torch.Tensor] = {}
    for p, g, accs, m in zip(params, grads, accumulators, momentum_buffers):
        dtype = accs[0].dtype
        buf = scratch.get(dtype)
        if buf is None or buf.device != g.device:
            buf = scratch[dtype] = torch.empty(block_elements, dtype=dtype, device=g.device)
        if g.dim() <= 1:
            _apply_flat(p.view(-1), g.reshape(-1), accs[0].view(-1), None if m is None else m.view(-1),
                        buf, lr, momentum, beta, eps, block_elements)
        else:
            _apply_rows(p, g, accs, m, buf, lr, momentum, beta, eps, block_elements)


def _finish_block(p_blk, u, m_blk, lr, momentum):
    if m_blk is not None:
        u = ema(m_blk, u.to(m_blk.dtype), momentum, out=m_blk)
    p_blk.add_(u, alpha=-lr)


def _apply_flat(p, g, acc, m, buf, lr, momentum, beta, eps, block_elements):
    """0-d/1-d: the accumulator is full-size; each block's nu is written into it."""
    for start in range(0, g.numel(), block_elements):
        end = min(g.numel(), start + block_elements)
        g_blk = g[start:end].to(acc.dtype)
        acc_blk = acc[start:end]
        u, _ = sm3_block(g_blk, [acc_blk], beta, eps, nu_out=acc_blk, u_out=buf[: end - start])
        _finish_block(p[start:end], u, None if m is None else m[start:end], lr, momentum)


def _apply_rows(p, g, accs, m, buf, lr, momentum, beta, eps, block_elements):
    rows_max = [torch.full_like(a, -float("inf")) for a in accs[1:]]
    for start, end in _row_blocks(g.shape, block_elements):
        g_blk = g[start:end].to(accs[0].dtype)
        scratch = buf[: g_blk.numel()].view(g_blk.shape) if g_blk.numel() <= buf.numel() else torch.empty_like(g_blk)
        blk_accs = [accs[0][start:end], *accs[1:]]
        u, maxima = sm3_block(g_blk, blk_accs, beta, eps, nu_out=scratch, u_out=scratch)
        accs[0][start:end].copy_(maxima[0])
        for running, new in zip(rows_max, maxima[1:]):
            torch.maximum(running, new, out=running)
        _finish_block(p[start:end], u, None if m is None else m[start:end], lr, momentum)
    for a, new in zip(accs[1:], rows_max):
        a.copy_(new)
