"""Argument checks shared by the transforms, the aliases and the optimizers.

Every check names the argument and the value, and runs before anything is
computed, so a rejected call leaves the caller's tensors and state as they
were.  Tensor hyperparameters are checked when their value can be read
without tracing (not under ``torch.compile`` or ``torch.func`` transforms).
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Optional, Sequence, Union

import torch

from sm3fn import _tree


def _is_concrete(t: torch.Tensor) -> bool:
    """True when reading ``t``'s values is safe: no tracing, no functorch wrapper."""
    if torch.compiler.is_compiling():
        return False
    if t.device.type == "meta" or t.is_sparse:
        return False
    return not _is_traced(t)


def _is_traced(t: torch.Tensor) -> bool:
    """Whether ``t`` is a functorch wrapper (vmap, grad) or a fake tensor, asked through
    private PyTorch names; where another torch version lacks them (or changed them),
    the answer is read by trying: a traced tensor refuses ``bool()``."""
    try:
        if torch._C._functorch.is_functorch_wrapped_tensor(t):
            return True
        from torch._subclasses import FakeTensor

        return isinstance(t, FakeTensor)
    except Exception:  # noqa: BLE001 - a private API moved: fall back to asking the tensor
        pass
    try:
        bool(t.reshape(-1)[:1].sum() == 0)
    except Exception:  # noqa: BLE001 - data-dependent control flow refused: traced
        return True
    return False


def functorch_transform_active() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``, ...) is running.

    Asked through a private PyTorch name; where another torch version lacks it
    (or changed it) the answer is True, so callers take the differentiable
    path, which is right under any transform (only slower outside one).
    """
    try:
        return torch._C._functorch.peek_interpreter_stack() is not None
    except Exception:  # noqa: BLE001 - a private API moved: assume a transform
        return True


def check_scalar(
    name: str,
    value: Any,
    low: float,
    high: Optional[float] = None,
    high_inclusive: bool = False,
    allow_callable: bool = False,
    finite: bool = False,
) -> None:
    """Checks a hyperparameter lies in ``[low, high)`` (or ``[low, high]``).

    ``finite=True`` (with ``high`` None) refuses ``inf`` too: the interval is ``[low, inf)``.

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
        elif finite:
            bad |= torch.isinf(value)
        if bool(bad.any()):
            first = value.detach().reshape(-1)[bad.reshape(-1)][0].item()
            raise ValueError(f"{name} must be in {_interval(low, high, high_inclusive, finite)}, got {first}")
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {value!r} of type {type(value).__name__}")
    v = float(value)
    ok = v >= low  # False for NaN; no math.isnan, which breaks a torch.compile graph
    if high is not None:
        ok = ok and (v <= high if high_inclusive else v < high)
    elif finite:
        ok = ok and abs(v) < float("inf")  # a comparison, as above: math.isinf breaks a graph
    if not ok:
        raise ValueError(f"{name} must be in {_interval(low, high, high_inclusive, finite)}, got {value!r}")


def check_sm3_hyperparameters(
    learning_rate: Any, momentum: Any, beta: Any, eps: Any, lr_name: str = "learning_rate"
) -> None:
    """The checks of SM3's four hyperparameters, shared by ``sm3``, ``sm3_update_``
    and ``sm3fn.optim.SM3`` (which calls its learning rate ``lr``)."""
    check_scalar(lr_name, learning_rate, 0.0, allow_callable=True, finite=True)
    check_scalar("momentum", momentum, 0.0, 1.0)
    check_scalar("beta", beta, 0.0, 1.0)
    check_scalar("eps", eps, 0.0, finite=True)
    if isinstance(eps, torch.Tensor):
        raise TypeError("eps must be a float, got a tensor")


def _interval(low: float, high: Optional[float], high_inclusive: bool, finite: bool = False) -> str:
    if high is None:
        if finite:
            return f"[{low}, inf) (finite, not NaN)"
        return f"[{low}, inf)" if low != 0 else "[0, inf) (non-negative, not NaN)"
    return f"[{low}, {high}{']' if high_inclusive else ')'}"


#: the dtypes sm3fn steps and keeps statistics in (float8 has too little range for
#: SM3's sums of squares, and most of torch's arithmetic refuses it on a CPU)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_SUPPORTED_NAMES = ", ".join(str(d) for d in SUPPORTED_DTYPES)


