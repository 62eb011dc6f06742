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


def make_batch(module, rng, dtype=torch.float64):
    """Random input for ``module`` and the loss weights ``c``; returns (args, kwargs, c, entries).

    The loss is ``sum(module(*args, **kwargs) * c)``, so the gradient of
    each lookup is known in closed form: ``entries`` are its (row, value)
    pairs, repeats included, which the reference sums itself.
    """
    if isinstance(module, torch.nn.Embedding):
        idx = torch.as_tensor(random_indices(rng, 9))
        c = rng.standard_normal((9, D)) * 10.0 ** rng.uniform(-3, 2, size=(9, 1))
        return (idx,), {}, torch.as_tensor(c, dtype=dtype), list(zip(idx.tolist(), c))
    # EmbeddingBag: 4 bags of 1-4 lookups, with per-sample weights for mode="sum"
    sizes = rng.integers(1, 5, size=4)
    idx = torch.as_tensor(random_indices(rng, int(sizes.sum())))
    offsets = torch.as_tensor(np.concatenate([[0], np.cumsum(sizes)[:-1]]))
    c = rng.standard_normal((4, D)) * 10.0 ** rng.uniform(-3, 2, size=(4, 1))
    bag = np.repeat(np.arange(4), sizes)
    if module.mode == "sum":
        psw = rng.uniform(0.1, 2.0, size=idx.numel())
        entries = [(i, c[b] * s) for i, b, s in zip(idx.tolist(), bag, psw)]
        kwargs = {"per_sample_weights": torch.as_tensor(psw, dtype=dtype)}
    else:
        entries = [(i, c[b] / sizes[b]) for i, b in zip(idx.tolist(), bag)]
        kwargs = {}
    return (idx, offsets), kwargs, torch.as_tensor(c, dtype=dtype), entries


def embedding_grad(module, weight, rng):
    """The sparse gradient of the loss of :func:`make_batch` at ``weight``, and its entries."""
    w = weight.detach().clone().requires_grad_(True)
    args, kwargs, c, entries = make_batch(module, rng, w.dtype)
    (functional_call(module, {"weight": w}, args, kwargs) * c).sum().backward()
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
        g, entries = embedding_grad(module, params[leaf], rng)
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


def bits(t):
    """A tensor's bit pattern, so that -0.0 != 0.0 and NaNs compare."""
    return t.detach().contiguous().view(torch.int32 if t.element_size() == 4 else torch.int64).clone()


@pytest.mark.parametrize("declared", [True, False])
def test_absent_rows_bit_identical_and_inputs_untouched(declared):
    rng = np.random.default_rng(5)
    module = torch.nn.Embedding(N, D, sparse=True)
    tx = sm3fn.sm3(learning_rate=0.1, momentum=0.5, sparse={"w"} if declared else None)
    params = {"w": torch.randn(N, D, generator=torch.Generator().manual_seed(1))}
    params["w"][3] = -0.0  # a negative zero row must survive as -0.0
    state = tx.init(params)
    for _ in range(3):  # non-trivial accumulators first
        g, _ = embedding_grad(module, params["w"], rng)
        updates, state = tx.update({"w": g}, state, params)
        params = sm3fn.apply_updates(params, updates)
    g, entries = embedding_grad(module, params["w"], rng)
    touched = sorted({r for r, _ in entries})
    absent = [r for r in range(N) if r not in touched]
    assert 3 in absent or 3 in touched
    g_before, p_before = (g._indices().clone(), g._values().clone()), bits(params["w"])
    s_before = state.clone()
    updates, new_state = tx.update({"w": g}, state, params)
    new = sm3fn.apply_updates(params, updates)
    assert torch.equal(bits(new["w"])[absent], p_before[absent])
    assert not torch.equal(bits(new["w"])[touched], p_before[touched])
    a_new, a_old = new_state["sm3", "w", "accumulator_0"], state["sm3", "w", "accumulator_0"]
    assert torch.equal(bits(a_new)[absent], bits(a_old)[absent])
    assert torch.all(a_new[touched] > a_old[touched])
    # pure: the gradient (still uncoalesced), the params and the old state are as they were
    assert not g.is_coalesced()
    assert torch.equal(g._indices(), g_before[0]) and torch.equal(g._values(), g_before[1])
    assert torch.equal(bits(params["w"]), p_before)
    assert (state == s_before).all()
    if not declared:  # the momentum buffer is not touched by a sparse update
        assert torch.equal(new_state["momentum", "w"], state["momentum", "w"])


def test_float32_embedding_close_to_reference():
    rng = np.random.default_rng(9)
    module = torch.nn.EmbeddingBag(N, D, mode="sum", sparse=True)
    w0 = rng.standard_normal((N, D))
    ref = ReferenceRowSM3(w0, lr=0.1)
    tx = sm3fn.sm3(learning_rate=0.1, sparse=lambda name: name.endswith("weight"))
    params = {"bag": {"weight": torch.tensor(w0, dtype=torch.float32)}}
    state = tx.init(params)
    for _ in range(15):
        g, entries = embedding_grad(module, params["bag"]["weight"], rng)
        ref.step(*dense_from_entries((N, D), [e[0] for e in entries], [e[1] for e in entries]))
        updates, state = tx.update({"bag": {"weight": g}}, state, params)
        params = sm3fn.apply_updates(params, updates)
    assert params["bag"]["weight"].dtype == torch.float32
    np.testing.assert_allclose(params["bag"]["weight"].double().numpy(), ref.p, rtol=2e-5, atol=2e-6)


