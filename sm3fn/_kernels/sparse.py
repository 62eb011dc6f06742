"""Sparse gradients: SM3 with the row cover, on the rows a gradient touches.

A row of an embedding's gradient is all zero or all non-zero, so for a sparse
COO gradient (``nn.Embedding(sparse=True)``, ``nn.EmbeddingBag(sparse=True)``,
or any ``torch.sparse_coo`` tensor, hybrid or fully sparse, coalesced or not)
SM3 keeps one accumulator per row (dim 0) and only that one: the row cover of
the paper (Anil et al. 2019, section 4; the authors' code does the same).  For
every touched row ``r``::

    nu[r]  = a_0[r] + g[r]**2                 (beta == 0)
    nu[r]  = beta * a_0[r] + (1 - beta) * g[r]**2
    u[r]   = g[r] / sqrt(nu[r] + eps)         (0 where nu == 0)
    a_0[r] = max of nu[r] over the row

and rows absent from the gradient keep their accumulator and their values
bit for bit.  These are :func:`sm3fn._sm3_math.sm3_block`'s equations with
the row accumulator as the only cover; this module only gathers the touched
rows, calls it, and scatters the results back, so the work of a step is
proportional to the touched rows, not to the table.

Momentum is not applied to sparse updates (as in the authors' code and
torch-SM3): a momentum buffer would be as large as the table and would move
every row on every step.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Callable, Union

import torch

from sm3fn import _tree
from sm3fn._sm3_math import Scalar, sm3_block

#: how a user declares which parameters get sparse gradients: dotted names
#: (``"emb.weight"``, as ``named_parameters`` spells them) or a predicate on them.
SparseSpec = Union[None, Collection[str], Callable[[str], bool]]


def is_sparse(t: torch.Tensor) -> bool:
    """True for a ``torch.sparse_coo`` tensor (the layout autograd gives sparse embeddings)."""
    return t.layout == torch.sparse_coo


def check_spec(sparse: SparseSpec) -> Callable[[_tree.Path], bool]:
    """Checks a ``sparse=`` argument and returns ``path -> declared sparse?``."""
    if sparse is None:
        return lambda path: False
    if callable(sparse):
        return lambda path: bool(sparse(".".join(path)))
    if isinstance(sparse, str) or not isinstance(sparse, Collection):
        raise TypeError(
            "sparse must be None, a collection of parameter names (e.g. {'emb.weight'}) "
            f"or a callable name -> bool, got {sparse!r}"
        )
    for name in sparse:
        if not isinstance(name, str):
            raise TypeError(f"sparse names must be strings, got {name!r} of type {type(name).__name__}")
    names = set(sparse)
    return lambda path: ".".join(path) in names


def check_not_compiling(sparse_params: list[str], owner: str, hint: str = "") -> None:
    """Sparse tensors cannot be traced: stop, naming the parameter, under ``torch.compile``.

    Called before any gradient is read, since torch.compile refuses a
    sparse tensor as soon as it sees one (with ``fullgraph=False`` it falls
    back to eager for this step, where the sparse path runs).
    ``sparse_params`` describe the parameters known to take sparse gradients.
    """
    if sparse_params and torch.compiler.is_compiling():
        raise TypeError(
            f"{owner}: {sparse_params[0]} takes sparse gradients, which torch.compile cannot "
            "trace; run this step eagerly (torch.compile without fullgraph=True falls back to "
            f"eager for it){hint}"
        )


def row_accumulator(param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The zero row accumulator of a parameter with sparse gradients: shape ``(n_1, 1, ..., 1)``.

    The same layout as ``accumulator_0`` of the full cover, so either state
    serves a sparse gradient.
    """
    if param.dim() == 0:
        raise ValueError("a 0-d parameter has no rows")
    return param.new_zeros((param.shape[0],) + (1,) * (param.dim() - 1), dtype=dtype)


def is_row_cover(accumulators: list[torch.Tensor]) -> bool:
    """A state holding only the row accumulator of a parameter with two or more dims."""
    return len(accumulators) == 1 and accumulators[0].dim() >= 2


