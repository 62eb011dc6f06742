"""zero_nans, clip, set_to_zero, freeze and sm3fn.tree, against optax's definitions
(written out here with NumPy) and optax itself where installed; compile and vmap smoke tests."""

import importlib
import pkgutil

import numpy as np
import pytest
import torch
from tensordict import TensorDict
from torch._dynamo.testing import CompileCounter

import sm3fn
from reference import ReferenceSM3, random_gradient


def _grads(seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((4, 3)) * 3
    w[1, 2] = w[3, 0] = np.nan
    w[0, 0] = np.inf
    return {"w": w, "b": rng.standard_normal(3) * 3}


def _torch(tree):
    return {k: torch.tensor(v) for k, v in tree.items()}


def test_zero_nans():
    g = _grads()
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
    g = _grads(1)
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
    g = _grads(4)
    theirs = {"w": jnp.asarray(g["w"], dtype=jnp.float32), "b": jnp.asarray(g["b"], dtype=jnp.float32)}
    ours = {k: torch.tensor(v, dtype=torch.float32) for k, v in g.items()}
    for mine, their in [(sm3fn.zero_nans(), optax.zero_nans()), (sm3fn.clip(0.7), optax.clip(0.7)),
                        (sm3fn.set_to_zero(), optax.set_to_zero())]:
        a, _ = mine.update(ours, mine.init(ours))
        b, _ = their.update(theirs, their.init(theirs))
        for k in g:
            np.testing.assert_array_equal(a[k].numpy(), np.asarray(b[k]))


# -- sm3fn.tree ------------------------------------------------------------------------


def test_tree_helpers():
    rng = np.random.default_rng(5)
    x = {"a": rng.standard_normal((2, 3)), "n": {"b": rng.standard_normal(4)}}
    y = {"a": rng.standard_normal((2, 3)), "n": {"b": rng.standard_normal(4)}}
    tx, ty = ({"a": torch.tensor(t["a"]), "n": {"b": torch.tensor(t["n"]["b"])}} for t in (x, y))
    flat = lambda t: np.concatenate([t["a"].ravel(), t["n"]["b"].ravel()])  # noqa: E731
    tree = sm3fn.tree
    as_numpy = lambda t: {"a": t["a"].numpy(), "n": {"b": t["n"]["b"].numpy()}}  # noqa: E731
    np.testing.assert_allclose(flat(as_numpy(tree.add(tx, ty, tx))), 2 * flat(x) + flat(y))
    np.testing.assert_allclose(flat(as_numpy(tree.sub(tx, ty))), flat(x) - flat(y))
    assert float(tree.vdot(tx, ty)) == pytest.approx(float(flat(x) @ flat(y)))
    assert float(tree.norm(tx)) == pytest.approx(float(np.linalg.norm(flat(x))))
    assert float(tree.norm(tx)) == float(sm3fn.global_norm(tx))
    scaled = tree.scale(0.5, tx)
    np.testing.assert_allclose(scaled["n"]["b"].numpy(), 0.5 * x["n"]["b"])
    zeros, ones = tree.zeros_like(tx, dtype=torch.float32), tree.ones_like(tx)
    assert zeros["a"].dtype == torch.float32 and not zeros["a"].any() and ones["n"]["b"].dtype == torch.float64
    assert torch.equal(tree.full_like(tx, 7.0)["a"], torch.full((2, 3), 7.0, dtype=torch.float64))
    clipped = tree.clip(tx, -0.1, 0.2)
    np.testing.assert_array_equal(clipped["a"].numpy(), np.clip(x["a"], -0.1, 0.2))
    assert tree.cast(tx, torch.bfloat16)["a"].dtype == torch.bfloat16
    mapped = tree.tree_map(lambda u, v: u * v, tx, ty)
    np.testing.assert_allclose(mapped["a"].numpy(), x["a"] * y["a"])


def test_tree_keeps_containers_and_none():
    td = TensorDict({"a": torch.ones(2), "n": {"b": torch.ones(3)}}, batch_size=[])
    out = sm3fn.tree.scale(2.0, td)
    assert isinstance(out, TensorDict) and torch.equal(out["n", "b"], torch.full((3,), 2.0))
    d = {"a": torch.ones(2), "frozen": None}
    assert sm3fn.tree.zeros_like(d)["frozen"] is None
    assert sm3fn.tree.add(d, d)["frozen"] is None
    with pytest.raises(ValueError, match="'c'"):
        sm3fn.tree.add({"a": torch.ones(2)}, {"a": torch.ones(2), "c": torch.ones(1)})
    with pytest.raises(TypeError, match="dtype"):
        sm3fn.tree.cast(d, "float32")


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


def test_tree_helpers_compile_and_vmap():
    def f(x, y):
        t = sm3fn.tree
        return t.vdot(t.add(x, t.scale(2.0, y)), t.clip(t.sub(x, y), -1.0, 1.0)) + t.norm(t.zeros_like(x))

    x = {"a": torch.randn(3, 2), "b": torch.randn(2)}
    y = {"a": torch.randn(3, 2), "b": torch.randn(2)}
    counter = CompileCounter()
    torch.testing.assert_close(torch.compile(f, backend=counter, fullgraph=True)(x, y), f(x, y))
    assert counter.frame_count == 1
    bx = {k: torch.stack([v, v * 2]) for k, v in x.items()}
    by = {k: torch.stack([v, -v]) for k, v in y.items()}
    got = torch.func.vmap(f)(bx, by)
    torch.testing.assert_close(got[1], f({k: v[1] for k, v in bx.items()}, {k: v[1] for k, v in by.items()}))


# -- __all__ ---------------------------------------------------------------------------


TYPE_ALIASES = {"OptState", "Tree", "Schedule", "ScalarOrSchedule", "Mask", "Labels", "Path", "Template",
                "TransformOrFactory", "Step", "Value"}


def _modules():
    """sm3fn's public modules (no ``_`` in the dotted name: the private ones export nothing)."""
    yield sm3fn
    for info in pkgutil.walk_packages(sm3fn.__path__, "sm3fn."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            yield importlib.import_module(info.name)


@pytest.mark.parametrize("module", list(_modules()), ids=lambda m: m.__name__)
def test_every_module_has_an_all_of_its_own_names(module):
    assert hasattr(module, "__all__"), module.__name__
    for name in module.__all__:
        value = getattr(module, name)  # every exported name exists
        owner = getattr(value, "__module__", None)
        # nothing re-exported from torch, typing, tensordict, numbers ...
        if name in TYPE_ALIASES or isinstance(value, str):  # OptState = TensorDictBase; PARAM = "*"
            continue
        if isinstance(value, type(sm3fn)):
            assert value.__name__.startswith("sm3fn"), (module.__name__, name)
        else:
            assert owner is not None and owner.startswith("sm3fn"), (module.__name__, name, owner)


def test_top_level_exports_the_new_names():
    for name in ("MultiSteps", "zero_nans", "clip", "set_to_zero", "freeze", "tree"):
        assert name in sm3fn.__all__ and hasattr(sm3fn, name)
