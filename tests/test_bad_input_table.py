"""Bad input everywhere: one table of what sm3fn rejects.

Each row builds fresh inputs, makes the bad call, and checks the error type,
a message that names the argument or key and the offending value, and that
every tensor it was given (parameters, gradients, state) is bit-identical
afterwards.
"""

import math
import re
from typing import Any, Callable, NamedTuple

import numpy as np
import pytest
import torch
from tensordict import TensorDict, TensorDictBase

import sm3fn


class Case(NamedTuple):
    name: str
    build: Callable[[], tuple[Callable[[], Any], list]]  # -> (bad call, things it must not change)
    error: type
    message: str  # regex: the argument/key and the value


def _params():
    gen = torch.Generator().manual_seed(0)
    return {"w": torch.randn(3, 4, generator=gen), "b": torch.randn(4, generator=gen)}


def _grads():
    gen = torch.Generator().manual_seed(1)
    return {"w": torch.randn(3, 4, generator=gen), "b": torch.randn(4, generator=gen)}


def _stepped(tx):
    """tx, params, a state that has taken one step (non-zero), and fresh gradients."""
    params = _params()
    state = tx.init(params)
    _, state = tx.update(_grads(), state, params)
    return tx, params, state, _grads()


def factory(fn):
    """A bad hyperparameter: the factory raises; nothing to watch but its tensor arguments."""
    return lambda: (fn, [])


def bad_update(make_tx, edit_grads=lambda g: g, edit_state=lambda s: s, with_params=True):
    def build():
        tx, params, state, grads = _stepped(make_tx())
        grads, state = edit_grads(grads), edit_state(state)
        return (lambda: tx.update(grads, state, params if with_params else None)), [params, state, grads]
    return build


def bad_init(make_tx, params):
    def build():
        p = params()
        return (lambda: make_tx().init(p)), [p]
    return build


def with_key(tree, key, value):
    return dict(tree, **{key: value})


def _td_state_without(key):
    def edit(state):
        state = state.clone()
        del state[key]
        return state
    return edit


SM3 = lambda: sm3fn.sm3(0.1, momentum=0.9)  # noqa: E731


def _stepped_optimizer(out_features=4, **kwargs):
    from sm3fn.optim import SM3 as OptSM3

    torch.manual_seed(0)
    model = torch.nn.Linear(3, out_features)
    opt = OptSM3(model.parameters(), lr=0.1, momentum=0.9, **kwargs)
    model(torch.randn(5, 3)).square().sum().backward()
    opt.step()
    return model, opt


def bad_optimizer(edit):
    """``edit(model, opt)`` returns the bad call; the parameters, their gradients and
    the optimizer state must come through it unchanged."""
    def build():
        model, opt = _stepped_optimizer(skip_nonfinite=True)
        params = list(model.parameters())
        return edit(model, opt), [params, [p.grad for p in params], opt.state, opt.param_groups]
    return build


def _set_lr_then_step(model, opt):
    opt.param_groups[0]["lr"] = -0.5
    return opt.step


def _load_other_shapes(model, opt):
    other = _stepped_optimizer(out_features=5)[1].state_dict()
    return lambda: opt.load_state_dict(other)


def _load_negative_skips(model, opt):
    saved = opt.state_dict()
    saved["skipped_steps"] = -1
    return lambda: opt.load_state_dict(saved)


def _load_edited(key, make):
    """A state_dict whose parameter 0 has ``state[key] = make(old)`` (new dicts and tensors:
    the optimizer's own state is not touched)."""
    def edit(model, opt):
        saved = opt.state_dict()
        state = dict(saved["state"])
        state[0] = dict(state[0], **{key: make(state[0][key])})
        saved = dict(saved, state=state)
        return lambda: opt.load_state_dict(saved)
    return edit


def _step_with_lr(lr):
    def edit(model, opt):
        opt.param_groups[0]["lr"] = lr
        return opt.step
    return edit


def _aliased_step():
    base = torch.zeros(4)
    a, b = torch.nn.Parameter(base), torch.nn.Parameter(base)
    a.grad, b.grad = torch.ones(4), torch.ones(4)
    from sm3fn.optim import SM3 as OptSM3

    opt = OptSM3([a, b], lr=0.1)
    return opt.step, [a, b, a.grad, opt.state]


def _optim(**kwargs):
    from sm3fn.optim import SM3 as OptSM3

    return lambda: OptSM3([torch.nn.Parameter(torch.randn(2))], **kwargs)
