"""The fused CPU kernel: one sweep over each parameter, generated from ``_sm3_math``.

The blocked eager path (:mod:`sm3fn._kernels.blocked`) makes ~7 passes over every
block, and ``torch.compile`` makes 3 (inductor cannot fuse the row maxima,
the column maxima and the update of an SM3 step into one loop).  One sweep
reads ``g`` and ``p`` once and writes ``p`` once; ``min``/``max`` of the
small accumulators are nearly free.  That is what this kernel does, on a CPU,
for float32 and float64 tensors, and for bfloat16 and float16 ones with float32
statistics (widened on load, rounded on store, as ATen's opmath does).

There is no hand-written copy of the equations here.  The per-element
arithmetic is *traced*: :func:`_body` runs the very functions of
:mod:`sm3fn._sm3_math` that the differentiable and eager paths run
(``cover_minimum``, ``second_moment``, ``precondition``, ``ema``,
``saturate``) on symbolic scalars (:class:`~sm3fn._kernels.trace.Sym`, which answers torch's
``__torch_function__`` protocol), and each torch call they make becomes one
line of C++ on ``at::vec::Vectorized`` (the SIMD type inductor's kernels use).
The C++ template below holds only loads, stores, the loop over rows and the
running maxima (``a_i = max of nu over every dim but i``).  The source is
compiled by inductor's C++ code cache (:class:`CppPythonBindingsCodeCache`:
the same compiler, flags and on-disk cache as ``torch.compile``), once per
configuration: dtypes, number of dims, momentum on or off, ``beta == 0`` or
not, and the mode (in place, or the pure update of ``sm3fn.sm3`` or of
``scale_by_sm3``).  ``lr``, ``momentum``, ``beta`` and ``eps`` are read at run
time (:class:`_Hyper`), so a schedule of any of them (``OneCycleLR`` cycles
momentum every step) builds nothing.

Out of place (the pure ``tx.update``, :func:`sweep`) the same sweep reads
``g`` (and ``m``) and writes the update (and the new ``m``) to fresh tensors,
without reading or writing the parameter, and the new accumulators to fresh
small tensors: ``sm3fn.sm3``'s whole step, ``scale_by_sm3``, the momentum and
``-lr``, in one pass.

The sweep (``k >= 2`` dims): :mod:`sm3fn._kernels.layout` presents the
tensor, in any dense layout, as ``rows x m`` in memory order (groups of dims
folded into small tables of accumulator minima, reduced back after the
sweep), and the kernel sees that 2-D problem.  For each row, every element's ``nu``, ``u``, momentum and new
parameter come from the traced lines; the row's maximum of ``nu`` goes to the
row accumulator, and each column's running maximum to the column one.  Each
thread keeps its own running maxima (``threads x (rows + cols)`` numbers, in a tensor the caller allocates, so that the allocator sees
it), merged and saturated after the sweep, so the old accumulator
values every row reads are never overwritten mid-step.  0-d/1-d tensors
have a full-size accumulator: their sweep is elementwise.
"""

from __future__ import annotations

import sys
import threading
import warnings
from collections import OrderedDict
from typing import Any, Optional, Sequence

import torch

from sm3fn._kernels import layout as _layout
from sm3fn._kernels.trace import Sym, Trace
from sm3fn._sm3_math import cover_minimum, ema, precondition, saturate, second_moment

#: statistics (accumulator and momentum) dtypes the kernel is generated for
STATISTICS = {torch.float32: "float", torch.float64: "double"}
#: parameter (and gradient) dtypes: float32/float64 with statistics of their own
#: dtype, bfloat16/float16 with float32 statistics (loaded into and stored from
#: float32 vectors, as ATen's opmath does); other tensors take the blocked path
PARAMS = {**STATISTICS, torch.bfloat16: "c10::BFloat16", torch.float16: "c10::Half"}
#: below this many elements a tensor is swept by one thread (a team costs more)
_PARALLEL_MIN_ELEMENTS = 1 << 16


# --------------------------------------------------------------------------- tracing


