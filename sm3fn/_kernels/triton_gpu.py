"""The Triton kernel: one sweep per tensor on a GPU, generated from ``_sm3_math`` like the CPU one.

There is no hand-written copy of the equations here.  :func:`_body` runs the
functions of :mod:`sm3fn._sm3_math` (``cover_minimum``, ``second_moment``,
``precondition``, ``ema``, ``saturate``) on symbolic values
(:mod:`sm3fn._kernels.trace`), as :mod:`sm3fn._kernels.fused_cpu` does, and
:class:`_Trace` renders each torch call as one line of Triton.  The templates
below hold only loads, stores, the loops and the maxima.  The source is
written to a cache directory and imported once per configuration (kind,
number of dims, parameter and statistics dtypes, momentum buffer or none,
and ``beta == 0`` or not: the one branch ``_sm3_math`` takes on a
hyperparameter).  ``lr``, ``momentum``, ``beta`` and ``eps`` are read by the
kernel from a small float64 tensor, so a schedule does not recompile and a
CUDA graph replays with a tensor ``lr`` updated in place.

Kernel interface (what the dispatcher calls):

* :func:`supported` ``(p, g, accs, m) -> bool``: from metadata only (dtype,
  device, layout, contiguity), so it answers on fake tensors too.  CUDA
  tensors (CPU ones too while ``TRITON_INTERPRET=1``, for the tests); dense,
  contiguous; float32/float64 with statistics of their own dtype, or
  bfloat16/float16 with float32 statistics; plain tensors (a DTensor's local
  shard is one).
* :func:`sweep_many_` ``(params, grads, accumulators, momentum_buffers, *,
  lr, momentum, beta, eps)``: one SM3 step in place on every parameter.
  ``lr`` is a float or a tensor (read on the device, never on the host);
  ``momentum``, ``beta``, ``eps`` are Python numbers.  :func:`sweep_` is the
  same for one tensor.
* :func:`step_many` ``(params, grads, accumulators, momentum_buffers, *, lr,
  momentum, beta, eps) -> [(update, new_accs, new_m)]``: out of place (the
  pure ``tx.update``): the in-place kernel run on copies of the state and a
  zero "parameter", so ``update`` is exactly ``-lr * (m or u)`` (``lr=-1``
  gives ``u``).  :func:`step` is the same for one tensor.

The sweep.  0-d/1-d tensors (full-size accumulator, elementwise) are packed
by a table of pointers: however many there are, they are one launch.
Tensors of ``k >= 2`` dims of one configuration are one launch too: each is
seen as ``rows x cols`` (``cols`` its last dim), and a program steps a block
of rows, walking the columns in chunks.  It reads ``g`` and ``p`` (and ``m``)
once and writes ``p`` (and ``m``) once.  A row's entries of the leading
accumulators are loaded once per row; the row maxima of ``nu`` stay in
registers; the column maxima, and the row maxima of the leading dims, go by
atomic max into a workspace of ``sum(shape)`` numbers per tensor (SM3's own
state size, never a parameter-sized one).  The atomics work on an integer
view of ``nu`` (``nu >= 0``, where integer and float order agree) with every
NaN mapped to the largest integer, so a NaN wins every maximum as on the
CPU (float atomic max on a GPU drops NaN).  After the sweeps the workspace
becomes the new accumulators through ``_sm3_math.saturate`` (an overflowing
square saturates at the dtype's largest finite value) in two launches per
statistics dtype for the whole step, after every sweep has read the old
values.  Every kernel is built (compiled, on a GPU) before any tensor is
written: a failure raises :class:`BuildError` with everything as it was.

No host synchronisation: no ``.item()``, no branch on data; tables of
pointers are cached per set of tensors (a new set costs one pinned,
non-blocking copy), so a step can be captured in a CUDA graph after one
warm-up step.

Triton is imported only when a kernel is built: ``import sm3fn`` works
without it, and :func:`supported` answers False where it is missing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
import threading
import warnings
from collections import OrderedDict
from typing import Optional, Sequence, Union

import torch

from sm3fn._kernels.trace import Sym, Trace, assumptions_hold, flat
from sm3fn._sm3_math import cover_minimum, ema, precondition, saturate, second_moment

#: statistics (accumulator and momentum) dtypes, as Triton names them
STATISTICS = {torch.float32: "tl.float32", torch.float64: "tl.float64"}
#: parameter (and gradient) dtypes: bfloat16/float16 ones keep float32 statistics
PARAMS = {**STATISTICS, torch.bfloat16: "tl.bfloat16", torch.float16: "tl.float16"}
#: the integer view of each statistics dtype used for the atomic maxima, and its NaN key
_KEYS = {torch.float32: ("tl.int32", torch.int32, "0x7FFFFFFF"),
         torch.float64: ("tl.int64", torch.int64, "0x7FFFFFFFFFFFFFFF")}
#: the run-time hyperparameters, in the order the kernel reads them from its float64 tensor
HYPERPARAMETERS = ("lr", "momentum", "beta", "eps")
#: elements per program of the 0-d/1-d kernel
FLAT_BLOCK = 1024
#: rows x columns per chunk of the k-d kernel (a program walks its rows' columns in chunks);
#: untuned: no GPU has run this kernel yet
ROWS_BLOCK = (16, 256)
#: warps per program (ignored by the interpreter)
NUM_WARPS = 8
#: no multiply-add contraction beyond the traced ``fma``s: the numbers are those the
#: interpreter (and the CPU kernel) give, whatever the compiler's default
_LAUNCH = dict(enable_fp_fusion=False)

_Number = Union[float, torch.Tensor]


# --------------------------------------------------------------------------- tracing


class _Trace(Trace):
    """Records the Triton lines of one traced computation, in the statistics dtype."""

    def __init__(self, dtype: torch.dtype):
        super().__init__(dtype)
        self.tl_dtype = STATISTICS[dtype]
        self.host = False  # whether the call being rendered has only hyperparameters as operands

    def call(self, func, args, kwargs) -> Sym:
        # Arithmetic on hyperparameters alone (``1 - beta``) is done in float64, as Python does
        # it on the host before ATen casts the result to the tensor's dtype; a hyperparameter
        # meeting a tensor is cast to the statistics dtype there, as ATen casts a Python scalar.
        self.host = all(getattr(a, "host", False) for a in flat(args, kwargs) if isinstance(a, Sym))
        result = self.render(func, args, kwargs)
        result.host = self.host
        return result

    def assign(self, name: str, expr: str) -> str:
        return f"{name} = {expr}"

    def value(self, x) -> str:
        """Triton for an operand: a symbol's name, or a Python number as a constant of the dtype."""
        if isinstance(x, Sym):
            return f"{x.name}.to({self.tl_dtype})" if getattr(x, "host", False) and not self.host else x.name
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise NotImplementedError(f"the Triton kernel cannot trace the operand {x!r}")
        # repr round-trips the double; tl.full makes it in the dtype (rounding once, as ATen's cast)
        return f"tl.full([], {float(x)!r}, {'tl.float64' if self.host else self.tl_dtype})"

    def render(self, func, args, kwargs) -> Sym:
        """One torch call as Triton (see :meth:`call`)."""
        v = self.value
        if func in (torch.minimum, torch.Tensor.minimum, torch.maximum, torch.Tensor.maximum) and not kwargs:
            name = "minimum" if func in (torch.minimum, torch.Tensor.minimum) else "maximum"
            # torch's minimum/maximum propagate NaN; a GPU's min/max instruction does not
            return self.emit(f"tl.{name}({v(args[0])}, {v(args[1])}, propagate_nan=tl.PropagateNan.ALL)")
        if func is torch.addcmul:
            # self + value * t1 * t2 with its last multiply-add fused, as the CPU kernel does
            value = kwargs.pop("value", 1)
            _no_more(func, kwargs)
            return self.emit(f"tl.fma({v(value)} * {v(args[1])}, {v(args[2])}, {v(args[0])})")
        if func is torch.add:
            alpha = kwargs.pop("alpha", 1)
            _no_more(func, kwargs)
            if not isinstance(alpha, Sym) and alpha == 1:
                return self.emit(f"{v(args[0])} + {v(args[1])}")
            return self.emit(f"{v(args[0])} + {v(alpha)} * {v(args[1])}")
        if func is torch.div and not kwargs and self.dtype == torch.float32 and not self.host:
            # float32 "/" is an approximation on a GPU (div.full); div_rn is IEEE's, as ATen's
            return self.emit(f"tl.div_rn({v(args[0])}, {v(args[1])})")
        binary = {torch.sub: "-", torch.mul: "*", torch.div: "/", torch.ne: "!=", torch.eq: "=="}
        if func in binary and not kwargs:
            # != is unordered (NaN != 0 is true), as in torch
            return self.emit(f"({v(args[0])} {binary[func]} {v(args[1])})")
        if func is torch.where and not kwargs:
            mask, a, b = args
            return self.emit(f"tl.where({v(mask)}, {v(a)}, {v(b)})")
        if func in (torch.sqrt, torch.Tensor.sqrt) and not kwargs:
            # tl.sqrt is an approximation in float32; sqrt_rn is IEEE's (float64's sqrt always is)
            sqrt = "tl.sqrt_rn" if self.dtype == torch.float32 else "tl.sqrt"
            return self.emit(f"{sqrt}({v(args[0])})")
        if func in (torch.clamp, torch.Tensor.clamp):
            high = kwargs.pop("max", None)
            _no_more(func, kwargs)
            if len(args) != 1 or high is None:
                raise NotImplementedError("the Triton kernel traces clamp(x, max=...) only")
            # a NaN x stays NaN (NaN > cap is false), as torch.clamp keeps it
            x = v(args[0])
            return self.emit(f"tl.where({x} > {v(high)}, {v(high)}, {x})")
        if func in (torch.lerp, torch.Tensor.lerp) and not kwargs:
            start, end, weight = (v(a) for a in args)
            # ATen's lerp: one fused multiply-add from the nearer end, so that weight 0 and
            # 1 are exact; the weight is a run-time value, so both sides are computed
            diff = self.emit(f"{end} - {start}").name
            return self.emit(f"tl.where(tl.abs({weight}) < 0.5, tl.fma({weight}, {diff}, {start}), "
                             f"tl.fma({weight} - 1.0, {diff}, {end}))")
        raise NotImplementedError(f"the Triton kernel cannot trace {getattr(func, '__name__', func)}")


