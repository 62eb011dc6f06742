"""sm3fn.optim.SM3's weight_decay (decoupled) and its two warnings (unused group keys,
a momentum that leaves 0)."""

import warnings

import numpy as np
import pytest
import torch

import sm3fn
from reference import ReferenceSM3, random_gradient
from sm3fn.optim import SM3


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_weight_decay_matches_reference_and_functional_chain(momentum):
    rng = np.random.default_rng(0)
    lr, wd = 0.05, 0.3
    init = {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(3)}
    params = [torch.nn.Parameter(torch.tensor(v)) for v in init.values()]
    opt = SM3(params, lr=lr, momentum=momentum, weight_decay=wd)
    refs = [ReferenceSM3(v, lr=lr, momentum=momentum) for v in init.values()]
    # the chain SM3's docstring names: decay after the momentum, before the learning rate
    tx = sm3fn.chain(sm3fn.scale_by_sm3(), sm3fn.ema(momentum) if momentum else sm3fn.identity(),
                     sm3fn.add_decayed_weights(wd), sm3fn.scale_by_learning_rate(lr))
    fparams = {k: torch.tensor(v) for k, v in init.items()}
    state = tx.init(fparams)
    for _ in range(6):
        grads = {k: random_gradient(rng, v.shape) for k, v in init.items()}
        for p, g in zip(params, grads.values()):
            p.grad = torch.tensor(g)
        opt.step()
        for ref, g in zip(refs, grads.values()):
            ref.p = ref.p * (1 - lr * wd)  # decoupled: the SM3 step does not see the decay
            ref.step(g)
        updates, state = tx.update({k: torch.tensor(g) for k, g in grads.items()}, state, fparams)
        fparams = sm3fn.apply_updates(fparams, updates)
    for p, ref, fp in zip(params, refs, fparams.values()):
        np.testing.assert_allclose(p.detach().numpy(), ref.p, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(p.detach().numpy(), fp.numpy(), rtol=1e-10, atol=1e-12)


def test_trainer_style_groups_decay_only_their_group():
    # HF Trainer's optimizer_cls_and_kwargs: decay the weights, not biases/norms
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    opt = SM3([{"params": [model.weight], "weight_decay": 0.5},
               {"params": [model.bias], "weight_decay": 0.0}], lr=0.1)
    model.weight.grad, model.bias.grad = torch.zeros_like(model.weight), torch.zeros_like(model.bias)
    opt.step()  # zero gradients: only the decay moves anything
    torch.testing.assert_close(model.weight.detach(), w0 * (1 - 0.1 * 0.5))
    assert torch.equal(model.bias.detach(), b0)


def test_weight_decay_zero_is_the_plain_step_bit_for_bit():
    torch.manual_seed(1)
    a, b = torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(6, 4))
    b.data.copy_(a.data)
    opt_a, opt_b = SM3([a], lr=0.1), SM3([b], lr=0.1, weight_decay=0.0)
    for _ in range(3):
        g = torch.randn(6, 4)
        a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    assert torch.equal(a, b)


@pytest.mark.parametrize("bad, error", [(-0.1, ValueError), (float("nan"), ValueError),
                                        ("0.1", TypeError), (True, TypeError)])
def test_bad_weight_decay_is_refused_and_changes_nothing(bad, error):
    p = torch.nn.Parameter(torch.randn(3, 2))
    with pytest.raises(error, match="weight_decay"):
        SM3([p], weight_decay=bad)
    with pytest.raises(error, match="weight_decay"):
        SM3([{"params": [p], "weight_decay": bad}])
    opt = SM3([p], weight_decay=0.1)
    p.grad = torch.randn(3, 2)
    opt.step()
    before, state = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}
    opt.param_groups[0]["weight_decay"] = bad
    with pytest.raises(error, match="weight_decay"):
        opt.step()
    assert torch.equal(p, before)
    assert all(torch.equal(v, state[k]) for k, v in opt.state[p].items())


