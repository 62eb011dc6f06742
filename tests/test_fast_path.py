"""The in-place fast path and the differentiable path agree to float rounding."""

import pytest
import torch

import sm3fn
from sm3fn._kernels.blocked import sm3_apply_

SHAPES = {"scalar": (), "vector": (300,), "matrix": (70, 33), "conv": (5, 4, 3, 2), "row": (1, 40)}


def _accumulators(state, key):
    entry = state["sm3", key]
    return [entry[f"accumulator_{i}"] for i in range(len(entry.keys()))]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 1e-5)])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("beta", [0.0, 0.5])
@pytest.mark.parametrize("block_elements", [64, 1 << 16])
def test_fast_path_matches_functional(dtype, tol, momentum, beta, block_elements):
    gen = torch.Generator().manual_seed(5)
    params = {k: torch.randn(s, dtype=dtype, generator=gen) for k, s in SHAPES.items()}
    tx = sm3fn.sm3(0.1, momentum=momentum, beta=beta)
    state = tx.init(params)
    fast_params = {k: v.clone() for k, v in params.items()}
    fast_state = state.clone()
    keys = list(SHAPES)
    for _ in range(4):
        grads = {
            k: torch.randn(s, dtype=dtype, generator=gen) * 10.0 ** torch.randint(-3, 3, (), generator=gen).item()
            for k, s in SHAPES.items()
        }
        grads["matrix"][3] = 0  # a row that sees no gradient
        grads_before = {k: g.clone() for k, g in grads.items()}
        updates, state = tx.update(grads, state, params)
        params = sm3fn.apply_updates(params, updates)
        sm3_apply_(
            [fast_params[k] for k in keys],
            [grads[k] for k in keys],
            [_accumulators(fast_state, k) for k in keys],
            [fast_state["momentum", k] if momentum else None for k in keys],
            lr=0.1, momentum=momentum, beta=beta, eps=1e-30, block_elements=block_elements,
        )
        for k in keys:
            assert torch.equal(grads[k], grads_before[k]), "the fast path must not write the gradients"
    for k in keys:
        torch.testing.assert_close(fast_params[k], params[k], rtol=tol, atol=tol)
        for a_fast, a in zip(_accumulators(fast_state, k), _accumulators(state, k)):
            torch.testing.assert_close(a_fast, a, rtol=tol, atol=0)


# --- sm3_update_: the in-place functional step -----------------------------------------------

import numpy as np  # noqa: E402

from reference import ReferenceSM3, random_gradient  # noqa: E402
from sm3fn.benchmark import step_peak_bytes  # noqa: E402


def _functional_run(tx, params, grads_seq):
    state = tx.init(params)
    for grads in grads_seq:
        updates, state = tx.update(grads, state, params)
        params = sm3fn.apply_updates(params, updates)
    return params, state


def _inplace_run(tx, params, grads_seq, **kw):
    kw.setdefault("fused", False)  # the blocked path; tests/test_fused.py runs the fused kernel
    params = {k: v.clone() for k, v in params.items()}
    state = tx.init(params)
    for grads in grads_seq:
        sm3fn.sm3_update_(params, grads, state, **kw)
    return params, state


def _random_grads(gen, shapes, dtype, steps, zero_row=True):
    out = []
    for _ in range(steps):
        grads = {}
        for k, s in shapes.items():
            scale = 10.0 ** torch.randint(-3, 3, (), generator=gen).item()
            g = torch.randn(s, generator=gen, dtype=torch.float32) * scale
            if zero_row and len(s) >= 2:
                g[torch.randint(s[0], (), generator=gen)] = 0  # a row with no gradient
            grads[k] = g.to(dtype)
        out.append(grads)
    return out


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("shape", [(), (9,), (6, 5), (4, 3, 2), (3, 37)], ids=str)
@pytest.mark.parametrize("momentum,beta", [(0.0, 0.0), (0.9, 0.5)])
def test_sm3_update_matches_float64_reference(shape, momentum, beta, fused):
    """sm3_update_ against the coordinate-loop reference: the blocked path (small blocks,
    so every path is crossed) and the fused kernel (rows of 37: full vectors and a tail)."""
    rng = np.random.default_rng(3)
    p0 = rng.standard_normal(shape)
    ref = ReferenceSM3(p0, lr=0.05, momentum=momentum, beta=beta)
    params = {"p": torch.tensor(p0)}
    state = sm3fn.sm3(0.05, momentum=momentum, beta=beta).init(params)
    for _ in range(5):
        g = random_gradient(rng, shape)
        ref.step(g)
        sm3fn.sm3_update_(params, {"p": torch.tensor(g)}, state, learning_rate=0.05,
                          momentum=momentum, beta=beta, block_elements=4, fused=fused)
    np.testing.assert_allclose(params["p"].numpy(), ref.p, rtol=1e-9, atol=1e-12)


