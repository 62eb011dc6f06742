"""Any rank, any dense layout through the fused CPU kernel (sm3fn/_kernels/layout.py).

Every tensor of 2+ dims is swept as a 2-D row problem in its memory order,
the trailing (or leading) dims folded into a table of accumulator minima.
Held to the float64 coordinate-loop reference (tests/reference.py), to the
blocked path (accumulators bit for bit, on every split, with NaN and
saturation), and to itself across thread counts.
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from helpers import exact_in as _exact
from helpers import kernel_state as _state
from reference import ReferenceSM3, random_gradient

from sm3fn._kernels import fused_cpu as _fused
from sm3fn._kernels import layout, sm3_step_


def laid_out(x: torch.Tensor, order) -> torch.Tensor:
    """``x``'s values in memory order ``order`` (outermost first): a permutation of a contiguous tensor."""
    return x.permute(order).contiguous().permute(list(np.argsort(order)))


def _like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t``'s values laid out in memory as ``like``."""
    return torch.empty_like(like, dtype=t.dtype).copy_(t)


CL4, CL5 = [0, 2, 3, 1], [0, 2, 3, 4, 1]  # channels_last, channels_last_3d
#: (shape, memory order): conv weights 7x7/3x3/1x1, depthwise, Conv1d, 3-D/5-D, odd permutations
CASES = [
    ((5, 7), [0, 1]), ((5, 7), [1, 0]),
    ((6, 4, 3), [0, 1, 2]), ((6, 4, 3), [2, 0, 1]),
    ((8, 3, 7, 7), [0, 1, 2, 3]), ((8, 3, 7, 7), CL4),
    ((6, 5, 3, 3), [0, 1, 2, 3]), ((6, 5, 3, 3), CL4), ((6, 5, 3, 3), [3, 1, 0, 2]),
    ((9, 4, 1, 1), [0, 1, 2, 3]), ((9, 4, 1, 1), CL4),
    ((7, 1, 3, 3), [0, 1, 2, 3]), ((7, 1, 3, 3), CL4),
    ((4, 3, 2, 3, 2), [0, 1, 2, 3, 4]), ((4, 3, 2, 3, 2), CL5), ((4, 3, 2, 3, 2), [4, 2, 0, 3, 1]),
]
_ids = [f"{s}-{''.join(map(str, o))}" for s, o in CASES]


def test_memory_formats_are_read_as_permutations():
    w = torch.randn(8, 4, 3, 3)
    assert layout.physical_order(w) == [0, 1, 2, 3]
    assert layout.physical_order(w.contiguous(memory_format=torch.channels_last)) == CL4
    assert layout.physical_order(torch.randn(2, 3, 4, 5, 6).contiguous(memory_format=torch.channels_last_3d)) == CL5
    assert layout.physical_order(w.transpose(1, 3)) == [0, 3, 2, 1]
    assert layout.physical_order(w[:, ::2]) is None  # gaps: not dense
    assert layout.physical_order(torch.randn(4, 1).expand(4, 5)) is None  # overlapping


@pytest.mark.parametrize("shape,order", CASES, ids=_ids)
def test_views_not_copies_and_tables_smaller_than_the_parameter(shape, order):
    p = laid_out(torch.randn(shape), order)
    m = torch.zeros_like(p)
    accs, _ = _state(p, 0)
    problem = layout.row_problem([p, p.clone(memory_format=torch.preserve_format), m], accs)
    p2, _, m2 = problem.views
    assert p2.data_ptr() == p.data_ptr() and m2.data_ptr() == m.data_ptr()
    assert p2.is_contiguous() and p2.shape == (problem.row_acc.numel(), problem.col_acc.numel())
    assert problem.row_acc.numel() + problem.col_acc.numel() < p.numel()