def _no_more(func, kwargs):
    if kwargs:
        raise NotImplementedError(f"the Triton kernel cannot trace {func.__name__} with {sorted(kwargs)}")


def _body(dtype: torch.dtype, k: int, with_momentum: bool, values: dict) -> tuple[str, list]:
    """Traced Triton for a block of elements, and the comparisons on hyperparameters it assumed.

    Inputs (names in the template): ``g_``, ``p_``, ``m_`` (widened to the
    statistics dtype), ``a0_ ... a{k-1}_`` (accumulator values, broadcasting
    against the block; ``a0_`` alone for 0-d/1-d) and the run-time scalars
    ``lr``, ``momentum``, ``beta``, ``eps``; ``values`` are the numbers they
    are traced with.  Outputs: ``nu_o``, ``p_o``, ``m_o`` and, for 0-d/1-d,
    ``acc_o``.
    """
    t = _Trace(dtype)
    g, p = t.input("g_"), t.input("p_")
    hyper = {name: t.scalar(name, values[name]) for name in HYPERPARAMETERS}
    accs = [t.input(f"a{i}_") for i in range(max(k, 1))]
    nu = second_moment(g, cover_minimum(accs), hyper["beta"])
    u = precondition(g, nu, hyper["eps"])
    out = [f"nu_o = {nu.name}"]
    if with_momentum:
        u = ema(t.input("m_"), u, hyper["momentum"])
        out.append(f"m_o = {u.name}")
    # p.add_(u, alpha=-lr), as ATen computes it: one fused multiply-add
    out.append(f"p_o = tl.fma({u.name}, -lr.to({t.tl_dtype}), {p.name})")
    if k <= 1:  # the accumulator is nu itself, saturated (cover_maxima of a 1-d nu is nu)
        out.append(f"acc_o = {saturate(nu).name}")
    return "\n".join(t.lines + out), t.assumptions