# shapes that cross block boundaries in every way: rows that fill blocks exactly, leave a
# remainder, or are wider than a block; a 1-d tensor longer than a block; small 1-d/0-d
# tensors packed across several packs
ODD = {
    "exact": (7, 13), "tall": (31, 3), "wide": (2, 50), "cube": (4, 5, 6), "long": (130,),
    "s0": (), "s1": (1,), "s7": (7,), "s20": (20,), "s33": (33,), "col": (9, 1), "row": (1, 9),
}


@pytest.mark.parametrize("block_elements", [1, 13, 39, 40, 64, None])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_block_boundaries_match_functional(block_elements, momentum):
    gen = torch.Generator().manual_seed(11)
    params = {k: torch.randn(s, generator=gen) for k, s in ODD.items()}
    grads_seq = _random_grads(gen, ODD, torch.float32, 3)
    tx = sm3fn.sm3(0.1, momentum=momentum, beta=0.0)
    want, want_state = _functional_run(tx, params, grads_seq)
    got, got_state = _inplace_run(tx, params, grads_seq, learning_rate=0.1, momentum=momentum,
                                  block_elements=block_elements)
    for k in ODD:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    for (key, a), (key2, b) in zip(sorted(got_state.items(True, True)), sorted(want_state.items(True, True))):
        assert key == key2
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_low_precision_params_keep_float32_statistics(dtype, momentum):
    gen = torch.Generator().manual_seed(2)
    shapes = {"w": (33, 17), "b": (17,), "s": ()}
    params = {k: torch.randn(s, generator=gen).to(dtype) for k, s in shapes.items()}
    grads_seq = _random_grads(gen, shapes, dtype, 3)
    tx = sm3fn.sm3(0.01, momentum=momentum)
    want, want_state = _functional_run(tx, params, grads_seq)
    got, got_state = _inplace_run(tx, params, grads_seq, learning_rate=0.01, momentum=momentum,
                                  block_elements=64)
    for key, a in got_state.items(True, True):
        assert a.dtype == torch.float32
        # the functional path rounds u to the parameter dtype before momentum; the fast path
        # does not, so momentum buffers agree to that dtype's rounding
        if key[0] == "sm3":
            torch.testing.assert_close(a, want_state[key], rtol=1e-6, atol=1e-6)
        else:
            scale = want_state[key].abs().max().item()
            torch.testing.assert_close(a, want_state[key], rtol=1e-2, atol=1e-2 * scale)
    for k in shapes:
        assert got[k].dtype == dtype
        # one rounding of the parameter dtype apart
        torch.testing.assert_close(got[k], want[k])


