"""Resume: stop anywhere, torch.save, torch.load(weights_only=True) into fresh objects,
continue: bit-identical to never stopping."""

import math

import pytest
import torch
from helpers import assert_trees_bit_equal, functional_run, saved_and_loaded
from tensordict import TensorDict, TensorDictBase

import sm3fn

STEPS = 12


def make_tx():
    """A fresh optimizer each call: nothing survives in Python objects between runs."""
    schedule = lambda count: 0.05 * torch.clamp((count + 1) / 4.0, max=1.0) ** 2  # quadratic warm-up
    return sm3fn.apply_if_finite(
        sm3fn.chain(sm3fn.sm3(schedule, momentum=0.9, beta=0.3), sm3fn.trace(0.5))
    )


def problem(dtype, container):
    gen = torch.Generator().manual_seed(11)
    shapes = {"w": (6, 5), "b": (5,), "conv": (3, 2, 3, 3), "s": ()}
    params = {k: torch.randn(s, generator=gen).to(dtype) for k, s in shapes.items()}
    grads = []
    for i in range(STEPS):
        g = {k: (torch.randn(s, generator=gen) * 10.0 ** (i % 4 - 2)).to(dtype) for k, s in shapes.items()}
        if i == 5:
            g["w"][2, 2] = math.nan  # a skipped step inside the run
        grads.append(g)
    if container == "tensordict":
        params = TensorDict({"layer": {k: v for k, v in params.items() if k != "s"}, "s": params["s"]}, [])
        grads = [TensorDict({"layer": {k: v for k, v in g.items() if k != "s"}, "s": g["s"]}, []) for g in grads]
    return params, grads


@pytest.mark.parametrize("stop", [0, 1, 5, 6, 11, STEPS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("container", ["dict", "tensordict"])
def test_functional_resume_is_bit_identical(stop, dtype, container):
    params, grads = problem(dtype, container)
    tx = make_tx()
    want_params, want_state = functional_run(tx, params, grads)

    tx = make_tx()
    p, s = functional_run(tx, params, grads[:stop])
    saved = saved_and_loaded({"params": p, "state": s, "step": stop})
    del tx, p, s
    tx = make_tx()
    p, s = functional_run(tx, saved["params"], grads[saved["step"]:], state=saved["state"])

    assert type(p) is type(want_params)
    assert_trees_bit_equal(p, want_params)
    assert_trees_bit_equal(s, want_state)
    assert int(s["skipped"]) == 1


def test_saved_state_loads_on_a_fresh_process_layout(tmp_path):
    """Through a file, with every leaf a plain tensor that weights_only accepts."""
    params, grads = problem(torch.float32, "dict")
    tx = make_tx()
    p, s = functional_run(tx, params, grads[:3])
    torch.save({"params": p, "state": s}, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert_trees_bit_equal(loaded["state"], s)
    assert isinstance(loaded["state"], TensorDictBase)


# -- sm3fn.optim.SM3 with an LR scheduler ------------------------------------------------

ADAPTER_STEPS = 10


def fresh_training():
    """Model, optimizer (two groups, one with momentum) and scheduler, all new objects."""
    from sm3fn.optim import SM3

    torch.manual_seed(0)  # the same initial weights every time
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.Flatten(), torch.nn.LayerNorm(48),
                                torch.nn.Linear(48, 4))
    opt = SM3([{"params": model[0].parameters(), "momentum": 0.9},
               {"params": list(model[2].parameters()) + list(model[3].parameters()), "beta": 0.5}],
              lr=0.1, skip_nonfinite=True)
    recipe = lambda s: min(1.0, ((s + 1) / 3) ** 2, (ADAPTER_STEPS - s) / (0.3 * ADAPTER_STEPS))  # noqa: E731
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, recipe)


def adapter_batches():
    gen = torch.Generator().manual_seed(5)
    out = []
    for i in range(ADAPTER_STEPS):
        x = torch.randn(6, 2, 6, 6, generator=gen) * 10.0 ** (i % 3 - 1)
        if i == 4:
            x[0, 0, 0, 0] = math.nan  # a skipped step
        out.append((x, torch.randn(6, 4, generator=gen)))
    return out


def adapter_train(model, opt, sched, data):
    for x, y in data:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()


@pytest.mark.parametrize("stop", [0, 1, 4, 5, 9])
def test_adapter_resume_with_scheduler_is_bit_identical(stop):
    data = adapter_batches()
    want_model, want_opt, want_sched = fresh_training()
    adapter_train(want_model, want_opt, want_sched, data)

    model, opt, sched = fresh_training()
    adapter_train(model, opt, sched, data[:stop])
    saved = saved_and_loaded({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    del model, opt, sched
    model, opt, sched = fresh_training()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    sched.load_state_dict(saved["sched"])
    adapter_train(model, opt, sched, data[stop:])

    assert_trees_bit_equal(dict(model.named_parameters()), dict(want_model.named_parameters()))
    got, want = opt.state_dict(), want_opt.state_dict()
    assert got["param_groups"] == want["param_groups"] and got["skipped_steps"] == want["skipped_steps"] == 1
    assert got["state"].keys() == want["state"].keys()
    for i in want["state"]:
        assert_trees_bit_equal(got["state"][i], want["state"][i])