def touched_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, block)``: the sorted, distinct rows ``grad`` touches, and its values there, dense.

    Repeated indices are summed first (SM3's update is not linear in ``g``,
    so ``g = g_1 + g_2`` must be formed before squaring).  ``block`` has
    shape ``(len(rows), *grad.shape[1:])``; entries of a touched row that a
    fully sparse gradient leaves out are 0 there (their step is 0).
    """
    g = grad.coalesce()  # a new tensor; the caller's gradient is left as it was
    index, values = g.indices(), g.values()
    if g.sparse_dim() == 1:  # hybrid (embeddings): values are whole rows already
        return index[0], values
    rows, slot = torch.unique_consecutive(index[0], return_inverse=True)  # coalesced: sorted
    block = values.new_zeros((rows.numel(),) + tuple(g.shape[1:]))
    block[(slot,) + tuple(index[1:])] = values
    return rows, block


def _gather(accumulator: torch.Tensor, rows: torch.Tensor, ndim: int) -> torch.Tensor:
    """The touched rows of a row accumulator (any layout with ``n_1`` elements), keepdim-shaped."""
    keepdim = accumulator.reshape((accumulator.numel(),) + (1,) * (ndim - 1))
    return keepdim.index_select(0, rows)


def row_cover_step(
    block: torch.Tensor, accumulator_rows: torch.Tensor, beta: Scalar, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, new row accumulators)`` of the touched rows: :func:`sm3_block` with one cover."""
    u, maxima = sm3_block(block, [accumulator_rows], beta, eps)
    return u, maxima[0]


@torch.compiler.disable  # sparse tensors cannot be traced; under torch.compile this runs eagerly
def sparse_update(
    grad: torch.Tensor, accumulator: torch.Tensor, beta: Scalar, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Out of place: ``(u, new accumulator)`` for a sparse ``grad``.

    ``u`` is a coalesced sparse COO tensor on the touched rows (hybrid:
    one sparse dim, whole rows as values), in ``grad``'s dtype;
    ``accumulator`` (the row accumulator) comes back as a new tensor with
    the touched rows replaced.
    """
    rows, block = touched_rows(grad)
    if rows.numel() == 0:  # nothing touched (and no row for the row maximum to reduce)
        u, new_accumulator = block, accumulator.clone()  # new, as on the other branch
    else:
        u, new_rows = row_cover_step(
            block.to(accumulator.dtype), _gather(accumulator, rows, block.dim()), beta, eps
        )
        flat = accumulator.reshape(-1).index_copy(0, rows, new_rows.reshape(-1))
        new_accumulator = flat.view(accumulator.shape)
    update = torch.sparse_coo_tensor(
        rows.unsqueeze(0), u.to(grad.dtype), grad.shape,
        is_coalesced=True, check_invariants=False,
    )
    return update, new_accumulator


@torch.compiler.disable
@torch.no_grad()
def sparse_apply_(
    param: torch.Tensor,
    grad: torch.Tensor,
    accumulator: torch.Tensor,
    *,
    lr: Scalar,
    beta: Scalar,
    eps: float,
) -> None:
    """In place: ``param[rows] -= lr * u`` and ``accumulator[rows] = new rows``, nothing else.

    ``accumulator`` is the row accumulator (contiguous, ``n_1`` elements, any
    shape: ``(n_1,)`` as torch-SM3 stores it, or ``(n_1, 1, ..., 1)``).  No
    momentum.  ``grad`` is only read.
    """
    rows, block = touched_rows(grad)
    if rows.numel() == 0:
        return
    flat = accumulator.view(-1)
    u, new_rows = row_cover_step(block.to(flat.dtype), _gather(flat, rows, block.dim()), beta, eps)
    flat.index_copy_(0, rows, new_rows.reshape(-1))
    if isinstance(lr, torch.Tensor):
        param.index_add_(0, rows, (u * -lr).to(param.dtype))
    else:
        param.index_add_(0, rows, u.to(param.dtype), alpha=-lr)
