"""Weight decay, clipping, masking/partition and named_chain state, against NumPy references."""

import io

import numpy as np
import pytest
import torch
from tensordict import TensorDict

import sm3fn
from reference import ReferenceSM3, random_gradient

SHAPES = {"w": (6, 4), "b": (4,), "norm": (4,), "emb": (5, 3)}


def _params(rng, dtype=torch.float64):
    return {k: torch.tensor(rng.standard_normal(s), dtype=dtype) for k, s in SHAPES.items()}


def _grads(rng, dtype=torch.float64):
    return {k: torch.tensor(random_gradient(rng, s), dtype=dtype) for k, s in SHAPES.items()}


def _np(tree):
    return {k: None if v is None else v.detach().numpy().astype(np.float64) for k, v in tree.items()}


# --- add_decayed_weights -----------------------------------------------------------------------
def test_decoupled_weight_decay_with_sm3_matches_reference():
    """chain(scale_by_sm3, add_decayed_weights(masked), lr): p <- p - lr * (u + wd * p) on masked params."""
    rng = np.random.default_rng(0)
    lr, wd = 0.05, 0.3
    params = _params(rng)
    refs = {k: ReferenceSM3(v.numpy(), lr=lr) for k, v in params.items()}
    decays = {"w", "emb"}  # 2-d only: no decay on biases and norms
    tx = sm3fn.chain(
        sm3fn.scale_by_sm3(),
        sm3fn.add_decayed_weights(wd, mask=lambda path, p: p.ndim > 1),
        sm3fn.scale_by_learning_rate(lr),
    )
    state = tx.init(params)
    for _ in range(5):
        grads = _grads(rng)
        for k, ref in refs.items():
            before = ref.p.copy()
            ref.step(grads[k].numpy())  # p - lr * u
            if k in decays:
                ref.p = ref.p - lr * wd * before
        updates, state = tx.update(grads, state, params)
        params = sm3fn.apply_updates(params, updates)
        for k, ref in refs.items():
            np.testing.assert_allclose(params[k].numpy(), ref.p, rtol=1e-10, atol=1e-12, err_msg=k)


@pytest.mark.parametrize("mask_kind", ["none", "predicate", "tree", "tensordict"])
def test_weight_decay_masks(mask_kind):
    rng = np.random.default_rng(1)
    params, updates = _params(rng), _grads(rng)
    wd = float(rng.uniform(0.01, 1.0))
    chosen = {"w": True, "b": False, "norm": False, "emb": True}
    mask = {
        "none": None,
        "predicate": lambda path, p: path in ("w", "emb"),
        "tree": chosen,
        "tensordict": TensorDict({k: torch.tensor(v) for k, v in chosen.items()}, batch_size=[]),
    }[mask_kind]
    tx = sm3fn.add_decayed_weights(wd, mask=mask)
    out, _ = tx.update(updates, tx.init(params), params)
    p, u = _np(params), _np(updates)
    for k in SHAPES:
        decayed = mask_kind == "none" or chosen[k]
        want = u[k] + wd * p[k] if decayed else u[k]
        np.testing.assert_allclose(out[k].numpy(), want, rtol=1e-12, atol=0, err_msg=k)


def test_weight_decay_errors_and_frozen():
    params = {"w": torch.randn(3, 2), "b": torch.randn(2)}
    tx = sm3fn.add_decayed_weights(0.1, mask={"w": True})
    with pytest.raises(ValueError, match="needs params"):
        tx.update({"w": torch.randn(3, 2), "b": torch.randn(2)}, tx.init(params))
    with pytest.raises(ValueError, match="mask has no entry for key 'b'"):
        tx.update({"w": torch.randn(3, 2), "b": torch.randn(2)}, tx.init(params), params)
    with pytest.raises(TypeError, match=r"mask\['b'\] must be a bool"):
        sm3fn.add_decayed_weights(0.1, mask={"w": True, "b": "yes"}).update(
            {"w": torch.randn(3, 2), "b": torch.randn(2)}, TensorDict({}), params
        )
    with pytest.raises(ValueError, match="weight_decay"):
        sm3fn.add_decayed_weights(-1.0)
    out, _ = sm3fn.add_decayed_weights(0.1).update({"w": None, "b": torch.ones(2)}, TensorDict({}), params)
    assert out["w"] is None