class _Hyper:
    """A hyperparameter read at run time: a C++ ``double`` expression over ``hp[0..3]``.

    ``lr``, ``momentum``, ``beta`` and ``eps`` are kernel arguments, not baked
    into the code (a schedule that changes them every step builds nothing).
    Arithmetic with Python numbers stays in double, as Python computes
    ``1 - beta`` before ATen sees it; used as an operand of a traced call, the
    value is rounded to the statistics dtype, as ATen rounds a Python scalar.
    ``nonzero``: the value is known to be > 0 (the kernel is built for that
    case), so the math's ``beta == 0`` branch can be answered at trace time.
    """

    def __init__(self, expr: str, nonzero: bool = False):
        self.expr, self.nonzero = expr, nonzero

    # torch looks for the protocol on every argument; the call is recorded by the
    # trace of the symbolic value it is combined with
    __torch_function__ = Sym.__torch_function__

    def _combine(self, other, op: str, reflected: bool = False) -> _Hyper:
        if isinstance(other, bool) or not isinstance(other, (int, float, _Hyper)):
            return NotImplemented
        o = other.expr if isinstance(other, _Hyper) else f"{float(other).hex()}"
        return _Hyper(f"({o} {op} {self.expr})" if reflected else f"({self.expr} {op} {o})")

    def __add__(self, other): return self._combine(other, "+")
    def __radd__(self, other): return self._combine(other, "+", reflected=True)
    def __sub__(self, other): return self._combine(other, "-")
    def __rsub__(self, other): return self._combine(other, "-", reflected=True)
    def __mul__(self, other): return self._combine(other, "*")
    def __rmul__(self, other): return self._combine(other, "*", reflected=True)
    def __neg__(self): return _Hyper(f"(-{self.expr})", self.nonzero)

    def __eq__(self, other):
        if self.nonzero and not isinstance(other, bool) and other == 0:
            return False
        raise NotImplementedError("the fused kernel cannot branch on a run-time hyperparameter")

    def __ne__(self, other):
        return not self.__eq__(other)

    def __bool__(self):
        raise NotImplementedError("the fused kernel cannot branch on a run-time hyperparameter")

    __hash__ = object.__hash__


class _Trace(Trace):
    """Records the C++ lines of one traced computation (SSA: one ``auto tN`` per call)."""

    def assign(self, name: str, expr: str) -> str:
        return f"auto {name} = {expr};"

    def value(self, x) -> str:
        """C++ for an operand: a symbol's name, or a Python number as an exact vector constant."""
        if isinstance(x, Sym):
            return x.name
        if isinstance(x, _Hyper):  # rounded once to the statistics dtype, as ATen rounds a scalar
            return f"V(static_cast<scalar_t>({x.expr}))"
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise NotImplementedError(f"the fused kernel cannot trace the operand {x!r}")
        # a hex literal is exact; the cast rounds as ATen's scalar-to-dtype cast does
        return f"V(static_cast<scalar_t>({float(x).hex()}))"

    def call(self, func, args, kwargs) -> Sym:
        v = self.value
        if func in (torch.minimum, torch.Tensor.minimum) and not kwargs:
            return self.emit(f"at::vec::minimum({v(args[0])}, {v(args[1])})")
        if func in (torch.maximum, torch.Tensor.maximum) and not kwargs:
            return self.emit(f"at::vec::maximum({v(args[0])}, {v(args[1])})")
        if func is torch.addcmul:
            # ATen: self + value * t1 * t2, whose last multiply-add the compiler
            # contracts into one fused multiply-add (eager float32 agrees bit for bit)
            value = kwargs.pop("value", 1)
            _no_more(func, kwargs)
            return self.emit(f"at::vec::fmadd({v(value)} * {v(args[1])}, {v(args[2])}, {v(args[0])})")
        if func is torch.add:
            alpha = kwargs.pop("alpha", 1)
            _no_more(func, kwargs)
            if not isinstance(alpha, Sym) and alpha == 1:
                return self.emit(f"{v(args[0])} + {v(args[1])}")
            return self.emit(f"{v(args[0])} + {v(alpha)} * {v(args[1])}")
        binary = {torch.sub: "-", torch.mul: "*", torch.div: "/"}
        if func in binary and not kwargs:
            return self.emit(f"{v(args[0])} {binary[func]} {v(args[1])}")
        if func is torch.ne and not kwargs:
            # an all-ones-bits lane where true (unordered: NaN != 0 is true, as in torch)
            return self.emit(f"({v(args[0])} != {v(args[1])})")
        if func is torch.eq and not kwargs:
            return self.emit(f"({v(args[0])} == {v(args[1])})")
        if func is torch.where and not kwargs:
            mask, a, b = args
            return self.emit(f"V::blendv({v(b)}, {v(a)}, {v(mask)})")
        if func in (torch.sqrt, torch.Tensor.sqrt) and not kwargs:
            return self.emit(f"{v(args[0])}.sqrt()")
        if func in (torch.clamp, torch.Tensor.clamp):
            high = kwargs.pop("max", None)
            _no_more(func, kwargs)
            if len(args) != 1 or high is None:
                raise NotImplementedError("the fused kernel traces clamp(x, max=...) only")
            # min(cap, x): a NaN x stays NaN, as torch.clamp keeps it
            return self.emit(f"at::vec::clamp_max({v(args[0])}, {v(high)})")
        if func in (torch.lerp, torch.Tensor.lerp) and not kwargs:
            start, end, weight = args
            if isinstance(weight, _Hyper):
                # ATen's vectorized lerp (LerpKernel.cpp): the weight rounded to the dtype,
                # then one fused multiply-add from the nearer end (so that weight 0 and 1
                # are exact); which end is a run-time select on the weight
                w = self.emit(self.value(weight))
                diff = self.emit(f"{v(end)} - {v(start)}")
                return self.emit(f"(std::abs(static_cast<scalar_t>({weight.expr})) < static_cast<scalar_t>(0.5)) ? "
                                 f"at::vec::fmadd({w.name}, {diff.name}, {v(start)}) : "
                                 f"at::vec::fmadd({w.name} - {v(1)}, {diff.name}, {v(end)})")
            if not isinstance(weight, (int, float)):
                raise NotImplementedError("the fused kernel traces lerp with a number weight only")
            # a weight known when tracing (not used by the kernels, whose weight is run time)
            if abs(weight) < 0.5:
                return self.emit(f"at::vec::fmadd({v(weight)}, {v(end)} - {v(start)}, {v(start)})")
            return self.emit(f"at::vec::fmadd({v(weight)} - {v(1)}, {v(end)} - {v(start)}, {v(end)})")
        raise NotImplementedError(f"the fused kernel cannot trace {getattr(func, '__name__', func)}")


