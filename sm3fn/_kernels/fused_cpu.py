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
``saturate``) on symbolic scalars (:class:`_Sym`, which answers torch's
``__torch_function__`` protocol), and each torch call they make becomes one
line of C++ on ``at::vec::Vectorized`` (the SIMD type inductor's kernels use).
The C++ template below holds only loads, stores, the loop over rows and the
running maxima (``a_i = max of nu over every dim but i``).  The source is
compiled by inductor's C++ code cache (:class:`CppPythonBindingsCodeCache`:
the same compiler, flags and on-disk cache as ``torch.compile``), once per
configuration (dtypes, number of dims, beta, eps and momentum, 0 for none);
``lr`` is read at run time, so a schedule does not recompile.

The sweep (``k >= 2`` dims): :mod:`sm3fn._kernels.layout` presents the
tensor, in any dense layout, as ``rows x m`` in memory order (groups of dims
folded into small tables of accumulator minima, reduced back after the
sweep), and the kernel sees that 2-D problem.  For each row, every element's ``nu``, ``u``, momentum and new
parameter come from the traced lines; the row's maximum of ``nu`` goes to the
accumulators of the leading dims, and each column's running maximum to the
last one.  Each thread keeps its own running maxima (``threads x sum(shape)``
numbers, in a tensor the caller allocates, so that the allocator sees
it), merged and saturated after the sweep, so the old accumulator
values every row reads are never overwritten mid-step.  0-d/1-d tensors
have a full-size accumulator: their sweep is elementwise.
"""

from __future__ import annotations

import threading
import warnings
from typing import Optional, Sequence

import torch

from sm3fn._kernels import layout as _layout
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


class _Sym:
    """A symbolic SIMD value: a C++ expression of ``at::vec::Vectorized<scalar_t>``.

    The ``_sm3_math`` functions run on it as on a tensor: every torch call and
    operator they make is recorded, in order, as one C++ line by the
    :class:`_Trace` it belongs to.  Only the calls those functions make are
    known; any other raises, so a change to the math that the generator cannot
    express fails loudly (a :class:`BuildError`: ``fused=None`` then takes the
    blocked path), rather than generating something else.
    """

    def __init__(self, trace: "_Trace", name: str, dtype: torch.dtype):
        self.trace, self.name, self.dtype = trace, name, dtype

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if kwargs.pop("out", None) is not None:
            raise NotImplementedError("the fused kernel traces the out-of-place math only")
        trace = next(a.trace for a in _flat(args, kwargs) if isinstance(a, _Sym))
        return trace.call(func, args, kwargs)

    def __bool__(self):
        # a Python branch on a traced value would bake one side into the kernel
        raise NotImplementedError("the fused kernel cannot branch on a traced value")

    # Python operators (``nu != 0``, ``lr * u``) record the same lines; set below the class
    __hash__ = object.__hash__


def _operator(func, reflected: bool):
    def operator(self, other):
        return self.trace.call(func, (other, self) if reflected else (self, other), {})
    return operator


for _name, _func in {"ne": torch.ne, "eq": torch.eq, "mul": torch.mul, "add": torch.add,
                     "sub": torch.sub, "truediv": torch.div}.items():
    setattr(_Sym, f"__{_name}__", _operator(_func, reflected=False))
    if _name in ("mul", "add", "sub"):
        setattr(_Sym, f"__r{_name}__", _operator(_func, reflected=True))


def _flat(args, kwargs):
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, (list, tuple)):
            yield from a
        else:
            yield a


class _Trace:
    """Records the C++ lines of one traced computation (SSA: one ``auto tN`` per call)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype, self.lines, self.count = dtype, [], 0

    def input(self, name: str) -> _Sym:
        return _Sym(self, name, self.dtype)

    def value(self, x) -> str:
        """C++ for an operand: a symbol's name, or a Python number as an exact vector constant."""
        if isinstance(x, _Sym):
            return x.name
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise NotImplementedError(f"the fused kernel cannot trace the operand {x!r}")
        # a hex literal is exact; the cast rounds as ATen's scalar-to-dtype cast does
        return f"V(static_cast<scalar_t>({float(x).hex()}))"

    def emit(self, expr: str) -> _Sym:
        name = f"t{self.count}"
        self.count += 1
        self.lines.append(f"auto {name} = {expr};")
        return _Sym(self, name, self.dtype)

    def call(self, func, args, kwargs) -> _Sym:
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
            if not isinstance(alpha, _Sym) and alpha == 1:
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
            if not isinstance(weight, (int, float)):
                raise NotImplementedError("the fused kernel traces lerp with a number weight only")
            # ATen's vectorized lerp (LerpKernel.cpp): one fused multiply-add from the
            # nearer end, so that weight 0 and 1 are exact; the branch is taken here
            if abs(weight) < 0.5:
                return self.emit(f"at::vec::fmadd({v(weight)}, {v(end)} - {v(start)}, {v(start)})")
            return self.emit(f"at::vec::fmadd({v(weight)} - {v(1)}, {v(end)} - {v(start)}, {v(end)})")
        raise NotImplementedError(f"the fused kernel cannot trace {getattr(func, '__name__', func)}")


