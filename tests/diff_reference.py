"""An independent, differentiable SM3-II in torch, for meta-gradient tests.

Written from the paper for 0-d, 1-d and 2-d parameters with explicit row and
column vectors (no keepdim layout, no shared code with sm3fn), in the naive
form ``u = g * rsqrt(nu + eps)``.  In float64 its second derivatives are
finite even at ``g = 0`` (``(1e-30) ** -1.5`` fits in a double); in float32
they overflow to inf and ``0 * inf`` gives NaN, which the tests show.
"""

from __future__ import annotations

import torch


def _value(x) -> float:
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


def init(params: dict) -> dict:
    state = {}
    for k, p in params.items():
        if p.dim() <= 1:
            acc = [torch.zeros(p.shape, dtype=p.dtype)]
        elif p.dim() == 2:
            acc = [torch.zeros(p.shape[0], dtype=p.dtype), torch.zeros(p.shape[1], dtype=p.dtype)]
        else:
            raise NotImplementedError("the reference covers 0-d, 1-d and 2-d parameters")
        state[k] = {"acc": acc, "m": torch.zeros(p.shape, dtype=p.dtype)}
    return state


def step(params: dict, grads: dict, state: dict, lr, momentum=0.0, beta=0.0, eps=1e-30):
    """One SM3-II step with torch-SM3's EMA momentum; returns new (params, state)."""
    new_params, new_state = {}, {}
    for k, p in params.items():
        g, acc, m = grads[k], state[k]["acc"], state[k]["m"]
        if g.dim() <= 1:
            prev = acc[0]
        else:
            rows = acc[0].unsqueeze(1).expand(g.shape)
            cols = acc[1].unsqueeze(0).expand(g.shape)
            prev = torch.stack([rows, cols]).min(dim=0).values
        if _value(beta) != 0:  # the paper: beta == 0 is the plain sum, also as a tensor
            nu = beta * prev + (1 - beta) * g * g
        else:
            nu = prev + g * g
        u = g * torch.rsqrt(nu + eps)
        if g.dim() <= 1:
            new_acc = [nu]
        else:
            new_acc = [nu.max(dim=1).values, nu.max(dim=0).values]
        if _value(momentum) != 0:
            m = momentum * m + (1 - momentum) * u
            direction = m
        else:
            direction = u
        new_params[k] = p - lr * direction
        new_state[k] = {"acc": new_acc, "m": m}
    return new_params, new_state
