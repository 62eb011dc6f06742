"""The blocked in-place kernel (``sm3fn._kernels.blocked``) and the in-place entry points that run it
(``sm3_update_``, ``sm3fn.optim.SM3``) agree with the differentiable path to float rounding and with
the float64 reference; its shortcuts keep the reference's numbers:

* ``nu > 0`` is decided from the accumulators (no mask, no per-block ``amin``);
  where some accumulator is 0 or ``beta * a`` underflows, the masked path runs;
* without momentum the division is folded into ``p.addcdiv_``;
* ``sm3fn.optim.SM3(compiled=True)``;
* tensors with a zero-size dimension (nothing to update) in every path.
"""

import numpy as np
import pytest
import torch
from helpers import functional_run
from reference import ReferenceSM3, random_gradient

import sm3fn
from sm3fn._kernels.blocked import sm3_apply_
from sm3fn.benchmark import step_peak_bytes
from sm3fn.optim import SM3

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



def _inplace_run(tx, params, grads_seq, **kw):
    kw.setdefault("fused", False)  # the blocked path; tests/test_kernels_fused_cpu.py runs the fused kernel
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
    want, want_state = functional_run(tx, params, grads_seq)
    got, got_state = _inplace_run(tx, params, grads_seq, learning_rate=0.1, momentum=momentum,
                                  block_elements=block_elements)
    for k in ODD:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    for (key, a), (key2, b) in zip(sorted(got_state.items(True, True)), sorted(want_state.items(True, True))):
        assert key == key2
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sm3_update_low_precision_matches_functional(dtype, momentum):
    """bf16/fp16 parameters: the in-place step keeps float32 statistics and the functional numbers."""
    gen = torch.Generator().manual_seed(2)
    shapes = {"w": (33, 17), "b": (17,), "s": ()}
    params = {k: torch.randn(s, generator=gen).to(dtype) for k, s in shapes.items()}
    grads_seq = _random_grads(gen, shapes, dtype, 3)
    tx = sm3fn.sm3(0.01, momentum=momentum)
    want, want_state = functional_run(tx, params, grads_seq)
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
    want, want_state = functional_run(tx, params, [g1, g2])
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
    want, want_state = functional_run(tx, params, grads_seq)
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
    want, want_state = functional_run(tx, {k: v.clone() for k, v in params.items()}, grads_seq)
    state = tx.init(params)
    for grads in grads_seq:
        sm3fn.sm3_update_(params, grads, state, learning_rate=0.1, momentum=0.9, block_elements=16)
    torch.testing.assert_close(base[:, 2], want["col"])
    torch.testing.assert_close(base_t.t(), want["t"])
    for key, a in state.items(True, True):
        torch.testing.assert_close(a, want_state[key])


# --- The shortcuts against the float64 reference; compiled=True; zero-size parameters

REFERENCE_SHAPES = {"matrix": (23, 17), "conv": (4, 3, 5), "vector": (40,), "scalar": ()}


def _run_optim(shapes, steps, seed, **kwargs):
    """sm3fn.optim.SM3 and one ReferenceSM3 per parameter, on the same random gradients."""
    rng = np.random.default_rng(seed)
    init = {k: rng.standard_normal(s) for k, s in shapes.items()}
    params = {k: torch.nn.Parameter(torch.tensor(v, dtype=torch.float64)) for k, v in init.items()}
    refs = {k: ReferenceSM3(v, lr=kwargs.get("lr", 0.1), momentum=kwargs.get("momentum", 0.0),
                            beta=kwargs.get("beta", 0.0)) for k, v in init.items()}
    opt = SM3(list(params.values()), **kwargs)
    for _ in range(steps):
        for k, s in shapes.items():
            g = random_gradient(rng, s)
            params[k].grad = torch.tensor(g)
            refs[k].step(g)
        opt.step()
    return params, refs, opt


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_optim_matches_reference_with_zero_rows(momentum, beta):
    """Zero slices keep some accumulators at 0 (masked path) while the rest are > 0 (shortcut)."""
    params, refs, _ = _run_optim(REFERENCE_SHAPES, 4, seed=11, lr=0.1, momentum=momentum, beta=beta)
    for k, ref in refs.items():
        np.testing.assert_allclose(params[k].detach().numpy(), ref.p, rtol=1e-10, atol=1e-12)


def test_underflowing_beta_times_accumulator_takes_the_masked_path():
    """``beta * a`` can round to 0 for a tiny ``a``; a zero gradient there must be a zero step, not NaN."""
    tiny = torch.finfo(torch.float32).tiny * 2.0**-20  # a subnormal float32
    p = torch.randn(6, 5, generator=torch.Generator().manual_seed(3))
    before = p.clone()
    accs = [torch.full((6, 1), tiny), torch.full((1, 5), tiny)]
    grads = torch.zeros(6, 5)
    grads[0, 0] = 1.5
    from sm3fn._kernels.blocked import sm3_apply_

    sm3_apply_([p], [grads], [accs], [None], lr=0.1, momentum=0.0, beta=2.0**-10, eps=0.0)
    assert torch.isfinite(p).all()
    assert torch.equal(p.view(-1)[1:], before.view(-1)[1:])  # beta * tiny == 0: nu == 0, zero step
    # nu = beta * tiny + (1 - beta) * g^2 at (0, 0); in float64
    nu = (1 - 2.0**-10) * 1.5**2
    torch.testing.assert_close(p[0, 0].double(), before[0, 0].double() - 0.1 * 1.5 / nu**0.5)


