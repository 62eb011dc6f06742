"""The transforms of ``sm3fn.transforms`` not tested in a file of their own (accumulation,
averaging and finite have theirs): ema, trace (vs torch.optim.SGD), scaling, chain, named_chain,
weight decay, clipping, masking/partition, zero_nans, set_to_zero, freeze, against NumPy
references (optax's definitions) and optax itself where installed; compile and vmap."""


import numpy as np
import pytest
import torch
from helpers import saved_and_loaded
from reference import ReferenceSM3, random_gradient
from tensordict import TensorDict
from torch._dynamo.testing import CompileCounter

import sm3fn

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
    loaded = saved_and_loaded(state1)
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


# --- The small transforms against references: ema, trace (vs torch.optim.SGD), scaling, chain.

def _run(tx, grads_seq, params):
    state = tx.init(params)
    outs = []
    for grads in grads_seq:
        updates, state = tx.update(grads, state, params)
        outs.append(updates)
    return outs, state


def test_ema_matches_numpy():
    rng = np.random.default_rng(0)
    gs = [rng.standard_normal((3, 2)) for _ in range(5)]
    outs, _ = _run(sm3fn.ema(0.8), [{"w": torch.tensor(g)} for g in gs], {"w": torch.zeros(3, 2, dtype=torch.float64)})
    m = np.zeros((3, 2))
    for g, out in zip(gs, outs):
        m = 0.8 * m + 0.2 * g
        np.testing.assert_allclose(out["w"].numpy(), m, rtol=1e-13)


@pytest.mark.parametrize("nesterov", [False, True])
def test_trace_matches_torch_sgd(nesterov):
    gen = torch.Generator().manual_seed(1)
    p0 = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    grads = [torch.randn(4, 3, generator=gen, dtype=torch.float64) for _ in range(5)]
    ref = torch.nn.Parameter(p0.clone())
    opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9, nesterov=nesterov)
    tx = sm3fn.chain(sm3fn.trace(0.9, nesterov=nesterov), sm3fn.scale_by_learning_rate(0.1))
    params = {"w": p0.clone()}
    state = tx.init(params)
    for g in grads:
        ref.grad = g.clone()
        opt.step()
        updates, state = tx.update({"w": g}, state, params)
        params = sm3fn.apply_updates(params, updates)
    torch.testing.assert_close(params["w"], ref.detach(), rtol=1e-12, atol=1e-12)


def test_scale_and_learning_rate_tensor_gets_gradient():
    lr = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, dtype=torch.float64)
    tx = sm3fn.scale_by_learning_rate(lr)
    updates, _ = tx.update({"w": g}, tx.init({"w": g}))
    torch.testing.assert_close(updates["w"], -0.3 * g)
    (d_lr,) = torch.autograd.grad(updates["w"].sum(), lr)
    torch.testing.assert_close(d_lr, -g.sum())
    updates, _ = sm3fn.scale(2.5).update({"w": g}, sm3fn.scale(2.5).init({"w": g}))
    torch.testing.assert_close(updates["w"], 2.5 * g)


def test_schedule_sees_the_step_count_as_a_tensor():
    seen = []

    def schedule(count):
        seen.append(count)
        return 1.0 / (1.0 + count)

    g = torch.randn(3, dtype=torch.float64)
    outs, state = _run(sm3fn.scale_by_schedule(schedule), [{"w": g}] * 4, {"w": g})
    assert all(isinstance(c, torch.Tensor) and c.dtype == torch.int64 for c in seen)
    assert [int(c) for c in seen] == [0, 1, 2, 3]
    for i, out in enumerate(outs):
        torch.testing.assert_close(out["w"], g / (1 + i))
    assert int(state["count"]) == 4


def test_sm3_with_schedule_is_sm3_with_that_rate():
    rng = np.random.default_rng(2)
    gs = [{"w": torch.tensor(rng.standard_normal((4, 3)))} for _ in range(4)]
    params = {"w": torch.tensor(rng.standard_normal((4, 3)))}
    # 0.125 * (c + 1) is exact in the float32 a tensor schedule computes in
    scheduled, _ = _run(sm3fn.sm3(learning_rate=lambda c: 0.125 * (c + 1)), gs, params)
    for i in range(4):
        fixed, _ = _run(sm3fn.sm3(learning_rate=0.125 * (i + 1)), gs[: i + 1], params)
        torch.testing.assert_close(scheduled[i]["w"], fixed[i]["w"], rtol=1e-13, atol=0)


def test_chain_applies_left_to_right_and_names_state():
    g = {"w": torch.randn(3, dtype=torch.float64)}
    tx = sm3fn.chain(sm3fn.scale(2.0), sm3fn.ema(0.5))
    outs, state = _run(tx, [g], g)
    torch.testing.assert_close(outs[0]["w"], 0.5 * 2.0 * g["w"])  # scale, then EMA from zero
    assert set(state.keys()) == {"0", "1"}
    named = sm3fn.named_chain(("double", sm3fn.scale(2.0)), ("avg", sm3fn.ema(0.5)))
    _, state = _run(named, [g], g)
    assert set(state.keys()) == {"double", "avg"}
    torch.testing.assert_close(state["avg", "w"], g["w"])  # 0.5 * 0 + 0.5 * 2g