def _no_more(func, kwargs):
    if kwargs:
        raise NotImplementedError(f"the fused kernel cannot trace {func.__name__} with {sorted(kwargs)}")


def _body(dtype: torch.dtype, k: int, momentum: float, beta: float, eps: float) -> tuple[str, str]:
    """Traced C++ for one vector of elements, and for saturating one vector of maxima.

    Inputs (C++ names): ``g_``, ``p_``, ``m_`` (momentum buffer), ``lr``, and
    ``a0_ ... a{k-1}_`` (accumulator values broadcast to the vector; ``a0_``
    alone for 0-d/1-d).  Outputs: ``nu_o``, ``p_o``, ``m_o`` and, for 0-d/1-d,
    ``acc_o``.  The second string turns ``x_`` (maxima) into ``sat_o``.
    """
    t = _Trace(dtype)
    g, p, lr = t.input("g_"), t.input("p_"), t.input("lr")
    accs = [t.input(f"a{i}_") for i in range(max(k, 1))]
    nu = second_moment(g, cover_minimum(accs), beta)
    u = precondition(g, nu, eps)
    lines_out = [f"auto nu_o = {nu.name};"]
    if momentum:
        u = ema(t.input("m_"), u, momentum)
        lines_out.append(f"auto m_o = {u.name};")
    # p.add_(u, alpha=-lr), as ATen computes it: one fused multiply-add
    new_p = t.emit(f"at::vec::fmadd({u.name}, V(0) - {lr.name}, {p.name})")
    lines_out.append(f"auto p_o = {new_p.name};")
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
"""

# A tensor of k >= 2 dims as rows x m (m: its last dim); acc0..acc{k-1}: its accumulators.
_SWEEP_ROWS = """
extern "C" void kernel(const param_t* g, param_t* p, scalar_t* mom, {acc_params},
                       const double* lr_ptr, {shape_params}, const int64_t nthreads,
                       scalar_t* running)
{{
    constexpr int K = {k};
    scalar_t* acc[K] = {{{acc_names}}};
    const int64_t shape[K] = {{{shape_names}}};
    const int64_t m = shape[K - 1];
    int64_t rows = 1, total = 0, offset[K];
    for (int d = 0; d < K; ++d) {{ offset[d] = total; total += shape[d]; }}
    for (int d = 0; d < K - 1; ++d) rows *= shape[d];
    const V lr(static_cast<scalar_t>(lr_ptr[0]));
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
            param_t* pq = p + q * m;
            scalar_t* mq = mom + q * m;
            V row_max(lowest);
            int64_t j = 0;
            for (; j + V::size() <= m; j += V::size()) {{
                auto g_ = load_p(gq + j, V::size());
                auto p_ = load_p(pq + j, V::size());
                auto m_ = {load_m_full};
                auto a{last}_ = V::loadu(acc[K - 1] + j);
{body}
                store_p(pq + j, p_o, V::size());
                {store_m_full}
                row_max = at::vec::maximum(row_max, nu_o);
                at::vec::maximum(V::loadu(col + j), nu_o).store(col + j);
            }}
            if (j < m) {{
                const int64_t n = m - j;
                auto g_ = load_p(gq + j, n);
                auto p_ = load_p(pq + j, n);
                auto m_ = {load_m_tail};
                auto a{last}_ = V::loadu(acc[K - 1] + j, n);
{body}
                store_p(pq + j, p_o, n);
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
            sat_o.store(acc[d] + i, n);
        }}
    }}
}}
"""

# A 0-d/1-d tensor: elementwise, its accumulator is full-size.
_SWEEP_FLAT = """
extern "C" void kernel(const param_t* g, param_t* p, scalar_t* mom, scalar_t* a0,
                       const double* lr_ptr, const int64_t numel, const int64_t nthreads)
{{
    const V lr(static_cast<scalar_t>(lr_ptr[0]));
    #pragma omp parallel num_threads(nthreads)
    {{
        const int64_t tid = omp_get_thread_num();
        const int64_t vectors = (numel + V::size() - 1) / V::size();
        const int64_t end = std::min(numel, vectors * (tid + 1) / nthreads * V::size());
        for (int64_t j = vectors * tid / nthreads * V::size(); j < end; j += V::size()) {{
            const int64_t n = std::min<int64_t>(V::size(), end - j);
            auto g_ = load_p(g + j, n);
            auto p_ = load_p(p + j, n);
            auto m_ = {load_m_tail};
            auto a0_ = V::loadu(a0 + j, n);
{body}
            store_p(p + j, p_o, n);
            {store_m_tail}
            acc_o.store(a0 + j, n);
        }}
    }}
}}
"""


def _indent(text: str, spaces: int) -> str:
    return "\n".join(" " * spaces + line for line in text.splitlines())


def source(param_dtype: torch.dtype, dtype: torch.dtype, k: int, momentum: float, beta: float,
           eps: float) -> str:
    """The C++ source of the kernel for one configuration (see the module docstring).

    ``dtype`` is the statistics dtype, in which everything is computed.
    """
    body, sat = _body(dtype, k, momentum, beta, eps)
    with_m = bool(momentum)
    fields = dict(
        load_m_full="V::loadu(mq + j)" if with_m else "V(0)",
        load_m_tail="V::loadu({} + j, n)".format("mq" if k >= 2 else "mom") if with_m else "V(0)",
        store_m_full="m_o.store(mq + j);" if with_m else "",
        store_m_tail="m_o.store({} + j, n);".format("mq" if k >= 2 else "mom") if with_m else "",
    )
    prelude = _PRELUDE.format(ptype=PARAMS[param_dtype], ctype=STATISTICS[dtype])
    if k <= 1:
        return prelude + _SWEEP_FLAT.format(body=_indent(body, 12), **fields)
    return prelude + _SWEEP_ROWS.format(
        k=k, last=k - 1,
        acc_params=", ".join(f"scalar_t* acc{i}" for i in range(k)),
        acc_names=", ".join(f"acc{i}" for i in range(k)),
        shape_params=", ".join(f"const int64_t n{i}" for i in range(k)),
        shape_names=", ".join(f"n{i}" for i in range(k)),
        lead_loads=_indent("\n".join(f"auto a{i}_ = V(acc[{i}][index[{i}]]);" for i in range(k - 1)), 12),
        body=_indent(body, 16), saturate=_indent(sat, 12), **fields,
    )


_kernels: dict[tuple, object] = {}
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
        warnings.warn(f"{error}; SM3 steps take the blocked path", RuntimeWarning, stacklevel=4)


def build(g: torch.Tensor, accs: Sequence[torch.Tensor], m: Optional[torch.Tensor],
          momentum: float, beta: float, eps: float):
    """The kernel that steps ``g``'s parameter, built (or taken from the caches) now."""
    # every tensor of 2 or more dims is swept as a 2-D row problem (see sweep_)
    return _kernel(g.dtype, accs[0].dtype, min(g.dim(), 2), momentum if m is not None else 0.0, beta, eps)