def check_floating(argname: str, path: _tree.Path, t: torch.Tensor) -> None:
    """Parameters and gradients must be float16, bfloat16, float32 or float64."""
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{argname}[{_tree.fmt(path)}] has dtype {t.dtype}; "
            f"sm3fn optimizes real floating-point tensors only ({_SUPPORTED_NAMES})"
        )


def check_dtype_arg(name: str, dtype: Optional[torch.dtype]) -> None:
    if dtype is None:
        return
    if not isinstance(dtype, torch.dtype) or dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be None or a floating-point torch.dtype ({_SUPPORTED_NAMES}), got {dtype!r}")


#: a tensor's name in an error; a callable is called only to raise (names can cost a walk)
Name = Union[str, Callable[[], str]]


def _named(name: Name) -> str:
    return name if isinstance(name, str) else name()


def check_step_values(where: Name, lr: Any, eps: float, statistics: torch.dtype) -> None:
    """``lr`` and ``eps`` must be finite in the dtype the step computes in.

    The in-place kernels take them as scalars of the statistics dtype:
    ``lr = 1e39`` is inf in float32, which one kernel turns into inf/NaN
    parameters and another refuses mid-step (after other tensors moved).
    Called per tensor before anything is written; ``where`` names the
    tensor.  A tensor ``lr`` is read only where it is concrete (a host read).
    """
    if statistics not in SUPPORTED_DTYPES:
        raise TypeError(f"{_named(where)} keeps its statistics in {statistics}; sm3fn supports {_SUPPORTED_NAMES}")
    biggest = torch.finfo(statistics).max
    for name, value in (("lr", lr), ("eps", eps)):
        if isinstance(value, torch.Tensor):
            if not _is_concrete(value):
                continue
            value = value.detach().abs().max().item() if value.numel() else 0.0
        if not abs(float(value)) <= biggest:  # inf and NaN fail too
            raise ValueError(
                f"{name}={value!r} is not finite in {statistics} (largest {biggest:.6g}), the statistics "
                f"dtype of {_named(where)}"
            )


# -- memory: aliased parameters, self-overlapping state -------------------------------------


def _address_range(t: torch.Tensor) -> tuple[int, int]:
    """``[first, last + 1)``: the addresses of the bytes ``t``'s elements lie in (``numel > 0``).

    Absolute addresses (``data_ptr`` is the first element's), so tensors of
    different storages compare as well as views of one.
    """
    start = int(t.data_ptr())
    size = t.element_size()
    if t.is_contiguous():  # the usual case, without a Python loop over the dims
        return start, start + int(t.numel()) * size
    span = sum((int(n) - 1) * int(s) for n, s in zip(t.shape, t.stride()))
    return start, start + (span + 1) * size


