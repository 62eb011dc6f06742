"""The four public ways to take SM3 steps, run on one table of inputs (tests/test_kernels_dispatch.py).

Each runner takes the initial parameters (a dict of tensors, plain or
DTensor), a list of gradient dicts (one per step; dense, sparse COO or
DTensor leaves) and the hyperparameters, and returns the final parameters
and the final ``accumulator_0`` of every parameter (every entry point keeps
that one, whatever the gradient was; the optimizers make none for a parameter
that never had a gradient).
"""

from __future__ import annotations

import torch

import sm3fn
from sm3fn.optim import SM3, FunctionalOptimizer


def _clone(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone()


def functional(params0, grads_seq, lr, momentum, beta):
    """``tx.update`` + ``apply_updates``: the pure path."""
    tx = sm3fn.sm3(lr, momentum=momentum, beta=beta)
    params = {k: _clone(v) for k, v in params0.items()}
    state = tx.init(params)
    for grads in grads_seq:
        updates, state = tx.update(grads, state, params)
        params = sm3fn.apply_updates(params, updates)
    return params, {k: state["sm3", k, "accumulator_0"] for k in params}


def inplace(params0, grads_seq, lr, momentum, beta):
    """``sm3_update_`` on the state of ``sm3fn.sm3``."""
    tx = sm3fn.sm3(lr, momentum=momentum, beta=beta)
    params = {k: _clone(v) for k, v in params0.items()}
    state = tx.init(params)
    for grads in grads_seq:
        sm3fn.sm3_update_(params, grads, state, learning_rate=lr, momentum=momentum, beta=beta)
    return params, {k: state["sm3", k, "accumulator_0"] for k in params}


def _optimizer_run(make, params0, grads_seq, key):
    params = {k: torch.nn.Parameter(_clone(v)) for k, v in params0.items()}
    opt = make(list(params.values()))
    for grads in grads_seq:
        for k, p in params.items():
            p.grad = None if grads[k] is None else grads[k].clone()
        opt.step()
    return ({k: p.detach() for k, p in params.items()},
            {k: opt.state[p][key] for k, p in params.items() if p in opt.state})


def optimizer(params0, grads_seq, lr, momentum, beta):
    """``sm3fn.optim.SM3.step``."""
    return _optimizer_run(lambda ps: SM3(ps, lr=lr, momentum=momentum, beta=beta),
                          params0, grads_seq, "accumulator_0")


def functional_optimizer(params0, grads_seq, lr, momentum, beta):
    """``FunctionalOptimizer`` around ``sm3fn.sm3``."""
    def make(ps):
        return FunctionalOptimizer(ps, lambda lr, momentum, beta: sm3fn.sm3(lr, momentum, beta),
                                   lr=lr, momentum=momentum, beta=beta)
    return _optimizer_run(make, params0, grads_seq, "sm3.*.accumulator_0")


ENTRY_POINTS = {"tx.update": functional, "sm3_update_": inplace, "SM3.step": optimizer,
                "FunctionalOptimizer": functional_optimizer}
