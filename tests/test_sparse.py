"""Sparse gradients (row-cover SM3) in the functional API, against the float64 row reference."""

import numpy as np
import pytest
import torch
from tensordict import TensorDict
from torch.func import functional_call

import sm3fn
from reference import ReferenceSM3, random_gradient
from sparse_reference import ReferenceRowSM3, dense_from_entries

N, D = 40, 5


def random_indices(rng, size):
    """Row indices with many repeats: drawn from a small pool of rows, often twice or more."""
    pool = rng.choice(N, size=max(2, size // 2), replace=False)
    return rng.choice(pool, size=size)


def embedding_grad(module, weight, rng, kind):
    """Runs ``module`` on random input with ``weight``; returns the sparse grad and the COO entries.

    The loss is ``sum(out * c)`` with random ``c``, so the gradient of each
    lookup is known in closed form; the entries (row, value) are what the
    reference sums itself.
    """
    w = weight.detach().clone().requires_grad_(True)
    if kind == "embedding":
        idx = torch.as_tensor(random_indices(rng, 9))
        c = rng.standard_normal((9, D)) * 10.0 ** rng.uniform(-3, 2, size=(9, 1))
        out = functional_call(module, {"weight": w}, (idx,))
        entries = list(zip(idx.tolist(), c))
    else:  # EmbeddingBag: bags of 1-4 lookups, with per-sample weights for mode="sum"
        sizes = rng.integers(1, 5, size=4)
        idx = torch.as_tensor(random_indices(rng, int(sizes.sum())))
        offsets = torch.as_tensor(np.concatenate([[0], np.cumsum(sizes)[:-1]]))
        c = rng.standard_normal((4, D)) * 10.0 ** rng.uniform(-3, 2, size=(4, 1))
        bag = np.repeat(np.arange(4), sizes)
        if module.mode == "sum":
            psw = rng.uniform(0.1, 2.0, size=idx.numel())
            out = functional_call(module, {"weight": w}, (idx, offsets),
                                  {"per_sample_weights": torch.as_tensor(psw, dtype=w.dtype)})
            entries = [(i, c[b] * s) for i, b, s in zip(idx.tolist(), bag, psw)]
        else:
            out = functional_call(module, {"weight": w}, (idx, offsets))
            entries = [(i, c[b] / sizes[b]) for i, b in zip(idx.tolist(), bag)]
    (out * torch.as_tensor(c, dtype=w.dtype)).sum().backward()
    return w.grad, entries


MODULES = {
    "embedding": lambda: torch.nn.Embedding(N, D, sparse=True),
    "bag_sum": lambda: torch.nn.EmbeddingBag(N, D, mode="sum", sparse=True),
    "bag_mean": lambda: torch.nn.EmbeddingBag(N, D, mode="mean", sparse=True),
}


@pytest.mark.parametrize("module_name", list(MODULES))
@pytest.mark.parametrize("beta", [0.0, 0.6])
@pytest.mark.parametrize("container", ["dict", "tensordict"])
@pytest.mark.parametrize("declared", [True, False])
def test_embedding_matches_row_reference(module_name, beta, container, declared):
    rng = np.random.default_rng(abs(hash((module_name, beta, container, declared))) % 2**32)
    module = MODULES[module_name]().double()
    lr, momentum = 0.05, (0.9 if declared else 0.5)
    w0, h0 = rng.standard_normal((N, D)), rng.standard_normal((3, D))
    # momentum moves the dense head only: it is not applied to sparse updates
    ref = ReferenceRowSM3(w0, lr=lr, beta=beta)
    ref_head = ReferenceSM3(h0, lr=lr, momentum=momentum, beta=beta)
    tx = sm3fn.sm3(learning_rate=lr, momentum=momentum, beta=beta,
                   sparse={"emb.weight"} if declared else None)

    def tree(emb, head):  # the embedding and a dense parameter side by side
        if container == "dict":
            return {"emb.weight": emb, "head": head}
        return TensorDict({"emb": {"weight": emb}, "head": head}, batch_size=[])

    params = tree(torch.tensor(w0), torch.tensor(h0))
    state = tx.init(params)
    emb_key = ("emb.weight",) if container == "dict" else ("emb", "weight")
    if declared:  # the row accumulator only, and no momentum buffer for the embedding
        assert set(state[("sm3",) + emb_key].keys()) == {"accumulator_0"}
        assert state["sm3", *emb_key, "accumulator_0"].shape == (N, 1)
        assert list(state["momentum"].keys(True, True)) == ["head"]
    leaf = "emb.weight" if container == "dict" else ("emb", "weight")  # how params is indexed
    for _ in range(12):
        g, entries = embedding_grad(module, params[leaf], rng, module_name.split("_")[0])
        assert g.layout == torch.sparse_coo and not g.is_coalesced()
        g_dense, touched = dense_from_entries((N, D), [e[0] for e in entries], [e[1] for e in entries])
        g_head = random_gradient(rng, (3, D))
        ref.step(g_dense, touched)
        ref_head.step(g_head)
        updates, state = tx.update(tree(g, torch.tensor(g_head)), state, params)
        assert updates[leaf].layout == torch.sparse_coo
        assert sorted(updates[leaf].coalesce().indices()[0].tolist()) == sorted(touched)
        params = sm3fn.apply_updates(params, updates)
        assert type(params) is (dict if container == "dict" else TensorDict)
        np.testing.assert_allclose(params[leaf].numpy(), ref.p, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(params["head"].numpy(), ref_head.p, rtol=1e-9, atol=1e-12)
        acc = state["sm3", *emb_key, "accumulator_0"]
        np.testing.assert_allclose(acc.reshape(-1).numpy(), ref.acc, rtol=1e-9, atol=0)
        if not declared:  # the column accumulator of an undeclared parameter is left alone
            assert torch.count_nonzero(state["sm3", *emb_key, "accumulator_1"]) == 0


@pytest.mark.parametrize("shape,sparse_dim", [((N, 6), 2), ((N, 3, 4), 2), ((N, 3, 4), 1), ((N,), 1)])
def test_fully_sparse_and_hybrid_coo_match_reference(shape, sparse_dim):
    """Any COO layout: entries a gradient leaves out of a touched row are zeros of that row."""
    rng = np.random.default_rng(sparse_dim + len(shape))
    p0 = rng.standard_normal(shape)
    ref = ReferenceRowSM3(p0, lr=0.1)
    tx = sm3fn.chain(sm3fn.scale_by_sm3(), sm3fn.scale(-0.1))
    params = {"w": torch.tensor(p0)}
    state = tx.init(params)
    for _ in range(8):
        nnz = int(rng.integers(1, 12))
        rows = random_indices(rng, nnz)
        index = np.stack([rows] + [rng.integers(0, n, nnz) for n in shape[1:sparse_dim]])
        values = rng.standard_normal((nnz,) + shape[sparse_dim:]) * 10.0 ** rng.uniform(-3, 2)
        g = torch.sparse_coo_tensor(torch.as_tensor(index), torch.as_tensor(values), shape, check_invariants=True)
        g_dense, touched = dense_from_entries(shape, index.T, values)
        ref.step(g_dense, touched)
        updates, state = tx.update({"w": g}, state)
        params = sm3fn.apply_updates(params, updates)
        np.testing.assert_allclose(params["w"].numpy(), ref.p, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(state["0", "w", "accumulator_0"].reshape(-1).numpy(), ref.acc, rtol=1e-9)
