"""One dispatcher behind every entry point (sm3fn/_kernels/dispatch.py).

One table of inputs (dims 0 to 3, zero rows, a saturating gradient, a NaN,
a sparse embedding gradient, bfloat16 parameters with float32 statistics, a
frozen parameter) runs through the four public ways to step, which must agree
with each other and, where the inputs are finite, with the float64 NumPy
reference (tests/reference.py, tests/sparse_reference.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from entry_points import ENTRY_POINTS
from reference import ReferenceSM3, random_gradient
from sparse_reference import ReferenceRowSM3

LR, STEPS = 0.07, 3

#: name -> (shape, dtype, what its gradients look like)
TABLE = {
    "matrix": ((6, 5), torch.float64, "dense"),
    "cube": ((3, 4, 5), torch.float64, "dense"),
    "vector": ((9,), torch.float64, "dense"),
    "scalar": ((), torch.float64, "dense"),
    "f32": ((7, 3), torch.float32, "dense"),
    "bf16": ((5, 8), torch.bfloat16, "dense"),
    "huge": ((4, 3), torch.float32, "saturate"),  # g*g overflows float32: accumulators saturate
    "nan": ((3, 4), torch.float32, "nan"),  # a NaN gradient entry: NaN shows in the same places
    "emb": ((10, 4), torch.float64, "sparse"),  # hybrid COO, as nn.Embedding(sparse=True) gives
    "frozen": ((2, 2), torch.float64, "frozen"),  # None gradient: never moves
}


def _table(seed=0):
    rng = np.random.default_rng(seed)
    params0 = {k: torch.tensor(rng.standard_normal(s)).to(d) for k, (s, d, _) in TABLE.items()}
    grads_seq, dense_seq = [], []
    for step in range(STEPS):
        grads, dense = {}, {}
        for k, (shape, dtype, kind) in TABLE.items():
            g = random_gradient(rng, shape)
            if kind == "frozen":
                grads[k] = dense[k] = None
                continue
            if kind == "saturate":
                g[1, 2] = 1e20 * (step + 1)
            if kind == "nan" and step == 1:
                g[2, 1] = np.nan
            if kind == "sparse":
                rows = np.array(sorted(rng.choice(shape[0], 3, replace=False)))
                values = rng.standard_normal((3, shape[1]))
                g = np.zeros(shape)
                g[rows] = values
                grads[k] = torch.sparse_coo_tensor(torch.tensor(rows)[None], torch.tensor(values), shape,
                                                   check_invariants=True)
                dense[k] = (g, set(rows.tolist()))
                continue
            grads[k] = torch.tensor(g).to(dtype)
            dense[k] = g
        grads_seq.append(grads)
        dense_seq.append(dense)
    return params0, grads_seq, dense_seq


def _close(a, b, key, what):
    dtype = TABLE[key][1]
    tol = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol, equal_nan=True,
                               msg=lambda m: f"{key} {what}: {m}")


@pytest.mark.parametrize("momentum,beta", [(0.0, 0.0), (0.9, 0.0), (0.5, 0.9)])
def test_every_entry_point_steps_the_table_alike(momentum, beta):
    params0, grads_seq, dense_seq = _table()
    runs = {name: run(params0, grads_seq, LR, momentum, beta) for name, run in ENTRY_POINTS.items()}
    want_p, want_a = runs["tx.update"]
    for name, (got_p, got_a) in runs.items():
        for k in TABLE:
            _close(got_p[k], want_p[k], k, f"{name} parameter")
            if k in got_a:
                _close(got_a[k].reshape(-1), want_a[k].reshape(-1), k, f"{name} accumulator_0")
    # the float64 reference, where the inputs are finite
    for k, (_, dtype, kind) in TABLE.items():
        if kind == "frozen":
            assert torch.equal(want_p[k], params0[k])
            continue
        if kind == "sparse":
            ref = ReferenceRowSM3(params0[k].numpy(), lr=LR, beta=beta)
            for dense in dense_seq:
                ref.step(*dense[k])
            acc = ref.acc
        elif kind == "dense" and dtype == torch.float64:
            ref = ReferenceSM3(params0[k].numpy(), lr=LR, momentum=momentum, beta=beta)
            for dense in dense_seq:
                ref.step(dense[k])
            acc = ref.acc[0]
        else:
            continue
        np.testing.assert_allclose(want_p[k].numpy(), ref.p, rtol=1e-10, atol=1e-12, err_msg=k)
        np.testing.assert_allclose(want_a[k].numpy().reshape(-1), acc.reshape(-1), rtol=1e-10, err_msg=k)
    # what the special rows show: saturation; NaN in the NaN's row and column (their
    # accumulators), nowhere else
    cap = torch.finfo(torch.float32).max
    assert want_a["huge"].max() == cap and torch.isfinite(want_p["huge"]).all()
    poisoned = torch.zeros(3, 4, dtype=torch.bool)
    poisoned[2, :] = poisoned[:, 1] = True
    assert torch.equal(torch.isnan(want_p["nan"]), poisoned)


def test_sm3_update_takes_sparse_gradients_of_a_declared_sparse_state():
    """sm3fn.sm3(sparse=...) keeps no momentum buffer for the declared parameter; sm3_update_
    steps that state as tx.update does."""
    import sm3fn

    params0, grads_seq, _ = _table(seed=1)
    keep = {"emb": params0["emb"], "matrix": params0["matrix"]}
    tx = sm3fn.sm3(LR, momentum=0.9, sparse={"emb"})
    params, state = {k: v.clone() for k, v in keep.items()}, tx.init(keep)
    fast, fast_state = {k: v.clone() for k, v in keep.items()}, tx.init(keep)
    for grads in grads_seq:
        grads = {k: grads[k] for k in keep}
        updates, state = tx.update(grads, state, params)
        params = sm3fn.apply_updates(params, updates)
        sm3fn.sm3_update_(fast, grads, fast_state, learning_rate=LR, momentum=0.9)
    for k in keep:
        torch.testing.assert_close(fast[k], params[k], rtol=1e-12, atol=1e-12)
    assert (fast_state == state).all()