def _no_more(func, kwargs):
    if kwargs:
        raise NotImplementedError(f"the fused kernel cannot trace {func.__name__} with {sorted(kwargs)}")


#: what a kernel writes: ``p`` in place (the optimizer's step), or fresh tensors for
#: the pure ``tx.update``: ``-lr * (ema of u, or u)`` (``sm3fn.sm3``) or ``u`` (``scale_by_sm3``)
MODES = ("inplace", "sm3", "u")


def _body(dtype: torch.dtype, k: int, with_momentum: bool, beta_zero: bool, mode: str) -> tuple[str, str]:
    """Traced C++ for one vector of elements, and for saturating one vector of maxima.

    Inputs (C++ names): ``g_``, ``p_`` (in place only), ``m_`` (momentum
    buffer), ``a0_ ... a{k-1}_`` (accumulator values broadcast to the vector;
    ``a0_`` alone for 0-d/1-d), and the run-time hyperparameters
    ``hp[0..3]`` = lr, momentum, beta, eps (:class:`_Hyper`).  Outputs:
    ``nu_o``, ``p_o`` (the new parameter in place, the update out of place),
    ``m_o`` and, for 0-d/1-d, ``acc_o``.  The second string turns ``x_``
    (maxima) into ``sat_o``.  Out of place the values are rounded to the
    parameter dtype (``round_p``) where ``sm3fn.sm3``'s chain of transforms
    rounds them (``u.to(g.dtype)`` after each stage), so both give the same numbers.
    """
    lr, momentum, eps = _Hyper("hp[0]"), _Hyper("hp[1]"), _Hyper("hp[3]")
    beta = 0.0 if beta_zero else _Hyper("hp[2]", nonzero=True)
    t = _Trace(dtype)
    g = t.input("g_")
    accs = [t.input(f"a{i}_") for i in range(max(k, 1))]
    nu = second_moment(g, cover_minimum(accs), beta)
    u: Any = precondition(g, nu, eps)  # symbolic values (_Sym) where the math types tensors
    out: Any
    lines_out = [f"auto nu_o = {nu.name};"]
    if mode != "inplace":
        u = t.emit(f"round_p({u.name})")  # scale_by_sm3's u.to(g.dtype)
    if with_momentum:
        u = ema(t.input("m_"), u, momentum)
        lines_out.append(f"auto m_o = {u.name};")
        if mode != "inplace":
            u = t.emit(f"round_p({u.name})")  # ema's out.to(u.dtype)
    if mode == "inplace":
        # p.add_(u, alpha=-lr), as ATen computes it: one fused multiply-add
        out = t.emit(f"at::vec::fmadd({u.name}, V(0) - {t.value(lr)}, p_)")
    elif mode == "sm3":
        out = torch.mul(u, -lr)  # scale_by_learning_rate: u * -lr
    else:
        out = u
    lines_out.append(f"auto p_o = {out.name};")
    if k <= 1:  # the accumulator is nu itself, saturated (cover_maxima of a 1-d nu is nu)
        lines_out.append(f"auto acc_o = {saturate(nu).name};")
    body = "\n".join(t.lines + lines_out)
    s = _Trace(dtype)
    capped = saturate(s.input("x_"))
    sat = "\n".join(s.lines + [f"auto sat_o = {capped.name};"])
    return body, sat