def _kernel(param_dtype: torch.dtype, dtype: torch.dtype, k: int, momentum: float, beta: float, eps: float):
    # 0-d and 1-d: one kernel
    key = (param_dtype, dtype, max(k, 1), float(momentum), float(beta), float(eps))
    kernel = _kernels.get(key)
    if kernel is None:
        with _lock:
            kernel = _kernels.get(key)
            if kernel is None:
                from torch._inductor.codecache import CppPythonBindingsCodeCache

                pointers = ["const param_t*", "param_t*", "scalar_t*"]  # g, p, momentum
                if key[2] <= 1:
                    argtypes = pointers + ["scalar_t*", "const double*", "const int64_t", "const int64_t"]
                else:
                    argtypes = (pointers + ["scalar_t*"] * k + ["const double*"]
                                + ["const int64_t"] * (k + 1) + ["scalar_t*"])
                try:
                    kernel = CppPythonBindingsCodeCache.load_pybinding(argtypes, source(*key))
                except Exception as e:  # no compiler, or one that fails: say what to do
                    raise BuildError(
                        "the fused SM3 kernel is built with torch.compile's C++ compiler, and that "
                        f"failed ({type(e).__name__}: {e}); pass fused=False for the blocked path"
                    ) from e
                _kernels[key] = kernel
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
    stats = accs[0].dtype
    if p.dtype not in PARAMS or g.dtype != p.dtype:
        return False
    if stats != (p.dtype if p.dtype in STATISTICS else torch.float32):
        return False
    for t in (p, g, *accs) if m is None else (p, g, *accs, m):
        if type(t) not in _PLAIN or t.device.type != "cpu" or t.layout != torch.strided:
            return False
    if not all(a.is_contiguous() for a in accs):
        return False
    tensors = (p, g) if m is None else (p, g, m)
    if p.dim() >= 2 and not (_layout.same_layout(*tensors) and _layout.presentable(p)):
        return False
    if p.dim() <= 1 and not all(t.is_contiguous() for t in tensors):
        return False
    return all(t.dtype == stats for t in accs) and (m is None or m.dtype == stats)