def test_compiled_flag_is_checked_and_pickled():
    import pickle

    with pytest.raises(TypeError, match="compiled"):
        SM3([torch.nn.Parameter(torch.zeros(2))], compiled=1)
    for flag in (True, False):
        opt = SM3([torch.nn.Parameter(torch.zeros(2))], compiled=flag)
        assert pickle.loads(pickle.dumps(opt)).compiled is flag


@pytest.mark.slow
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_optim_compiled_matches_reference(momentum):
    """compiled=True: the same blocks through torch.compile, to float rounding (float32)."""
    shapes = {"matrix": (23, 17), "vector": (40,), "conv": (3, 4, 5)}
    rng = np.random.default_rng(5)
    init = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    params = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in init.items()}
    refs = {k: ReferenceSM3(v, lr=0.05, momentum=momentum) for k, v in init.items()}
    opt = SM3(list(params.values()), lr=0.05, momentum=momentum, compiled=True)
    for _ in range(3):
        for k, s in shapes.items():
            g = random_gradient(rng, s).astype(np.float32)
            params[k].grad = torch.tensor(g)
            refs[k].step(g.astype(np.float64))
        opt.step()
    for k, ref in refs.items():
        np.testing.assert_allclose(params[k].detach().numpy(), ref.p, rtol=1e-5, atol=1e-6)
        accs = [opt.state[params[k]][f"accumulator_{i}"].reshape(-1).numpy() for i in range(len(ref.acc))]
        for got, want in zip(accs, ref.acc):
            np.testing.assert_allclose(got, want.reshape(-1), rtol=1e-5)


EMPTY = {"rows": (0, 3), "cols": (4, 0), "vec": (0,), "mid": (2, 0, 3)}


def test_zero_size_parameters_functional():
    """A parameter with no elements: an empty update and its state unchanged, next to a normal one."""
    rng = np.random.default_rng(2)
    shapes = {**EMPTY, "w": (5, 4)}
    params = {k: torch.tensor(rng.standard_normal(s)) for k, s in shapes.items()}
    # scale_by_sm3's update is u; sm3(0.1, momentum=0.9)'s first is -0.1 * (1 - 0.9) * u
    for tx, scale in ((sm3fn.scale_by_sm3(), 1.0), (sm3fn.sm3(0.1, momentum=0.9), -0.01)):
        state = tx.init(params)
        before = state.clone()
        g_w = random_gradient(rng, (5, 4))
        grads = {k: torch.tensor(rng.standard_normal(s)) for k, s in EMPTY.items()}
        grads["w"] = torch.tensor(g_w)
        updates, new_state = tx.update(grads, state, params)
        for k, s in EMPTY.items():
            assert updates[k].shape == s
        for key, a in new_state.items(True, True):
            if "w" not in key:
                assert torch.equal(a, before[key]), key
        u = ReferenceSM3(np.zeros((5, 4))).step(g_w)
        np.testing.assert_allclose(updates["w"].numpy(), scale * u, rtol=1e-12, atol=1e-300)


def test_zero_size_parameters_in_place():
    """sm3_update_ and sm3fn.optim.SM3 skip parameters with no elements (and step the others)."""
    rng = np.random.default_rng(4)
    shapes = {**EMPTY, "w": (5, 4)}
    params = {k: torch.tensor(rng.standard_normal(s)) for k, s in shapes.items()}
    grads = {k: torch.tensor(random_gradient(rng, s, zero_slices=False)) for k, s in shapes.items()}
    ref = ReferenceSM3(params["w"].numpy(), lr=0.1)
    ref.step(grads["w"].numpy())
    tx = sm3fn.sm3(0.1)
    state = tx.init(params)
    before = state.clone()
    fast = {k: v.clone() for k, v in params.items()}
    sm3fn.sm3_update_(fast, grads, state, learning_rate=0.1)
    np.testing.assert_allclose(fast["w"].numpy(), ref.p, rtol=1e-12)
    for key, a in state.items(True, True):
        if "w" not in key:
            assert torch.equal(a, before[key]), key
    torch_params = [torch.nn.Parameter(v.clone()) for v in params.values()]
    for p, g in zip(torch_params, grads.values()):
        p.grad = g.clone()
    SM3(torch_params, lr=0.1).step()
    np.testing.assert_allclose(torch_params[-1].detach().numpy(), ref.p, rtol=1e-12)