# --- clip_by_global_norm ------------------------------------------------------------------------
@pytest.mark.parametrize("scale_exp", [-3, 0, 3])
def test_clip_by_global_norm_matches_reference(scale_exp):
    rng = np.random.default_rng(scale_exp + 10)
    updates = {k: v * 10.0**scale_exp for k, v in _grads(rng).items()}
    max_norm = float(rng.uniform(0.5, 2.0))
    u = _np(updates)
    norm = np.sqrt(sum(float(np.sum(x**2)) for x in u.values()))
    factor = 1.0 if norm <= max_norm else max_norm / norm
    torch.testing.assert_close(sm3fn.global_norm(updates), torch.tensor(norm, dtype=torch.float64))
    out, _ = sm3fn.clip_by_global_norm(max_norm).update(updates, TensorDict({}))
    for k in SHAPES:
        np.testing.assert_allclose(out[k].numpy(), u[k] * factor, rtol=1e-12, atol=0, err_msg=k)
    got_norm = np.sqrt(sum(float(np.sum(x.numpy() ** 2)) for x in out.values()))
    assert got_norm <= max_norm * (1 + 1e-12)


def test_clip_zero_float16_and_tensor_max_norm():
    zeros = {"w": torch.zeros(3, 2), "b": None}
    out, _ = sm3fn.clip_by_global_norm(1.0).update(zeros, TensorDict({}))
    assert torch.equal(out["w"], torch.zeros(3, 2)) and out["b"] is None
    # float16: the squares overflow float16 (300**2 * 6 > 65504); the norm is taken in float32
    big = {"w": torch.full((3, 2), 300.0, dtype=torch.float16)}
    out, _ = sm3fn.clip_by_global_norm(1.0).update(big, TensorDict({}))
    assert out["w"].dtype == torch.float16
    np.testing.assert_allclose(out["w"].float().numpy(), np.full((3, 2), 1 / np.sqrt(6)), rtol=1e-3)
    # a tensor max_norm gets gradients
    m = torch.tensor(0.5, requires_grad=True)
    g = {"w": torch.tensor([[3.0, 4.0]])}
    out, _ = sm3fn.clip_by_global_norm(m).update(g, TensorDict({}))
    out["w"].sum().backward()
    torch.testing.assert_close(m.grad, torch.tensor(7.0 / 5.0))
    with pytest.raises(ValueError, match="max_norm"):
        sm3fn.clip_by_global_norm(0.0)
    with pytest.raises(TypeError, match="updates\\['w'\\]"):
        sm3fn.clip_by_global_norm(1.0).update({"w": torch.ones(2, dtype=torch.int64)}, TensorDict({}))


# --- masked / partition -------------------------------------------------------------------------
def test_masked_sm3_on_matrices_only():
    rng = np.random.default_rng(3)
    params = _params(rng)
    tx = sm3fn.masked(sm3fn.scale_by_sm3(), lambda path, p: p.ndim >= 2)
    state = tx.init(params)
    assert sorted(state.keys()) == ["emb", "w"]  # no state for the vectors
    refs = {k: ReferenceSM3(params[k].numpy()) for k in ("w", "emb")}
    for _ in range(3):
        grads = _grads(rng)
        out, state = tx.update(grads, state, params)
        for k in SHAPES:
            if k in refs:
                np.testing.assert_allclose(out[k].numpy(), refs[k].step(grads[k].numpy()), rtol=1e-10, atol=1e-14)
            else:
                assert out[k] is grads[k]  # passed through untouched