def test_identity_and_sm3_state_names():
    g = {"w": torch.randn(3, 2)}
    outs, _ = _run(sm3fn.identity(), [g], g)
    assert outs[0]["w"] is g["w"]
    state = sm3fn.sm3(momentum=0.9).init(g)
    assert set(state.keys()) == {"sm3", "momentum", "learning_rate"}


# --- zero_nans, clip, set_to_zero, freeze against optax's definitions (NumPy) and optax itself

def _grads_with_nonfinite(seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((4, 3)) * 3
    w[1, 2] = w[3, 0] = np.nan
    w[0, 0] = np.inf
    return {"w": w, "b": rng.standard_normal(3) * 3}


def _torch(tree):
    return {k: torch.tensor(v) for k, v in tree.items()}


def test_zero_nans():
    g = _grads_with_nonfinite()
    tx = sm3fn.zero_nans()
    state = tx.init(_torch(g))
    assert not bool(state["w"]) and not bool(state["b"])
    out, state = tx.update(_torch(g), state)
    for k, v in g.items():
        np.testing.assert_array_equal(out[k].numpy(), np.where(np.isnan(v), 0.0, v))  # inf stays, as optax
    assert bool(state["w"]) and not bool(state["b"])
    out, state = tx.update({"w": None, "b": torch.tensor(g["b"])}, state)  # frozen: keeps its flag
    assert out["w"] is None and bool(state["w"])


def test_zero_nans_then_sm3_matches_reference():
    g = _grads_with_nonfinite(1)
    g["w"][0, 0] = 1.0
    init = np.random.default_rng(2).standard_normal((4, 3))
    tx = sm3fn.chain(sm3fn.zero_nans(), sm3fn.sm3(0.1))
    params = {"w": torch.tensor(init)}
    updates, _ = tx.update({"w": torch.tensor(g["w"])}, tx.init(params), params)
    ref = ReferenceSM3(init, lr=0.1)
    ref.step(np.nan_to_num(g["w"], nan=0.0))
    np.testing.assert_allclose(sm3fn.apply_updates(params, updates)["w"].numpy(), ref.p, rtol=1e-12)


@pytest.mark.parametrize("max_delta", [0.5, torch.tensor(1.5, dtype=torch.float64)])
def test_clip(max_delta):
    g = {"w": random_gradient(np.random.default_rng(3), (5, 4)) * 4}
    out, _ = sm3fn.clip(max_delta).update(_torch(g), sm3fn.clip(max_delta).init(_torch(g)))
    m = float(max_delta)
    np.testing.assert_array_equal(out["w"].numpy(), np.clip(g["w"], -m, m))
    assert (g["w"] > m).any()  # the test clips something


def test_clip_sparse_stays_sparse():
    i = torch.tensor([[0, 2, 2]])
    u = torch.sparse_coo_tensor(i, torch.tensor([[3.0, -0.2], [1.0, 1.0], [1.0, -4.0]]), (4, 2))
    out, _ = sm3fn.clip(1.5).update({"e": u}, sm3fn.clip(1.5).init({"e": u}))
    assert out["e"].layout == torch.sparse_coo
    torch.testing.assert_close(out["e"].to_dense(), u.to_dense().clamp(-1.5, 1.5))


def test_set_to_zero_and_freeze():
    params = {"enc": {"w": torch.randn(3, 2)}, "head": {"w": torch.randn(2, 2)}}
    grads = {"enc": {"w": torch.randn(3, 2)}, "head": {"w": torch.randn(2, 2)}}
    tx = sm3fn.partition({"train": sm3fn.sm3(0.1), "frozen": sm3fn.set_to_zero()},
                         lambda path, p: "frozen" if path.startswith("enc.") else "train")
    state = tx.init(params)
    held = [k for k, _ in state.items(include_nested=True, leaves_only=True)]
    assert held and not any("enc" in k for k in held)  # no optimizer state for the frozen part
    updates, state = tx.update(grads, state, params)
    assert torch.equal(updates["enc"]["w"], torch.zeros(3, 2))
    want, _ = sm3fn.sm3(0.1).update({"w": grads["head"]["w"]}, sm3fn.sm3(0.1).init({"w": params["head"]["w"]}))
    torch.testing.assert_close(updates["head"]["w"], want["w"])
    frozen = sm3fn.chain(sm3fn.sm3(0.1), sm3fn.freeze(lambda path, p: path.startswith("enc.")))
    updates, _ = frozen.update(grads, frozen.init(params), params)
    assert torch.equal(updates["enc"]["w"], torch.zeros(3, 2))
    torch.testing.assert_close(updates["head"]["w"], want["w"])


def test_against_optax_itself():
    optax = pytest.importorskip("optax", reason="optax not installed: the NumPy tests above still run")
    jnp = pytest.importorskip("jax.numpy")
    g = _grads_with_nonfinite(4)
    theirs = {"w": jnp.asarray(g["w"], dtype=jnp.float32), "b": jnp.asarray(g["b"], dtype=jnp.float32)}
    ours = {k: torch.tensor(v, dtype=torch.float32) for k, v in g.items()}
    for mine, their in [(sm3fn.zero_nans(), optax.zero_nans()), (sm3fn.clip(0.7), optax.clip(0.7)),
                        (sm3fn.set_to_zero(), optax.set_to_zero())]:
        a, _ = mine.update(ours, mine.init(ours))
        b, _ = their.update(theirs, their.init(theirs))
        for k in g:
            np.testing.assert_array_equal(a[k].numpy(), np.asarray(b[k]))


# -- compile and vmap ------------------------------------------------------------------

TRANSFORMS = {
    "zero_nans": lambda: sm3fn.chain(sm3fn.zero_nans(), sm3fn.sm3(0.1)),
    "clip": lambda: sm3fn.chain(sm3fn.clip(0.5), sm3fn.sm3(0.1)),
    "set_to_zero": lambda: sm3fn.partition({"t": sm3fn.sm3(0.1), "z": sm3fn.set_to_zero()},
                                           lambda path, p: "z" if path == "b" else "t"),
    "freeze": lambda: sm3fn.chain(sm3fn.sm3(0.1), sm3fn.freeze(lambda path, p: path == "b")),
    "MultiSteps": lambda: sm3fn.chain(sm3fn.zero_nans(), sm3fn.MultiSteps(sm3fn.sm3(0.1, momentum=0.9), 2)),
}


@pytest.mark.parametrize("name", TRANSFORMS)
def test_compiles_fullgraph(name):
    tx = TRANSFORMS[name]()
    params = {"w": torch.randn(4, 3), "b": torch.randn(3)}
    counter = CompileCounter()
    step = torch.compile(tx.update, backend=counter, fullgraph=True)
    state, eager_state = tx.init(params), tx.init(params)
    for _ in range(3):
        g = {k: torch.randn_like(v) for k, v in params.items()}
        g["w"][0, 0] = float("nan")
        u, state = step(g, state, params)
        want, eager_state = tx.update(g, eager_state, params)
        for k in params:
            torch.testing.assert_close(u[k], want[k], equal_nan=True)
    assert counter.frame_count == 1


@pytest.mark.parametrize("name", TRANSFORMS)
def test_vmap_over_tasks(name):
    tasks = 3
    params = {"w": torch.randn(tasks, 4, 3), "b": torch.randn(tasks, 3)}
    grads = [{k: torch.randn_like(v) * 2 for k, v in params.items()} for _ in range(2)]

    def run(p, gs):
        tx = TRANSFORMS[name]()
        s = tx.init(p)
        for g in gs:
            u, s = tx.update(g, s, p)
            p = sm3fn.apply_updates(p, u)
        return torch.cat([p["w"].reshape(-1), p["b"]])

    got = torch.func.vmap(run)(params, grads)
    for i in range(tasks):
        want = run({k: v[i] for k, v in params.items()}, [{k: v[i] for k, v in g.items()} for g in grads])
        torch.testing.assert_close(got[i], want)


# --- A whole training step of these transforms under torch.compile(fullgraph=True): eager's numbers, no recompiles

@pytest.mark.slow
def test_toolbox_step_compiles_fullgraph():
    torch.manual_seed(0)
    total = 30
    tx = sm3fn.named_chain(
        ("clip", sm3fn.clip_by_global_norm(1.0)),
        ("sm3", sm3fn.masked(sm3fn.scale_by_sm3(), lambda path, p: p.ndim > 1)),
        ("decay", sm3fn.add_decayed_weights(1e-2, mask=lambda path, p: not path.endswith("b"))),
        ("learning_rate", sm3fn.scale_by_learning_rate(sm3fn.schedules.recipe(0.1, total))),
        ("average", sm3fn.parameter_averaging()),
    )

    def step(params, grads, state):
        updates, state = tx.update(grads, state, params)
        return sm3fn.apply_updates(params, updates), state

    compiled = torch.compile(step, fullgraph=True)
    params = {"w": torch.randn(6, 4), "b": torch.randn(4)}
    p_eager, s_eager = params, tx.init(params)
    p_comp, s_comp = params, tx.init(params)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(6):
            grads = {"w": torch.randn(6, 4) * 3, "b": torch.randn(4)}
            p_eager, s_eager = step(p_eager, grads, s_eager)
            p_comp, s_comp = compiled(p_comp, grads, s_comp)
    for k in params:
        torch.testing.assert_close(p_comp[k], p_eager[k])
        torch.testing.assert_close(
            sm3fn.averaged_params(s_comp, like=p_comp)[k], sm3fn.averaged_params(s_eager, like=p_eager)[k]
        )
    assert int(s_comp["learning_rate", "count"]) == 6
