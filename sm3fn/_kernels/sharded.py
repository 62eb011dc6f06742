"""SM3 on sharded parameters (``torch.distributed`` DTensors, as FSDP2's ``fully_shard`` makes them).

SM3's accumulator ``a_i`` is the maximum of ``nu`` over every dimension but
``i``, so it crosses shard boundaries.  For a parameter sharded along dim
``s`` (FSDP2: ``Shard(0)``), each rank holds whole slices along every other
dimension, so:

* ``a_s`` (the accumulator of the sharded dim) is complete on each rank: it
  is sharded like the parameter and needs no communication;
* every other ``a_i`` is a maximum over rows that live on several ranks: each
  rank takes the maximum over its own rows, then an ``all_reduce(MAX)``
  across the shard group makes it the global one.  It is stored replicated.

Each rank runs the ordinary SM3 math (:func:`sm3fn._sm3_math.sm3_block`, or
the dispatcher's in-place step on :func:`local_shards`) on its local shards; the
partial maxima of all parameters of a step are packed into one flat buffer
per process group and dtype, so a step costs **one** ``all_reduce`` in all,
carrying ``sum(n_i for i != s)`` numbers per sharded parameter of two or
more dims (0-d and 1-d parameters, and replicated ones, need none).

Why not let DTensor do the reductions (``nu.amax(dims)`` on a DTensor): it
yields a ``Partial(max)`` placement (a pending reduction that must not be
stored in state, and whose later resolution is a collective per parameter);
it raises on an empty local shard, which uneven sharding produces (a
1-row weight on 2 ranks); and each DTensor op pays a dispatch cost.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from sm3fn import _tree
from sm3fn._sm3_math import Scalar, accumulator_shapes, init_accumulators, sm3_block

try:
    from torch.distributed.tensor import DTensor, Replicate
except ImportError:  # a torch built without distributed support
    DTensor = None  # type: ignore[assignment,misc]  # is_dtensor() then answers False


def is_dtensor(t: Optional[torch.Tensor]) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def check_same_kind(owner: str, path, **tensors: Optional[torch.Tensor]) -> None:
    """All tensors of one parameter must be DTensors on one mesh, or all plain tensors.

    ``tensors`` maps a role (``param``, ``grad``, ``state``...) to a tensor
    (``None`` entries are skipped).  Raises a ``TypeError`` naming the
    parameter (``owner: parameter 'path'``; ``path`` may also be a ready
    description, a str, or a function that makes one, called only to raise)
    before DTensor raises a deep dispatch error.
    """
    if not any(is_dtensor(t) for t in tensors.values()):
        return
    if callable(path):
        path = path()
    name = path if isinstance(path, str) else f"parameter {_tree.fmt(path)}"
    present = {role: t for role, t in tensors.items() if t is not None}
    kinds = {role: is_dtensor(t) for role, t in present.items()}
    if len(set(kinds.values())) > 1:
        sharded = sorted(r for r, k in kinds.items() if k)
        plain = sorted(r for r, k in kinds.items() if not k)
        raise TypeError(
            f"{owner}: {name} mixes DTensors ({', '.join(sharded)}) with plain "
            f"tensors ({', '.join(plain)}); a parameter's value, gradient and optimizer state must "
            "all be DTensors (sharded, e.g. by fully_shard) or all plain tensors: create the "
            "optimizer state after sharding the model"
        )
    meshes = {role: t.device_mesh for role, t in present.items() if is_dtensor(t)}
    if any(m != next(iter(meshes.values())) for m in meshes.values()):
        raise ValueError(
            f"{owner}: {name} has DTensors on different device meshes: "
            + ", ".join(f"{r}: {m}" for r, m in meshes.items())
        )


def _sharded_dim(placement, ndim: int, owner: str, path: _tree.Path) -> Optional[int]:
    """The tensor dim a placement shards (``None`` for replicate); Partial is refused."""
    if placement.is_replicate():
        return None
    if placement.is_partial() or not hasattr(placement, "dim"):
        raise ValueError(
            f"{owner}: parameter {_tree.fmt(path)} has placement {placement}; SM3 needs "
            "Shard or Replicate placements (redistribute a Partial gradient first)"
        )
    return placement.dim % max(ndim, 1)


def accumulator_placements(placements, ndim: int, i: int, owner="sm3", path=()) -> tuple:
    """Placements of accumulator ``i`` of a parameter placed as ``placements``.

    The accumulator of a sharded dim is sharded like the parameter; all
    others are replicated (their maxima are all-reduced).  A 0-d/1-d
    parameter's full-size accumulator is placed like the parameter.
    """
    if ndim <= 1:
        return tuple(placements)
    return tuple(
        pl if _sharded_dim(pl, ndim, owner, path) == i else Replicate() for pl in placements
    )


def _mesh_dims_to_reduce(placements, ndim: int, i: int, owner, path) -> list[int]:
    """Mesh dims over which accumulator ``i``'s local maxima must be all-reduced."""
    if ndim <= 1:
        return []
    dims = []
    for m, pl in enumerate(placements):
        d = _sharded_dim(pl, ndim, owner, path)
        if d is not None and d != i:
            dims.append(m)
    return dims