# --------------------------------------------------------------------------- C++


_PRELUDE = """
#include <torch/csrc/inductor/cpp_prefix.h>
using param_t = {ptype};
using scalar_t = {ctype};
using V = at::vec::Vectorized<scalar_t>;

// parameters and gradients in their own dtype, widened to the statistics dtype
static inline V load_p(const param_t* ptr, int64_t n) {{
    if constexpr (std::is_same_v<param_t, scalar_t>) return V::loadu(ptr, n);
    else return at::vec::convert<scalar_t>(at::vec::Vectorized<param_t>::loadu(ptr, n));
}}
static inline void store_p(param_t* ptr, const V& v, int64_t n) {{
    if constexpr (std::is_same_v<param_t, scalar_t>) {{
        v.store(ptr, n);
    }} else if (n == V::size()) {{
        // a whole vector: its narrow half through an aligned buffer, a copy of constant
        // size the compiler makes one move (store(ptr, n) copies byte counts it cannot know)
        __at_align__ param_t narrow[at::vec::Vectorized<param_t>::size()];
        at::vec::convert<param_t>(v).store(narrow);
        std::memcpy(ptr, narrow, V::size() * sizeof(param_t));
    }} else {{
        at::vec::convert<param_t>(v).store(ptr, n);
    }}
}}
// a value rounded to the parameter dtype and widened again (``.to(param dtype)``)
static inline V round_p(const V& v) {{
    if constexpr (std::is_same_v<param_t, scalar_t>) return v;
    else return at::vec::convert<scalar_t>(at::vec::convert<param_t>(v));
}}
"""

