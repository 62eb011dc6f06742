"""Second pass on the fast path (issue 6): its shortcuts keep the numbers of the float64 reference.

* ``nu > 0`` is decided from the accumulators (no mask, no per-block ``amin``);
  where some accumulator is 0 or ``beta * a`` underflows, the masked path runs;
* without momentum the division is folded into ``p.addcdiv_``;
* ``sm3fn.optim.SM3(compiled=True)``;
* tensors with a zero-size dimension (nothing to update) in every path.
"""

import numpy as np
import pytest
import torch

import sm3fn
from reference import ReferenceSM3, random_gradient
from sm3fn.optim import SM3

SHAPES = {"matrix": (23, 17), "conv": (4, 3, 5), "vector": (40,), "scalar": ()}


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
    params, refs, _ = _run_optim(SHAPES, 4, seed=11, lr=0.1, momentum=momentum, beta=beta)
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