# --------------------------------------------------------------------------- Triton

# Only builtins of triton.language and jit functions of this module: triton's own jit
# functions (tl.zeros, tl.max) were jitted or interpreted when triton was imported, which
# (through tensordict) precedes any test's TRITON_INTERPRET=1.  The maxima reduce with
# {max_combine}: triton's own combine function where it has one (the interpreter then reduces
# with numpy; with any other function it makes a Python call per element), else _max.
_HEADER = """\
import triton
import triton.language as tl


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _bfloat16_bits(x):
    # float32 -> bfloat16, rounding to nearest even as torch does (the interpreter's cast truncates)
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(x != x, 0x7FC0, rounded).to(tl.uint16)


@triton.jit
"""


def _max_combine() -> str:
    import triton.language as tl

    return "tl.standard._elementwise_max" if hasattr(getattr(tl, "standard", None), "_elementwise_max") else "_max"


# table: one row of int64 per tensor [g, p, m, a0, numel]; blocks: [tensor, first element]
_SWEEP_FLAT = """\
def sweep(table, blocks, hyper, work, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    entry = table + tl.load(blocks + 2 * pid) * 5
    start = tl.load(blocks + 2 * pid + 1)
    g_ptr = tl.load(entry).to(tl.pointer_type({ptype}))
    p_ptr = tl.load(entry + 1).to(tl.pointer_type({ptype}))
    m_ptr = tl.load(entry + 2).to(tl.pointer_type({stype}))
    a_ptr = tl.load(entry + 3).to(tl.pointer_type({stype}))
    numel = tl.load(entry + 4)
{hyper}
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    g_ = tl.load(g_ptr + offs, mask=mask, other=0.0).to({stype})
    p_ = tl.load(p_ptr + offs, mask=mask, other=0.0).to({stype})
    a0_ = tl.load(a_ptr + offs, mask=mask, other=0.0)
    {load_m}
{body}
    {store_p}
    {store_m}
    tl.store(a_ptr + offs, acc_o, mask=mask)
"""