# A tensor of k >= 2 dims as rows x m (m: its last dim).  In place, p_in == p_out,
# m_in == m_out and ain{d} == aout{d}: the new accumulators are written only after the
# sweep, from the running maxima, so every row reads the old ones.
_SWEEP_ROWS = """
extern "C" void kernel(const param_t* g, const param_t* p_in, param_t* p_out,
                       const scalar_t* m_in, scalar_t* m_out, {acc_params},
                       const double* hp_arg, {shape_params}, const int64_t nthreads,
                       scalar_t* running)
{{
    constexpr int K = {k};
    const double hp[4] = {{hp_arg[0], hp_arg[1], hp_arg[2], hp_arg[3]}};  // lr, momentum, beta, eps
    const scalar_t* acc[K] = {{{acc_in_names}}};
    scalar_t* acc_out[K] = {{{acc_out_names}}};
    const int64_t shape[K] = {{{shape_names}}};
    const int64_t m = shape[K - 1];
    int64_t rows = 1, total = 0, offset[K];
    for (int d = 0; d < K; ++d) {{ offset[d] = total; total += shape[d]; }}
    for (int d = 0; d < K - 1; ++d) rows *= shape[d];
    const scalar_t lowest = -std::numeric_limits<scalar_t>::infinity();
    // running maxima of nu, one set per thread: [a_0 | a_1 | ... | a_{{K-1}}]
    // (``running`` holds nthreads * total numbers, allocated by the caller)
    std::fill(running, running + nthreads * total, lowest);
    #pragma omp parallel num_threads(nthreads)
    {{
        const int64_t tid = omp_get_thread_num();
        scalar_t* mine = running + tid * total;
        scalar_t* col = mine + offset[K - 1];
        for (int64_t q = rows * tid / nthreads; q < rows * (tid + 1) / nthreads; ++q) {{
            int64_t index[K], rest = q;
            for (int d = K - 2; d >= 0; --d) {{ index[d] = rest % shape[d]; rest /= shape[d]; }}
{lead_loads}
            const param_t* gq = g + q * m;
            const param_t* pq = p_in + q * m;
            param_t* oq = p_out + q * m;
            const scalar_t* mq = m_in + q * m;
            scalar_t* moq = m_out + q * m;
            V row_max(lowest);
            int64_t j = 0;
            for (; j + V::size() <= m; j += V::size()) {{
                auto g_ = load_p(gq + j, V::size());
                auto p_ = {load_p_full};
                auto m_ = {load_m_full};
                auto a{last}_ = V::loadu(acc[K - 1] + j);
{body}
                store_p(oq + j, p_o, V::size());
                {store_m_full}
                row_max = at::vec::maximum(row_max, nu_o);
                at::vec::maximum(V::loadu(col + j), nu_o).store(col + j);
            }}
            if (j < m) {{
                const int64_t n = m - j;
                auto g_ = load_p(gq + j, n);
                auto p_ = {load_p_tail};
                auto m_ = {load_m_tail};
                auto a{last}_ = V::loadu(acc[K - 1] + j, n);
{body}
                store_p(oq + j, p_o, n);
                {store_m_tail}
                auto live = V::set(V(lowest), nu_o, n);  // lanes past the row end stay out of the maxima
                row_max = at::vec::maximum(row_max, live);
                at::vec::maximum(V::loadu(col + j, n), live).store(col + j, n);
            }}
            const scalar_t r = at::vec::vec_reduce_all<scalar_t>(
                [](V& x, V& y) {{ return at::vec::maximum(x, y); }}, row_max);
            for (int d = 0; d < K - 1; ++d)
                mine[offset[d] + index[d]] = max_propagate_nan(mine[offset[d] + index[d]], r);
        }}
    }}
    // merge the threads' maxima, then write the new accumulators (saturated)
    for (int64_t t = 1; t < nthreads; ++t)
        for (int64_t i = 0; i < total; ++i)
            running[i] = max_propagate_nan(running[i], running[t * total + i]);
    for (int d = 0; d < K; ++d) {{
        for (int64_t i = 0; i < shape[d]; i += V::size()) {{
            const int64_t n = std::min<int64_t>(V::size(), shape[d] - i);
            auto x_ = V::loadu(running + offset[d] + i, n);
{saturate}
            sat_o.store(acc_out[d] + i, n);
        }}
    }}
}}
"""

# A 0-d/1-d tensor: elementwise, its accumulator is full-size (each element reads its
# own old value before writing the new one, so in place ain0 == aout0 is safe).
_SWEEP_FLAT = """
extern "C" void kernel(const param_t* g, const param_t* p_in, param_t* p_out,
                       const scalar_t* m_in, scalar_t* m_out, const scalar_t* ain0, scalar_t* aout0,
                       const double* hp_arg, const int64_t numel, const int64_t nthreads)
{{
    const double hp[4] = {{hp_arg[0], hp_arg[1], hp_arg[2], hp_arg[3]}};  // lr, momentum, beta, eps
    #pragma omp parallel num_threads(nthreads)
    {{
        const int64_t tid = omp_get_thread_num();
        const int64_t vectors = (numel + V::size() - 1) / V::size();
        const int64_t end = std::min(numel, vectors * (tid + 1) / nthreads * V::size());
        for (int64_t j = vectors * tid / nthreads * V::size(); j < end; j += V::size()) {{
            const int64_t n = std::min<int64_t>(V::size(), end - j);
            auto g_ = load_p(g + j, n);
            auto p_ = {load_p_flat};
            auto m_ = {load_m_flat};
            auto a0_ = V::loadu(ain0 + j, n);
{body}
            store_p(p_out + j, p_o, n);
            {store_m_flat}
            acc_o.store(aout0 + j, n);
        }}
    }}
}}
"""


def _indent(text: str, spaces: int) -> str:
    return "\n".join(" " * spaces + line for line in text.splitlines())