def _param_placements(accs: Sequence[torch.Tensor], ndim: int, owner, path) -> tuple:
    """The parameter placements that ``accs`` (as made by :func:`init_accumulators`) belong to."""
    if ndim <= 1:
        return tuple(accs[0].placements)
    out = []
    for m in range(accs[0].device_mesh.ndim):
        pl = Replicate()
        for i, a in enumerate(accs):
            if _sharded_dim(a.placements[m], ndim, owner, path) == i:
                pl = a.placements[m]
        out.append(pl)
    return tuple(out)


def _wrap(local: torch.Tensor, like: torch.Tensor, placements) -> torch.Tensor:
    """``local`` as a DTensor with the global shape of ``like`` (uneven shards need it spelled out)."""
    return DTensor.from_local(
        local, like.device_mesh, placements, run_check=False, shape=like.shape, stride=like.stride()
    )


class MaxReducer:
    """Collects partial maxima and all-reduces them, one flat buffer per (process group, dtype).

    Tensors handed to :meth:`add` are overwritten in place by :meth:`flush`,
    so they must be the caller's own (fresh results, or state being updated
    in place).  A tensor reduced over two mesh dims is added twice; buckets
    run in the order they were first used, each reading current values, so
    the second reduction sees the first's result.
    """

    def __init__(self) -> None:
        self._buckets: dict = {}

    def add(self, t: torch.Tensor, group) -> None:
        self._buckets.setdefault((group, t.dtype, t.device), []).append(t)

    def flush(self) -> None:
        for (group, _, _), tensors in self._buckets.items():
            flat = torch.cat([t.reshape(-1) for t in tensors])
            dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=group)
            offset = 0
            for t in tensors:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
        self._buckets = {}


def init_accumulators_sharded(
    param: torch.Tensor, dtype: torch.dtype, owner: str = "scale_by_sm3", path=()
) -> tuple[torch.Tensor, ...]:
    """Zero accumulators for a DTensor ``param``: local zeros, placed per :func:`accumulator_placements`."""
    local = init_accumulators(param.to_local(), dtype)
    ndim = param.dim()
    out = []
    for i, (a, shape) in enumerate(zip(local, accumulator_shapes(param.shape))):
        placements = accumulator_placements(param.placements, ndim, i, owner, path)
        out.append(
            DTensor.from_local(
                a, param.device_mesh, placements, run_check=False,
                shape=torch.Size(shape), stride=_contiguous_stride(shape),
            )
        )
    return tuple(out)


def _contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(stride))


