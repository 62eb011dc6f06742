"""parameter_averaging / averaged_params against NumPy averages of the recorded iterates."""


import numpy as np
import pytest
import torch
from helpers import saved_and_loaded
from reference import random_gradient
from tensordict import TensorDict

import sm3fn

SHAPES = {"w": (5, 3), "b": (3,)}


def _run(tx, steps, rng, params=None, frozen=()):
    """Trains on random gradients; returns the final state, params and every iterate (NumPy)."""
    if params is None:
        params = {k: torch.tensor(rng.standard_normal(s)) for k, s in SHAPES.items()}
    state = tx.init(params)
    iterates = [{k: v.numpy().copy() for k, v in params.items()}]
    for _ in range(steps):
        grads = {k: None if k in frozen else torch.tensor(random_gradient(rng, s)) for k, s in SHAPES.items()}
        updates, state = tx.update(grads, state, params)
        params = sm3fn.apply_updates(params, updates)
        iterates.append({k: v.numpy().copy() for k, v in params.items()})
    return state, params, iterates


@pytest.mark.parametrize("start_step", [0, 4])
def test_polyak_is_the_mean_of_the_iterates(start_step):
    rng = np.random.default_rng(11)
    tx = sm3fn.chain(sm3fn.sm3(0.05, momentum=0.9), sm3fn.parameter_averaging(start_step=start_step))
    for steps in (1, 3, 9):
        state, params, its = _run(tx, steps, np.random.default_rng(steps))
        avg = sm3fn.averaged_params(state, like=params)
        for k in SHAPES:
            if steps <= start_step:
                want = its[steps][k]  # before the start the average tracks the params
            else:
                want = np.mean([it[k] for it in its[start_step + 1 : steps + 1]], axis=0)
            np.testing.assert_allclose(avg[k].numpy(), want, rtol=1e-10, atol=1e-12)
        assert int(state["1", "count"]) == steps


@pytest.mark.parametrize("start_step", [0, 3])
def test_ema_of_the_iterates(start_step):
    rng = np.random.default_rng(5)
    decay = 0.8
    tx = sm3fn.chain(sm3fn.sm3(0.1), sm3fn.parameter_averaging(decay=decay, start_step=start_step))
    state, params, its = _run(tx, 7, rng)
    want = {k: its[0][k].copy() for k in SHAPES}  # starts at the initial params
    for t, it in enumerate(its[1:], start=1):
        for k in SHAPES:
            want[k] = it[k] if t <= start_step else decay * want[k] + (1 - decay) * it[k]
    avg = sm3fn.averaged_params(state)  # no `like`: a TensorDict
    assert isinstance(avg, TensorDict)
    for k in SHAPES:
        np.testing.assert_allclose(avg[k].numpy(), want[k], rtol=1e-10, atol=1e-12)


def test_updates_pass_unchanged_and_frozen_params_are_averaged_as_constants():
    rng = np.random.default_rng(2)
    inner = sm3fn.sm3(0.1)
    tx = sm3fn.named_chain(("opt", inner), ("avg", sm3fn.parameter_averaging(decay=0.5)))
    params = {k: torch.tensor(rng.standard_normal(s)) for k, s in SHAPES.items()}
    state, inner_state = tx.init(params), inner.init(params)
    grads = {"w": torch.tensor(random_gradient(rng, SHAPES["w"])), "b": None}
    updates, state = tx.update(grads, state, params)
    want, _ = inner.update(grads, inner_state, params)
    torch.testing.assert_close(updates["w"], want["w"], rtol=0, atol=0)
    assert updates["b"] is None
    avg = sm3fn.averaged_params(state["avg"], like=params)
    torch.testing.assert_close(avg["b"], params["b"])
    torch.testing.assert_close(avg["w"], params["w"] + 0.5 * updates["w"])