def source(param_dtype: torch.dtype, dtype: torch.dtype, k: int, with_momentum: bool, beta_zero: bool,
           mode: str = "inplace") -> str:
    """The C++ source of the kernel for one configuration (see the module docstring).

    ``dtype`` is the statistics dtype, in which everything is computed;
    ``mode`` one of :data:`MODES`.
    """
    body, sat = _body(dtype, k, with_momentum, beta_zero, mode)
    in_place = mode == "inplace"
    fields = dict(
        load_p_full="load_p(pq + j, V::size())" if in_place else "V(0)",
        load_p_tail="load_p(pq + j, n)" if in_place else "V(0)",
        load_p_flat="load_p(p_in + j, n)" if in_place else "V(0)",
        load_m_full="V::loadu(mq + j)" if with_momentum else "V(0)",
        load_m_tail="V::loadu(mq + j, n)" if with_momentum else "V(0)",
        load_m_flat="V::loadu(m_in + j, n)" if with_momentum else "V(0)",
        store_m_full="m_o.store(moq + j);" if with_momentum else "",
        store_m_tail="m_o.store(moq + j, n);" if with_momentum else "",
        store_m_flat="m_o.store(m_out + j, n);" if with_momentum else "",
    )
    prelude = _PRELUDE.format(ptype=PARAMS[param_dtype], ctype=STATISTICS[dtype])
    if k <= 1:
        return prelude + _SWEEP_FLAT.format(body=_indent(body, 12), **fields)
    return prelude + _SWEEP_ROWS.format(
        k=k, last=k - 1,
        acc_params=", ".join([f"const scalar_t* ain{i}" for i in range(k)] + [f"scalar_t* aout{i}" for i in range(k)]),
        acc_in_names=", ".join(f"ain{i}" for i in range(k)),
        acc_out_names=", ".join(f"aout{i}" for i in range(k)),
        shape_params=", ".join(f"const int64_t n{i}" for i in range(k)),
        shape_names=", ".join(f"n{i}" for i in range(k)),
        lead_loads=_indent("\n".join(f"auto a{i}_ = V(acc[{i}][index[{i}]]);" for i in range(k - 1)), 12),
        body=_indent(body, 16), saturate=_indent(sat, 12), **fields,
    )


#: built kernels by configuration, least recently used first.  The key holds only what
#: changes the generated code (dtypes, rank, momentum on/off, beta zero or not, mode),
#: so a training run needs a handful; the bound keeps a long-lived process from growing.
_kernels: OrderedDict[tuple, object] = OrderedDict()
MAX_KERNELS = 64
_lock = threading.Lock()
#: why the kernel cannot be built here (set by :func:`give_up`), or None
unavailable: Optional[str] = None


class BuildError(RuntimeError):
    """The kernel's C++ could not be compiled or loaded (no compiler, say)."""


def give_up(error: BuildError) -> None:
    """Stops ``fused=None`` from trying again, with one warning."""
    global unavailable
    if unavailable is None:
        unavailable = str(error)
        warnings.warn(f"{error}; SM3 steps take the blocked path", RuntimeWarning, stacklevel=5)


def build(g: torch.Tensor, accs: Sequence[torch.Tensor], m: Optional[torch.Tensor], beta: float,
          mode: str = "inplace"):
    """The kernel that steps ``g``'s parameter (in place, or the pure ``mode``), built now or cached.

    Only ``beta == 0`` or not enters the key: ``beta == 0`` is the sum of
    squares (``min a + g*g``), ``beta > 0`` the moving average
    (``beta * min a + (1 - beta) * g*g``), a different formula rather than
    another value (``beta = 0`` in the second would drop the accumulators).
    """
    # every tensor of 2 or more dims is swept as a 2-D row problem (see _run)
    return _kernel(g.dtype, accs[0].dtype, min(max(g.dim(), 1), 2), m is not None, float(beta) == 0.0, mode)