def test_partition_labels_tree_and_predicate():
    rng = np.random.default_rng(4)
    params = _params(rng)
    transforms = {"adaptive": sm3fn.sm3(0.1, momentum=0.5), "sgd": sm3fn.scale_by_learning_rate(0.01)}
    label_tree = {"w": "adaptive", "emb": "adaptive", "b": "sgd", "norm": "sgd"}
    tx_tree = sm3fn.partition(transforms, label_tree)
    tx_fn = sm3fn.partition(transforms, lambda path, p: "adaptive" if p.ndim > 1 else "sgd")
    s_tree, s_fn = tx_tree.init(params), tx_fn.init(params)
    assert sorted(s_tree["adaptive", "sm3"].keys()) == ["emb", "w"]
    refs = {k: ReferenceSM3(params[k].numpy(), lr=0.1, momentum=0.5) for k in ("w", "emb")}
    sgd = {k: params[k].numpy().copy() for k in ("b", "norm")}
    p_tree, p_fn = dict(params), dict(params)
    for _ in range(3):
        grads = _grads(rng)
        u_tree, s_tree = tx_tree.update(grads, s_tree, p_tree)
        u_fn, s_fn = tx_fn.update(grads, s_fn, p_fn)
        p_tree, p_fn = sm3fn.apply_updates(p_tree, u_tree), sm3fn.apply_updates(p_fn, u_fn)
        for k, ref in refs.items():
            ref.step(grads[k].numpy())
        for k in sgd:
            sgd[k] = sgd[k] - 0.01 * grads[k].numpy()
        for k in SHAPES:
            want = refs[k].p if k in refs else sgd[k]
            np.testing.assert_allclose(p_tree[k].numpy(), want, rtol=1e-10, atol=1e-12, err_msg=k)
            torch.testing.assert_close(p_fn[k], p_tree[k], rtol=0, atol=0)


def test_partition_nested_tensordict_and_errors():
    params = TensorDict(
        {"enc": {"weight": torch.randn(4, 3), "bias": torch.randn(3)}, "head": torch.randn(3, 2)}, batch_size=[]
    )
    tx = sm3fn.partition(
        {"decay": sm3fn.add_decayed_weights(0.5), "plain": sm3fn.identity()},
        lambda path, p: "plain" if path.endswith("bias") else "decay",
    )
    state = tx.init(params)
    grads = params.apply(torch.randn_like)
    out, _ = tx.update(grads, state, params)
    assert isinstance(out, TensorDict)
    torch.testing.assert_close(out["enc", "bias"], grads["enc", "bias"])
    torch.testing.assert_close(out["enc", "weight"], grads["enc", "weight"] + 0.5 * params["enc", "weight"])
    torch.testing.assert_close(out["head"], grads["head"] + 0.5 * params["head"])
    bad = sm3fn.partition({"a": sm3fn.identity()}, lambda path, p: "b")
    with pytest.raises(ValueError, match="label 'b'"):
        bad.init(params)
    with pytest.raises(ValueError, match="labels has no entry for key 'head'"):
        sm3fn.partition({"a": sm3fn.identity()}, {"enc": {"weight": "a", "bias": "a"}}).init(params)
    with pytest.raises(ValueError, match="partition labels"):
        sm3fn.partition({"a.b": sm3fn.identity()}, lambda path, p: "a.b")