def test_containers_dtypes_and_keys_left_out_of_init():
    rng = np.random.default_rng(9)
    params = TensorDict(
        {"enc": {"w": torch.randn(4, 3, dtype=torch.bfloat16)}, "head": torch.randn(3)}, batch_size=[]
    )
    tx = sm3fn.parameter_averaging()
    state = tx.init(params.exclude("head"))  # head is not averaged
    assert state["averaged_params", "enc", "w"].dtype == torch.float32  # bf16 -> float32 statistics
    upd = TensorDict({"enc": {"w": torch.randn(4, 3, dtype=torch.bfloat16)}}, batch_size=[])
    _, state = tx.update(upd, state, params)
    avg = sm3fn.averaged_params(state, like=params)
    assert isinstance(avg, TensorDict)
    assert avg["enc", "w"].dtype == torch.bfloat16
    torch.testing.assert_close(avg["head"], params["head"])
    want = params["enc", "w"] + upd["enc", "w"]
    torch.testing.assert_close(avg["enc", "w"], want)
    del rng


def test_state_saves_and_loads_weights_only():
    tx = sm3fn.chain(sm3fn.sm3(0.1), sm3fn.parameter_averaging(decay=0.9))
    state, params, _ = _run(tx, 3, np.random.default_rng(1))
    loaded = saved_and_loaded(state)
    for k in SHAPES:
        torch.testing.assert_close(
            sm3fn.averaged_params(loaded, like=params)[k], sm3fn.averaged_params(state, like=params)[k]
        )


def test_errors_name_the_problem_and_change_nothing():
    params = {"w": torch.randn(5, 3), "b": torch.randn(3)}
    tx = sm3fn.parameter_averaging()
    state = tx.init(params)
    before = state.clone()
    grads = {"w": torch.randn(5, 3), "b": torch.randn(3)}
    with pytest.raises(ValueError, match="needs params"):
        tx.update(grads, state)
    with pytest.raises(ValueError, match="'b'"):
        tx.update(grads, state, {"w": params["w"]})
    with pytest.raises(ValueError, match="'w'.*shape"):
        tx.update({"w": torch.randn(3, 5), "b": grads["b"]}, state, params)
    with pytest.raises(ValueError, match="decay"):
        sm3fn.parameter_averaging(decay=1.0)
    with pytest.raises(ValueError, match="start_step"):
        sm3fn.parameter_averaging(start_step=-1)
    with pytest.raises(ValueError, match="exactly one"):
        sm3fn.averaged_params(sm3fn.sm3().init(params))
    both = TensorDict({"a": state, "b": state.clone()}, batch_size=[])
    with pytest.raises(ValueError, match="found 2"):
        sm3fn.averaged_params(both)
    assert (state == before).all()


def test_vmap_over_tasks():
    """A batch of tasks, each with its own params, schedule count and average (EMA decay batched too),
    through clipping, masking and weight decay."""
    torch.manual_seed(0)
    tasks = 4
    params = {"w": torch.randn(tasks, 3, 2), "b": torch.randn(tasks, 2)}
    decay = torch.rand(tasks, dtype=torch.float64) * 0.9
    grads = [{"w": torch.randn(tasks, 3, 2) * 2, "b": torch.randn(tasks, 2)} for _ in range(3)]

    def run(p, d, gs):
        tx = sm3fn.chain(
            sm3fn.clip_by_global_norm(2.0),
            sm3fn.masked(sm3fn.scale_by_sm3(), lambda path, p: p.ndim > 1),
            sm3fn.add_decayed_weights(0.1),
            sm3fn.scale_by_learning_rate(sm3fn.schedules.recipe(0.1, 40, warmup_fraction=0.1)),
            sm3fn.parameter_averaging(decay=d),
        )
        s = tx.init(p)
        for g in gs:
            u, s = tx.update(g, s, p)
            p = sm3fn.apply_updates(p, u)
        avg = sm3fn.averaged_params(s, like=p)
        return torch.cat([avg["w"].reshape(-1), avg["b"]])

    got = torch.func.vmap(run, in_dims=(0, 0, 0))(params, decay, grads)
    for i in range(tasks):
        want = run({k: v[i] for k, v in params.items()}, decay[i].item(), [{k: v[i] for k, v in g.items()} for g in grads])
        torch.testing.assert_close(got[i], want)
