"""Property-based tests (hypothesis) over shapes, dtypes, hyperparameters and gradient scales.

The references are float64 NumPy computations written here from the
definitions (Adagrad's per-coordinate sum of squares), not sm3fn's code.
"""

import os

import numpy as np
import pytest
import torch
from helpers import bit_equal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensordict import TensorDictBase

import sm3fn

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# modest by default; SM3FN_HYPOTHESIS_EXAMPLES=1000 for a deeper search
EXAMPLES = int(os.environ.get("SM3FN_HYPOTHESIS_EXAMPLES", "40"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

shapes = st.lists(st.integers(1, 5), min_size=0, max_size=4).map(tuple)
dtypes = st.sampled_from(DTYPES)
seeds = st.integers(0, 2**32 - 1)
# log10 of the gradient scale for each step; clipped to what each dtype holds below
exponents = st.lists(st.integers(-45, 40), min_size=1, max_size=4)


def gradient(rng, shape, exponent, dtype):
    """Normal entries times 10**exponent, clipped into ``dtype``'s finite range."""
    fi = torch.finfo(dtype)
    exponent = float(np.clip(exponent, np.log10(fi.tiny) - 3, np.log10(fi.max) - 1))
    g = rng.standard_normal(shape) * 10.0**exponent
    g = np.clip(g, -fi.max / 2, fi.max / 2)
    if g.ndim >= 1 and g.shape[0] > 1 and rng.random() < 0.5:
        g[rng.integers(g.shape[0])] = 0.0  # a slice that sees no gradient
    return torch.tensor(g).to(dtype)


def leaves(tree):
    """``{TensorDict key: leaf}`` (a plain name for a flat tree, as ``optimizer.state`` spells it)."""
    if isinstance(tree, TensorDictBase):
        return dict(tree.items(include_nested=True, leaves_only=True))
    return dict(tree)


def cover_min_f64(state, key, shape):
    """min_i a_i at every coordinate, in float64 NumPy, from the stored accumulators."""
    accs = [state[key, f"accumulator_{i}"].double().numpy() for i in range(max(1, len(shape)))]
    if len(shape) <= 1:
        return accs[0].reshape(shape)
    low = np.full(shape, np.inf)
    for a in accs:
        low = np.minimum(low, np.broadcast_to(a, shape))
    return low


@SETTINGS
@given(shape=shapes, dtype=dtypes, own_stats=st.booleans(), exps=exponents, seed=seeds,
       eps=st.sampled_from([0.0, 1e-30, 1e-8]))
def test_sm3_bounds_adagrad(shape, dtype, own_stats, exps, seed, eps):
    """beta = 0: min of the covers >= Adagrad's per-coordinate sum of g^2, and
    |SM3 step| <= |Adagrad step| (sums capped at the statistics dtype's max)."""
    rng = np.random.default_rng(seed)
    stats = dtype if own_stats else None
    tx = sm3fn.scale_by_sm3(eps=eps, accumulator_dtype=stats)
    state = tx.init({"p": torch.zeros(shape, dtype=dtype)})
    stat_dtype = state["p", "accumulator_0"].dtype
    fs = torch.finfo(stat_dtype)
    adagrad = np.zeros(shape)
    for step, e in enumerate(exps, 1):
        g = gradient(rng, shape, e, dtype)
        g64 = g.double().numpy()
        with np.errstate(over="ignore"):
            adagrad = adagrad + g64 * g64
        u, state = tx.update({"p": g}, state)
        low = cover_min_f64(state, "p", shape)
        # rounding: each of `step` additions loses at most one ulp (relative), or one
        # subnormal spacing (absolute) where g^2 falls below tiny; a sum above
        # finfo.max saturates, so Adagrad is capped the same way
        rtol = 2 * step * fs.eps
        lower = np.minimum(adagrad, fs.max) * (1 - rtol) - step * fs.tiny * fs.eps
        assert np.all(low >= lower)
        eps_s = float(torch.tensor(eps, dtype=stat_dtype))  # eps as the statistics dtype holds it
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            u_ada = np.where(adagrad > 0, np.abs(g64) / np.sqrt(np.maximum(lower, 0) + eps_s), 0.0)
        u_ada = np.nan_to_num(u_ada, nan=np.inf)  # 0 / 0 where the lower bound is 0: no bound
        u_abs = u["p"].double().abs().numpy()
        # u is rounded to the parameter dtype on the way out (subnormal spacing: tiny * eps)
        fp = torch.finfo(dtype)
        with np.errstate(over="ignore"):  # u_ada may be inf (no bound)
            assert np.all(u_abs <= u_ada * (1 + 2 * fp.eps) + fp.tiny * fp.eps), (u_abs, u_ada)


@SETTINGS
@given(shape=shapes, dtype=dtypes, exps=st.lists(st.integers(-45, 40), min_size=2, max_size=6), seed=seeds)
def test_accumulators_never_decrease_for_beta_zero(shape, dtype, exps, seed):
    rng = np.random.default_rng(seed)
    tx = sm3fn.scale_by_sm3(beta=0.0)
    state = tx.init({"p": torch.zeros(shape, dtype=dtype)})
    for e in exps:
        before = {k: v.clone() for k, v in leaves(state).items()}
        _, state = tx.update({"p": gradient(rng, shape, e, dtype)}, state)
        for k, v in leaves(state).items():
            assert torch.all(v >= before[k]), k
            assert torch.isfinite(v).all(), k


hyper = st.fixed_dictionaries({
    "lr": st.floats(1e-4, 1.0),
    "momentum": st.sampled_from([0.0, 0.5, 0.9]),
    "beta": st.sampled_from([0.0, 0.3, 0.999]),
    "eps": st.sampled_from([0.0, 1e-30, 1e-8]),
})


@SETTINGS
@given(shapes=st.lists(shapes, min_size=1, max_size=3), dtype=dtypes, h=hyper,
       exps=exponents, seed=seeds, skip=st.booleans())
def test_update_is_pure_and_finite(shapes, dtype, h, exps, seed, skip):
    """update() leaves grads, state and params bit-identical, and finite inputs
    of any scale give finite updates and state."""
    rng = np.random.default_rng(seed)
    tx = sm3fn.sm3(h["lr"], momentum=h["momentum"], beta=h["beta"], eps=h["eps"])
    if skip:
        tx = sm3fn.apply_if_finite(tx)
    params = {f"p{i}": gradient(rng, s, 0, dtype) for i, s in enumerate(shapes)}
    state = tx.init(params)
    for e in exps:
        grads = {k: gradient(rng, v.shape, e, dtype) for k, v in params.items()}
        copies = [{k: v.clone() for k, v in leaves(t).items()} for t in (grads, state, params)]
        updates, new_state = tx.update(grads, state, params)
        for tree, copy in zip((grads, state, params), copies):
            assert all(bit_equal(v, copy[k]) for k, v in leaves(tree).items())
        for t in list(leaves(updates).values()) + list(leaves(new_state).values()):
            assert not t.is_floating_point() or torch.isfinite(t).all()
        params, state = sm3fn.apply_updates(params, updates), new_state


@pytest.mark.parametrize("fused", [False, True])
@SETTINGS
@given(shapes=st.lists(shapes, min_size=1, max_size=3), dtype=dtypes, h=hyper.filter(lambda h: h["beta"] < 0.99),
       exps=exponents, seed=seeds)
def test_adapter_and_functional_paths_agree(fused, shapes, dtype, h, exps, seed):
    """sm3fn.optim.SM3 (in-place fast path) and sm3fn.sm3 (pure update) take the
    same steps, frozen (grad None) parameters included.  The accumulators depend
    only on the gradients and come out bit-identical; parameters differ by the
    rounding of the final add (one rounding in place, up to three out of place).
    On a CPU the pure path runs the fused kernel's arithmetic (its out-of-place
    sweep), so with fused=True float32/float64 momentum is bit-identical too; the
    blocked path (fused=False) runs ATen's float32 sqrt, which misses the IEEE one
    by an ulp now and then, so its u, and the momentum built from it, are an ulp of
    |u| apart per step."""
    from sm3fn.optim import SM3

    rng = np.random.default_rng(seed)
    init = {f"p{i}": gradient(rng, s, 0, dtype) for i, s in enumerate(shapes)}
    tensors = [v.clone().requires_grad_() for v in init.values()]
    opt = SM3(tensors, lr=h["lr"], momentum=h["momentum"], beta=h["beta"], eps=h["eps"], fused=fused)
    tx = sm3fn.sm3(h["lr"], momentum=h["momentum"], beta=h["beta"], eps=h["eps"])
    params = dict(init)
    state = tx.init(params)
    for e in exps:
        grads = {k: None if rng.random() < 0.2 else gradient(rng, v.shape, e, dtype) for k, v in params.items()}
        for t, g in zip(tensors, grads.values()):
            t.grad = g
        opt.step()
        updates, state = tx.update(grads, state, params)
        params = sm3fn.apply_updates(params, updates)
    fp = torch.finfo(dtype)
    tol = 8 * len(exps) * fp.eps
    for t, (key, p) in zip(tensors, params.items()):
        scale = max(1.0, float(init[key].abs().max()))
        torch.testing.assert_close(t.detach(), p, rtol=tol, atol=tol * scale)
        if "accumulator_0" not in opt.state[t]:  # never had a gradient: no state in the adapter
            assert all(torch.count_nonzero(a) == 0 for a in leaves(state["sm3", key]).values())
            continue
        for name, a in leaves(state["sm3", key]).items():
            assert bit_equal(opt.state[t][name], a), name
        if h["momentum"] > 0 and "momentum_buffer" in opt.state[t]:
            m, m_fn = opt.state[t]["momentum_buffer"], state["momentum", key]
            if dtype in (torch.float32, torch.float64) and fused:
                assert bit_equal(m, m_fn)
            elif dtype in (torch.float32, torch.float64):
                u_max = 1 / np.sqrt(1 - h["beta"])
                torch.testing.assert_close(m, m_fn, rtol=0, atol=2 * fp.eps * u_max * len(exps))
            else:  # the pure path hands u (|u| <= 1/sqrt(1-beta)) to the float32 buffer
                # rounded to the parameter dtype: an absolute error of eps*|u| per step
                u_max = 1 / np.sqrt(1 - h["beta"])
                torch.testing.assert_close(m, m_fn, rtol=0, atol=fp.eps * u_max * len(exps))
