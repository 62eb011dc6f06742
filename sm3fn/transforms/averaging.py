"""Averaging the parameters (Polyak-Ruppert or exponential) for evaluation."""

from __future__ import annotations

from typing import Optional

import torch
from tensordict import TensorDict, TensorDictBase

from sm3fn import _checks, _tree
from sm3fn.base import COUNT, GradientTransformation, OptState, Tree

__all__ = ["parameter_averaging", "averaged_params"]

AVERAGE = "averaged_params"


def parameter_averaging(
    decay: Optional[float | torch.Tensor] = None,
    start_step: int = 0,
    dtype: Optional[torch.dtype] = None,
) -> GradientTransformation:
    """Keeps an average of the parameters the optimizer visits; read it with :func:`averaged_params`.

    With ``p_t = params + updates`` the parameters after step ``t`` (t = 1, 2, ...)
    and ``avg_0 = params`` at ``init``::

        avg_t = avg_{t-1} + w_t * (p_t - avg_{t-1})
        w_t   = 1 / (t - start_step)      (decay=None: Polyak-Ruppert, the mean of p_{start_step+1..t})
        w_t   = 1 - decay                 (decay given: exponential moving average)
        w_t   = 1                         while t <= start_step (the average tracks p_t)

    The updates pass through unchanged.  Because it averages
    ``params + updates``, put it **last** in the chain (after the learning
    rate), and pass ``params`` to ``update`` (a ``ValueError`` otherwise).
    The average is a full copy of the parameters: SM3's memory saving does
    not extend to it (the authors' alternative is the linear cool-down of
    :func:`sm3fn.schedules.recipe`).  Polyak & Juditsky 1992; TensorFlow's
    ``tf.train.ExponentialMovingAverage``.

    State: ``{"count": int64 0-d tensor, "averaged_params": {param path: average}}``.

    Args:
      decay: ``None`` for the uniform (Polyak) average, or an EMA decay in ``[0, 1)``
        (e.g. 0.999); may be a tensor.
      start_step: the steps before it are left out of the average.
      dtype: the average's dtype; default: the parameter's for float32/float64,
        float32 for narrower floats.

    Example::

        tx = sm3fn.chain(sm3fn.sm3(0.1), sm3fn.parameter_averaging(decay=0.99))
        ...
        updates, state = tx.update(grads, state, params)     # params are needed
        params = sm3fn.apply_updates(params, updates)
        eval_params = sm3fn.averaged_params(state, like=params)
    """
    if decay is not None:
        _checks.check_scalar("decay", decay, 0.0, 1.0)
    if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
        raise ValueError(f"start_step must be an int >= 0, got {start_step!r}")
    _checks.check_dtype_arg("dtype", dtype)

    def init(params: Tree) -> OptState:
        averages, device = {}, None
        for path, p in _tree.flatten(params, "params").items():
            if p is None:
                continue
            _checks.check_floating("params", path, p)
            averages[path] = p.detach().to(_checks.statistics_dtype(p.dtype, dtype), copy=True)
            device = device or p.device
        count = torch.zeros((), dtype=torch.int64, device=device)
        return TensorDict({COUNT: count, AVERAGE: _tree.state_tree(averages)}, batch_size=[])

    def update(updates: Tree, state: OptState, params: Optional[Tree] = None) -> tuple[Tree, OptState]:
        if params is None:
            raise ValueError(
                "parameter_averaging needs params: call tx.update(grads, state, params)"
            )
        if COUNT not in state.keys() or AVERAGE not in state.keys():
            raise ValueError(
                f"parameter_averaging state must hold {COUNT!r} and {AVERAGE!r}, got keys {list(state.keys())}"
            )
        incoming = _tree.flatten(updates, "updates")
        param_leaves = _tree.flatten(params, "params")
        averages = _tree.flatten(state.get(AVERAGE), "parameter_averaging state")
        extra = [p for p in incoming if p not in averages and incoming[p] is not None]
        if extra:
            raise ValueError(
                f"updates has key {_tree.fmt(extra[0])}, which the parameter_averaging state does not hold"
            )
        for path, avg in averages.items():
            p = param_leaves.get(path)
            if p is None:
                raise ValueError(f"params is missing key {_tree.fmt(path)}, which the parameter_averaging state holds")
            u = incoming.get(path)
            for name, t in (("params", p), ("updates", u)):
                if t is not None and t.shape != avg.shape:
                    raise ValueError(
                        f"{name}[{_tree.fmt(path)}] has shape {tuple(t.shape)}, but the "
                        f"parameter_averaging state was made for shape {tuple(avg.shape)}"
                    )

        count = state.get(COUNT) + 1  # the step being taken, t
        after_start = count > start_step

        def weight(dtype: torch.dtype) -> torch.Tensor:
            if decay is None:
                rate = 1.0 / torch.clamp(count - start_step, min=1).to(dtype)
            else:
                rate = (1 - decay).to(dtype) if isinstance(decay, torch.Tensor) else torch.full(
                    (), 1.0 - decay, dtype=dtype, device=count.device
                )
            return torch.where(after_start, rate, torch.ones_like(rate))

        new_averages = {}
        for path, avg in averages.items():
            p, u = param_leaves[path], incoming.get(path)
            current = p.to(avg.dtype) if u is None else (p + u.to(p.dtype)).to(avg.dtype)
            new_averages[path] = avg + weight(avg.dtype).to(avg.device) * (current - avg)
        new_state = TensorDict({COUNT: count, AVERAGE: _tree.state_tree(new_averages)}, batch_size=[])
        return updates, new_state

    return GradientTransformation(init, update)


def averaged_params(state: OptState, like: Optional[Tree] = None) -> Tree:
    """The averaged parameters held by a :func:`parameter_averaging` state.

    ``state`` is the averaging transform's own state or any state that holds
    exactly one of them (e.g. the whole state of a ``chain``).  With ``like``
    (the current params), the result has its container type and dtypes and
    the keys the average does not hold (left out of ``init``) come from
    ``like``; without it, a TensorDict.

    Example::

        eval_params = sm3fn.averaged_params(state, like=params)
        logits = torch.func.functional_call(model, eval_params, (x,))
    """
    if not isinstance(state, TensorDictBase):
        raise TypeError(f"state must be a TensorDict, got {type(state).__name__}")
    found = _find_averages(state)
    if len(found) != 1:
        raise ValueError(
            f"state must hold exactly one parameter_averaging state, found {len(found)}"
            + (f" (at {[_tree.fmt(p) for p in found]})" if found else "")
        )
    average = next(iter(found.values()))
    if like is None:
        return average
    like_leaves = _tree.flatten(like, "like")
    avg_leaves = _tree.flatten(average, "averaged_params")
    extra = [p for p in avg_leaves if p not in like_leaves]
    if extra:
        raise ValueError(f"the average holds key {_tree.fmt(extra[0])}, which like does not have")
    out = {
        path: (avg_leaves[path].to(p.dtype) if path in avg_leaves and p is not None else p)
        for path, p in like_leaves.items()
    }
    return _tree.unflatten_like(like, out)


def _find_averages(state: TensorDictBase, prefix: _tree.Path = ()) -> dict:
    keys = set(state.keys())
    if {COUNT, AVERAGE} <= keys and isinstance(state.get(AVERAGE), TensorDictBase):
        return {prefix: state.get(AVERAGE)}
    found = {}
    for key in keys:
        value = state.get(key)
        if isinstance(value, TensorDictBase):
            found.update(_find_averages(value, prefix + (key,)))
    return found