momentum_tensor = torch.tensor(2.0)

CASES = [
    # hyperparameters
    Case("negative learning rate", factory(lambda: sm3fn.sm3(learning_rate=-0.1)), ValueError, r"learning_rate.*-0\.1"),
    Case("learning rate as a string", factory(lambda: sm3fn.sm3(learning_rate="0.1")), TypeError, r"learning_rate.*'0\.1'"),
    Case("momentum 1", factory(lambda: sm3fn.sm3(momentum=1.0)), ValueError, r"momentum.*1\.0"),
    Case("negative momentum", factory(lambda: sm3fn.sm3(momentum=-0.5)), ValueError, r"momentum.*-0\.5"),
    Case("momentum tensor out of range", factory(lambda: sm3fn.sm3(momentum=momentum_tensor)), ValueError, r"momentum.*2\.0"),
    Case("integer momentum tensor", factory(lambda: sm3fn.sm3(momentum=torch.tensor(1))), TypeError, r"momentum.*int64"),
    Case("beta above 1", factory(lambda: sm3fn.sm3(beta=1.5)), ValueError, r"beta.*1\.5"),
    Case("beta NaN", factory(lambda: sm3fn.scale_by_sm3(beta=float("nan"))), ValueError, r"beta.*nan"),
    Case("negative eps", factory(lambda: sm3fn.sm3(eps=-1e-8)), ValueError, r"eps.*-1e-08"),
    Case("learning rate inf", factory(lambda: sm3fn.sm3(learning_rate=float("inf"))), ValueError,
         r"learning_rate.*inf"),
    Case("eps inf", factory(lambda: sm3fn.scale_by_sm3(eps=float("inf"))), ValueError, r"eps.*inf"),
    Case("float8 accumulator dtype", factory(lambda: sm3fn.sm3(accumulator_dtype=torch.float8_e4m3fn)), TypeError,
         r"accumulator_dtype.*float8_e4m3fn"),
    Case("float8 parameter", bad_init(SM3, lambda: {"w": torch.zeros(2, 3).to(torch.float8_e5m2)}), TypeError,
         r"params\['w'\].*float8_e5m2"),
    Case("eps as a tensor", factory(lambda: sm3fn.scale_by_sm3(eps=torch.tensor(1e-8))), TypeError, r"eps.*tensor"),
    Case("integer accumulator dtype", factory(lambda: sm3fn.sm3(accumulator_dtype=torch.int32)), TypeError,
         r"accumulator_dtype.*torch\.int32"),
    Case("momentum dtype as a string", factory(lambda: sm3fn.sm3(momentum=0.9, momentum_dtype="float16")), TypeError,
         r"momentum_dtype.*'float16'"),
    Case("ema decay 1", factory(lambda: sm3fn.ema(1.0)), ValueError, r"decay.*1\.0"),
    Case("trace nesterov not a bool", factory(lambda: sm3fn.trace(0.9, nesterov=1)), TypeError, r"nesterov.*1"),
    Case("scale by a string", factory(lambda: sm3fn.scale("x")), TypeError, r"factor.*'x'"),
    Case("schedule not callable", factory(lambda: sm3fn.scale_by_schedule(5)), TypeError, r"schedule.*int"),
    Case("apply_if_finite of a factory", factory(lambda: sm3fn.apply_if_finite(sm3fn.sm3)), TypeError,
         r"inner.*function"),
    Case("negative max_consecutive_errors", factory(lambda: sm3fn.apply_if_finite(SM3(), max_consecutive_errors=-1)),
         ValueError, r"max_consecutive_errors.*-1"),
    Case("chain of a factory", factory(lambda: sm3fn.chain(sm3fn.sm3)), TypeError, r"'0'.*function"),
    Case("named_chain duplicate names", factory(lambda: sm3fn.named_chain(("a", SM3()), ("a", SM3()))), ValueError,
         r"unique.*'a', 'a'"),
    Case("named_chain dotted name", factory(lambda: sm3fn.named_chain(("a.b", SM3()))), ValueError, r"'a\.b'"),
    Case("negative learning rate alone", factory(lambda: sm3fn.scale_by_learning_rate(-1.0)), ValueError,
         r"learning_rate.*-1\.0"),
    Case("SM3 negative lr", factory(_optim(lr=-1.0)), ValueError, r"lr.*-1\.0"),
    Case("SM3 momentum 1", factory(_optim(momentum=1.0)), ValueError, r"momentum.*1\.0"),
    Case("SM3 skip_nonfinite not a bool", factory(_optim(skip_nonfinite="yes")), TypeError, r"skip_nonfinite.*'yes'"),
    Case("SM3 accumulator dtype", factory(_optim(accumulator_dtype=torch.int8)), TypeError,
         r"accumulator_dtype.*torch\.int8"),
    # trees
    Case("identity of a list", bad_init(sm3fn.identity, lambda: [torch.ones(2)]), TypeError, r"params.*list"),
    Case("params a list", bad_init(SM3, lambda: list(_params().values())), TypeError, r"params.*list"),
    Case("params key not a string", bad_init(SM3, lambda: {1: torch.randn(2)}), TypeError, r"keys.*1.*int"),
    Case("params leaf a NumPy array", bad_init(SM3, lambda: {"w": np.ones(3)}), TypeError, r"params\['w'\].*ndarray"),
    Case("gradient a float", bad_update(SM3, lambda g: with_key(g, "b", 3.0)), TypeError, r"grads\['b'\].*float"),
    Case("grads a tuple", bad_update(SM3, lambda g: tuple(g.values())), TypeError, r"grads.*tuple"),
    # dtypes
    Case("integer parameter", bad_init(SM3, lambda: {"w": torch.arange(6).reshape(2, 3)}), TypeError,
         r"params\['w'\].*torch\.int64"),
    Case("complex gradient", bad_update(SM3, lambda g: with_key(g, "w", g["w"].to(torch.complex64))), TypeError,
         r"grads\['w'\].*torch\.complex64"),
    Case("integer gradient", bad_update(SM3, lambda g: with_key(g, "b", torch.ones(4, dtype=torch.int32))), TypeError,
         r"grads\['b'\].*torch\.int32"),
    # shapes
    Case("gradient of the wrong shape", bad_update(SM3, lambda g: with_key(g, "w", torch.randn(3, 5))), ValueError,
         r"grads\['w'\].*\(3, 5\).*\(3, 4\)"),
    Case("transposed gradient", bad_update(SM3, lambda g: with_key(g, "w", g["w"].T.clone())), ValueError,
         r"grads\['w'\].*\(4, 3\).*\(3, 4\)"),
    Case("ema update of the wrong shape", bad_update(lambda: sm3fn.ema(0.9), lambda g: with_key(g, "b", torch.randn(5))),
         ValueError, r"updates\['b'\].*\(5,\).*\(4,\)"),
    Case("apply_updates of the wrong shape", lambda: ((lambda p, u: (lambda: sm3fn.apply_updates(p, u), [p, u]))(
        _params(), {"b": torch.randn(3)})), ValueError, r"updates\['b'\].*\(3,\).*params\['b'\].*\(4,\)"),
    Case("apply_updates with an unknown key", lambda: ((lambda p, u: (lambda: sm3fn.apply_updates(p, u), [p, u]))(
        _params(), {"z": torch.randn(3)})), ValueError, r"updates has key 'z'"),
    # state mismatches
    Case("SM3 step after a bad lr in a group", bad_optimizer(_set_lr_then_step), ValueError, r"lr.*-0\.5"),
    Case("SM3 load of other shapes", bad_optimizer(_load_other_shapes), ValueError,
         r"parameter 0 \(shape \(4, 3\)\).*'momentum_buffer'.*\(5, 3\).*\(4, 3\)"),
    Case("SM3 load of a negative skip count", bad_optimizer(_load_negative_skips), ValueError, r"skipped_steps.*-1"),
    Case("SM3 load of a negative accumulator", bad_optimizer(_load_edited("accumulator_1", lambda a: a - a.max() - 1)),
         ValueError, r"parameter 0.*'accumulator_1'.*-\d"),
    Case("SM3 load of a NaN accumulator", bad_optimizer(_load_edited("accumulator_0", lambda a: a * float("nan"))),
         ValueError, r"parameter 0.*'accumulator_0'.*nan"),
    Case("SM3 load of an expanded accumulator",
         bad_optimizer(_load_edited("accumulator_0", lambda a: a[:1].expand(a.shape))),
         ValueError, r"parameter 0.*'accumulator_0'.*share memory.*stride \(0, "),
    Case("SM3 load of a NaN momentum buffer", bad_optimizer(_load_edited("momentum_buffer", lambda m: m / 0 * 0)),
         ValueError, r"parameter 0.*'momentum_buffer'.*nan"),
    Case("SM3 load of an expanded momentum buffer",
         bad_optimizer(_load_edited("momentum_buffer", lambda m: m[:1].expand(m.shape))),
         ValueError, r"parameter 0.*'momentum_buffer'.*share memory"),
    Case("SM3 step with lr above float32's max", bad_optimizer(_step_with_lr(1e39)), ValueError,
         r"lr=1e\+39.*float32.*parameter 0"),
    Case("SM3 step with lr inf", bad_optimizer(_step_with_lr(float("inf"))), ValueError, r"lr.*inf"),
    Case("SM3 step on aliased parameters", _aliased_step, ValueError, r"parameter 0.*parameter 1.*share memory"),
    Case("gradient for an unknown key", bad_update(SM3, lambda g: with_key(g, "z", torch.randn(2))), ValueError,
         r"grads has key 'z'"),
    Case("gradient missing for a key", bad_update(SM3, lambda g: {"w": g["w"]}), ValueError, r"missing key 'b'"),
    Case("state of another chain", bad_update(lambda: sm3fn.named_chain(("sm3", sm3fn.scale_by_sm3()), ("lr", sm3fn.scale(-0.1))),
                                              edit_state=lambda s: TensorDict({"sm3": s["sm3"], "momentum": s["lr"]}, [])),
         ValueError, r"chain state has keys \['momentum', 'sm3'\].*\['sm3', 'lr'\]"),
    Case("foreign entry in sm3 state", bad_update(sm3fn.scale_by_sm3,
                                                  edit_state=lambda s: s.clone().set(("w", "foo"), torch.zeros(1))),
         ValueError, r"unexpected entry 'w\.foo'"),
    Case("schedule state without count", bad_update(lambda: sm3fn.scale_by_schedule(lambda c: 0.1),
                                                    edit_state=lambda s: TensorDict({"step": s["count"]}, [])),
         ValueError, r"'count'.*\['step'\]"),
    Case("apply_if_finite given the inner state", bad_update(lambda: sm3fn.apply_if_finite(SM3()),
                                                             edit_state=lambda s: s["inner"]),
         ValueError, r"apply_if_finite state.*\['learning_rate', 'momentum', 'sm3'\]"),
]