# table: one row of int64 per tensor [g, p, m, workspace offset, acc_0..acc_{K-1}, n_0..n_{K-1}];
# blocks: [tensor, first row]; work: the integer keys of the new maxima, [a_0 | a_1 | ...] per tensor
_SWEEP_ROWS = """\
def sweep(table, blocks, hyper, work, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    entry = table + tl.load(blocks + 2 * pid) * {width}
    row0 = tl.load(blocks + 2 * pid + 1)
    g_ptr = tl.load(entry).to(tl.pointer_type({ptype}))
    p_ptr = tl.load(entry + 1).to(tl.pointer_type({ptype}))
    m_ptr = tl.load(entry + 2).to(tl.pointer_type({stype}))
    w_ptr = work + tl.load(entry + 3)
{acc_ptrs}
{shape}
    rows = {rows}
    cols = n{last}
{hyper}
    r = row0 + tl.arange(0, BLOCK_R)
    rmask = r < rows
{indices}
{lead_loads}
    row_key = tl.full([BLOCK_R], 0, {ktype})
    for c0 in range(0, cols, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < cols
        mask = rmask[:, None] & cmask[None, :]
        offs = r[:, None] * cols + c[None, :]
        g_ = tl.load(g_ptr + offs, mask=mask, other=0.0).to({stype})
        p_ = tl.load(p_ptr + offs, mask=mask, other=0.0).to({stype})
        a{last}_ = tl.load(acc{last} + c, mask=cmask, other=0.0)[None, :]
        {load_m}
{body}
        {store_p}
        {store_m}
        # nu >= 0: its bits order as its values do; every NaN becomes the largest key
        key = tl.where(nu_o != nu_o, {nan_key}, nu_o.to({ktype}, bitcast=True))
        key = tl.where(mask, key, 0)
        row_key = tl.maximum(row_key, tl.reduce(key, 1, {max_combine}))
        tl.atomic_max(w_ptr + {last_offset} + c, tl.reduce(key, 0, {max_combine}), mask=cmask, sem="relaxed")
{lead_stores}
"""


