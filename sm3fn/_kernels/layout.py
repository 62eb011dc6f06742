"""Any dense tensor, of any rank and any memory layout, as a 2-D row problem.

A row kernel (:mod:`sm3fn._kernels.fused_cpu`'s 2-D sweep; the same shape of
problem serves a GPU or an out-of-place kernel) steps a contiguous
``rows x cols`` matrix with one accumulator per row and one per column:
``nu = min(a_row, a_col) + g*g``, then ``a_row <- max over the row``,
``a_col <- max over the column``.  SM3's cover for a tensor of ``k`` dims has
one accumulator per dim.  :func:`row_problem` turns the second into the first:

1. **Physical order.**  The dims are sorted by stride (outermost first), so
   that the permuted view is contiguous: a ``channels_last`` conv weight
   ``(out, in, kh, kw)`` is swept as ``(out, kh, kw, in)``, in the order its
   bytes lie in memory.  Each physical dim keeps its own accumulator.  Any
   permutation of a contiguous tensor qualifies (the gradient and momentum
   buffer must share the parameter's layout; else the caller takes another
   path: see :func:`row_problem`).
2. **Split.**  The physical dims ``0..s-1`` become the rows and ``s..k-1`` the
   columns (:func:`choose_split` picks ``s``).  A group of one dim uses its
   accumulator itself.  A group of several dims is folded into a *table*:
   ``cover_minimum`` of their accumulators, broadcast over the group and
   flattened (for a conv weight's ``(in, kh, kw)`` that is ``in*kh*kw``
   numbers, a fraction ``1/out`` of the weight).  ``min`` is exact, so the 2-D
   kernel's ``min(a_row, table[j])`` equals the k-d cover minimum bit for bit.
3. **Finish.**  After the sweep the kernel has written each table's new
   maxima (saturated) over its own entries; :attr:`RowProblem.finish` reduces
   them back to each accumulator of the group with ``cover_maxima`` (``amax``
   over the group's other dims: exact, and saturation commutes with ``max``).
   So the accumulators come out bit for bit as the blocked path's.

Scratch: the tables, at most :data:`TABLE_MAX_SHARE` of the parameter's
numbers (or :data:`TABLE_SMALL`): no split with larger ones is taken, and a
tensor with none left is not presented (the caller's blocked path steps it),
so never a parameter-sized buffer.  Nothing here knows about a kernel:
:func:`row_problem` returns 2-D views of the tensors it is given, what the
kernel reads and writes for the row and column accumulators (views or
tables), and a ``finish`` to call after the kernel has run; in place or out
of place (``new_accs``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from sm3fn._sm3_math import cover_maxima, cover_minimum

#: the row kernel's cost model (one thread, float32, AVX-512, from ``python -m
#: sm3fn.benchmark_conv --splits``: ns per element of a (2^21 / cols, cols) sweep
#: was 2.2 at 9 columns, 0.46 at 16, 0.27 at 64, 0.21-0.25 from 128 to 2048,
#: 0.28 at 4096 and 0.4 beyond 8192): a fixed cost per row (the scalar row
#: accumulator, the row's horizontal max, the loop) ...
ROW_NS = 10.0
#: ... a cost per vector of 16 lanes, full or not ...
VECTOR_NS = 3.4
#: ... and a slowdown once a thread's column arrays (the column accumulator and
#: its running maxima, read and written once per row) leave L1, then L2
CACHE_PENALTY = ((2048, 1.0), (4096, 1.3))
FAR_PENALTY = 1.9
#: a table costs a few torch calls to build and reduce back (fixed) and a few passes over it
TABLE_NS = 5000.0
TABLE_ELEMENT_NS = 1.0
#: no split whose tables hold more than this share of the parameter's numbers (or
#: TABLE_SMALL, whichever is more) is taken: the step's scratch stays a fraction of it
TABLE_MAX_SHARE = 1 / 8
TABLE_SMALL = 1 << 12


@dataclass(frozen=True)
class RowProblem:
    """One tensor's step as a ``rows x cols`` problem.

    ``views``: the caller's tensors (parameter, gradient, momentum, outputs:
    all of one shape and layout) as contiguous ``(rows, cols)`` views, in the
    order given.  ``row_acc`` (``rows`` numbers) and ``col_acc`` (``cols``
    numbers), contiguous and 1-d, are what the kernel reads: views of the
    accumulators where a group is one dim, tables otherwise.  ``row_out`` and
    ``col_out`` are where it writes the new maxima (saturated) after its
    sweep: the same tensors in place; views of the new accumulators out of
    place; for a table, the accumulator (view) of its one dim of size > 1 if
    it has one (the table's new maxima are that accumulator's), else the
    table again (its old values are no longer needed).  Call ``finish()``
    once after the kernel has run: it reduces the tables' new maxima into the
    other accumulators (a no-op when there is no table).
    """

    views: tuple[torch.Tensor, ...]
    row_acc: torch.Tensor
    col_acc: torch.Tensor
    row_out: torch.Tensor
    col_out: torch.Tensor
    finish: Callable[[], None]


def _nothing() -> None:
    pass


def physical_order(t: torch.Tensor) -> Optional[list[int]]:
    """The dims of ``t``, outermost first, so that ``t.permute(order)`` is contiguous; None if none is.

    ``t`` must be dense: a permutation of a contiguous tensor (``channels_last``,
    ``channels_last_3d``, a transpose, ...).  Dims of size 1 have no meaningful
    stride; they go where the sort puts them (``is_contiguous`` ignores them).
    """
    order = _order(tuple(t.shape), t.stride())
    return None if order is None else list(order)


@functools.lru_cache(maxsize=4096)
def _order(shape: tuple[int, ...], strides: tuple[int, ...]) -> Optional[tuple[int, ...]]:
    # larger strides first; among equal strides (size-1 dims) the larger size first
    order = tuple(sorted(range(len(shape)), key=lambda d: (-strides[d], -shape[d])))
    expected = 1
    for d in reversed(order):  # contiguous in that order: each stride the product of the sizes inside it
        if shape[d] != 1 and strides[d] != expected:
            return None
        expected *= shape[d]
    return order


def presentable(p: torch.Tensor) -> bool:
    """Whether :func:`row_problem` can present ``p`` (2+ dims): dense, with a split of small tables."""
    return _plan(tuple(p.shape), p.stride(), 1, None) is not None


def same_layout(p: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether ``p`` is dense (:func:`physical_order`) and ``others`` lie in memory exactly as it does."""
    strides = p.stride()
    if _order(tuple(p.shape), strides) is None:
        return False
    # dense, same shape: the same memory order iff the same strides on every dim of size > 1
    # (equal stride tuples, the common case, are checked first: one comparison per tensor)
    live = [d for d, n in enumerate(p.shape) if n != 1]
    return all(s == strides or all(s[d] == strides[d] for d in live) for s in (t.stride() for t in others))