def sm3_block_sharded(
    grad: torch.Tensor,
    accumulators: Sequence[torch.Tensor],
    beta: Scalar,
    eps: float,
    reducer: MaxReducer,
    owner: str = "scale_by_sm3",
    path: _tree.Path = (),
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """:func:`sm3_block` on DTensors: ``(u, new accumulators)``, both DTensors.

    The new accumulators of unsharded dims hold local maxima until
    ``reducer.flush()`` runs (call it before reading them).  A gradient
    placed differently from the parameter (e.g. ``Partial`` from tensor
    parallelism) is redistributed first.
    """
    ndim = grad.dim()
    target = _param_placements(accumulators, ndim, owner, path)
    if tuple(grad.placements) != target:
        grad = grad.redistribute(grad.device_mesh, target)
    g = grad.to_local().to(accumulators[0].dtype)
    accs = [a.to_local() for a in accumulators]
    if ndim >= 2 and g.numel() == 0:
        # an empty shard (uneven sharding): nu >= 0, so 0 is neutral for the max
        u, maxima = g.clone(), tuple(torch.zeros_like(a) for a in accs)
    else:
        # fresh tensors (amax, or nu for 0-d/1-d): the reducer may write into them
        u, maxima = sm3_block(g, accs, beta, eps)
    mesh = grad.device_mesh
    new = []
    for i, (m, a) in enumerate(zip(maxima, accumulators)):
        for mesh_dim in _mesh_dims_to_reduce(target, ndim, i, owner, path):
            reducer.add(m, mesh.get_group(mesh_dim))
        new.append(_wrap(m, a, a.placements))
    return _wrap(u, grad, target), tuple(new)


def local_shards(
    p: torch.Tensor,
    g: torch.Tensor,
    accumulators: Sequence[torch.Tensor],
    momentum_buffer: Optional[torch.Tensor],
    reducer: MaxReducer,
) -> Optional[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], Optional[torch.Tensor]]]:
    """A DTensor parameter's local shards, for an in-place step: ``(p, g, accs, m)``, or None.

    The local accumulators of unsharded dims are handed to ``reducer``: after
    the in-place step on the shards they hold local maxima, and
    ``reducer.flush()`` (once per step, for every parameter) makes them the
    global ones.  An empty shard (uneven sharding) has nothing to step: its
    accumulators are set to the neutral 0 (``nu >= 0``) for the maxima of the
    other dims, and None comes back.  A gradient placed differently from the
    parameter is redistributed first.
    """
    ndim = p.dim()
    if tuple(g.placements) != tuple(p.placements):
        g = g.redistribute(p.device_mesh, p.placements)
    accs = [a.to_local() for a in accumulators]
    for i, a in enumerate(accs):
        for mesh_dim in _mesh_dims_to_reduce(p.placements, ndim, i, "SM3", ()):
            reducer.add(a, p.device_mesh.get_group(mesh_dim))
    if p.to_local().numel() == 0:
        for a in accs:
            a.zero_()
        return None
    return p.to_local(), g.to_local(), accs, None if momentum_buffer is None else momentum_buffer.to_local()


def all_finite_agreed(tensors: Sequence[torch.Tensor], all_finite, device) -> bool:
    """``bool(all_finite(tensors))`` that every rank agrees on, for plain tensors and DTensors.

    On DTensors ``all_finite`` gives a flag with a pending reduction
    (``Partial``); reading it as is would give each rank its own shard's
    answer, and a rank that skips a step while the others run it leaves them
    waiting in the step's all_reduce.  ``full_tensor()`` settles the flag
    (one collective per device mesh).  Every flag is computed before any is
    read, so no rank leaves out a collective.
    """
    groups: dict = {}
    for t in tensors:
        groups.setdefault(t.device_mesh if is_dtensor(t) else None, []).append(t)
    flags = [all_finite(ts, device) for ts in groups.values()]
    settled = [f.full_tensor() if is_dtensor(f) else f for f in flags]
    return all(bool(f) for f in settled)
