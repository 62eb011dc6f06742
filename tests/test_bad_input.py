"""Bad input: a clear error naming the argument or key and the value, and nothing changed."""

import math

import pytest
import torch
from tensordict import TensorDict

import sm3fn


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        ({"learning_rate": -0.1}, ValueError, r"learning_rate.*-0\.1"),
        ({"learning_rate": math.nan}, ValueError, r"learning_rate.*nan"),
        ({"learning_rate": torch.tensor(-1.0)}, ValueError, r"learning_rate.*-1\.0"),
        ({"learning_rate": "fast"}, TypeError, r"learning_rate.*'fast'"),
        ({"momentum": 1.0}, ValueError, r"momentum.*1\.0"),
        ({"momentum": -0.5}, ValueError, r"momentum.*-0\.5"),
        ({"momentum": math.nan}, ValueError, r"momentum.*nan"),
        ({"beta": 1.0}, ValueError, r"beta.*1\.0"),
        ({"beta": -0.1}, ValueError, r"beta.*-0\.1"),
        ({"beta": torch.tensor([0.5, 1.5])}, ValueError, r"beta.*1\.5"),
        ({"eps": -1e-8}, ValueError, r"eps.*-1e-08"),
        ({"eps": math.nan}, ValueError, r"eps.*nan"),
        ({"momentum": torch.tensor(1)}, TypeError, r"momentum.*int64"),
        ({"accumulator_dtype": torch.int32}, TypeError, r"accumulator_dtype.*int32"),
    ],
)
def test_bad_hyperparameters(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        sm3fn.sm3(**kwargs)


@pytest.mark.parametrize(
    "factory,error,pattern",
    [
        (lambda: sm3fn.scale_by_sm3(beta=2.0), ValueError, r"beta.*2\.0"),
        (lambda: sm3fn.ema(1.5), ValueError, r"decay.*1\.5"),
        (lambda: sm3fn.trace(-0.1), ValueError, r"decay.*-0\.1"),
        (lambda: sm3fn.trace(0.9, nesterov="yes"), TypeError, r"nesterov.*'yes'"),
        (lambda: sm3fn.scale_by_schedule(3.0), TypeError, r"schedule.*float"),
        (lambda: sm3fn.scale_by_learning_rate(-1.0), ValueError, r"learning_rate.*-1\.0"),
        (lambda: sm3fn.named_chain(("a", sm3fn.scale(1.0)), ("a", sm3fn.scale(2.0))), ValueError, r"unique.*'a'"),
    ],
)
def test_bad_transform_arguments(factory, error, pattern):
    with pytest.raises(error, match=pattern):
        factory()


def _setup(momentum=0.9):
    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(3, generator=gen)}
    tx = sm3fn.sm3(0.1, momentum=momentum)
    state = tx.init(params)
    grads = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
    _, state = tx.update(grads, state, params)  # non-zero state
    return tx, params, state, gen


@pytest.mark.parametrize(
    "make_grads,error,pattern",
    [
        (lambda g: {"w": g["w"]}, ValueError, r"missing key 'b'"),
        (lambda g: {**g, "extra": torch.randn(2)}, ValueError, r"key 'extra'"),
        (lambda g: {**g, "w": torch.randn(3, 4)}, ValueError, r"grads\['w'\].*\(3, 4\).*\(4, 3\)"),
        (lambda g: {**g, "b": torch.randn(3, 1)}, ValueError, r"grads\['b'\].*\(3, 1\).*\(3,\)"),
        (lambda g: {**g, "w": torch.ones(4, 3, dtype=torch.int64)}, TypeError, r"grads\['w'\].*int64"),
        (lambda g: {**g, "w": torch.randn(4, 3, dtype=torch.complex64)}, TypeError, r"grads\['w'\].*complex64"),
        (lambda g: {**g, "w": [1.0, 2.0]}, TypeError, r"grads\['w'\].*list"),
        (lambda g: [g["w"], g["b"]], TypeError, r"grads.*list"),
        (lambda g: {1: g["w"], "b": g["b"]}, TypeError, r"keys must be strings.*1"),
    ],
)
def test_bad_grads_raise_and_change_nothing(make_grads, error, pattern):
    tx, params, state, gen = _setup()
    grads = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
    bad = make_grads(grads)
    saved_params = {k: v.clone() for k, v in params.items()}
    saved_grads = {k: v.clone() for k, v in grads.items()}
    saved_state = state.clone()
    with pytest.raises(error, match=pattern):
        tx.update(bad, state, params)
    assert all(torch.equal(params[k], saved_params[k]) for k in params)
    assert all(torch.equal(grads[k], saved_grads[k]) for k in grads)
    assert (state == saved_state).all()


@pytest.mark.parametrize(
    "params,error,pattern",
    [
        ({"w": torch.ones(3, 2, dtype=torch.int32)}, TypeError, r"params\['w'\].*int32"),
        ({"w": torch.randn(3, dtype=torch.complex64)}, TypeError, r"params\['w'\].*complex64"),
        ({"w": torch.randn(3), "n": {"deep": torch.ones(2, dtype=torch.long)}}, TypeError, r"params\['n\.deep'\].*int64"),
        (torch.randn(3), TypeError, r"params must be a dict of tensors or a TensorDict, got Tensor"),
        ({"w": 3.0}, TypeError, r"params\['w'\].*float"),
    ],
)
def test_bad_params_at_init(params, error, pattern):
    with pytest.raises(error, match=pattern):
        sm3fn.sm3().init(params)


def test_state_of_another_optimizer_is_rejected():
    tx, params, state, gen = _setup(momentum=0.9)
    other = sm3fn.sm3(0.1, momentum=0.0)
    grads = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
    with pytest.raises(ValueError, match=r"chain state has keys.*momentum"):
        other.update(grads, state, params)


def test_tensordict_grads_with_wrong_shape():
    params = TensorDict({"layer": {"w": torch.randn(4, 3)}}, batch_size=[])
    tx = sm3fn.sm3()
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"grads\['layer\.w'\] has shape \(2, 3\)"):
        tx.update(TensorDict({"layer": {"w": torch.randn(2, 3)}}, batch_size=[]), state, params)


def test_apply_updates_mismatch():
    params = {"w": torch.randn(4, 3)}
    with pytest.raises(ValueError, match=r"updates has key 'v'"):
        sm3fn.apply_updates(params, {"w": torch.zeros(4, 3), "v": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"updates\['w'\] has shape \(3, 4\)"):
        sm3fn.apply_updates(params, {"w": torch.zeros(3, 4)})