def _indent(text: str, spaces: int) -> str:
    return "\n".join(" " * spaces + line for line in text.splitlines())


def _hyper_loads() -> str:
    # float64, as Python numbers are; the traced lines cast them where they meet a tensor
    return _indent("\n".join(f"{name} = tl.load(hyper + {i})" for i, name in enumerate(HYPERPARAMETERS)), 4)


def source(param_dtype: torch.dtype, dtype: torch.dtype, k: int, with_momentum: bool,
           values: dict) -> tuple[str, list]:
    """The Triton source of one kernel, and the hyperparameter comparisons it assumes.

    ``dtype`` is the statistics dtype; ``k`` the number of dims (0 and 1
    share the elementwise kernel); ``values`` the hyperparameters to trace
    with (only the comparisons recorded depend on them).
    """
    body, assumptions = _body(dtype, k, with_momentum, values)
    ptype, stype = PARAMS[param_dtype], STATISTICS[dtype]
    if param_dtype == torch.bfloat16:
        store_p = "tl.store(p_ptr.to(tl.pointer_type(tl.uint16)) + offs, _bfloat16_bits(p_o), mask=mask)"
    else:
        store_p = f"tl.store(p_ptr + offs, p_o.to({ptype}), mask=mask)"
    if k <= 1:
        text = _SWEEP_FLAT.format(
            store_p=store_p, ptype=ptype, stype=stype, hyper=_hyper_loads(), body=_indent(body, 4),
            load_m="m_ = tl.load(m_ptr + offs, mask=mask, other=0.0)" if with_momentum else "",
            store_m="tl.store(m_ptr + offs, m_o, mask=mask)" if with_momentum else "",
        )
        return _HEADER + text, assumptions
    ktype, _, nan_key = _KEYS[dtype]
    last = k - 1
    lead = range(k - 1)
    # the flat row index as the indices of the leading dims (the last of them varies fastest)
    indices = ["rest = r"]
    for d in reversed(lead):
        indices.append(f"i{d} = rest % n{d}")
        if d:
            indices.append(f"rest = rest // n{d}")
    offsets = ["0"] + [" + ".join(f"n{e}" for e in range(d)) for d in range(1, k)]
    text = _SWEEP_ROWS.format(
        max_combine=_max_combine(), store_p=store_p, width=4 + 2 * k, ptype=ptype, stype=stype,
        ktype=ktype, nan_key=nan_key, last=last,
        acc_ptrs=_indent("\n".join(f"acc{i} = tl.load(entry + {4 + i}).to(tl.pointer_type({stype}))"
                                   for i in range(k)), 4),
        shape=_indent("\n".join(f"n{i} = tl.load(entry + {4 + k + i})" for i in range(k)), 4),
        rows=" * ".join(f"n{d}" for d in lead),
        hyper=_hyper_loads(),
        indices=_indent("\n".join(indices), 4),
        lead_loads=_indent("\n".join(f"a{d}_ = tl.load(acc{d} + i{d}, mask=rmask, other=0.0)[:, None]"
                                     for d in lead), 4),
        body=_indent(body, 8),
        load_m="m_ = tl.load(m_ptr + offs, mask=mask, other=0.0)" if with_momentum else "",
        store_m="tl.store(m_ptr + offs, m_o, mask=mask)" if with_momentum else "",
        last_offset=f"({offsets[last]})",
        lead_stores=_indent("\n".join(
            f"tl.atomic_max(w_ptr + ({offsets[d]}) + i{d}, row_key, mask=rmask, sem=\"relaxed\")"
            for d in lead), 4),
    )
    return _HEADER + text, assumptions


_kernels: dict[tuple, list] = {}
_lock = threading.Lock()


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (on CPU tensors): ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_importable: Optional[bool] = None


def available() -> bool:
    """Whether triton can be imported (asked once, without importing it)."""
    global _importable
    if _importable is None:
        try:
            _importable = importlib.util.find_spec("triton") is not None
        except (ImportError, ValueError):  # blocked (sys.modules["triton"] = None) or half-installed
            _importable = False
    return _importable