def _is_dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill its range, each byte once (contiguous in some dim order)."""
    if t.is_contiguous():
        return True
    span = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return span + 1 == t.numel() and all(s > 0 for n, s in zip(t.shape, t.stride()) if n > 1)


def _share_elements(a: torch.Tensor, b: torch.Tensor, lo: int, hi: int) -> bool:
    """Whether ``a`` and ``b`` (address ranges meeting, together within ``[lo, hi)``) share a byte.

    Dense tensors whose ranges meet do; strided views with gaps (two columns
    of one matrix) are compared byte by byte on a CPU mask of the joint range.
    """
    if _is_dense(a) and _is_dense(b):
        return True
    mask = torch.zeros(hi - lo, dtype=torch.bool)

    def cover(t: torch.Tensor) -> torch.Tensor:
        size = t.element_size()
        return mask.as_strided(tuple(t.shape) + (size,), tuple(s * size for s in t.stride()) + (1,),
                               t.data_ptr() - lo)

    cover(a).fill_(True)
    return bool(cover(b).any())


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _memory_span(t: torch.Tensor) -> Optional[tuple[torch.device, int, int, torch.Tensor]]:
    """``(device, first address, end address, tensor)`` of the memory ``t`` writes (a
    DTensor's local shard), or None where there is none to compare (meta, sparse, empty,
    or a tensor without storage: a functorch wrapper, a fake tensor)."""
    if type(t) not in _PLAIN and hasattr(t, "to_local"):
        t = t.to_local()
    if t.numel() == 0 or t.layout != torch.strided or t.is_meta:
        return None
    try:
        start, end = _address_range(t)
    except Exception:  # noqa: BLE001 - no storage to read: nothing to compare
        return None
    return t.device, start, end, t


def check_no_aliasing(named: Sequence[tuple[Name, torch.Tensor]], what: str = "parameters") -> None:
    """Tensors that are stepped in place must not share memory.

    Two parameters over one storage (or one listed twice) would each be
    stepped from the same old values and written twice; the kernels differ
    in which write survives.  sm3fn refuses such a call with a
    ``ValueError`` naming both.  One ``nn.Parameter`` used twice in a model
    (tied weights) appears once in ``model.parameters()`` and is unaffected.
    ``named``: ``(name, tensor)`` pairs.  Skipped under ``torch.compile``.
    Cost: about a microsecond per tensor (address ranges, sorted; only
    tensors whose ranges meet are compared further).
    """
    if torch.compiler.is_compiling():
        return
    spans = []
    for name, t in named:
        span = _memory_span(t)
        if span is not None:
            spans.append((span, name))
    spans.sort(key=lambda s: s[0][1])
    for i, ((device, start, end, view), name) in enumerate(spans):
        for (other_device, other_start, other_end, other), other_name in spans[i + 1:]:
            if other_start >= end:
                break
            if other_device == device and _share_elements(view, other, start, max(end, other_end)):
                raise ValueError(
                    f"{_named(name)} and {_named(other_name)} share memory (one storage, overlapping "
                    f"elements); sm3fn steps {what} in place and refuses aliased ones: pass each tensor "
                    "once, or give each its own storage (.clone())"
                )


def check_no_self_overlap(where: Name, t: torch.Tensor) -> None:
    """A state tensor written in place must not have elements that share memory (an
    ``expand``-ed tensor, stride 0): the kernels would write one element several times."""
    if t.layout != torch.strided or t.numel() <= 1:
        return
    if torch.compiler.is_compiling():
        return
    dims = sorted((s, n) for n, s in zip(t.shape, t.stride()) if n > 1)
    reach = 1  # one past the farthest element the dims so far reach
    for stride, n in dims:
        if stride < reach:
            raise ValueError(
                f"{_named(where)} has elements that share memory (shape {tuple(t.shape)}, stride {tuple(t.stride())}, "
                "e.g. from expand()); state must hold each element once: pass .clone()"
            )
        reach += stride * (n - 1)


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


def check_in_place_step(
    named_params: Sequence[tuple[Name, torch.Tensor]],
    statistics: Sequence[torch.dtype],
    lr: Any,
    eps: float,
    named_state: Sequence[tuple[Name, torch.Tensor]] = (),
) -> None:
    """What an in-place step could fail on, checked before it writes anything.

    Every parameter's dtype is supported and ``lr``/``eps`` are finite in its
    statistics dtype (``statistics[j]``); no two parameters share memory;
    every state tensor (``named_state``) has a supported dtype and holds each
    element once.  So a step that raises moves nothing, on every kernel.
    (Callers also run :func:`check_no_aliasing` over all the parameters they step.)
    """
    for name, t in named_state:
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{_named(name)} has dtype {t.dtype}; sm3fn keeps statistics in {_SUPPORTED_NAMES}")
        check_no_self_overlap(name, t)
    first_of: dict[torch.dtype, Name] = {}  # lr and eps: checked once per statistics dtype
    for (name, p), stats in zip(named_params, statistics):
        if p.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{_named(name)} has dtype {p.dtype}; sm3fn optimizes real floating-point tensors "
                            f"only ({_SUPPORTED_NAMES})")
        first_of.setdefault(stats, name)
    for stats, name in first_of.items():
        check_step_values(name, lr, eps, stats)


def check_loaded_accumulator(where: str, t: torch.Tensor, nonnegative: bool = True) -> None:
    """A loaded SM3 accumulator holds maxima of sums (or averages) of squares: ``>= 0``, not NaN
    (``nonnegative=False``: a momentum buffer, which may be negative but not NaN).

    A negative or NaN one would turn the next step's ``nu`` (and the weight) NaN.
    Read only where the values are concrete (not on ``meta``, not under tracing).
    """
    if t.numel() == 0 or not _is_concrete(t):
        return
    bad = torch.isnan(t)
    if nonnegative:
        bad |= t < 0
    if bool(bad.any()):
        first = t.detach()[bad][0].item()
        what = "SM3 accumulators are >= 0 and not NaN" if nonnegative else "momentum buffers are not NaN"
        raise ValueError(
            f"{where} holds {first} (at {int(bad.sum())} entries); {what}: the checkpoint is damaged, "
            "or was saved after a step on a NaN gradient (skip_nonfinite=True / sm3fn.apply_if_finite "
            "drop such steps)"
        )
