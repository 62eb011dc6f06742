"""Dtypes: zero gradients give exactly zero steps (never NaN) in every dtype, forward and backward;
float32 statistics for bf16/fp16 parameters; no NaN/inf from extreme gradients."""

import numpy as np
import pytest
import torch
from helpers import leaf_tensors
from reference import ReferenceSM3

import sm3fn

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SHAPES = [(), (5,), (4, 3), (3, 2, 2)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("momentum,beta", [(0.0, 0.0), (0.9, 0.9)])
def test_zero_gradient_is_a_zero_step(dtype, momentum, beta):
    gen = torch.Generator().manual_seed(0)
    params = {f"p{i}": torch.randn(s, generator=gen).to(dtype) for i, s in enumerate(SHAPES)}
    tx = sm3fn.sm3(0.1, momentum=momentum, beta=beta)
    state = tx.init(params)
    for _ in range(3):
        updates, state = tx.update({k: torch.zeros_like(v) for k, v in params.items()}, state, params)
        for k, u in updates.items():
            assert u.dtype == dtype
            assert torch.equal(u, torch.zeros_like(u)), k
        params_next = sm3fn.apply_updates(params, updates)
        for k in params:
            assert torch.equal(params_next[k], params[k])
    for t in state.values(True, True):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_partly_zero_gradient_finite_and_zero_where_zero(dtype):
    gen = torch.Generator().manual_seed(1)
    params = {"w": torch.randn(6, 4, generator=gen).to(dtype)}
    g = torch.randn(6, 4, generator=gen).to(dtype)
    g[2] = 0
    g[:, 1] = 0
    tx = sm3fn.scale_by_sm3()
    u, _ = tx.update({"w": g}, tx.init(params))
    assert torch.isfinite(u["w"]).all()
    assert torch.equal(u["w"][2], torch.zeros_like(u["w"][2]))
    assert torch.equal(u["w"][:, 1], torch.zeros_like(u["w"][:, 1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gradient_through_update_is_finite_at_zero(dtype, shape):
    """The meta-gradient of an update w.r.t. a zero gradient is finite (the update is written as g / sqrt(nu) where nu > 0 and 0 elsewhere)."""
    tx = sm3fn.sm3(0.1, momentum=0.5)
    params = {"w": torch.randn(shape, dtype=dtype)}
    state = tx.init(params)
    g = torch.zeros(shape, dtype=dtype, requires_grad=True)
    updates, _ = tx.update({"w": g}, state, params)
    (dg,) = torch.autograd.grad(updates["w"].sum(), g)
    assert torch.isfinite(dg).all()
    # the naive form g * rsqrt(g^2 + eps) does give NaN here, so the test can fail
    naive = g * torch.rsqrt(g * g + 1e-30)
    if dtype == torch.float32:
        (dn,) = torch.autograd.grad(naive.sum(), g)
        assert not torch.isfinite(dn).all()


# --- Low precision: float32 statistics for bf16/fp16 parameters, and no NaN/inf from extreme gradients

LOW = [torch.bfloat16, torch.float16]
ALL = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_params_keep_float32_statistics(dtype):
    params = {"w": torch.randn(64, 32).to(dtype), "b": torch.randn(32).to(dtype)}
    state = sm3fn.sm3(0.1, momentum=0.9).init(params)
    for t in leaf_tensors(state):
        assert t.dtype == torch.float32
    half = sm3fn.sm3(0.1, momentum=0.9, momentum_dtype=torch.bfloat16).init(params)
    assert half["momentum", "w"].dtype == torch.bfloat16
    assert half["momentum", "w"].nbytes * 2 == state["momentum", "w"].nbytes
    assert half["sm3", "w", "accumulator_0"].dtype == torch.float32
    wide = sm3fn.sm3(0.1, accumulator_dtype=torch.float64).init(params)
    assert wide["sm3", "w", "accumulator_1"].dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float32_and_float64_params_keep_their_own_dtype(dtype):
    state = sm3fn.sm3(0.1, momentum=0.5).init({"w": torch.randn(3, 2, dtype=dtype)})
    assert {t.dtype for t in leaf_tensors(state)} == {dtype}


@pytest.mark.parametrize("dtype", LOW)
def test_constant_gradient_1000_steps_float32_accumulators(dtype):
    """1000 steps of one gradient: the accumulators of bf16/fp16 parameters are
    the float32 ones and within float32 rounding of a float64 NumPy sum; a
    bf16 accumulator (the opt-in) stalls near 256, so its steps come out ~2x."""
    gen = torch.Generator().manual_seed(1)
    g = {"w": torch.randn(5, 3, generator=gen).to(dtype), "b": torch.randn(4, generator=gen).to(dtype)}
    g64 = {k: v.double().numpy() for k, v in g.items()}
    refs = {k: ReferenceSM3(np.zeros(v.shape)) for k, v in g64.items()}
    runs = {}
    for name, p_dtype, acc_dtype in [
        ("low", dtype, None),
        ("f32", torch.float32, None),
        ("bf16_acc", dtype, torch.bfloat16),
    ]:
        tx = sm3fn.scale_by_sm3(accumulator_dtype=acc_dtype)
        state = tx.init({k: torch.zeros(v.shape, dtype=p_dtype) for k, v in g.items()})
        grads = {k: v.to(p_dtype) for k, v in g.items()}
        for _ in range(1000):
            u, state = tx.update(grads, state)
        runs[name] = (u, state)
    for _ in range(1000):
        u_ref = {k: refs[k].step(v) for k, v in g64.items()}

    u_low, s_low = runs["low"]
    u_f32, s_f32 = runs["f32"]
    for key, ref in refs.items():
        for i, a_ref in enumerate(ref.acc):
            a = s_low[key, f"accumulator_{i}"]
            assert a.dtype == torch.float32
            assert torch.equal(a, s_f32[key, f"accumulator_{i}"])
            # 1000 float32 additions: relative error at most 1000 * 2**-24 = 6e-5
            np.testing.assert_allclose(a.numpy().reshape(a_ref.shape), a_ref, rtol=6e-5)
        # u is rounded to the parameter dtype on the way out (8 bits in bf16)
        np.testing.assert_allclose(u_low[key].double().numpy(), u_ref[key], rtol=1e-2, atol=1e-6)
        # the opt-in bf16 accumulator: what the float32 default avoids
        a_bf16 = runs["bf16_acc"][1][key, "accumulator_0"].double().numpy().reshape(ref.acc[0].shape)
        assert np.max(ref.acc[0] / np.maximum(a_bf16, 1e-30)) > 2.0


def _bounded(shape, scale, dtype, gen):
    """Uniform in (-scale, scale), built in float64 so that it never overflows ``dtype``."""
    return ((torch.rand(shape, dtype=torch.float64, generator=gen) * 2 - 1) * scale).to(dtype)


@pytest.mark.parametrize("dtype", ALL, ids=str)
@pytest.mark.parametrize("own_dtype_statistics", [False, True], ids=["default_stats", "param_dtype_stats"])
@pytest.mark.parametrize("beta,momentum", [(0.0, 0.0), (0.9, 0.9)])
def test_no_nonfinite_from_zero_tiny_or_huge_gradients(dtype, own_dtype_statistics, beta, momentum):
    fi = torch.finfo(dtype)
    stats = dtype if own_dtype_statistics else None
    tx = sm3fn.sm3(0.1, momentum=momentum, beta=beta, accumulator_dtype=stats, momentum_dtype=stats)
    gen = torch.Generator().manual_seed(2)
    params = {"w": torch.randn(6, 5, generator=gen).to(dtype), "b": torch.randn(5, generator=gen).to(dtype),
              "s": torch.randn((), generator=gen).to(dtype)}
    state = tx.init(params)
    scales = [0.0, 1e-30, fi.tiny / 8, fi.tiny, fi.max, 1.0, fi.max, 1e-3, 0.0, 1.0]
    for scale in scales:
        grads = {k: _bounded(v.shape, scale, dtype, gen) for k, v in params.items()}
        if scale == 0.0:
            grads = {k: torch.zeros_like(v) for k, v in params.items()}
        updates, state = tx.update(grads, state, params)
        params = sm3fn.apply_updates(params, updates)
        for t in leaf_tensors(updates) + leaf_tensors(params) + leaf_tensors(state):
            assert torch.isfinite(t).all(), f"non-finite after a gradient of scale {scale}"
        if scale == 0.0:
            assert all(torch.count_nonzero(u) == 0 for u in leaf_tensors(updates)) or momentum > 0


@pytest.mark.filterwarnings("ignore:overflow encountered")  # the float64 reference's own 1e400
@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.float64])
def test_overflowing_square_gives_zero_step_and_saturates(acc_dtype):
    """|g| = 1e20 in float32 (1e200 in float64): g*g overflows.  That step is 0 on
    the coordinate, the accumulators stop at finfo.max (not inf), and the
    rest of the tensor moves as the float64 reference says."""
    huge = 1e20 if acc_dtype == torch.float32 else 1e200
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(4, 3, dtype=torch.float64, generator=gen)
    g[1, 2] = huge
    tx = sm3fn.scale_by_sm3()
    state = tx.init({"w": torch.zeros(4, 3, dtype=acc_dtype)})
    u, state = tx.update({"w": g.to(acc_dtype)}, state)
    assert u["w"][1, 2] == 0
    assert state["w", "accumulator_0"][1, 0] == torch.finfo(acc_dtype).max
    assert state["w", "accumulator_1"][0, 2] == torch.finfo(acc_dtype).max
    ref = ReferenceSM3(np.zeros((4, 3)))
    u_ref = ref.step(g.numpy())
    mask = np.ones((4, 3), bool)
    mask[1, 2] = False
    np.testing.assert_allclose(u["w"].double().numpy()[mask], u_ref[mask], rtol=1e-6)
    # beta = 0: later steps are Adagrad's tiny but finite ones, never NaN
    u, state = tx.update({"w": torch.randn(4, 3, generator=gen).to(acc_dtype)}, state)
    assert torch.isfinite(u["w"]).all() and abs(u["w"][1, 2]) < 1e-18


def test_saturated_coordinate_recovers_with_beta():
    """beta > 0: a saturated accumulator decays like the float64 one and the
    coordinate trains again (inf would stay inf: frozen forever)."""
    gen = torch.Generator().manual_seed(4)
    tx = sm3fn.scale_by_sm3(beta=0.5)
    state = tx.init({"w": torch.zeros(4, 3)})
    ref = ReferenceSM3(np.zeros((4, 3)), beta=0.5)
    for step in range(200):
        g = torch.randn(4, 3, dtype=torch.float64, generator=gen)
        if step == 0:
            g[1, 2] = 1e20
        u, state = tx.update({"w": g.float()}, state)
        u_ref = ref.step(g.numpy())
    assert abs(u["w"][1, 2]) > 0.1
    np.testing.assert_allclose(u["w"].double().numpy(), u_ref, rtol=1e-4)


@pytest.mark.parametrize("dtype", LOW)
def test_zero_gradient_is_a_zero_step_in_low_precision(dtype):
    """torch-SM3 turns float16 parameters into NaN on a zero gradient (eps underflows)."""
    params = {"w": torch.randn(3, 4).to(dtype)}
    for stats in (None, dtype):
        tx = sm3fn.sm3(0.1, accumulator_dtype=stats)
        state = tx.init(params)
        updates, state = tx.update({"w": torch.zeros(3, 4, dtype=dtype)}, state, params)
        assert torch.equal(sm3fn.apply_updates(params, updates)["w"], params["w"])


@pytest.mark.parametrize("shape", [(4, 3), (7,)], ids=str)
def test_fast_path_saturates_too(shape):
    from sm3fn._kernels.blocked import sm3_apply_

    gen = torch.Generator().manual_seed(5)
    p = torch.randn(shape, generator=gen)
    g = torch.randn(shape, generator=gen)
    g.view(-1)[2] = 1e20
    state = sm3fn.scale_by_sm3().init({"p": p})
    accs = [state["p", f"accumulator_{i}"] for i in range(len(state["p"].keys()))]
    u, new_state = sm3fn.scale_by_sm3().update({"p": g}, state)
    before = p.clone()
    sm3_apply_([p], [g], [accs], [None], lr=0.1, momentum=0.0, beta=0.0, eps=1e-30, block_elements=4)
    assert p.view(-1)[2] == before.view(-1)[2]
    torch.testing.assert_close(p, before - 0.1 * u["p"])
    for i, a in enumerate(accs):
        assert torch.equal(a, new_state["p", f"accumulator_{i}"])
        assert torch.isfinite(a).all() and a.max() == torch.finfo(torch.float32).max


def test_sparse_rows_saturate_too():
    """The sparse (embedding) path runs the same sm3_block: an overflowing row saturates."""
    from sm3fn.optim import SM3

    torch.manual_seed(0)
    emb = torch.nn.Embedding(6, 3, sparse=True)
    opt = SM3(emb.parameters(), lr=0.1)
    weight = emb.weight.detach().clone()
    (emb(torch.tensor([1, 4])) * torch.tensor([[1e20], [1.0]])).sum().backward()
    opt.step()
    acc = opt.state[emb.weight]["accumulator_0"].reshape(-1)
    assert acc[1] == torch.finfo(torch.float32).max and acc[4] == 1.0  # g = 1 on each entry of row 4
    assert torch.equal(emb.weight[1], weight[1])  # the overflowing row: a zero step
    assert torch.isfinite(emb.weight).all()


@pytest.mark.parametrize("dtype", ALL, ids=str)
@pytest.mark.parametrize("beta,momentum", [(0.0, 0.0), (0.9, 0.9)])
def test_adapter_no_nonfinite_from_zero_tiny_or_huge_gradients(dtype, beta, momentum):
    """The same gradients through sm3fn.optim.SM3's in-place fast path."""
    from sm3fn.optim import SM3

    fi = torch.finfo(dtype)
    gen = torch.Generator().manual_seed(6)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in [(6, 5), (5,), ()]]
    opt = SM3(params, lr=0.1, momentum=momentum, beta=beta)
    for scale in [0.0, 1e-30, fi.tiny / 8, fi.tiny, fi.max, 1.0, fi.max, 1e-3, 0.0, 1.0]:
        for p in params:
            p.grad = _bounded(p.shape, scale, dtype, gen)
        opt.step()
        tensors = params + [t for s in opt.state.values() for t in s.values() if t.is_floating_point()]
        assert all(torch.isfinite(t).all() for t in tensors), f"non-finite after a gradient of scale {scale}"