def sweep_(kernel, p: torch.Tensor, g: torch.Tensor, accs: Sequence[torch.Tensor],
           m: Optional[torch.Tensor], lr: torch.Tensor) -> None:
    """One SM3 step on ``p`` in place (accumulators and ``m`` too): one sweep, see the module docstring.

    ``kernel`` is :func:`build`'s for this tensor; ``lr`` a 0-d float64 CPU
    tensor.  The caller checks :func:`supported` and skips tensors with no
    elements.
    """
    threads = 1 if g.numel() < _PARALLEL_MIN_ELEMENTS else torch.get_num_threads()
    written = [p, *accs] if m is None else [p, *accs, m]
    if g.dim() <= 1:
        kernel(g, p, accs[0] if m is None else m, accs[0], lr, g.numel(), threads)
    else:
        # any rank, any dense layout: rows x cols in memory order, trailing dims folded into tables
        problem = _layout.row_problem(p, g, accs, m, threads)
        p, g, m = problem.p, problem.g, problem.m
        rows, cols = g.shape
        threads = max(1, min(threads, rows))
        # the threads' running maxima: rows + cols numbers each, a fraction of the parameter
        running = torch.empty(threads * (rows + cols), dtype=accs[0].dtype)
        mom = m if m is not None else problem.row_acc  # never read or written without momentum
        kernel(g, p, mom, problem.row_acc, problem.col_acc, lr, rows, cols, threads, running)
        problem.finish()
    # written through raw pointers: tell autograd, as an ATen in-place op would
    torch.autograd.graph.increment_version(written)