def test_chosen_splits():
    # conv weights: rows of in*kh*kw (channels_last: kh*kw*in); a tall 3-D tensor: rows of 512
    assert layout.choose_split([512, 256, 3, 3]) == 1
    assert layout.choose_split([64, 7, 7, 3]) == 1
    assert layout.choose_split([2048, 512, 1, 1]) == 1
    assert layout.choose_split([4, 512, 512]) == 2
    assert layout.choose_split([2, 3, 8192]) == 2  # not a column table of half the parameter
    # fewer rows than threads leave threads idle
    assert layout.split_cost([2, 4096], 1, threads=8) == layout.split_cost([2, 4096], 1, threads=2)
    assert layout.split_cost([64, 4096], 1, threads=8) < layout.split_cost([64, 4096], 1, threads=2)


@pytest.mark.parametrize("shape", [(2, 3, 8192), (4, 512, 512), (64, 32, 7, 7), (16, 16, 16, 16, 16),
                                   (2048, 512, 1, 1), (8, 64, 64, 64), (300, 2, 5)], ids=str)
def test_tables_are_a_small_share_of_the_parameter(shape):
    for order in ([0, 1, 2, 3, 4][:len(shape)], list(range(len(shape)))[::-1]):
        p = laid_out(torch.zeros(shape), order)
        accs = _state(p, 0)[0]
        problem = layout.row_problem([p, p], accs)
        owned = {a.untyped_storage().data_ptr() for a in accs}
        tables = [a for a in (problem.row_acc, problem.col_acc) if a.untyped_storage().data_ptr() not in owned]
        assert tables or len(shape) == 2  # these shapes need one (but a 2-D one)
        tables = sum(a.numel() for a in tables)
        assert tables <= max(p.numel() // 8, layout.TABLE_SMALL)


def test_a_tensor_with_no_small_split_takes_the_blocked_path():
    """(2, 100000, 2): any split needs a table of half the parameter; the blocked path steps it."""
    shape = (2, 100000, 2)
    assert layout.choose_split(list(shape)) is None
    p = torch.zeros(shape)
    assert not _fused.supported(p, p, _state(p, 0)[0], None)
    _assert_same(*_step_both(shape, [0, 1, 2], 0.0, 0.0, torch.float32, steps=2, first=None), torch.float32, 0.0)


@pytest.mark.parametrize("shape,order", CASES, ids=_ids)
@pytest.mark.parametrize("momentum,beta", [(0.0, 0.0), (0.9, 0.0), (0.3, 0.5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_float64_reference(shape, order, momentum, beta, dtype):
    """Four steps of random gradients (zero slices included) against the float64 reference."""
    steps = 4
    rng = np.random.default_rng(abs(hash((shape, tuple(order), momentum, beta))) % 2**32)
    p0 = _exact(rng.standard_normal(shape), dtype)
    ref = ReferenceSM3(p0, lr=0.07, momentum=momentum, beta=beta)
    p = laid_out(torch.tensor(p0).to(dtype), order)
    accs, m = _state(p, momentum)
    grads = [laid_out(torch.tensor(_exact(random_gradient(rng, shape) * 10.0 ** rng.integers(-3, 3), dtype)).to(dtype),
                      order) for _ in range(steps)]
    assert _fused.supported(p, grads[0], accs, m)  # the fused kernel really takes it
    strides = p.stride()
    for g in grads:
        ref.step(g.double().numpy())
        sm3_step_([p], [g], [accs], [m], lr=0.07, momentum=momentum, beta=beta, eps=1e-30, fused=True)
    assert p.stride() == strides  # stepped in place, in its own layout
    if dtype == torch.float32:
        np.testing.assert_allclose(p.double().numpy(), ref.p, rtol=2e-5, atol=1e-6)
    else:
        bound = steps * torch.finfo(dtype).eps * max(1.0, np.abs(ref.p).max())
        np.testing.assert_allclose(p.double().numpy(), ref.p, rtol=0, atol=bound)
    for a, want in zip(accs, ref.acc):
        np.testing.assert_allclose(a.double().numpy().reshape(-1), want.reshape(-1), rtol=2e-5, atol=0)
    if momentum:
        np.testing.assert_allclose(m.double().numpy(), ref.m, rtol=2e-4, atol=1e-6)


_row_problem = layout.row_problem


def _forced_split(split):
    """The fused kernel's tensors presented with rows ``shape[:split]`` (None: the chosen split)."""
    return mock.patch.object(layout, "row_problem", lambda *a, **k: _row_problem(*a, **k, split=split))


def _step_both(shape, order, momentum, beta, dtype, steps=3, seed=0, nonfinite=False, split=None, first=True):
    """The same steps through the fused kernel (split forced if given) and the blocked path.

    ``first``: the ``fused`` choice of the first run (``None`` for a tensor the kernel does not
    cover: ``fused=True`` would refuse it)."""
    out = []
    for fused in (first, False):
        gen = torch.Generator().manual_seed(seed)
        p = laid_out(torch.randn(shape, generator=gen).to(dtype), order)
        accs, m = _state(p, momentum)
        for step in range(steps):
            g = torch.randn(shape, generator=gen) * 10.0 ** (step - 1)
            g[torch.randint(shape[0], (), generator=gen)] = 0  # a slice with no gradient
            if nonfinite and step == steps - 1:  # last: the next step would spread the NaN everywhere
                g.view(-1)[3] = float("nan")
                g.view(-1)[-2] = 1e20 if dtype == torch.float32 else 6e4  # g*g overflows float32 / saturates
            g = laid_out(g.to(dtype), order)
            with _forced_split(split):
                sm3_step_([p], [g], [accs], [m], lr=0.05, momentum=momentum, beta=beta, eps=1e-30, fused=fused)
        out.append((p, accs, m))
    return out


def _assert_same(fused, blocked, dtype, beta):
    (fp, fa, fm), (bp, ba, bm) = fused, blocked
    for a, b in zip(fa, ba):  # bit for bit: nu has no square root in it
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    u_max = 1 / np.sqrt(1 - beta)
    if fm is not None:
        torch.testing.assert_close(fm, bm, rtol=0, atol=4 * torch.finfo(torch.float32).eps * u_max, equal_nan=True)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(fp.float(), bp.float(), rtol=2 * eps, atol=2 * eps, equal_nan=True)
    assert fp.stride() == bp.stride()  # the layout is kept


@pytest.mark.parametrize("shape,order", CASES, ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_accumulators_bit_for_bit_with_the_blocked_path(shape, order, dtype):
    _assert_same(*_step_both(shape, order, 0.9, 0.0, dtype), dtype, 0.0)


@pytest.mark.parametrize("shape,order", [((6, 5, 3, 3), CL4), ((4, 3, 2, 3, 2), [4, 2, 0, 3, 1]), ((5, 4, 6), [1, 2, 0])],
                         ids=str)
def test_every_split_gives_the_same_bits(shape, order):
    for split in range(1, len(shape)):
        _assert_same(*_step_both(shape, order, 0.0, 0.5, torch.float32, split=split), torch.float32, 0.5)


@pytest.mark.parametrize("shape,order", [((6, 5, 3, 3), CL4), ((9, 4, 1, 1), [0, 1, 2, 3]), ((4, 3, 2, 3, 2), CL5)],
                         ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_and_saturation_as_in_the_blocked_path(shape, order, dtype):
    (fp, fa, fm), blocked = _step_both(shape, order, 0.0, 0.0, dtype, nonfinite=True)
    assert any(torch.isnan(a).any() for a in fa)
    if dtype == torch.float32:
        assert any((a == torch.finfo(torch.float32).max).any() for a in fa)
    _assert_same((fp, fa, fm), blocked, dtype, 0.0)


def test_threads_give_identical_numbers_on_tables():
    """A channels_last conv weight above the thread-team size, with tables: one thread's bits."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _step_both((64, 32, 7, 7), CL4, 0.9, 0.0, torch.float32, steps=2)[0]
        torch.set_num_threads(3)
        three = _step_both((64, 32, 7, 7), CL4, 0.9, 0.0, torch.float32, steps=2)[0]
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], three[0]) and torch.equal(one[2], three[2])
    assert all(torch.equal(a, b) for a, b in zip(one[1], three[1]))


@pytest.mark.parametrize("which", ["grad", "momentum"])
def test_a_gradient_or_buffer_in_another_layout_takes_the_blocked_path(which):
    """The kernel sweeps p, g and m in one memory order; a tensor in another would need a
    parameter-sized copy, so the blocked path (any strides) steps it (fused=None; fused=True
    refuses it), with the same numbers."""
    shape = (6, 5, 3, 3)
    got = []
    for fused in (None, False):
        gen = torch.Generator().manual_seed(4)
        p = laid_out(torch.randn(shape, generator=gen), CL4)
        accs, m = _state(p, 0.9)
        g = torch.randn(shape, generator=gen)  # contiguous
        if which == "grad":
            m = _like(m, p)
        else:
            g, m = _like(g, p), m.contiguous()
        assert not _fused.supported(p, g, accs, m) and layout.row_problem([p, g, m], accs) is None
        sm3_step_([p], [g], [accs], [m], lr=0.05, momentum=0.9, beta=0.0, eps=1e-30, fused=fused)
        got.append((p, accs, m))
    for x, y in zip(got[0][1] + [got[0][0], got[0][2]], got[1][1] + [got[1][0], got[1][2]]):
        assert torch.equal(x, y)


def test_a_channels_last_model_trains_the_same_through_both_paths():
    """sm3fn.optim.SM3 on a channels_last conv net: fused and blocked agree to rounding."""
    import copy

    from sm3fn.optim import SM3

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
    base = base.to(memory_format=torch.channels_last)
    models = {f: copy.deepcopy(base) for f in (True, False)}
    opts = {f: SM3(m.parameters(), lr=0.05, momentum=0.9, fused=f) for f, m in models.items()}
    assert models[True][0].weight.is_contiguous(memory_format=torch.channels_last)
    for _ in range(4):
        x = torch.randn(5, 3, 8, 8).contiguous(memory_format=torch.channels_last)
        for f, m in models.items():
            opts[f].zero_grad()
            m(x).square().mean().backward()
            opts[f].step()
    w = models[True][0].weight
    assert _fused.supported(w, w.grad, [opts[True].state[w][f"accumulator_{i}"] for i in range(4)],
                            opts[True].state[w]["momentum_buffer"])
    for a, b in zip(models[True].parameters(), models[False].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape,order", [((6, 5, 3, 3), CL4), ((9, 4, 1, 1), [0, 1, 2, 3]),
                                         ((4, 3, 2, 3, 2), CL5), ((5, 7), [1, 0])], ids=str)
@pytest.mark.parametrize("lr,momentum", [(None, None), (0.05, 0.9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pure_step_through_the_layout(shape, order, lr, momentum, dtype):
    """The out-of-place kernel (sm3fn.sm3 / scale_by_sm3's update) on a permuted layout: inputs
    untouched, accumulators bit for bit with the reference math, updates to rounding, and
    the update in the gradient's layout."""
    from sm3fn._kernels import sm3_step

    gen = torch.Generator().manual_seed(11)
    g = laid_out(torch.randn(shape, generator=gen).to(dtype), order)
    accs, m = _state(g, momentum)
    accs = [torch.rand(a.shape, generator=gen) for a in accs]  # random old accumulators
    if m is not None:
        m = _like(torch.randn(shape, generator=gen), g)
    before = [t.clone() for t in [g, *accs] + ([m] if m is not None else [])]
    assert _fused.supported(None, g, accs, m)
    got = [sm3_step([g], [accs], None if m is None else [m], beta=0.0, eps=1e-30, momentum=momentum, lr=lr,
                    fused=fused) for fused in (True, False)]
    for t, b in zip([g, *accs] + ([m] if m is not None else []), before):
        assert torch.equal(t, b)
    (fu, fa, fm), (bu, ba, bm) = got
    for a, b in zip(fa[0], ba[0]):
        assert torch.equal(a, b)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(fu[0].float(), bu[0].float(), rtol=4 * eps, atol=4 * eps * (lr or 1))
    assert fu[0].stride() == g.stride()
    if m is not None:
        torch.testing.assert_close(fm[0], bm[0], rtol=0, atol=4 * torch.finfo(torch.float32).eps)


def test_views_into_a_flat_buffer_step_in_place_and_leave_the_rest_alone():
    """Parameters that are dense views at an offset into one flat buffer (flat-parameter
    schemes): the sweep starts at each view's own first element and writes nothing else."""
    got = []
    for fused in (True, False):
        gen = torch.Generator().manual_seed(12)
        flat = torch.randn(1000, generator=gen)
        w = flat[7:7 + 6 * 5 * 3 * 3].view(6, 3, 3, 5).permute(0, 3, 1, 2)  # channels_last, offset 7
        v = flat[400:400 + 4 * 9].view(9, 4).t()  # transposed, offset 400
        before = flat.clone()
        for p in (w, v):
            accs, m = _state(p, 0.9)
            g = _like(torch.randn(p.shape, generator=gen), p)
            if fused:
                assert _fused.supported(p, g, accs, m)
            sm3_step_([p], [g], [accs], [m], lr=0.05, momentum=0.9, beta=0.0, eps=1e-30, fused=fused)
        touched = torch.zeros(1000, dtype=torch.bool)
        touched[7:7 + 270] = True
        touched[400:436] = True
        assert torch.equal(flat[~touched], before[~touched]) and not torch.equal(flat[touched], before[touched])
        got.append(flat)
    torch.testing.assert_close(got[0], got[1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape,order", [((9, 4, 1, 1), [0, 1, 2, 3]), ((9, 4, 1, 1), CL4), ((5, 1, 3, 3), CL4),
                                         ((5, 1, 3, 3), [0, 1, 2, 3]), ((3, 1, 1, 4, 1), [0, 1, 2, 3, 4]),
                                         ((1, 1, 6, 1), [0, 1, 2, 3])], ids=str)
def test_groups_with_size_one_dims_match_the_blocked_path_from_any_accumulators(shape, order):
    """A table's dims of size 1 are reduced back with one max over the whole table; that must give
    the blocked path's bits for accumulators no step could have made (a size-1 dim's accumulator
    below or above the others, as a hand-edited checkpoint may hold), in place and out of place,
    on every split."""
    from sm3fn._kernels.dispatch import sm3_step

    k = len(shape)
    for split in range(1, k):
        gen = torch.Generator().manual_seed(split)
        p0 = laid_out(torch.randn(shape, generator=gen), order)
        g = laid_out(torch.randn(shape, generator=gen), order)
        # random, inconsistent: each accumulator drawn on its own, some entries zero
        accs0 = [torch.rand([n if j == i else 1 for j, n in enumerate(shape)], generator=gen) * 3
                 for i in range(k)]
        accs0[0].view(-1)[0] = 0.0
        results = []
        for fused in (True, False):
            p, accs = p0.clone(memory_format=torch.preserve_format), [a.clone() for a in accs0]
            with _forced_split(split):
                sm3_step_([p], [g], [accs], [None], lr=0.05, momentum=0.0, beta=0.0, eps=1e-30, fused=fused)
                u, new_accs, _ = sm3_step([g], [accs0], beta=0.0, eps=1e-30, fused=fused)
            results.append((p, accs, u[0], new_accs[0]))
        (fp, fa, fu, fna), (bp, ba, bu, bna) = results
        for a, b in zip(fa + fna, ba + bna):
            assert torch.equal(a, b), (shape, order, split)
        # u and p round a square root and a division: within float32's rounding, as _assert_same
        eps = torch.finfo(torch.float32).eps
        torch.testing.assert_close(fu, bu, rtol=2 * eps, atol=0)
        torch.testing.assert_close(fp, bp, rtol=2 * eps, atol=2 * eps)