def table_numbers(shape: Sequence[int], s: int) -> int:
    """How many numbers the tables of split ``s`` hold (a group of one dim needs none)."""
    k = len(shape)
    return (math.prod(shape[:s]) if s > 1 else 0) + (math.prod(shape[s:]) if k - s > 1 else 0)


def split_cost(shape: Sequence[int], s: int, threads: int = 1) -> float:
    """The modelled time (ns) of the row-kernel sweep of a physical ``shape`` split at ``s``.

    Per row: :data:`ROW_NS` plus :data:`VECTOR_NS` per vector of 16, times the
    cache penalty of the row length; rows are split among the threads (fewer
    rows than threads leave some idle); plus the tables (:data:`TABLE_NS`
    each, :data:`TABLE_ELEMENT_NS` per number).
    """
    rows, cols = math.prod(shape[:s]), math.prod(shape[s:])
    per_row = ROW_NS + VECTOR_NS * -(-cols // 16)
    penalty = FAR_PENALTY
    for limit, factor in CACHE_PENALTY:
        if cols <= limit:
            penalty = factor
            break
    tables = (s > 1) + (len(shape) - s > 1)
    return (per_row * penalty * -(-rows // max(1, threads))
            + TABLE_NS * tables + TABLE_ELEMENT_NS * table_numbers(shape, s))


def choose_split(shape: Sequence[int], threads: int = 1) -> Optional[int]:
    """Where a physical shape (``k >= 2``) splits into rows ``shape[:s]`` and columns ``shape[s:]``.

    The split of least :func:`split_cost`, the earliest among equals, among
    those whose tables stay small (:data:`TABLE_MAX_SHARE`); None if none
    does (then the blocked path steps the tensor).  Long rows (fewer row
    overheads, whole vectors) win while the column arrays stay in cache.  A
    conv weight ``(out, in, kh, kw)`` keeps ``s = 1`` (rows of ``in*kh*kw``);
    a depthwise ``(C, 1, 3, 3)`` has rows of 9 whatever the split (every row
    pays a masked vector, see docs/_incoming/conv.md); a ``(4, 512, 512)``
    tensor splits at ``s = 2`` (rows of 512, no column table).
    """
    limit = max(int(math.prod(shape) * TABLE_MAX_SHARE), TABLE_SMALL)
    costs = {s: split_cost(shape, s, threads) for s in range(1, len(shape))
             if table_numbers(shape, s) <= limit}
    return min(costs, key=lambda s: costs[s]) if costs else None


@functools.lru_cache(maxsize=4096)
def _plan(shape: tuple[int, ...], strides: tuple[int, ...], threads: int, split: Optional[int]):
    """(memory order, rows, cols, row dims, their sizes, column dims, their sizes) of a dense tensor, or None."""
    order = _order(shape, strides)
    if order is None:
        return None
    physical = [shape[d] for d in order]
    s = choose_split(physical, threads) if split is None else split
    if s is None:
        return None
    return (math.prod(physical[:s]), math.prod(physical[s:]),
            order[:s], tuple(physical[:s]), order[s:], tuple(physical[s:]))


def _group_accumulator(accs: Sequence[torch.Tensor], outs: Sequence[torch.Tensor], dims: Sequence[int],
                       shape: Sequence[int]):
    """What the kernel reads and writes for the physical ``dims`` (sizes ``shape``): views, or a table.

    Returns ``(read, write, finish)``: ``finish`` reduces the table's new
    maxima into ``outs`` (None for views, which the kernel writes itself).
    """
    if len(dims) == 1:
        return accs[dims[0]].view(-1), outs[dims[0]].view(-1), None
    views, live_shape, live_dims, lone_dims = _group_views(tuple(shape))
    table = cover_minimum([accs[d].view(v) for d, v in zip(dims, views)]).contiguous()
    flat = table.view(-1)  # broadcast over the group: prod(shape) numbers
    lone = [dims[i] for i in lone_dims]
    if len(live_dims) <= 1:
        # one dim of size > 1 (a 1x1 conv's (in, 1, 1)), or none: its accumulator's new values
        # are the table's new maxima themselves (cover_maxima of a 1-d table is the table), so
        # the kernel writes them there directly, and each size-1 dim gets their max (below)
        owner = dims[live_dims[0]] if live_dims else lone.pop(0)
        written = outs[owner].view(-1)
        return flat, written, functools.partial(_write_whole_max, written, [outs[d] for d in lone])
    live = [dims[i] for i in live_dims]

    def finish() -> None:
        # cover_maxima over the group's dims of size > 1 only: a dim of size 1 adds nothing to
        # reduce over (the max over one number is that number), so these equal the full
        # group's maxima bit for bit, in fewer reductions
        for d, new in zip(live, cover_maxima(table.view(live_shape))):
            outs[d].view(-1).copy_(new.view(-1))
        _write_whole_max(flat, [outs[d] for d in lone])

    return flat, flat, finish


def _write_whole_max(maxima: torch.Tensor, lone: Sequence[torch.Tensor]) -> None:
    """Each accumulator of a size-1 dim of a group: the max over every other dim, i.e. over the
    whole table of new ``maxima`` (exact and order-free), reduced once and written in place."""
    if lone:
        first = lone[0].view(())
        torch.amax(maxima, dim=0, out=first)
        for a in lone[1:]:
            a.view(()).copy_(first)


@functools.lru_cache(maxsize=4096)
def _group_views(shape: tuple[int, ...]) -> tuple[tuple[tuple[int, ...], ...], tuple[int, ...],
                                                  tuple[int, ...], tuple[int, ...]]:
    """A group's per-dim broadcast views, the sizes of its dims > 1, and the positions of those and of size-1 dims.

    Values-free, so cached per group shape (a ResNet has a few dozen).
    """
    views = tuple(tuple(n if j == i else 1 for j, n in enumerate(shape)) for i in range(len(shape)))
    live = tuple(i for i, n in enumerate(shape) if n != 1)
    lone = tuple(i for i, n in enumerate(shape) if n == 1)
    return views, tuple(shape[i] for i in live), live, lone


def row_problem(
    tensors: Sequence[torch.Tensor],
    accs: Sequence[torch.Tensor],
    threads: int = 1,
    split: Optional[int] = None,
    new_accs: Optional[Sequence[torch.Tensor]] = None,
    same_layout_checked: bool = False,
) -> Optional[RowProblem]:
    """``tensors`` (one shape, ``k >= 2`` dims) and their keepdim accumulators as a row problem.

    ``tensors``: the parameter, gradient, momentum buffer, outputs, whatever
    the kernel sweeps together (the first decides the layout).  ``new_accs``:
    where the new accumulators go, out of place (default: ``accs``, in place).
    None if the first tensor is not dense (a permutation of a contiguous
    tensor), if another does not lie in memory as it does (a kernel would
    need a parameter-sized copy to sweep them together, so the caller takes a
    strided path, the blocked one), or if every split needs large tables
    (:func:`choose_split`).  ``accs`` must be contiguous.  ``threads``: how
    many the kernel will run on (for :func:`choose_split`); ``split``
    overrides it (for measuring).  ``same_layout_checked``: the caller has
    already checked :func:`same_layout` (the kernel's ``supported`` does, on
    every step), so it is not checked again.  Allocates only the tables.  The plan
    (memory order, split) is cached per shape, strides and threads.
    """
    first = tensors[0]
    outs = accs if new_accs is None else new_accs
    if first.dim() == 2 and split is None and all(t.is_contiguous() for t in tensors):
        # already a row problem: the GPT-2 matrices
        return RowProblem(tuple(tensors), accs[0].view(-1), accs[1].view(-1), outs[0].view(-1),
                          outs[1].view(-1), _nothing)
    plan = _plan(tuple(first.shape), first.stride(), threads, split)
    if plan is None or not (same_layout_checked or same_layout(*tensors)):
        return None
    rows, cols, row_dims, row_shape, col_dims, col_shape = plan
    row_acc, row_out, finish_rows = _group_accumulator(accs, outs, row_dims, row_shape)
    col_acc, col_out, finish_cols = _group_accumulator(accs, outs, col_dims, col_shape)
    finishers = [f for f in (finish_rows, finish_cols) if f is not None]

    def finish() -> None:
        for f in finishers:
            f()

    # dense: the numel elements from each tensor's first one, in memory order (a view, never a copy)
    # (one view per distinct tensor: in place the inputs and outputs are the same tensors)
    made: dict[int, torch.Tensor] = {}
    for t in tensors:
        if id(t) not in made:
            made[id(t)] = t.as_strided((rows, cols), (cols, 1))
    views = tuple(made[id(t)] for t in tensors)
    return RowProblem(views, row_acc, col_acc, row_out, col_out, finish if finishers else _nothing)