def _cache_dir() -> str:
    path = os.path.join(tempfile.gettempdir(), f"sm3fn_triton_{os.getuid() if hasattr(os, 'getuid') else 0}")
    os.makedirs(path, exist_ok=True)
    return path


def kernel(param_dtype: torch.dtype, dtype: torch.dtype, k: int, with_momentum: bool, values: dict):
    """The jitted sweep for one configuration, generated (or taken from the cache) now.

    Kernels are kept per configuration with the comparisons their trace made
    on the hyperparameters; one whose comparisons ``values`` answer the same
    way is reused (``beta == 0`` and ``beta > 0`` get one kernel each).
    """
    key = (param_dtype, dtype, max(k, 1), with_momentum, interpreting())
    for assumptions, fn in _kernels.get(key, ()):
        if assumptions_hold(assumptions, values):
            return fn
    with _lock:
        for assumptions, fn in _kernels.get(key, ()):
            if assumptions_hold(assumptions, values):
                return fn
        text, assumptions = source(param_dtype, dtype, k, with_momentum, values)
        digest = hashlib.sha256(text.encode()).hexdigest()[:20]
        path = os.path.join(_cache_dir(), f"sm3_{digest}.py")
        if not os.path.exists(path):
            partial = f"{path}.{os.getpid()}.tmp"
            with open(partial, "w") as f:
                f.write(text)
            os.replace(partial, path)  # atomic: another process never imports half a file
        spec = importlib.util.spec_from_file_location(f"sm3fn_triton_{digest}", path)
        assert spec is not None and spec.loader is not None  # a .py file path always has both
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # jits (or interprets) as TRITON_INTERPRET says now
        _kernels.setdefault(key, []).append((assumptions, module.sweep))
        return module.sweep


class BuildError(RuntimeError):
    """A kernel could not be generated or compiled (no triton, an unsupported GPU...)."""


#: why the kernel cannot be built here (set by :func:`give_up`), or None
unavailable: Optional[str] = None


def give_up(error: BuildError) -> None:
    """Stops ``fused=None`` from trying again, with one warning."""
    global unavailable
    if unavailable is None:
        unavailable = str(error)
        warnings.warn(f"{error}; SM3 steps on GPUs take the blocked path", RuntimeWarning, stacklevel=4)


def _built(param_dtype, stats, k, with_m, values, grid, args, options):
    """:func:`kernel`, compiled now for these arguments (on a GPU: ``warmup`` compiles
    without running), so that a failure raises a :class:`BuildError` before anything is written."""
    try:
        fn = kernel(param_dtype, stats, k, with_m, values)
        if not interpreting():
            fn.warmup(*args, grid=grid, **options)
        return fn
    except Exception as e:
        raise BuildError(
            f"the Triton SM3 kernel could not be built ({type(e).__name__}: {e}); pass fused=False "
            "for the blocked path") from e


# --------------------------------------------------------------------------- host side


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _plain(t: torch.Tensor) -> bool:
    if type(t) in _PLAIN:
        return True
    from torch._subclasses.fake_tensor import is_fake  # torch.compile's fake tensors: metadata only

    return is_fake(t)


def supported(p: Optional[torch.Tensor], g: torch.Tensor, accs: Sequence[torch.Tensor],
              m: Optional[torch.Tensor]) -> bool:
    """Whether the Triton kernel can step this parameter, from metadata only (see the module docstring).

    ``p`` may be None (out of place: the gradient stands for it).
    """
    p = g if p is None else p
    if not available() or p.dtype not in PARAMS or g.dtype != p.dtype:
        return False
    stats = accs[0].dtype
    if stats != (p.dtype if p.dtype in STATISTICS else torch.float32):
        return False
    device = p.device
    if not (device.type == "cuda" or (device.type == "cpu" and interpreting())):
        return False
    for t in (p, g, *accs) if m is None else (p, g, *accs, m):
        if (not _plain(t) or t.device != device or t.layout != torch.strided
                or not t.is_contiguous()):
            return False
    if p.dim() >= 2 and len(accs) != p.dim():
        return False
    return all(t.dtype == stats for t in accs) and (m is None or m.dtype == stats)


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on ``device`` without a host synchronisation (pinned, non-blocking)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host


