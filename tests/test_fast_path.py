"""The in-place fast path and the differentiable path agree to float rounding."""

import pytest
import torch

import sm3fn
from sm3fn._inplace import sm3_apply_

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
