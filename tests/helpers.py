"""Helpers shared by the test files: trees' leaves, bitwise comparison, a checkpoint round trip,
the pure training loop (``tx.update`` + ``apply_updates``) the other paths are compared with, and
parameter groups with a float64 reference per parameter, and the inputs the fused kernels' tests
share."""

from __future__ import annotations

import io
from typing import Any, Iterable, Optional

import numpy as np
import torch
from reference import ReferenceSM3

import sm3fn
from sm3fn import _tree
from sm3fn._sm3_math import init_accumulators
from sm3fn.base import GradientTransformation, OptState, Tree


def leaves(tree: Tree) -> dict[tuple[str, ...], Optional[torch.Tensor]]:
    """``{key path: leaf}`` of a (nested) dict or a TensorDict; a dict's ``None`` leaves are kept."""
    return _tree.flatten(tree, "tree")


def leaf_tensors(tree: Tree) -> list[torch.Tensor]:
    """The tensor leaves of ``tree`` (``None`` leaves left out)."""
    return [t for t in leaves(tree).values() if t is not None]


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (NaN == NaN, 0.0 != -0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def assert_trees_bit_equal(x: Tree, y: Tree) -> None:
    """The same key paths, and at each the same dtype, shape and bits."""
    lx, ly = leaves(x), leaves(y)
    assert lx.keys() == ly.keys()
    for k in lx:
        assert bit_equal(lx[k], ly[k]), k


def saved_and_loaded(obj: Any) -> Any:
    """``obj`` through ``torch.save`` and ``torch.load(weights_only=True)``, as a checkpoint goes."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def functional_run(
    tx: GradientTransformation, params: Tree, grads_per_step: Iterable[Tree], state: Optional[OptState] = None
) -> tuple[Tree, OptState]:
    """The pure loop: ``tx.update`` then ``apply_updates`` for each step's gradients, from ``state``
    (``tx.init(params)`` when not given); returns the final ``(params, state)``."""
    if state is None:
        state = tx.init(params)
    for grads in grads_per_step:
        updates, state = tx.update(grads, state, params)
        params = sm3fn.apply_updates(params, updates)
    return params, state


def param_groups_with_references(
    specs: list[dict], shapes: Iterable[tuple[int, ...]], rng: np.random.Generator
) -> tuple[list[dict], list[torch.nn.Parameter], list[ReferenceSM3]]:
    """One float64 parameter group per hyperparameter dict in ``specs``, each with a parameter of
    every shape drawn from ``rng``, and a :class:`ReferenceSM3` per parameter with that group's
    hyperparameters; returns ``(groups, params, refs)``, params and refs in the same order."""
    groups, params, refs = [], [], []
    for spec in specs:
        group = []
        for shape in shapes:
            init = rng.standard_normal(shape)
            group.append(torch.nn.Parameter(torch.tensor(init, dtype=torch.float64)))
            refs.append(ReferenceSM3(init, **spec))
        groups.append({"params": group, **spec})
        params += group
    return groups, params, refs


def kernel_state(p: torch.Tensor, momentum: float) -> tuple[list[torch.Tensor], Optional[torch.Tensor]]:
    """Fresh accumulators (and a momentum buffer when ``momentum``) for ``p``, in the statistics
    dtype the fused kernels take: the parameter's for float32/float64, float32 otherwise."""
    stats = p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32
    accs = list(init_accumulators(p, stats))
    return accs, (torch.zeros_like(p, dtype=stats) if momentum else None)


def exact_in(x: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """``x`` clipped into ``dtype``'s finite range and rounded to it: what a kernel is given."""
    high = torch.finfo(dtype).max / 4
    return torch.tensor(np.clip(x, -high, high)).to(dtype).double().numpy()


def assert_kernel_matches_reference(p: torch.Tensor, accs: list[torch.Tensor], m: Optional[torch.Tensor],
                                    ref: ReferenceSM3, steps: int) -> None:
    """A kernel's parameter, accumulators and momentum after ``steps`` steps, against the float64
    reference: float32/float64 to their rounding; bfloat16/float16 parameters (float32 statistics)
    to one rounding of their own dtype per step."""
    dtype = p.dtype
    rtol, atol = (1e-10, 1e-12) if dtype == torch.float64 else (2e-5, 1e-6)
    if dtype in (torch.float32, torch.float64):
        np.testing.assert_allclose(p.double().numpy(), ref.p, rtol=rtol, atol=atol)
    else:  # one rounding to the parameter dtype per step
        bound = steps * torch.finfo(dtype).eps * max(1.0, np.abs(ref.p).max())
        np.testing.assert_allclose(p.double().numpy(), ref.p, rtol=0, atol=bound)
    for a, want in zip(accs, ref.acc):
        np.testing.assert_allclose(a.double().numpy().reshape(-1), want.reshape(-1), rtol=rtol, atol=0)
    if m is not None:
        np.testing.assert_allclose(m.double().numpy(), ref.m, rtol=rtol * 10, atol=atol)