class _LRU(OrderedDict):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get_or_make(self, key, make):
        value = self.get(key)
        if value is None:
            value = self[key] = make()
            if len(self) > self.size:
                self.popitem(last=False)
        else:
            self.move_to_end(key)
        return value


_hypers = _LRU(16)
_tables = _LRU(64)


def _hyper(lr: _Number, momentum: float, beta: float, eps: float, device: torch.device) -> torch.Tensor:
    """``[lr, momentum, beta, eps]`` as a float64 tensor on ``device``; a tensor ``lr`` stays on the device."""
    if isinstance(lr, torch.Tensor):
        rest = _hypers.get_or_make((device, None, momentum, beta, eps),
                                   lambda: _to_device([momentum, beta, eps], torch.float64, device))
        return torch.cat([lr.detach().reshape(1).to(device, torch.float64), rest])
    lr = float(lr)
    return _hypers.get_or_make((device, lr, momentum, beta, eps),
                               lambda: _to_device([lr, momentum, beta, eps], torch.float64, device))


def _tables_for(members, rows_kind: bool, offsets, device):
    """The pointer table and the block table of one launch (cached per set of tensors)."""
    key = (device, rows_kind, ROWS_BLOCK if rows_kind else FLAT_BLOCK,
           tuple((p.data_ptr(), g.data_ptr(), -1 if m is None else m.data_ptr(),
                  tuple(a.data_ptr() for a in accs), tuple(g.shape), off)
                 for (p, g, accs, m), off in zip(members, offsets)))

    def make():
        table, blocks = [], []
        for t, ((p, g, accs, m), off) in enumerate(zip(members, offsets)):
            m_ptr = 0 if m is None else m.data_ptr()
            if rows_kind:
                table += [g.data_ptr(), p.data_ptr(), m_ptr, off, *(a.data_ptr() for a in accs), *g.shape]
                rows = g.numel() // g.shape[-1]
                step = ROWS_BLOCK[0]
            else:
                table += [g.data_ptr(), p.data_ptr(), m_ptr, accs[0].data_ptr(), g.numel()]
                rows, step = g.numel(), FLAT_BLOCK
            for start in range(0, rows, step):
                blocks += [t, start]
        return (_to_device(table, torch.int64, device), _to_device(blocks, torch.int64, device),
                len(blocks) // 2)

    return _tables.get_or_make(key, make)


@torch.no_grad()
def sweep_many_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    accumulators: Sequence[Sequence[torch.Tensor]],
    momentum_buffers: Sequence[Optional[torch.Tensor]],
    *,
    lr: _Number,
    momentum: float,
    beta: float,
    eps: float,
) -> None:
    """One SM3 step in place on every parameter (accumulators and momentum buffers too).

    Every tensor must be :func:`supported`; ``momentum_buffers[j]`` is None
    when ``momentum == 0``.  One launch per configuration (dims, dtypes,
    momentum buffer or none), whatever the number of tensors; then two
    launches per statistics dtype turn the maxima into the accumulators.
    Tensors with no elements are skipped (their accumulators cover nothing).
    """
    values = dict(lr=0.0, momentum=float(momentum), beta=float(beta), eps=float(eps))
    groups: dict[tuple, list[int]] = {}
    for j, (p, g, accs, m) in enumerate(zip(params, grads, accumulators, momentum_buffers)):
        if g.numel():
            key = (g.device, max(g.dim(), 1), p.dtype, accs[0].dtype, m is not None)
            groups.setdefault(key, []).append(j)
    if not groups:
        return
    # workspace: per (device, statistics dtype), sum(shape) integer keys per tensor of k >= 2 dims
    work_sizes: dict[tuple, int] = {}
    offsets: dict[int, int] = {}
    for (device, k, _, stats, _), members in groups.items():
        if k >= 2:
            for j in members:
                offsets[j] = work_sizes.get((device, stats), 0)
                work_sizes[(device, stats)] = offsets[j] + sum(grads[j].shape)
    work = {key: torch.zeros(n, dtype=_KEYS[key[1]][1], device=key[0]) for key, n in work_sizes.items()}
    hypers = {}
    launches = []
    for (device, k, param_dtype, stats, with_m), members in groups.items():
        if device not in hypers:
            hypers[device] = _hyper(lr, momentum, beta, eps, device)
        tensors = [(params[j], grads[j], accumulators[j], momentum_buffers[j]) for j in members]
        table, blocks, n_blocks = _tables_for(tensors, k >= 2, [offsets.get(j, 0) for j in members], device)
        if k >= 2:
            args = (table, blocks, hypers[device], work[(device, stats)])
            options = dict(BLOCK_R=ROWS_BLOCK[0], BLOCK_C=ROWS_BLOCK[1], num_warps=NUM_WARPS, **_LAUNCH)
        else:  # the workspace is not used; any integer tensor keeps the signature
            args = (table, blocks, hypers[device], table)
            options = dict(BLOCK=FLAT_BLOCK, num_warps=4, **_LAUNCH)
        launches.append((_built(param_dtype, stats, k, with_m, values, (n_blocks,), args, options),
                         (n_blocks,), args, options))
    # every kernel is built (compiled, on a GPU) before any tensor is written
    for fn, grid, args, options in launches:
        fn[grid](*args, **options)
    # the new accumulators: every old value has been read by now
    for (device, stats), keys in work.items():
        new = saturate(keys.view(stats), inplace=True)
        targets = [a.view(-1) for j in sorted(offsets, key=lambda j: offsets[j]) if grads[j].device == device
                   and accumulators[j][0].dtype == stats for a in accumulators[j]]
        torch._foreach_copy_(targets, list(new.split([t.numel() for t in targets])))
    # written through raw pointers: tell autograd, as an ATen in-place op would
    written = [t for j in (j for members in groups.values() for j in members)
               for t in (params[j], *accumulators[j], momentum_buffers[j]) if t is not None]
    torch.autograd.graph.increment_version(written)