def test_sparse_gradient_in_a_decayed_group_is_refused():
    emb = torch.nn.Embedding(6, 3, sparse=True)
    opt = SM3(emb.parameters(), weight_decay=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(ValueError, match="weight_decay=0"):
        opt.step()
    assert torch.equal(emb.weight, before) and not opt.state
    opt.param_groups[0]["weight_decay"] = 0.0
    opt.step()  # the way out the message names
    assert not torch.equal(emb.weight, before)


def test_checkpoint_without_weight_decay_loads_with_no_decay():
    # torch-SM3's state_dicts (and ours from before weight_decay) have no such group key
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = SM3([p], lr=0.1)
    p.grad = torch.randn(4, 3)
    opt.step()
    saved = opt.state_dict()
    for g in saved["param_groups"]:
        del g["weight_decay"]
    fresh = SM3([p], lr=0.1, weight_decay=0.7)
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["weight_decay"] == 0.0


# -- warnings ---------------------------------------------------------------------------


def test_unused_group_key_warns_once():
    p, q = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2))
    with pytest.warns(UserWarning, match=r"ignores the param group key\(s\) \['betas'\]"):
        opt = SM3([{"params": [p], "betas": (0.9, 0.999)}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any further warning fails the test
        opt.add_param_group({"params": [q], "betas": (0.9, 0.99)})  # the same key: already said
        for _ in range(2):
            p.grad, q.grad = torch.randn(3), torch.randn(2)
            opt.step()
    with pytest.warns(UserWarning, match="nesterov"):  # a new key is news
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "nesterov": True})


def test_keys_of_torch_schedulers_and_swa_do_not_warn():
    model = torch.nn.Linear(3, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = SM3(model.parameters(), lr=0.1, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10, cycle_momentum=False)
        swa = torch.optim.swa_utils.SWALR(opt, swa_lr=0.05)
        for _ in range(3):
            model(torch.randn(4, 3)).sum().backward()
            opt.step()
            sched.step()
            swa.step()
        # a group added after the schedulers wrote their keys, with the same keys
        opt.add_param_group({**{k: v for k, v in opt.param_groups[0].items() if k != "params"},
                             "params": [torch.nn.Parameter(torch.randn(2))]})
    assert all("momentum_buffer" not in s for s in opt.state.values())  # cycle_momentum=False: no buffer


def test_one_cycle_with_cycle_momentum_warns_once_when_momentum_leaves_zero():
    model = torch.nn.Linear(3, 2)
    opt = SM3(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)  # cycle_momentum=True
    assert opt.param_groups[0]["momentum"] > 0  # the scheduler wrote it
    model(torch.randn(4, 3)).sum().backward()
    with pytest.warns(UserWarning, match="cycle_momentum=False"):
        opt.step()
    assert all(s["momentum_buffer"].shape == p.shape for p, s in opt.state.items())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            sched.step()
            model(torch.randn(4, 3)).sum().backward()
            opt.step()


def test_momentum_set_at_construction_does_not_warn():
    model = torch.nn.Linear(3, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = SM3(model.parameters(), lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.01, max_lr=0.1, step_size_up=2)
        for _ in range(3):
            model(torch.randn(4, 3)).sum().backward()
            opt.step()
            sched.step()


def test_skipped_nonfinite_step_does_not_decay():
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = SM3([p], lr=0.1, weight_decay=0.5, skip_nonfinite=True)
    before = p.detach().clone()
    p.grad = torch.full((3, 2), float("nan"))
    opt.step()
    assert torch.equal(p, before) and opt.skipped_steps == 1
    p.grad = torch.zeros(3, 2)
    opt.step()  # a finite zero gradient: the decay alone
    torch.testing.assert_close(p.detach(), before * (1 - 0.1 * 0.5))


def test_momentum_from_a_loaded_checkpoint_does_not_warn():
    p = torch.nn.Parameter(torch.randn(3, 2))
    saver = SM3([p], momentum=0.9)
    p.grad = torch.randn(3, 2)
    saver.step()
    opt = SM3([p])  # made with momentum 0, then given the run's momentum by its checkpoint
    opt.load_state_dict(saver.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    opt.param_groups[0]["momentum"] = 0.0  # a loaded group at 0 that then leaves it does warn
    loaded_at_zero = SM3([p], momentum=0.9)
    loaded_at_zero.load_state_dict(opt.state_dict())
    loaded_at_zero.param_groups[0]["momentum"] = 0.5
    with pytest.warns(UserWarning, match="momentum=0.5"):
        loaded_at_zero.step()