def _kernel(param_dtype: torch.dtype, dtype: torch.dtype, k: int, with_momentum: bool, beta_zero: bool,
            mode: str):
    key = (param_dtype, dtype, k, with_momentum, beta_zero, mode)
    with _lock:
        kernel = _kernels.get(key)
        if kernel is not None:
            _kernels.move_to_end(key)
            return kernel
        pointers = ["const param_t*", "const param_t*", "param_t*", "const scalar_t*", "scalar_t*"]
        accs = ["const scalar_t*"] * k + ["scalar_t*"] * k
        if k <= 1:
            argtypes = pointers + accs + ["const double*", "const int64_t", "const int64_t"]
        else:
            argtypes = pointers + accs + ["const double*"] + ["const int64_t"] * (k + 1) + ["scalar_t*"]
        try:
            # private: imported here, inside the guard, so that another torch version
            # without it (or an unwritable TORCHINDUCTOR_CACHE_DIR) means the blocked path
            from torch._inductor.codecache import CppPythonBindingsCodeCache

            kernel = CppPythonBindingsCodeCache.load_pybinding(argtypes, source(*key))
        except Exception as e:  # no compiler, or one that fails: say what to do
            raise BuildError(
                "the fused SM3 kernel is built with torch.compile's C++ compiler, and that "
                f"failed ({type(e).__name__}: {e}); pass fused=False for the blocked path"
            ) from e
        _kernels[key] = kernel
        while len(_kernels) > MAX_KERNELS:
            _kernels.popitem(last=False)
    return kernel


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def supported(p: torch.Tensor, g: torch.Tensor, accs: Sequence[torch.Tensor],
              m: Optional[torch.Tensor]) -> bool:
    """Whether the kernel can step this parameter (else the blocked path does).

    CPU, dense: contiguous, or for 2+ dims any permutation of contiguous
    (``channels_last``, a transpose; :func:`layout.physical_order`) with the
    gradient and momentum buffer laid out as the parameter, and a split whose
    tables stay small (:func:`layout.presentable`; else the blocked path,
    which takes any strides, steps it); contiguous accumulators; the
    gradient in the parameter's dtype; the accumulators and momentum buffer in
    one statistics dtype: the parameter's for float32/float64, float32 for
    bfloat16/float16 (see :data:`PARAMS`); plain tensors only (no DTensor or
    other subclass).
    """
    if len(accs) != max(1, g.dim()):
        return False  # a row-cover state (sparse gradients before) on a dense gradient
    stats = accs[0].dtype
    if p is None:  # out of place: the update is made in the gradient's dtype
        p = g
    if p.dtype not in PARAMS or g.dtype != p.dtype:
        return False
    if stats != (p.dtype if p.dtype in STATISTICS else torch.float32):
        return False
    for t in (p, g, *accs) if m is None else (p, g, *accs, m):
        # (is_cpu and an identity test: this runs for every tensor of every step)
        if type(t) not in _PLAIN or not t.is_cpu or t.layout is not torch.strided:
            return False
    if not all(a.is_contiguous() for a in accs):
        return False
    tensors = (p, g) if m is None else (p, g, m)
    if p.dim() >= 2 and not (_layout.same_layout(*tensors) and _layout.presentable(p)):
        return False
    if p.dim() <= 1 and not all(t.is_contiguous() for t in tensors):
        return False
    return all(t.dtype == stats for t in accs) and (m is None or m.dtype == stats)


def hyperparameters(lr, momentum, beta, eps) -> torch.Tensor:
    """The kernels' run-time arguments: ``[lr, momentum, beta, eps]`` as a float64 CPU tensor.

    Doubles, as Python keeps them: the kernel rounds each to the statistics
    dtype where ATen would round the Python scalar.  ``lr`` may be a tensor.
    """
    if isinstance(lr, torch.Tensor):
        lr = lr.detach().to("cpu", torch.float64).reshape(())
        return torch.cat([lr.reshape(1), torch.tensor([float(momentum), float(beta), float(eps)],
                                                      dtype=torch.float64)])
    return torch.tensor([float(lr), float(momentum), float(beta), float(eps)], dtype=torch.float64)