def _tensors(obj, out):
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, TensorDictBase):
        out.extend(obj.values(include_nested=True, leaves_only=True))
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensors(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _tensors(v, out)
    return out


def _keys(obj):
    if isinstance(obj, TensorDictBase):
        return sorted(map(str, obj.keys(include_nested=True, leaves_only=True)))
    if isinstance(obj, dict):
        return sorted(map(str, obj.keys()))
    return None


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_rejected_and_changes_nothing(case):
    call, watched = case.build()
    tensors = _tensors(watched, [])
    before = [(t.clone(), t.data_ptr(), t._version) for t in tensors]
    keys = [_keys(w) for w in watched]
    with pytest.raises(case.error) as info:
        call()
    assert re.search(case.message, str(info.value)), f"{info.value!s} does not match {case.message!r}"
    for t, (copy, ptr, version) in zip(tensors, before):
        assert t._version == version and t.data_ptr() == ptr  # not written in place
        assert torch.equal(t.reshape(-1).view(torch.uint8), copy.reshape(-1).view(torch.uint8))
    assert [_keys(w) for w in watched] == keys
    assert momentum_tensor.item() == 2.0


# --- More rows, as parametrized tests: hyperparameters, transform arguments, gradients, parameters

@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        ({"learning_rate": math.nan}, ValueError, r"learning_rate.*nan"),
        ({"learning_rate": torch.tensor(-1.0)}, ValueError, r"learning_rate.*-1\.0"),
        ({"learning_rate": "fast"}, TypeError, r"learning_rate.*'fast'"),
        ({"momentum": math.nan}, ValueError, r"momentum.*nan"),
        ({"beta": 1.0}, ValueError, r"beta.*1\.0"),
        ({"beta": -0.1}, ValueError, r"beta.*-0\.1"),
        ({"beta": torch.tensor([0.5, 1.5])}, ValueError, r"beta.*1\.5"),
        ({"eps": math.nan}, ValueError, r"eps.*nan"),
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
        (lambda g: {**g, "w": torch.randn(3, 4)}, ValueError, r"grads\['w'\].*\(3, 4\).*\(4, 3\)"),
        (lambda g: {**g, "b": torch.randn(3, 1)}, ValueError, r"grads\['b'\].*\(3, 1\).*\(3,\)"),
        (lambda g: {**g, "w": torch.ones(4, 3, dtype=torch.int64)}, TypeError, r"grads\['w'\].*int64"),
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
