"""Argument checks shared by the transforms, the aliases and the optimizers.

Every check names the argument and the value, and runs before anything is
computed, so a rejected call leaves the caller's tensors and state as they
were.  Tensor hyperparameters are checked when their value can be read
without tracing (not under ``torch.compile`` or ``torch.func`` transforms).
"""

from __future__ import annotations

import numbers
from typing import Any, Optional

import torch

from sm3fn import _tree


def _is_concrete(t: torch.Tensor) -> bool:
    """True when reading ``t``'s values is safe: no tracing, no functorch wrapper."""
    if torch.compiler.is_compiling():
        return False
    if torch._C._functorch.is_functorch_wrapped_tensor(t):
        return False
    if t.device.type == "meta" or t.is_sparse:
        return False
    return not isinstance(t, torch._subclasses.FakeTensor)


def check_scalar(
    name: str,
    value: Any,
    low: float,
    high: Optional[float] = None,
    high_inclusive: bool = False,
    allow_callable: bool = False,
) -> None:
    """Checks a hyperparameter lies in ``[low, high)`` (or ``[low, high]``).

    ``value`` may be a real number or a floating-point tensor (a tensor may
    require grad or hold a batch of values for a sweep); a callable passes
    when ``allow_callable`` (a schedule, checked when it is called).
    """
    if allow_callable and callable(value) and not isinstance(value, torch.Tensor):
        return
    if isinstance(value, torch.Tensor):
        if value.is_complex() or not value.is_floating_point():
            raise TypeError(
                f"{name} must be a float or a floating-point tensor, got a tensor of dtype {value.dtype}"
            )
        if not _is_concrete(value):
            return
        bad = torch.isnan(value)
        bad |= value < low
        if high is not None:
            bad |= (value > high) if high_inclusive else (value >= high)
        if bool(bad.any()):
            first = value.detach().reshape(-1)[bad.reshape(-1)][0].item()
            raise ValueError(f"{name} must be in {_interval(low, high, high_inclusive)}, got {first}")
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {value!r} of type {type(value).__name__}")
    v = float(value)
    ok = v >= low  # False for NaN; no math.isnan, which breaks a torch.compile graph
    if high is not None:
        ok = ok and (v <= high if high_inclusive else v < high)
    if not ok:
        raise ValueError(f"{name} must be in {_interval(low, high, high_inclusive)}, got {value!r}")


def check_sm3_hyperparameters(
    learning_rate: Any, momentum: Any, beta: Any, eps: Any, lr_name: str = "learning_rate"
) -> None:
    """The checks of SM3's four hyperparameters, shared by ``sm3``, ``sm3_update_``
    and ``sm3fn.optim.SM3`` (which calls its learning rate ``lr``)."""
    check_scalar(lr_name, learning_rate, 0.0, allow_callable=True)
    check_scalar("momentum", momentum, 0.0, 1.0)
    check_scalar("beta", beta, 0.0, 1.0)
    check_scalar("eps", eps, 0.0)
    if isinstance(eps, torch.Tensor):
        raise TypeError("eps must be a float, got a tensor")


def _interval(low: float, high: Optional[float], high_inclusive: bool) -> str:
    if high is None:
        return f"[{low}, inf)" if low != 0 else "[0, inf) (non-negative, not NaN)"
    return f"[{low}, {high}{']' if high_inclusive else ')'}"


def check_floating(argname: str, path: _tree.Path, t: torch.Tensor) -> None:
    """Parameters and gradients must be real floating point."""
    if t.is_complex() or not t.is_floating_point():
        raise TypeError(
            f"{argname}[{_tree.fmt(path)}] has dtype {t.dtype}; "
            "sm3fn optimizes real floating-point tensors only"
        )


def check_dtype_arg(name: str, dtype: Optional[torch.dtype]) -> None:
    if dtype is None:
        return
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{name} must be None or a floating-point torch.dtype, got {dtype!r}")


def statistics_dtype(param_dtype: torch.dtype, override: Optional[torch.dtype]) -> torch.dtype:
    """The dtype optimizer statistics are kept in for a parameter of ``param_dtype``.

    float32 and float64 keep their own dtype; narrower floats (bfloat16,
    float16, float8) keep float32, since a bfloat16 sum of squares stops
    growing at 256 and float16 underflows ``eps``.
    """
    if override is not None:
        return override
    if param_dtype in (torch.float32, torch.float64):
        return param_dtype
    return torch.float32