# --- named_chain state ---------------------------------------------------------------------------
def test_named_chain_state_is_addressable_and_saves():
    rng = np.random.default_rng(6)
    params = _params(rng)
    total = 20
    tx = sm3fn.named_chain(
        ("clip", sm3fn.clip_by_global_norm(1.0)),
        ("sm3", sm3fn.scale_by_sm3()),
        ("decay", sm3fn.add_decayed_weights(1e-2, mask=lambda path, p: p.ndim > 1)),
        ("learning_rate", sm3fn.scale_by_learning_rate(sm3fn.schedules.recipe(0.1, total))),
        ("average", sm3fn.parameter_averaging(decay=0.9)),
    )
    state = tx.init(params)
    assert list(state.keys()) == ["clip", "sm3", "decay", "learning_rate", "average"]
    # the "sm3" stage holds exactly what scale_by_sm3 alone would
    alone = sm3fn.scale_by_sm3().init(params)
    assert (state["sm3"] == alone).all()
    assert state["sm3", "w", "accumulator_0"].shape == (6, 1)
    grads = _grads(rng)
    _, state1 = tx.update(grads, state, params)
    sm3_state = sm3fn.scale_by_sm3().update(sm3fn.clip_by_global_norm(1.0).update(grads, None)[0], alone)[1]
    for k in SHAPES:
        torch.testing.assert_close(state1["sm3", k, "accumulator_0"], sm3_state[k]["accumulator_0"])
    # a stage's state can be read and replaced by name: jump the schedule to the last step
    jumped = state1.clone()
    jumped["learning_rate", "count"] = torch.tensor(total, dtype=torch.int64)
    updates, _ = tx.update(grads, jumped, params)
    assert all(torch.equal(updates[k], torch.zeros_like(updates[k])) for k in SHAPES)  # recipe: lr 0 at the end
    buf = io.BytesIO()
    torch.save(state1, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert (loaded == state1).all()


def test_sparse_updates_clip_decay_and_average_like_their_dense_copies():
    """An uncoalesced sparse COO update (nn.Embedding(sparse=True)) gives the dense numbers."""
    torch.manual_seed(8)
    emb = torch.nn.Embedding(12, 3, sparse=True)
    (emb(torch.tensor([1, 4, 4, 9])) ** 2).sum().backward()
    sparse = emb.weight.grad
    assert not sparse.is_coalesced()
    params = {"e": emb.weight.detach().clone(), "w": torch.randn(3, 2)}
    dense_g = {"e": sparse.to_dense(), "w": torch.randn(3, 2)}
    sparse_g = {"e": sparse, "w": dense_g["w"]}
    for tx in (
        sm3fn.clip_by_global_norm(0.7),
        sm3fn.add_decayed_weights(0.3),
        sm3fn.chain(sm3fn.scale(-0.1), sm3fn.parameter_averaging(decay=0.5)),
    ):
        state = tx.init(params)
        out_dense, s_dense = tx.update(dense_g, state, params)
        out_sparse, s_sparse = tx.update(sparse_g, state, params)
        for k in params:
            torch.testing.assert_close(out_sparse[k].to_dense(), out_dense[k])
        assert (s_sparse == s_dense).all()
    clipped, _ = sm3fn.clip_by_global_norm(0.7).update(sparse_g, TensorDict({}))
    assert clipped["e"].layout == torch.sparse_coo  # clipping keeps it sparse


def test_toolbox_chain_in_functional_optimizer_matches_functional_loop():
    """The whole toolbox runs as a torch.optim optimizer; its average is in the per-parameter state."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))

    def make():
        return sm3fn.named_chain(
            ("clip", sm3fn.clip_by_global_norm(0.5)),
            ("sm3", sm3fn.scale_by_sm3()),
            ("decay", sm3fn.add_decayed_weights(0.1, mask=lambda path, p: p.ndim > 1)),
            ("learning_rate", sm3fn.scale_by_learning_rate(sm3fn.schedules.recipe(0.1, 10))),
            ("average", sm3fn.parameter_averaging(decay=0.5)),
        )

    opt = sm3fn.optim.FunctionalOptimizer(model.parameters(), make())
    # the optimizer keys a group's parameters param_<i>; the functional loop does the same
    params = {f"param_{i}": p.detach().clone() for i, p in enumerate(model.parameters())}
    tx = make()
    state = tx.init(params)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        grads = {f"param_{i}": p.grad.clone() for i, p in enumerate(model.parameters())}
        opt.step()
        updates, state = tx.update(grads, state, params)
        params = sm3fn.apply_updates(params, updates)
    averaged = sm3fn.averaged_params(state, like=params)
    for i, p in enumerate(model.parameters()):
        torch.testing.assert_close(p.detach(), params[f"param_{i}"])
        torch.testing.assert_close(opt.state[p]["average.averaged_params.*"], averaged[f"param_{i}"])
