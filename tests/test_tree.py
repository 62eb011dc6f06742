"""sm3fn.tree against NumPy; containers and None leaves kept; under compile and vmap."""

import numpy as np
import pytest
import torch
from tensordict import TensorDict
from torch._dynamo.testing import CompileCounter

import sm3fn


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
