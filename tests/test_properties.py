"""The paper's invariant as a property: for beta = 0, SM3's nu upper-bounds Adagrad's sum of squares."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import sm3fn
from sm3fn._sm3_math import cover_minimum

shapes = st.lists(st.integers(1, 5), min_size=0, max_size=4).map(tuple)


@st.composite
def gradient_sequences(draw):
    shape = draw(shapes)
    steps = draw(st.integers(1, 5))
    scale = st.floats(-6, 4)
    grads = []
    for _ in range(steps):
        base = draw(arrays(np.float64, shape, elements=st.floats(-10, 10, allow_nan=False)))
        # exact zeros stay; entries whose square would underflow do not
        # (there Adagrad's float sum is 0 too and the comparison means nothing)
        base = np.where(np.abs(base) < 1e-6, 0.0, base)
        grads.append(base * 10.0 ** draw(scale))
    return shape, grads


@settings(max_examples=60, deadline=None)
@given(gradient_sequences())
def test_sm3_bounds_adagrad(case):
    shape, grads = case
    tx = sm3fn.scale_by_sm3(beta=0.0, eps=0.0)
    state = tx.init({"p": torch.zeros(shape, dtype=torch.float64)})
    adagrad_sum = np.zeros(shape)
    for g in grads:
        adagrad_sum += g * g
        u, state = tx.update({"p": torch.tensor(g)}, state)
        accs = [state["p", f"accumulator_{i}"] for i in range(len(state["p"].keys()))]
        # every coordinate's cover minimum is at least Adagrad's accumulator
        bound = cover_minimum(accs).expand(shape).numpy()
        assert np.all(bound >= adagrad_sum * (1 - 1e-12))
        # so each SM3 step is no larger than Adagrad's (same eps = 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            adagrad_step = np.where(adagrad_sum > 0, np.abs(g) / np.sqrt(adagrad_sum), 0.0)
        assert np.all(np.abs(u["p"].numpy()) <= adagrad_step * (1 + 1e-12))