def test_dense_gradient_on_declared_parameter_is_a_row_cover_step():
    """A parameter declared sparse keeps the row cover; a dense gradient touches every row."""
    rng = np.random.default_rng(2)
    shape = (6, 3, 2)
    p0 = rng.standard_normal(shape)
    ref = ReferenceRowSM3(p0, lr=0.1, beta=0.3)
    tx = sm3fn.sm3(learning_rate=0.1, beta=0.3, sparse=["p"])
    params = {"p": torch.tensor(p0)}
    state = tx.init(params)
    for step in range(6):
        if step % 2:
            g_dense = random_gradient(rng, shape)
            g, touched = torch.tensor(g_dense), range(shape[0])
        else:
            rows = rng.choice(shape[0], size=3)
            vals = rng.standard_normal((3,) + shape[1:])
            g = torch.sparse_coo_tensor(torch.as_tensor(rows)[None], torch.as_tensor(vals), shape,
                                        check_invariants=True)
            g_dense, touched = dense_from_entries(shape, rows, vals)
        ref.step(g_dense, touched)
        updates, state = tx.update({"p": g}, state, params)
        params = sm3fn.apply_updates(params, updates)
        assert list(state["sm3", "p"].keys()) == ["accumulator_0"]
        np.testing.assert_allclose(params["p"].numpy(), ref.p, rtol=1e-9, atol=1e-12)


def test_empty_sparse_gradient_changes_nothing():
    tx = sm3fn.sm3(learning_rate=0.1)
    params = {"w": torch.randn(7, 3)}
    state = tx.init(params)
    empty = torch.sparse_coo_tensor(torch.zeros(1, 0, dtype=torch.long), torch.zeros(0, 3), (7, 3),
                                    check_invariants=True)
    updates, new_state = tx.update({"w": empty}, state, params)
    assert torch.equal(sm3fn.apply_updates(params, updates)["w"], params["w"])
    assert (new_state == state).all()


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_bad_sparse_input_is_rejected_before_anything_changes():
    params = {"emb": torch.randn(5, 3)}
    tx = sm3fn.scale_by_sm3(sparse={"emb"})
    state = tx.init(params)
    before = state.clone()
    csr = torch.randn(5, 3).to_sparse_csr()
    with pytest.raises(TypeError, match=r"grads\['emb'\].*sparse_csr"):
        tx.update({"emb": csr}, state)
    wrong = torch.sparse_coo_tensor(torch.tensor([[0, 7]]), torch.ones(2, 3), (8, 3), check_invariants=True)
    with pytest.raises(ValueError, match=r"grads\['emb'\] has shape \(8, 3\)"):
        tx.update({"emb": wrong}, state)
    no_sparse_dim = torch.sparse_coo_tensor(torch.zeros(0, 1, dtype=torch.long), torch.randn(1, 5, 3), (5, 3),
                                            check_invariants=True)
    with pytest.raises(ValueError, match="no sparse dimension"):
        tx.update({"emb": no_sparse_dim}, state)
    assert (state == before).all()
    with pytest.raises(ValueError, match=r"params\['s'\] is declared sparse but is 0-d"):
        sm3fn.scale_by_sm3(sparse={"s"}).init({"s": torch.tensor(1.0)})
    for bad in ["emb", 3, [1]]:
        with pytest.raises(TypeError, match="sparse"):
            sm3fn.sm3(sparse=bad)


@pytest.mark.slow
def test_compile_names_the_sparse_parameter_and_falls_back_without_fullgraph():
    rng = np.random.default_rng(4)
    module = torch.nn.Embedding(N, D, sparse=True)
    tx = sm3fn.sm3(learning_rate=0.1, sparse={"emb.weight"})
    params = {"emb.weight": torch.randn(N, D)}
    state = tx.init(params)
    g, _ = embedding_grad(module, params["emb.weight"], rng)

    def step(grads, state, params):
        updates, state = tx.update(grads, state, params)
        return sm3fn.apply_updates(params, updates), state

    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"parameter 'emb.weight' takes sparse gradients"):
        torch.compile(step, fullgraph=True)({"emb.weight": g}, state, params)
    torch._dynamo.reset()
    got, got_state = torch.compile(step)({"emb.weight": g}, state, params)  # eager fallback
    want, want_state = step({"emb.weight": g}, state, params)
    assert torch.equal(got["emb.weight"], want["emb.weight"]) and (got_state == want_state).all()
    torch._dynamo.reset()


def test_trace_passes_sparse_updates_and_keeps_no_buffer_for_declared():
    u = torch.sparse_coo_tensor(torch.tensor([[2, 0, 2]]), torch.randn(3, 4), (5, 4), check_invariants=True)
    dense = torch.randn(3, 4)
    tx = sm3fn.trace(0.9, sparse=lambda name: name.startswith("emb"))
    params = {"emb": torch.zeros(5, 4), "other": torch.zeros(5, 4), "dense": torch.zeros(3, 4)}
    state = tx.init(params)
    assert sorted(state.keys()) == ["dense", "other"]
    _, state = tx.update({"emb": dense.new_zeros(5, 4), "other": dense.new_zeros(5, 4), "dense": dense}, state)
    buf = state["other"].clone()
    out, new_state = tx.update({"emb": u, "other": u, "dense": dense}, state)
    assert out["emb"] is u and out["other"] is u  # no momentum on sparse updates
    assert torch.equal(new_state["other"], buf)
    torch.testing.assert_close(out["dense"], 0.9 * dense + dense)  # heavy ball, second step
