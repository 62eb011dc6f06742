"""``SM3``: a drop-in for torch-SM3's ``from SM3 import SM3``, on sm3fn's core.

It is :class:`FunctionalOptimizer` around :func:`sm3fn.sm3`: ``tx.init``
makes the state, which is stored under torch-SM3's names, and the step runs
the in-place step of the dispatcher :func:`sm3fn._kernels.sm3_step_` (the same equations
as ``tx.update``, from :mod:`sm3fn._sm3_math`, without full-size temporaries).

Per-parameter state, as in torch-SM3 (so its checkpoints load here):

* ``step``: steps taken (a 0-d int64 tensor; torch-SM3 keeps an int);
* ``accumulator_0`` ... ``accumulator_{k-1}``: keepdim layout, ``a_i`` has
  ``n_i`` in dim ``i`` and 1 elsewhere (one full-size accumulator for 0-d/1-d);
* ``momentum_buffer``: only while ``momentum > 0`` (torch-SM3 stores the
  float ``0.`` otherwise).

A parameter whose first gradient is sparse (``nn.Embedding(sparse=True)``)
keeps only ``accumulator_0``, shape ``(n_1, 1, ..., 1)``, and no momentum
buffer (see :mod:`sm3fn._kernels.sparse`).
"""

from __future__ import annotations

import functools
import numbers
import warnings
from typing import AbstractSet, Any, Callable, Mapping, Optional

import torch
from torch.optim.optimizer import ParamsT

from sm3fn import _checks
from sm3fn._kernels import check_kernel_choice, sm3_step_
from sm3fn._kernels import sharded as _sharded
from sm3fn._kernels import sparse as _sparse
from sm3fn._kernels.dispatch import build_kernels, refuse_uncovered
from sm3fn._sm3_math import accumulator_shapes
from sm3fn.alias import sm3 as sm3_tx
from sm3fn.base import ACCUMULATOR_PREFIX
from sm3fn.optim.functional import PARAM, FunctionalOptimizer, Template, one_value, param_key
from sm3fn.optim.functional import _describe as _describe_value
from sm3fn.transforms.finite import all_finite

__all__ = ["SM3"]

STEP = "step"
SKIPPED_STEPS = "skipped_steps"  # a top-level state_dict entry, with skip_nonfinite=True
MOMENTUM_BUFFER = "momentum_buffer"

# where each entry of sm3fn.sm3's state lives (see sm3fn.alias.sm3)
_SM3_STAGE, _MOMENTUM_STAGE = "sm3", "momentum"


def _transform(lr, momentum, beta, eps, weight_decay=0.0, *, accumulator_dtype, momentum_dtype):
    """A group's ``sm3fn.sm3`` (module level, so that the optimizer pickles).

    ``weight_decay`` is not part of it: :meth:`SM3.step` decays the weights
    itself, before the SM3 step (see :func:`_decay_weights_`)."""
    return sm3_tx(lr, momentum, beta, eps, accumulator_dtype=accumulator_dtype, momentum_dtype=momentum_dtype)


#: group keys that torch.optim and its schedulers write (``initial_lr``, OneCycleLR's
#: ``max_lr``/``min_lr``/``max_momentum``/``base_momentum``, SWALR's ``swa_lr``):
#: present in a group, but not settings a user expects SM3 to honour, so no warning
_TORCH_GROUP_KEYS = frozenset(
    {"params", "param_names", "initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum", "swa_lr"})


def _decay_weights_(params: list[torch.Tensor], lr: Any, weight_decay: Any) -> None:
    """Decoupled weight decay, in place: ``p <- p * (1 - lr * weight_decay)``.

    Run before the SM3 step, whose update does not depend on ``p``, this gives
    ``p - lr * (u + weight_decay * p)``: the step of
    ``chain(scale_by_sm3(), ema(momentum), add_decayed_weights(weight_decay),
    scale_by_learning_rate(lr))``, as AdamW decays (Loshchilov & Hutter 2019).
    """
    torch._foreach_mul_(params, 1 - lr * weight_decay)


def _check_weight_decay(weight_decay: Any) -> None:
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, numbers.Real):
        raise TypeError(
            f"weight_decay must be a real number, got {weight_decay!r} of type {type(weight_decay).__name__}")
    _checks.check_scalar("weight_decay", weight_decay, 0.0)