def sweep_(p: torch.Tensor, g: torch.Tensor, accs: Sequence[torch.Tensor], m: Optional[torch.Tensor],
           *, lr: _Number, momentum: float, beta: float, eps: float) -> None:
    """:func:`sweep_many_` for one parameter."""
    sweep_many_([p], [g], [accs], [m], lr=lr, momentum=momentum, beta=beta, eps=eps)


def step_many(
    params: Sequence[Optional[torch.Tensor]],
    grads: Sequence[torch.Tensor],
    accumulators: Sequence[Sequence[torch.Tensor]],
    momentum_buffers: Sequence[Optional[torch.Tensor]],
    *,
    lr: _Number,
    momentum: float,
    beta: float,
    eps: float,
) -> list[tuple[torch.Tensor, tuple[torch.Tensor, ...], Optional[torch.Tensor]]]:
    """Out of place: ``(update, new_accs, new_m)`` per parameter; no input is written.

    ``update = -lr * (m or u)`` in the gradient's dtype (``lr=-1.0`` gives
    ``u`` itself); ``params`` are not read (the dispatcher's signature) and may be None.
    Runs :func:`sweep_many_` on fresh state and a zero parameter: the
    kernel's ``p - lr * x`` on ``p = 0`` is exactly ``-lr * x``.
    """
    updates = [torch.zeros_like(g) for g in grads]
    new_accs = [tuple(a.clone() for a in accs) for accs in accumulators]
    new_ms = [None if m is None else m.clone() for m in momentum_buffers]
    sweep_many_(updates, grads, new_accs, new_ms, lr=lr, momentum=momentum, beta=beta, eps=eps)
    return list(zip(updates, new_accs, new_ms))


def step(p: Optional[torch.Tensor], g: torch.Tensor, accs: Sequence[torch.Tensor], m: Optional[torch.Tensor],
         *, lr: _Number, momentum: float, beta: float, eps: float):
    """:func:`step_many` for one parameter."""
    return step_many([p], [g], [accs], [m], lr=lr, momentum=momentum, beta=beta, eps=eps)[0]