def _run(kernel, g, p_in, p_out, m_in, m_out, accs_in, accs_out, hp) -> None:
    threads = 1 if g.numel() < _PARALLEL_MIN_ELEMENTS else torch.get_num_threads()
    if g.dim() <= 1:
        kernel(g, p_in, p_out, m_in, m_out, accs_in[0], accs_out[0], hp, g.numel(), threads)
        return
    # any rank, any dense layout: rows x cols in memory order, groups of dims folded into tables
    # (m_in/m_out stand in for the momentum buffer without one: never read or written then)
    with_m = m_in is not accs_in[0]
    problem = _layout.row_problem([g, p_in, p_out] + ([m_in, m_out] if with_m else []), accs_in,
                                  threads, new_accs=accs_out, same_layout_checked=True)
    assert problem is not None, "supported() admits only the tensors the layout presents"
    g, p_in, p_out, *ms = problem.views
    m_in, m_out = ms if with_m else (problem.row_acc, problem.row_out)
    rows, cols = g.shape
    threads = max(1, min(threads, rows))
    # the threads' running maxima: rows + cols numbers each, a fraction of the parameter
    running = torch.empty(threads * (rows + cols), dtype=accs_in[0].dtype)
    kernel(g, p_in, p_out, m_in, m_out, problem.row_acc, problem.col_acc, problem.row_out, problem.col_out,
           hp, rows, cols, threads, running)
    problem.finish()


def sweep_(kernel, p: torch.Tensor, g: torch.Tensor, accs: Sequence[torch.Tensor],
           m: Optional[torch.Tensor], hp: torch.Tensor) -> None:
    """One SM3 step on ``p`` in place (accumulators and ``m`` too): one sweep, see the module docstring.

    ``kernel`` is :func:`build`'s for this tensor; ``hp`` the float64 CPU
    tensor of :func:`hyperparameters`.  The caller checks :func:`supported`
    and skips tensors with no elements.
    """
    mom = m if m is not None else accs[0]  # never read or written without momentum
    _run(kernel, g, p, p, mom, mom, accs, accs, hp)
    # written through raw pointers: tell autograd, as an ATen in-place op would
    torch.autograd.graph.increment_version([p, *accs] if m is None else [p, *accs, m])


#: outputs this large ask the kernel for transparent huge pages (see :func:`fresh_like`)
HUGE_PAGE_MIN_BYTES = 4 << 20
_HUGE_PAGE = 2 << 20
_madvise: Any = None  # libc's madvise once looked up; False where there is none


def fresh_like(like: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like(like)`` (a dense layout kept, e.g. channels_last), with huge pages
    asked for where it is large.

    A fresh tensor of many MiB comes from ``mmap`` and is returned to the
    system when freed, so every step of the pure path would take one page
    fault per 4 KiB written: on a 2-core EPYC that cost more than the
    sweep itself (docs: the pure step's breakdown).  ``madvise(MADV_HUGEPAGE)``
    on the untouched memory makes those faults 2 MiB each (what PyTorch's
    ``THP_MEM_ALLOC_ENABLE=1`` does for every allocation).  Linux only;
    elsewhere, or where the call fails, the tensor is just ``empty_like``'s.
    """
    out = torch.empty_like(like)  # dense and non-overlapping: spans numel elements
    nbytes = out.numel() * out.element_size()
    if nbytes >= HUGE_PAGE_MIN_BYTES and _advise() is not None:
        start = -(-out.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE  # the 2 MiB-aligned inside
        end = (out.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
        if end > start:
            _madvise(start, end - start, 14)  # MADV_HUGEPAGE; a failure only costs speed
    return out


def _advise():
    """libc's ``madvise`` (Linux), or None."""
    global _madvise
    if _madvise is None:
        _madvise = False
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                libc = ctypes.CDLL(None, use_errno=True)
                libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                _madvise = libc.madvise
            except (OSError, AttributeError):
                pass
    return _madvise or None


def sweep(kernel, g: torch.Tensor, accs: Sequence[torch.Tensor], m: Optional[torch.Tensor],
          hp: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], Optional[torch.Tensor]]:
    """One pure SM3 step: ``(update, new accumulators, new momentum buffer)``, all fresh tensors.

    ``kernel`` is :func:`build`'s with a pure mode; nothing passed in is
    written.  One sweep reads ``g`` (and ``m``) once and writes the update
    (and the new ``m``) once; the outputs are made with ``torch.empty``
    (every element is written, so no zero-fill pass).
    """
    update = fresh_like(g)  # in g's (dense) layout, as the kernel sweeps g
    new_accs = [torch.empty_like(a, memory_format=torch.contiguous_format) for a in accs]
    new_m = None if m is None else fresh_like(m)
    mom_in = m if m is not None else accs[0]  # never read without momentum
    mom_out = new_m if new_m is not None else new_accs[0]  # never written without momentum
    _run(kernel, g, g, update, mom_in, mom_out, accs, new_accs, hp)
    return update, new_accs, new_m
