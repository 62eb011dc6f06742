"""Long runs: 10,000 steps on a small model, with no memory growth and nothing non-finite.

Memory is measured two ways after ``gc.collect()``: the process's resident
set size (``/proc/self/statm``) and the number of live ``torch.Tensor``
objects the garbage collector can see.  Both are taken after a warm-up
(allocator pools and caches filled) and again at the end.
"""

import gc
import resource
import warnings

import pytest
import torch
from tensordict import TensorDictBase

import sm3fn

STEPS = 10_000
WARMUP = 1_000


def resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:  # not Linux: peak RSS is the best there is
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on some of torch's deprecated module objects warns
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def all_finite(*trees) -> bool:
    for tree in trees:
        leaves = tree.values(include_nested=True, leaves_only=True) if isinstance(tree, TensorDictBase) else tree.values()
        for t in leaves:
            if t.is_floating_point() and not torch.isfinite(t).all():
                return False
    return True


def data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=gen)
    teacher = torch.randn(8, 4, generator=gen)
    y = torch.tanh(x @ teacher) + 0.05 * torch.randn(256, 4, generator=gen)
    return x, y


@pytest.mark.slow
def test_functional_10k_steps_no_memory_growth_no_nonfinite():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    x, y = data()
    tx = sm3fn.sm3(0.05, momentum=0.9)
    state = tx.init(params)

    def loss_fn(p, xb, yb):
        return torch.nn.functional.mse_loss(torch.func.functional_call(model, p, (xb,)), yb)

    first_loss = float(loss_fn(params, x, y))
    marks = {}
    for step in range(STEPS):
        lo = (step * 32) % 256
        p = {k: v.requires_grad_() for k, v in params.items()}
        loss = loss_fn(p, x[lo : lo + 32], y[lo : lo + 32])
        grads = dict(zip(p, torch.autograd.grad(loss, list(p.values()))))
        params = {k: v.detach() for k, v in params.items()}
        updates, state = tx.update(grads, state, params)
        params = sm3fn.apply_updates(params, updates)
        if step % 500 == 0:
            assert all_finite(params, state), f"non-finite at step {step}"
        if step + 1 in (WARMUP, STEPS):
            del p, loss, grads, updates
            marks[step + 1] = (live_tensors(), resident_bytes())
    assert all_finite(params, state)
    assert float(loss_fn(params, x, y)) < 0.5 * first_loss  # it trained
    (t0, r0), (t1, r1) = marks[WARMUP], marks[STEPS]
    print(f"\nfunctional sm3, {STEPS} steps: live tensors {t0} -> {t1}, RSS {r0 / 2**20:.1f} -> {r1 / 2**20:.1f} MiB")
    assert t1 == t0
    assert r1 - r0 < 8 * 2**20  # allocator noise; a leak of 1 KiB per step would be 9 MiB


@pytest.mark.slow
def test_adapter_10k_steps_no_memory_growth_no_nonfinite():
    from sm3fn.optim import SM3

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    x, y = data()
    opt = SM3(model.parameters(), lr=0.05, momentum=0.9, skip_nonfinite=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, ((s + 1) / 500) ** 2))
    with torch.no_grad():
        first_loss = float(torch.nn.functional.mse_loss(model(x), y))
    marks = {}
    for step in range(STEPS):
        lo = (step * 32) % 256
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[lo : lo + 32]), y[lo : lo + 32]).backward()
        opt.step()
        sched.step()
        if step % 500 == 0:
            assert all_finite(dict(model.named_parameters()), *opt.state.values()), f"non-finite at step {step}"
        if step + 1 in (WARMUP, STEPS):
            marks[step + 1] = (live_tensors(), resident_bytes())
    assert all_finite(dict(model.named_parameters()), *opt.state.values())
    assert opt.skipped_steps == 0
    with torch.no_grad():
        assert float(torch.nn.functional.mse_loss(model(x), y)) < 0.5 * first_loss
    (t0, r0), (t1, r1) = marks[WARMUP], marks[STEPS]
    print(f"\nsm3fn.optim.SM3, {STEPS} steps: live tensors {t0} -> {t1}, RSS {r0 / 2**20:.1f} -> {r1 / 2**20:.1f} MiB")
    assert t1 == t0
    assert r1 - r0 < 8 * 2**20
