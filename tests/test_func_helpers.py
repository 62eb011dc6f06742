"""sm3fn.func: functional_call on TensorDicts and nested dicts, expand."""

import pytest
import torch
from tensordict import TensorDict
from torch.func import grad, vmap

import sm3fn
from sm3fn.func import expand, functional_call


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 2)).eval()


def test_functional_call_takes_tensordict_nested_and_flat_dicts():
    model = make_model()
    x = torch.randn(7, 3)
    flat = {k: v.detach() * 2 for k, v in model.state_dict().items()}  # params and buffers
    td = TensorDict(flat, batch_size=[]).unflatten_keys(".")
    assert isinstance(td["0"], TensorDict)  # nested by submodule, as from_module gives
    nested = td.to_dict()
    expected = torch.func.functional_call(model, flat, (x,))
    assert not torch.allclose(expected, model(x))  # the doubled weights are used
    for params in (flat, td, nested, TensorDict.from_module(model).apply(lambda t: t * 2)):
        torch.testing.assert_close(functional_call(model, params, (x,)), expected)


def test_functional_call_under_grad_and_vmap_with_tensordict():
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    params = TensorDict.from_module(model).detach()
    x, y = torch.randn(6, 3), torch.randn(6, 1)

    def loss(p):
        return ((functional_call(model, p, (x,)) - y) ** 2).mean()

    g = grad(loss)(params)
    assert isinstance(g, TensorDict)
    model.zero_grad()
    loss(TensorDict.from_module(model)).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(g[tuple(name.split("."))], p.grad)

    T = 3
    batched = expand(params, T).clone()
    batched["0", "weight"] = batched["0", "weight"] * torch.arange(1.0, T + 1).view(T, 1, 1)
    losses = vmap(loss)(batched)
    for t in range(T):
        torch.testing.assert_close(losses[t], loss(batched[t]))


def test_expand_dict_and_tensordict():
    tree = {"w": torch.randn(3, 2), "inner": {"b": torch.randn(2)}, "frozen": None}
    out = expand(tree, 4)
    assert out["w"].shape == (4, 3, 2) and out["inner"]["b"].shape == (4, 2) and out["frozen"] is None
    assert torch.equal(out["w"][2], tree["w"])
    td = TensorDict({"w": torch.randn(3, 2)}, batch_size=[3])
    assert expand(td, 5).batch_size == (5, 3)
    with pytest.raises(ValueError, match="n must be"):
        expand(tree, -1)
    with pytest.raises(ValueError, match="n must be"):
        expand(tree, 2.0)


def test_expand_gives_meta_parameters_the_sum_of_task_gradients():
    w = torch.randn(3, requires_grad=True)
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0])
    (expand({"w": w}, 4)["w"] * weights[:, None]).sum().backward()
    torch.testing.assert_close(w.grad, torch.full((3,), 10.0))


def test_top_level_names():
    assert sm3fn.stop_gradient is sm3fn.func.stop_gradient
    for name in ("stop_gradient", "inject_hyperparams", "func"):
        assert name in sm3fn.__all__