@pytest.mark.parametrize("eps", [1e-30, 0.0])
def test_zero_and_nonfinite_gradients_match_functional(eps):
    """nu == 0 (zero gradient, fresh state) gives an exactly zero step, eps = 0 included; a
    NaN gradient takes the masked path, as the differentiable one does."""
    gen = torch.Generator().manual_seed(4)
    params = {"w": torch.randn(6, 5, generator=gen), "b": torch.randn(5, generator=gen)}
    g1 = {"w": torch.randn(6, 5, generator=gen), "b": torch.zeros(5)}
    g1["w"][2] = 0
    g2 = {"w": torch.randn(6, 5, generator=gen), "b": torch.randn(5, generator=gen)}
    g2["w"][1, 3] = float("nan")
    tx = sm3fn.sm3(0.1, eps=eps)
    got, got_state = _inplace_run(tx, params, [g1], learning_rate=0.1, eps=eps)
    assert torch.equal(got["w"][2], params["w"][2]) and torch.equal(got["b"], params["b"])
    want, want_state = _functional_run(tx, params, [g1, g2])
    got, got_state = _inplace_run(tx, params, [g1, g2], learning_rate=0.1, eps=eps)
    torch.testing.assert_close(got["w"], want["w"], equal_nan=True)
    torch.testing.assert_close(got["b"], want["b"], equal_nan=True)
    for key, a in got_state.items(True, True):
        torch.testing.assert_close(a, want_state[key], equal_nan=True)


def test_sm3_update_schedule_frozen_and_nested():
    gen = torch.Generator().manual_seed(6)
    params = {"enc": {"w": torch.randn(8, 4, generator=gen)}, "head": torch.randn(4, generator=gen)}
    schedule = lambda count: 0.1 / (1.0 + count)  # noqa: E731
    tx = sm3fn.sm3(schedule, momentum=0.5)
    state = tx.init(params)
    fast = {"enc": {"w": params["enc"]["w"].clone()}, "head": params["head"].clone()}
    fast_state = state.clone()
    for _ in range(3):
        grads = {"enc": {"w": torch.randn(8, 4, generator=gen)}, "head": None}  # head frozen
        updates, state = tx.update(grads, state, params)
        params = sm3fn.apply_updates(params, updates)
        sm3fn.sm3_update_(fast, grads, fast_state, learning_rate=schedule, momentum=0.5)
    assert int(fast_state["learning_rate", "count"]) == 3
    torch.testing.assert_close(fast["enc"]["w"], params["enc"]["w"])
    torch.testing.assert_close(fast["head"], params["head"])
    for key, a in fast_state.items(True, True):
        torch.testing.assert_close(a, state[key])


def test_sm3_update_rejects_bad_input_before_writing():
    params = {"w": torch.randn(4, 3), "b": torch.randn(3)}
    tx = sm3fn.sm3(0.1, momentum=0.9)
    state = tx.init(params)
    before_p = {k: v.clone() for k, v in params.items()}
    before_s = state.clone()
    good = {"w": torch.randn(4, 3), "b": torch.randn(3)}
    cases = [
        ({"w": good["w"], "b": good["b"], "x": torch.randn(2)}, {}, ValueError, "'x'"),
        ({"w": good["w"]}, {}, ValueError, "'b'"),
        ({"w": torch.randn(3, 4), "b": good["b"]}, {}, ValueError, "'w'"),
        (good, {"momentum": 0.0}, ValueError, "momentum"),
        (good, {"block_elements": 0}, ValueError, "block_elements"),
        (good, {"learning_rate": -1.0}, ValueError, "learning_rate"),
        (good, {"learning_rate": torch.tensor(0.1, requires_grad=True)}, ValueError, "learning_rate"),
    ]
    for grads, kw, exc, match in cases:
        kw = {"momentum": 0.9, **kw}
        with pytest.raises(exc, match=match):
            sm3fn.sm3_update_(params, grads, state, **kw)
        for k in params:
            assert torch.equal(params[k], before_p[k])
        for key, a in state.items(True, True):
            assert torch.equal(a, before_s[key])


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype,momentum", [(torch.float32, 0.0), (torch.float32, 0.9), (torch.bfloat16, 0.9)])
def test_step_allocates_no_parameter_sized_memory(dtype, momentum, fused):
    """The allocator's peak during a fast step stays near the block scratch, far below one
    parameter (the fused kernel's running maxima are not tensors: its peak is the blocked
    path's or less); the differentiable step, measured the same way, allocates several (so
    the measurement itself can see a full-size temporary)."""
    gen = torch.Generator().manual_seed(8)
    # "wide": rows longer than a block, so blocks split dim 1
    shapes = {"big": (4096, 256), "bias": (256,), "cube": (16, 32, 64), "wide": (2, 3, 8192)}
    params = {k: torch.randn(s, generator=gen).to(dtype) for k, s in shapes.items()}
    grads = {k: torch.randn(s, generator=gen).to(dtype) for k, s in shapes.items()}
    tx = sm3fn.sm3(0.1, momentum=momentum)
    state = tx.init(params)
    block = 4096
    sm3fn.sm3_update_(params, grads, state, learning_rate=0.1, momentum=momentum, block_elements=block,
                      fused=fused)
    peak = step_peak_bytes(lambda: sm3fn.sm3_update_(
        params, grads, state, learning_rate=0.1, momentum=momentum, block_elements=block, fused=fused))
    big_bytes = params["big"].numel() * params["big"].element_size()
    # scratch: a few float32 buffers of one block, plus running maxima (at most the
    # accumulators' size, SM3's own few numbers per parameter) and a little slack
    acc_bytes = sum(a.numel() * a.element_size() for a in state["sm3"].values(True, True))
    assert peak <= 6 * block * 4 + acc_bytes + 4096, (peak, acc_bytes)
    assert peak < 0.2 * big_bytes
    functional_peak = step_peak_bytes(lambda: tx.update(grads, state, params))
    assert functional_peak > big_bytes


