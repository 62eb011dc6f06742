"""Purity, containers, frozen parameters, saving state, the public surface."""


import numpy as np
import pytest
import torch
from helpers import leaves, saved_and_loaded
from reference import random_gradient
from tensordict import TensorDict

import sm3fn


def _random_tree(gen, dtype=torch.float32):
    return {
        "linear": {"weight": torch.randn(6, 4, generator=gen, dtype=dtype), "bias": torch.randn(6, generator=gen, dtype=dtype)},
        "scale": torch.randn((), generator=gen, dtype=dtype),
        "conv.weight": torch.randn(3, 2, 2, 2, generator=gen, dtype=dtype),
    }


def _map(fn, tree):
    return {k: _map(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


@pytest.mark.parametrize("momentum,beta", [(0.0, 0.0), (0.9, 0.5)])
def test_update_is_pure(momentum, beta):
    gen = torch.Generator().manual_seed(0)
    params = _random_tree(gen)
    tx = sm3fn.sm3(0.1, momentum=momentum, beta=beta)
    state = tx.init(params)
    # a step first, so the state holds non-zero values worth protecting
    state = tx.update(_map(lambda p: torch.randn(p.shape, generator=gen), params), state, params)[1]
    grads = _map(lambda p: torch.randn(p.shape, generator=gen), params)
    before = ({k: v.clone() for k, v in leaves(params).items()},
              {k: v.clone() for k, v in leaves(grads).items()},
              state.clone())
    updates, new_state = tx.update(grads, state, params)
    for path, v in leaves(params).items():
        assert torch.equal(v, before[0][path])
    for path, v in leaves(grads).items():
        assert torch.equal(v, before[1][path])
    assert (state == before[2]).all()
    # and the new state is new memory: changing it does not reach the old one
    for old, new in zip(state.values(True, True), new_state.values(True, True)):
        assert old.data_ptr() != new.data_ptr()


def test_nested_dict_in_nested_dict_out():
    gen = torch.Generator().manual_seed(1)
    params = _random_tree(gen)
    tx = sm3fn.sm3(0.1)
    state = tx.init(params)
    updates, state = tx.update(_map(torch.randn_like, params), state, params)
    assert type(updates) is dict and type(updates["linear"]) is dict
    assert set(updates["linear"]) == {"weight", "bias"}
    new = sm3fn.apply_updates(params, updates)
    assert type(new) is dict and new["conv.weight"].shape == (3, 2, 2, 2)
    assert isinstance(state, TensorDict)


def test_tensordict_in_tensordict_out_and_to_module():
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 1))
    params = TensorDict.from_module(model).detach()
    tx = sm3fn.sm3(0.1, momentum=0.5)
    state = tx.init(params)
    grads = params.apply(torch.randn_like)
    updates, state = tx.update(grads, state, params)
    assert isinstance(updates, TensorDict)
    assert set(updates.keys(True, True)) == set(params.keys(True, True))
    new = sm3fn.apply_updates(params, updates)
    assert isinstance(new, TensorDict)
    new.to_module(model)
    assert torch.equal(model[0].weight, new["0", "weight"])


def test_dict_and_tensordict_give_the_same_numbers():
    gen = torch.Generator().manual_seed(2)
    params = _random_tree(gen, torch.float64)
    grads = _map(lambda p: torch.randn(p.shape, generator=gen, dtype=torch.float64), params)
    tx = sm3fn.sm3(0.1, momentum=0.9, beta=0.9)
    u_dict, s_dict = tx.update(grads, tx.init(params), params)
    td_params, td_grads = TensorDict(params, batch_size=[]), TensorDict(grads, batch_size=[])
    u_td, s_td = tx.update(td_grads, tx.init(td_params), td_params)
    for path, u in leaves(u_dict).items():
        assert torch.equal(u, u_td.get(path))
    assert (s_dict == s_td).all()


def test_frozen_parameter_none_gradient_keeps_state_and_value():
    gen = torch.Generator().manual_seed(3)
    params = {"w": torch.randn(4, 3, generator=gen), "frozen": torch.randn(5, generator=gen)}
    tx = sm3fn.sm3(0.1, momentum=0.9)
    state = tx.init(params)
    _, state = tx.update({k: torch.randn(v.shape, generator=gen) for k, v in params.items()}, state, params)
    kept = state.clone()
    updates, state = tx.update({"w": torch.randn(4, 3, generator=gen), "frozen": None}, state, params)
    assert updates["frozen"] is None
    assert torch.equal(state["sm3", "frozen", "accumulator_0"], kept["sm3", "frozen", "accumulator_0"])
    assert torch.equal(state["momentum", "frozen"], kept["momentum", "frozen"])
    assert not torch.equal(state["sm3", "w", "accumulator_0"], kept["sm3", "w", "accumulator_0"])
    new = sm3fn.apply_updates(params, updates)
    assert torch.equal(new["frozen"], params["frozen"])


def test_frozen_parameter_left_out_of_init():
    params = {"w": torch.randn(4, 3), "frozen": torch.randn(5)}
    trainable = {"w": params["w"]}
    tx = sm3fn.sm3(0.1)
    state = tx.init(trainable)
    updates, state = tx.update({"w": torch.randn(4, 3)}, state, params)
    new = sm3fn.apply_updates(params, updates)
    assert torch.equal(new["frozen"], params["frozen"])
    assert not torch.equal(new["w"], params["w"])


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_state_roundtrips_torch_save_weights_only(momentum):
    rng = np.random.default_rng(4)
    shapes = {"w": (5, 3), "b": (3,), "s": ()}
    params = {k: torch.tensor(rng.standard_normal(s)) for k, s in shapes.items()}
    tx = sm3fn.sm3(0.05, momentum=momentum)
    state = tx.init(params)
    grads_seq = [{k: torch.tensor(random_gradient(rng, s)) for k, s in shapes.items()} for _ in range(6)]
    for grads in grads_seq[:3]:
        updates, state = tx.update(grads, state, params)
        params = sm3fn.apply_updates(params, updates)
    loaded = saved_and_loaded({"params": params, "state": state})
    p2, s2 = loaded["params"], loaded["state"]
    assert isinstance(s2, TensorDict)
    for grads in grads_seq[3:]:
        updates, state = tx.update(grads, state, params)
        params = sm3fn.apply_updates(params, updates)
        updates2, s2 = tx.update(grads, s2, p2)
        p2 = sm3fn.apply_updates(p2, updates2)
    for k in shapes:
        assert torch.equal(params[k], p2[k])  # bit-identical resume


def test_public_names():
    expected = {
        "GradientTransformation", "apply_updates", "chain", "ema", "scale", "scale_by_learning_rate",
        "scale_by_schedule", "scale_by_sm3", "sm3", "trace", "named_chain", "identity",
    }
    assert expected <= set(sm3fn.__all__)
    for name in sm3fn.__all__:
        assert hasattr(sm3fn, name), name
    tx = sm3fn.sm3()
    assert isinstance(tx, sm3fn.GradientTransformation) and isinstance(tx, tuple)
    init, update = tx
    assert init is tx.init and update is tx.update


def test_defaults_follow_torch_sm3():
    import inspect

    sig = inspect.signature(sm3fn.sm3)
    assert {k: sig.parameters[k].default for k in ("learning_rate", "momentum", "beta", "eps")} == {
        "learning_rate": 0.1, "momentum": 0.0, "beta": 0.0, "eps": 1e-30}