def _row_cover(state: Mapping[str, Any], p: torch.Tensor) -> bool:
    """State made by a sparse gradient: the row accumulator of a parameter with 2+ dims only."""
    return p.dim() >= 2 and f"{ACCUMULATOR_PREFIX}0" in state and f"{ACCUMULATOR_PREFIX}1" not in state


def _accumulators(state: Mapping[str, Any], p: torch.Tensor) -> list[torch.Tensor]:
    if _row_cover(state, p):
        return [state[f"{ACCUMULATOR_PREFIX}0"]]
    return [state[f"{ACCUMULATOR_PREFIX}{i}"] for i in range(max(1, p.dim()))]


class SM3(FunctionalOptimizer):
    """SM3-II (Anil, Gupta, Koren, Singer 2019, arXiv:1901.11150) as a ``torch.optim.Optimizer``.

    A drop-in replacement for torch-SM3's ``SM3``: same arguments, defaults
    and checks, same per-parameter state keys, the same trajectory on dense
    gradients with ``beta == 0``.  Per step, for a gradient ``g`` with
    accumulators ``a_i``::

        nu  = min_i a_i + g*g              (beta > 0: beta * min_i a_i + (1 - beta) * g*g)
        u   = g / sqrt(nu + eps)           (0 where nu == 0)
        a_i = max of nu over every dim but i
        m   = momentum * m + (1 - momentum) * u        (only if momentum > 0)
        p  -= lr * (m or u) + lr * weight_decay * p     (the decay from p before the step)

    Args:
      params: parameters or param-group dicts (each group may set its own
        ``lr``, ``momentum``, ``beta``, ``eps``).
      lr: learning rate, ``>= 0``; ``torch.optim.lr_scheduler`` schedulers change it.
        May be a 0-d (or one-element) tensor, as in torch.optim: schedulers then
        ``fill_`` it, and ``torch.compile(opt.step)`` takes it as a graph input,
        so a new value does not recompile.
      momentum: EMA decay of ``u`` in ``[0, 1)``; ``> 0`` keeps one buffer shaped
        like the parameter.
      beta: 0 sums squared gradients (the paper's default); ``0 < beta < 1``
        keeps their exponential moving average, which decays.
      eps: added to ``nu`` under the square root, ``>= 0``.
      weight_decay: decoupled weight decay (AdamW's), ``>= 0``: each step
        first shrinks every parameter that has a dense gradient by the factor
        ``1 - lr * weight_decay``, outside the preconditioner and the momentum.
        A group key like the others (HF ``Trainer`` puts biases and norms in a
        group with ``weight_decay=0``).  Parameters with sparse gradients must
        be in a group with ``weight_decay=0`` (decaying every row would make
        their step dense).
      accumulator_dtype: dtype of the accumulators; default: the
        parameter's for float32/float64, float32 for bfloat16/float16.
      momentum_dtype: dtype of the momentum buffer; the same default.
      skip_nonfinite: when any gradient holds a NaN or inf, drop the whole
        step: parameters and state stay bit-identical and ``skipped_steps``
        (saved in ``state_dict()``) goes up by one.  Costs one host sync per
        step.  Without it a NaN/inf gradient entry turns that parameter entry
        into NaN, and a NaN poisons the accumulators of its row and column
        (see README, "Guarantees").  ``sm3fn.apply_if_finite`` is the
        functional form.
      fused: step each CPU parameter with one C++ sweep (float32/float64,
        and bfloat16/float16 with the default float32 statistics)
        (generated from the same equations, built by torch.compile's compiler
        on the first step, about a second per configuration; cached on disk).
        ``None`` (default): wherever it can be built, else (one warning) the
        blocked path; ``False``: always the blocked path (no compiler needed);
        ``True``: an error if it cannot be built, and a ``ValueError`` naming
        any dense parameter no fused kernel covers (other statistics dtypes,
        meta, views with gaps; CUDA without Triton), raised before anything changes, as
        ``torch.optim.Adam(fused=True)`` refuses; with ``None`` those take
        the blocked path.  Sparse gradients take the sparse path either way;
        DTensors run it on their local shards.  Same numbers to float
        rounding (README, "Speed and memory").  Under ``torch.compile`` the
        step is one custom op (:mod:`sm3fn._kernels.ops`) that runs these
        same kernels.
      compiled: run the dense step's blocks through ``torch.compile``
        instead (inductor; the first steps compile, seconds per
        configuration); excludes ``fused=True``.

    Warnings (once per optimizer): a param group key that SM3 does not use
    (e.g. Adam's ``betas``, which would otherwise be ignored silently), and a
    group whose ``momentum`` leaves 0 after construction (``OneCycleLR`` and
    ``CyclicLR`` with their default ``cycle_momentum=True`` do this), which
    makes SM3 keep a parameter-sized momentum buffer; pass
    ``cycle_momentum=False`` to keep SM3's memory.

    Sparse gradients (``nn.Embedding(sparse=True)``, ``nn.EmbeddingBag(sparse=True)``,
    any ``torch.sparse_coo`` gradient) update only the rows they touch, with
    the row accumulator ``a_0`` as the only cover; other rows keep their
    values and accumulators exactly, and momentum is not applied to them (as
    in torch-SM3 and the authors' code).  A parameter whose first gradient
    is sparse keeps only ``a_0`` (``n_1`` numbers; later dense gradients are
    row-cover steps on every row); one whose state began dense keeps its
    other accumulators and momentum buffer untouched by sparse steps.  A
    step under ``torch.compile`` on a parameter that has had sparse
    gradients is a ``TypeError`` naming it (sparse tensors cannot be traced).

    Unlike torch-SM3: parameters whose ``.grad`` is None are skipped,
    ``beta > 0`` accumulators decay, a zero gradient in float16/bfloat16 is a
    zero step (no NaN), every group's hyperparameters are checked, and
    ``load_state_dict`` checks shapes (see README, "Coming from torch-SM3").
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 0.1,
        momentum: float = 0.0,
        beta: float = 0.0,
        eps: float = 1e-30,
        weight_decay: float = 0.0,
        *,
        accumulator_dtype: Optional[torch.dtype] = None,
        momentum_dtype: Optional[torch.dtype] = None,
        skip_nonfinite: bool = False,
        compiled: bool = False,
        fused: Optional[bool] = None,
    ):
        if not isinstance(skip_nonfinite, bool):
            raise TypeError(f"skip_nonfinite must be a bool, got {skip_nonfinite!r}")
        check_kernel_choice(fused, compiled)
        self.compiled = compiled
        self.fused = fused
        self.skip_nonfinite = skip_nonfinite
        self.skipped_steps = 0
        _checks.check_dtype_arg("accumulator_dtype", accumulator_dtype)
        _checks.check_dtype_arg("momentum_dtype", momentum_dtype)
        self.accumulator_dtype = accumulator_dtype
        self.momentum_dtype = momentum_dtype
        self._warned_keys = set()
        self._zero_momentum_groups = set()
        self._check_group({"lr": lr, "momentum": momentum, "beta": beta, "eps": eps, "weight_decay": weight_decay})

        tx = functools.partial(_transform, accumulator_dtype=accumulator_dtype, momentum_dtype=momentum_dtype)
        super().__init__(params, tx, lr=lr, momentum=momentum, beta=beta, eps=eps, weight_decay=weight_decay)

    # -- torch-SM3's names for sm3fn.sm3's state ------------------------------------------

    compiled = False  # the defaults for optimizers pickled before the options existed
    fused: Optional[bool] = None
    _warned_keys: AbstractSet[str] = frozenset()  # optimizers pickled before the warnings: warn again
    _zero_momentum_groups: AbstractSet[int] = frozenset()
    _PICKLED = FunctionalOptimizer._PICKLED + (
        "accumulator_dtype", "momentum_dtype", "skip_nonfinite", "skipped_steps", "compiled", "fused",
        "_warned_keys", "_zero_momentum_groups")

    def _check_group(self, group: Mapping[str, Any]) -> None:
        # torch-SM3's checks, plus: real numbers only (the fast path takes floats), except
        # that lr may be a one-element tensor, as in torch.optim (compiled steps: no recompile)
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            one_value("lr", lr)  # a ValueError naming its shape unless one element
        for name in ("lr", "momentum", "beta", "eps"):
            value = group[name]
            if name == "lr" and isinstance(value, torch.Tensor):
                continue  # its dtype and value: check_scalar below
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}")
        _checks.check_sm3_hyperparameters(group["lr"], group["momentum"], group["beta"], group["eps"], lr_name="lr")
        _check_weight_decay(group.get("weight_decay", 0.0))  # absent from torch-SM3's groups

    # -- warnings, once per optimizer ----------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        unused = sorted(k for k in group if k not in self._hyperparameters and k not in _TORCH_GROUP_KEYS)
        new = [k for k in unused if k not in self._warned_keys]
        if new:
            self._warned_keys = set(self._warned_keys) | set(new)
            warnings.warn(
                f"sm3fn.optim.SM3 ignores the param group key(s) {new} (group {len(self.param_groups) - 1}); "
                f"it uses {list(self._hyperparameters)}", UserWarning, stacklevel=3)
        if group["momentum"] == 0:
            self._zero_momentum_groups = set(self._zero_momentum_groups) | {len(self.param_groups) - 1}

    def _warn_if_momentum_left_zero(self, group: Mapping[str, Any]) -> None:
        """One warning when a group made with ``momentum=0`` now steps with momentum > 0."""
        index = next(i for i, g in enumerate(self.param_groups) if g is group)
        if index in self._zero_momentum_groups:
            self._zero_momentum_groups = set()  # once per optimizer
            warnings.warn(
                f"param group {index} was made with momentum=0 and now has momentum={group['momentum']!r}; "
                "SM3 now keeps a momentum buffer the size of each parameter. A OneCycleLR or CyclicLR "
                "scheduler does this with its default cycle_momentum=True: pass cycle_momentum=False "
                "to keep SM3's memory.", UserWarning, stacklevel=3)

    def _state_key(self, template: Template) -> str:
        if template == (_MOMENTUM_STAGE, PARAM):
            return MOMENTUM_BUFFER
        if len(template) == 3 and template[:2] == (_SM3_STAGE, PARAM) and template[2].startswith(ACCUMULATOR_PREFIX):
            return template[2]
        raise ValueError(f"SM3 has no name for the state entry {template}")  # sm3fn.sm3 changed

    def _state_template(self, key: str) -> Optional[Template]:
        if key == MOMENTUM_BUFFER:
            return (_MOMENTUM_STAGE, PARAM)
        if key.startswith(ACCUMULATOR_PREFIX):
            return (_SM3_STAGE, PARAM, key)
        return None  # "step"

    # -- the step ----------------------------------------------------------------------

    def _describe_param(self, group: Mapping[str, Any], p: torch.Tensor, index: int) -> str:
        names = group.get("param_names")
        position = next(i for i, q in enumerate(group["params"]) if q is p)  # not list.index: tensor ==
        name = f" ({names[position]!r})" if names else ""
        return f"parameter {index}{name} of shape {tuple(p.shape)}"

    def _refuse_uncovered(self, group: Mapping[str, Any], p: torch.Tensor, state: Mapping[str, Any],
                          index: Mapping[int, int]) -> None:
        """``fused=True``: a ``ValueError`` if no fused kernel covers ``p`` (checked
        for every group before any is stepped; a parameter without state yet is probed with
        stand-ins of the statistics dtypes its state will have)."""
        if f"{ACCUMULATOR_PREFIX}0" in state:
            accs = _accumulators(state, p)
        else:  # small: the accumulators' own shapes, as tx.init makes them
            dtype = _checks.statistics_dtype(p.dtype, self.accumulator_dtype)
            accs = [torch.empty(s, dtype=dtype, device=p.device) for s in accumulator_shapes(p.shape)]
        m = None
        if group["momentum"] > 0:
            m = state.get(MOMENTUM_BUFFER)
            if not isinstance(m, torch.Tensor):  # laid out as tx.init's zeros_like(p) will be (unwritten)
                m = torch.empty_strided(p.shape, p.stride(), device=p.device,
                                        dtype=_checks.statistics_dtype(p.dtype, self.momentum_dtype))
        name = self._describe_param(group, p, index[id(p)]).rsplit(" of shape", 1)[0]  # the error adds it
        refuse_uncovered(p, p.grad, accs, m, name)

    def _namer(self, group: Mapping[str, Any], p: torch.Tensor, index: Mapping[int, int]) -> Callable[[], str]:
        """:meth:`_describe_param`, deferred: it walks the group, so it runs only to raise."""
        return lambda: self._describe_param(group, p, index[id(p)])

    def _statistics_dtype(self, p: torch.Tensor) -> torch.dtype:
        """The dtype ``p``'s accumulators are (or will be) kept in."""
        acc = self.state.get(p, {}).get(f"{ACCUMULATOR_PREFIX}0")
        if isinstance(acc, torch.Tensor):
            return acc.dtype
        return _checks.statistics_dtype(p.dtype, self.accumulator_dtype)

    # Sparse gradients (nn.Embedding(sparse=True)): the check runs with the dense
    # checks, before anything changes; the step runs after the dense step.

    def _check_sparse(self, group: Mapping[str, Any], params: list, index: Mapping[int, int]) -> None:
        """Checks the parameters of ``group`` whose gradient is sparse; raises to refuse them."""
        for p in params:
            g = p.grad
            if g.layout != torch.sparse_coo:
                raise TypeError(
                    f"{self._describe_param(group, p, index[id(p)])} has a {g.layout} gradient; "
                    "sm3fn.optim.SM3 takes dense (torch.strided) or torch.sparse_coo gradients"
                )
            if group.get("weight_decay", 0.0) != 0:
                raise ValueError(
                    f"{self._describe_param(group, p, index[id(p)])} has a sparse gradient in a group "
                    f"with weight_decay={group['weight_decay']!r}; put it in a group with weight_decay=0 "
                    "(decaying every row would make its sparse step dense)"
                )
            if g.sparse_dim() == 0:
                raise ValueError(
                    f"{self._describe_param(group, p, index[id(p)])} has a sparse gradient with "
                    "no sparse dimension; pass it dense"
                )

    def _row_state(self, params: list) -> None:
        """A first sparse gradient makes the row accumulator only (``n_1`` numbers); an existing
        state keeps its ``accumulator_0`` (and the rest, which sparse steps leave alone)."""
        for p in params:
            state = self.state[p]
            if f"{ACCUMULATOR_PREFIX}0" not in state:
                dtype = _checks.statistics_dtype(p.dtype, self.accumulator_dtype)
                state[f"{ACCUMULATOR_PREFIX}0"] = _sparse.row_accumulator(p.detach(), dtype)
            state.setdefault(STEP, torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None):
        """One SM3 step on every parameter that has a gradient; returns the closure's loss."""
        loss = self._evaluate(closure)
        index = self._index()
        # before any .grad is read: torch.compile rejects a sparse tensor on sight
        _sparse.check_not_compiling(
            [self._describe_param(g, p, index[id(p)])
             for g in self.param_groups for p in g["params"] if _row_cover(self.state.get(p, {}), p)],
            "sm3fn.optim.SM3",
        )
        work = []  # (group, params with a dense gradient, params with a sparse one)
        # 1. check everything, so that a bad group or gradient changes nothing
        for group in self.param_groups:
            self._check_group(group)
            dense: list[torch.Tensor] = []
            sparse: list[torch.Tensor] = []
            for p in group["params"]:
                g = p.grad
                if g is None or p.numel() == 0:  # frozen, or nothing to update: skipped
                    continue
                if p.dtype not in _checks.SUPPORTED_DTYPES or g.dtype not in _checks.SUPPORTED_DTYPES:
                    raise TypeError(
                        f"{self._describe_param(group, p, index[id(p)])} has dtype {p.dtype} and gradient "
                        f"dtype {g.dtype}; SM3 optimizes real floating-point tensors only "
                        f"({', '.join(map(str, _checks.SUPPORTED_DTYPES))})"
                    )
                state = self.state.get(p, {})
                _sharded.check_same_kind(  # the description is made only to raise: it walks the group
                    "SM3", lambda group=group, p=p: self._describe_param(group, p, index[id(p)]), param=p, grad=g,
                    **{k: v for k, v in state.items() if k != STEP and isinstance(v, torch.Tensor)},
                )
                if self.fused is True and g.layout == torch.strided and not _sharded.is_dtensor(p):
                    self._refuse_uncovered(group, p, state, index)
                (dense if g.layout == torch.strided else sparse).append(p)
            if sparse:
                self._check_sparse(group, sparse, index)
            if dense or sparse:
                work.append((group, dense, sparse))
                # lr and eps finite in each statistics dtype (a loaded state keeps its own)
                _checks.check_in_place_step(
                    [(self._namer(group, p, index), p) for p in dense + sparse],
                    [self._statistics_dtype(p) for p in dense + sparse], group["lr"], group["eps"])
        # no two stepped parameters share memory (across groups too)
        _checks.check_no_aliasing([(self._namer(g, p, index), p) for g, d, s in work for p in d + s])
        # 1b. skip_nonfinite: a NaN/inf gradient anywhere drops the step before any state is made
        if self.skip_nonfinite and work:
            grads = [p.grad._values() if p.grad.is_sparse else p.grad for _, d, s in work for p in d + s]
            if not _sharded.all_finite_agreed(grads, all_finite, grads[0].device):  # DTensors: all ranks agree
                self.skipped_steps += 1
                return loss
        # 2. state for new parameters (and a momentum buffer once momentum > 0), from tx.init
        for group, params, _ in work:
            with_momentum = group["momentum"] > 0
            if with_momentum:
                self._warn_if_momentum_left_zero(group)
            needs = {
                param_key(index[id(p)]): p
                for p in params
                if not _row_cover(self.state.get(p, {}), p)  # the row cover stays as it is
                and (f"{ACCUMULATOR_PREFIX}0" not in self.state.get(p, {})
                     or (with_momentum and not isinstance(self.state[p].get(MOMENTUM_BUFFER), torch.Tensor)))
            }
            if not needs:
                continue
            fresh = self._fresh_state(self._transform(group), {k: p.detach() for k, p in needs.items()})
            for key, p in needs.items():
                state = self.state[p]
                for name, value in fresh[key].items():
                    if not isinstance(state.get(name), torch.Tensor):
                        state[name] = value
                state.setdefault(STEP, torch.zeros((), dtype=torch.int64))
        # 3. the in-place step, through the one dispatcher (sparse, DTensor, fused, blocked)
        steps = []  # (group, dense params, every param stepped, states, accumulators, momentum buffers)
        for group, params, sparse in work:
            self._row_state(sparse)
            stepped = params + sparse
            states = [self.state[p] for p in stepped]
            steps.append((group, params, stepped, states, [_accumulators(s, p) for s, p in zip(states, stepped)],
                          [s[MOMENTUM_BUFFER] if group["momentum"] > 0 and not p.grad.is_sparse
                           and not _row_cover(s, p) else None for s, p in zip(states, stepped)]))
        if self.fused is True:  # every group's kernels built before any group (or its decay) writes
            for group, _, stepped, _, accs, moms in steps:
                build_kernels(stepped, [p.grad for p in stepped], accs, moms, beta=group["beta"])
        for group, params, stepped, states, accs, moms in steps:
            momentum = group["momentum"]
            if params and group.get("weight_decay", 0.0) != 0:  # dense only: _check_sparse refuses the rest
                _decay_weights_(params, group["lr"], group["weight_decay"])
            sm3_step_(
                stepped,
                [p.grad for p in stepped],
                accs,
                moms,
                lr=one_value("lr", group["lr"]),  # a one-element tensor as 0-d
                momentum=momentum,
                beta=group["beta"],
                eps=group["eps"],
                compiled=self.compiled,
                fused=self.fused,
            )
            for s in states:
                s[STEP] += 1
        return loss

    # -- checkpoints -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state_dict, plus ``"skipped_steps"`` with ``skip_nonfinite=True``."""
        state_dict = super().state_dict()
        if self.skip_nonfinite:
            state_dict[SKIPPED_STEPS] = self.skipped_steps
        return state_dict

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """As :meth:`FunctionalOptimizer.load_state_dict`; also restores ``skipped_steps``."""
        skipped = state_dict.get(SKIPPED_STEPS, 0)
        if isinstance(skipped, torch.Tensor) and skipped.numel() == 1 and not skipped.is_floating_point():
            skipped = int(skipped.item())
        if isinstance(skipped, bool) or not isinstance(skipped, int) or skipped < 0:
            raise ValueError(f"state_dict[{SKIPPED_STEPS!r}] must be an int >= 0, got {skipped!r}")
        groups = state_dict.get("param_groups")
        if isinstance(groups, list) and all(isinstance(g, Mapping) for g in groups):
            # torch-SM3's checkpoints and ours from before weight_decay: no decay
            state_dict = {**state_dict, "param_groups": [{"weight_decay": 0.0, **g} for g in groups]}
        super().load_state_dict(state_dict)
        self.skipped_steps = skipped
        # the loaded momentum is the run's own: warn only when it later leaves 0
        self._zero_momentum_groups = {i for i, g in enumerate(self.param_groups) if g["momentum"] == 0}

    def _load_param_state(
        self, name: str, p: torch.Tensor, group: Mapping[str, Any], saved: Mapping[str, Any]
    ) -> dict[str, Any]:
        """torch-SM3's state or ours: ``step`` (int or tensor), the accumulators, and a
        ``momentum_buffer`` that is a tensor shaped like ``p`` or torch-SM3's float 0."""
        saved = dict(saved)
        if STEP not in saved:
            raise ValueError(f"{name} (shape {tuple(p.shape)}): the loaded state has no {STEP!r}, "
                             f"keys {sorted(saved)}")
        step = saved.pop(STEP)
        if isinstance(step, torch.Tensor) and step.numel() == 1 and not step.is_floating_point():
            step = int(step.item())
        elif isinstance(step, torch.Tensor) and step.numel() == 1:
            step = float(step.item())
        if isinstance(step, bool) or not isinstance(step, numbers.Real) or step < 0 or step != int(step):  # type: ignore[call-overload]  # Real has __int__ at run time
            raise ValueError(f"{name}: loaded state['step'] must be a count >= 0, got {step!r}")
        buffer = saved.pop(MOMENTUM_BUFFER, None)
        if isinstance(buffer, torch.Tensor):
            if buffer.shape != p.shape:
                raise ValueError(
                    f"{name} (shape {tuple(p.shape)}): loaded state[{MOMENTUM_BUFFER!r}] has shape "
                    f"{tuple(buffer.shape)}, expected {tuple(p.shape)}"
                )
            dtype = _checks.statistics_dtype(p.dtype, self.momentum_dtype)
            buffer = self._load_tensor(f"{name}: loaded state[{MOMENTUM_BUFFER!r}]", MOMENTUM_BUFFER, buffer,
                                       p.device, dtype)
        elif buffer is not None and not (isinstance(buffer, numbers.Real) and buffer == 0):
            # torch-SM3's placeholder before momentum is used is the float 0.
            raise ValueError(
                f"{name}: loaded state[{MOMENTUM_BUFFER!r}] must be a tensor of shape "
                f"{tuple(p.shape)} or 0., got {buffer!r}"
            )
        else:
            buffer = None
        row_cover = [k for k in saved if k.startswith(ACCUMULATOR_PREFIX)] == [f"{ACCUMULATOR_PREFIX}0"]
        if p.dim() >= 2 and row_cover and buffer is None:  # state made by sparse gradients
            out = self._load_row_cover(name, p, saved)
        else:
            # the accumulators, checked against tx.init's (momentum left out: handled above)
            out = super()._load_param_state(name, p, {**group, "momentum": 0.0}, saved)
        out[STEP] = torch.tensor(int(step), dtype=torch.int64)  # type: ignore[call-overload]  # checked Real above
        if buffer is not None:
            out[MOMENTUM_BUFFER] = buffer
        return out

    def _load_row_cover(self, name: str, p: torch.Tensor, saved: Mapping[str, Any]) -> dict[str, Any]:
        """The row accumulator alone: ours ``(n_1, 1, ..., 1)`` or torch-SM3's sparse ``(n_1,)``."""
        acc = saved[f"{ACCUMULATOR_PREFIX}0"]
        extra = sorted(k for k in saved if k != f"{ACCUMULATOR_PREFIX}0")
        if extra or not isinstance(acc, torch.Tensor) or acc.numel() != p.shape[0]:
            raise ValueError(
                f"{name} (shape {tuple(p.shape)}): a loaded state with only {ACCUMULATOR_PREFIX}0 is the row "
                f"cover of sparse gradients and needs {p.shape[0]} numbers and no other entries; got "
                f"{_describe_value(acc)}" + (f" and {extra}" if extra else "")
            )
        keepdim = (p.shape[0],) + (1,) * (p.dim() - 1)
        dtype = _checks.statistics_dtype(p.dtype, self.accumulator_dtype)
        key = f"{ACCUMULATOR_PREFIX}0"
        return {key: self._load_tensor(f"{name}: loaded state[{key!r}]", key, acc, p.device, dtype).reshape(keepdim)}
