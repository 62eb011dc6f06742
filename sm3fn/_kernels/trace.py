"""The backend-neutral half of the kernel generators: symbolic values that record torch calls.

The generated kernels (:mod:`sm3fn._kernels.fused_cpu`'s C++,
:mod:`sm3fn._kernels.triton_gpu`'s Triton) hold no hand-written copy of the
SM3 equations.  They run the very functions of :mod:`sm3fn._sm3_math` on
:class:`Sym` values, which answer torch's ``__torch_function__`` protocol:
every torch call and Python operator those functions make is handed to the
:class:`Trace` the value belongs to, and a backend's subclass of
:class:`Trace` renders it as one line of its language (:meth:`Trace.call`).
"""

from __future__ import annotations


class Sym:
    """A symbolic value: the name of one variable of the generated code.

    The ``_sm3_math`` functions run on it as on a tensor: every torch call and
    operator they make is recorded, in order, as one line by the
    :class:`Trace` it belongs to.  Only the calls a backend knows are
    rendered; any other raises, so a change to the math that a generator
    cannot express fails loudly rather than generating something else.
    """

    #: whether the value is a hyperparameter or made of hyperparameters only (see :class:`Scalar`)
    host = False

    def __init__(self, trace: Trace, name: str, dtype):
        self.trace, self.name, self.dtype = trace, name, dtype

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if kwargs.pop("out", None) is not None:
            raise NotImplementedError("the fused kernel traces the out-of-place math only")
        trace = next(a.trace for a in flat(args, kwargs) if isinstance(a, Sym))
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


def _install_operators() -> None:
    import torch

    for name, func in {"ne": torch.ne, "eq": torch.eq, "mul": torch.mul, "add": torch.add,
                       "sub": torch.sub, "truediv": torch.div}.items():
        setattr(Sym, f"__{name}__", _operator(func, reflected=False))
        if name in ("mul", "add", "sub"):
            setattr(Sym, f"__r{name}__", _operator(func, reflected=True))


_install_operators()


def flat(args, kwargs):
    """The arguments of a call, one level of lists and tuples opened."""
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, (list, tuple)):
            yield from a
        else:
            yield a


class Trace:
    """Records the lines of one traced computation (SSA: one new variable per call).

    A backend subclasses it with :meth:`value` (an operand as code),
    :meth:`assign` (one line) and :meth:`call` (a torch call as an expression,
    handed to :meth:`emit`).
    """

    def __init__(self, dtype):
        self.dtype, self.count = dtype, 0
        self.lines: list[str] = []
        #: the comparisons made on run-time scalars while tracing (see :class:`Scalar`)
        self.assumptions: list[tuple[str, str, float, bool]] = []

    def input(self, name: str) -> Sym:
        return Sym(self, name, self.dtype)

    def scalar(self, name: str, value: float) -> Scalar:
        """A run-time hyperparameter named ``name`` in the generated code, traced with ``value``."""
        return Scalar(self, name, self.dtype, value)

    def emit(self, expr: str) -> Sym:
        name = f"t{self.count}"
        self.count += 1
        self.lines.append(self.assign(name, expr))
        return Sym(self, name, self.dtype)

    def assign(self, name: str, expr: str) -> str:
        raise NotImplementedError

    def value(self, x) -> str:
        raise NotImplementedError

    def call(self, func, args, kwargs) -> Sym:
        raise NotImplementedError


def _compare(op: str):
    """A comparison operator of :class:`Scalar`: answered from the traced value, and recorded."""
    def compare(self: Scalar, other) -> bool:
        if isinstance(other, Sym) or isinstance(other, bool) or not isinstance(other, (int, float)):
            raise NotImplementedError(f"the fused kernel cannot compare {self.name} with {other!r}")
        result = _COMPARISONS[op](self.value, float(other))
        self.trace.assumptions.append((self.name, op, float(other), result))
        return result
    return compare


class Scalar(Sym):
    """A run-time hyperparameter (``lr``, ``momentum``, ``beta``, ``eps``): a kernel argument.

    Arithmetic on it is traced as on any :class:`Sym` (``1 - beta`` becomes a
    line), so its value is not baked into the kernel.  A Python comparison
    (``if beta == 0`` in ``second_moment``) must be answered while tracing:
    it is answered from ``value`` (the value traced with) and recorded in
    ``trace.assumptions``, and a generated kernel is reused only for values
    that answer every recorded comparison the same way (:func:`assumptions_hold`).
    """

    host = True

    def __init__(self, trace: Trace, name: str, dtype, value: float):
        super().__init__(trace, name, dtype)
        self.value = float(value)

    __eq__, __ne__ = _compare("=="), _compare("!=")
    __lt__, __le__, __gt__, __ge__ = _compare("<"), _compare("<="), _compare(">"), _compare(">=")
    __hash__ = object.__hash__


_COMPARISONS = {"==": float.__eq__, "!=": float.__ne__, "<": float.__lt__, "<=": float.__le__,
                ">": float.__gt__, ">=": float.__ge__}


def assumptions_hold(assumptions, values: dict) -> bool:
    """Whether ``values`` (name -> number) answer every recorded comparison as the trace did."""
    return all(_COMPARISONS[op](float(values[name]), other) == result
               for name, op, other, result in assumptions)