@pytest.mark.slow
def test_compiled_fast_path_matches_functional():
    """compiled=True runs the same block step through torch.compile (inductor)."""
    gen = torch.Generator().manual_seed(9)
    # "wide": rows longer than a block (the split moves to dim 1)
    shapes = {"w": (37, 29), "b": (29,), "s": (), "long": (300,), "wide": (2, 300)}
    params = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    grads_seq = _random_grads(gen, shapes, torch.float32, 3)
    tx = sm3fn.sm3(0.1, momentum=0.9)
    want, want_state = _functional_run(tx, params, grads_seq)
    got, got_state = _inplace_run(tx, params, grads_seq, learning_rate=0.1, momentum=0.9,
                                  compiled=True, block_elements=256)
    for k in shapes:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    for key, a in got_state.items(True, True):
        torch.testing.assert_close(a, want_state[key], rtol=1e-5, atol=1e-7)


def test_sm3_update_on_module_parameters():
    """params from TensorDict.from_module: the module's own parameters move, as tx.update says."""
    from tensordict import TensorDict

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    params = TensorDict.from_module(model)
    tx = sm3fn.sm3(0.1, momentum=0.9)
    state = tx.init(params.detach())
    want_params, want_state = params.detach().clone(), state.clone()
    for _ in range(2):
        model.zero_grad()
        model(torch.randn(8, 6)).square().mean().backward()
        grads = TensorDict.from_module(model).apply(lambda p: p.grad)
        updates, want_state = tx.update(grads, want_state, want_params)
        want_params = sm3fn.apply_updates(want_params, updates)
        sm3fn.sm3_update_(params, grads, state, learning_rate=0.1, momentum=0.9)
    for key, p in TensorDict.from_module(model).items(True, True):
        torch.testing.assert_close(p.detach(), want_params[key])
    for key, a in state.items(True, True):
        torch.testing.assert_close(a, want_state[key])


def test_strided_parameters_are_updated_in_place():
    """Views with strides (a column of a matrix, a transposed matrix) move where they live."""
    gen = torch.Generator().manual_seed(12)
    base = torch.randn(9, 7, generator=gen)
    base_t = torch.randn(6, 11, generator=gen)
    params = {"col": base[:, 2], "t": base_t.t()}
    grads_seq = _random_grads(gen, {"col": (9,), "t": (11, 6)}, torch.float32, 3)
    tx = sm3fn.sm3(0.1, momentum=0.9)
    want, want_state = _functional_run(tx, {k: v.clone() for k, v in params.items()}, grads_seq)
    state = tx.init(params)
    for grads in grads_seq:
        sm3fn.sm3_update_(params, grads, state, learning_rate=0.1, momentum=0.9, block_elements=16)
    torch.testing.assert_close(base[:, 2], want["col"])
    torch.testing.assert_close(base_t.t(), want["t"])
    for key, a in state.items(True, True):
        torch.testing.assert_close(a, want_state[key])
