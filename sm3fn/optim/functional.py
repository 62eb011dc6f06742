"""``FunctionalOptimizer``: any ``GradientTransformation`` as a ``torch.optim.Optimizer``.

Each ``step`` runs, for every param group, the pure ``tx.update`` on the
group's parameters and gradients, then copies ``params + updates`` into the
parameters under ``no_grad``.

How the transform's state maps to torch.optim's per-parameter state
--------------------------------------------------------------------
Inside a group the parameters are the leaves of a flat tree keyed
``"param_<i>"``, ``i`` being the parameter's index in :meth:`state_dict`
(its position across all groups).  The transform's state (a TensorDict) is
split leaf by leaf:

* a leaf whose path holds a parameter key belongs to that parameter.  It is
  stored in ``optimizer.state[p]`` under its path with the parameter key
  written ``*``: ``("sm3", "param_3", "accumulator_0")`` becomes
  ``state[p]["sm3.*.accumulator_0"]`` and ``("momentum", "param_3")`` becomes
  ``state[p]["momentum.*"]``;
* a leaf whose path holds no parameter key belongs to the whole group (a
  schedule's ``count``).  Every parameter of the group keeps a reference to
  it under its path (``state[p]["learning_rate.count"]``); the first one is
  read back.

So ``state_dict()`` is torch.optim's usual ``{"state": {i: {...}},
"param_groups": [...]}`` of tensors and floats, which ``torch.save`` and
``torch.load(..., weights_only=True)`` round-trip, and ``load_state_dict``
checks it against what ``tx.init`` makes for each parameter (run on ``meta``
tensors, so nothing is allocated): a missing or extra key, or another shape,
is a ``ValueError`` naming the parameter, and the optimizer is left as it was.

State is created lazily, on a parameter's first gradient (as torch.optim
does), so a parameter that is never trained keeps no state.  A parameter
with state whose ``.grad`` is None is passed to ``tx.update`` as a frozen
(``None``) gradient: its state is kept and it does not move.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from copy import deepcopy
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch
from tensordict import TensorDictBase
from torch.optim.optimizer import ParamsT

from sm3fn import _checks, _tree
from sm3fn.base import ACCUMULATOR_PREFIX, GradientTransformation, apply_updates

__all__ = ["FunctionalOptimizer", "PARAM", "param_key", "split_state"]

#: stands for the parameter in the per-parameter state keys.
PARAM = "*"

#: ``tx`` itself, or ``(**hyperparameters) -> tx``, called with a group's values.
TransformOrFactory = Union[GradientTransformation, Callable[..., GradientTransformation]]

Template = tuple  # a state path with the parameter key replaced by PARAM


def param_key(index: int) -> str:
    """The tree key of the parameter with ``state_dict`` index ``index``."""
    return f"param_{index}"


def split_state(
    state: TensorDictBase, keys: Iterable[str]
) -> tuple[dict[str, dict[Template, torch.Tensor]], dict[Template, torch.Tensor]]:
    """``state`` as ``({param key: {template: leaf}}, {group path: leaf})``."""
    keys = set(keys)
    per_param: dict[str, dict[Template, torch.Tensor]] = defaultdict(dict)
    group: dict[Template, torch.Tensor] = {}
    for path, leaf in _tree.td_leaves(state):
        hits = [i for i, part in enumerate(path) if part in keys]
        if len(hits) > 1:
            raise ValueError(
                f"state path {path} names more than one parameter; FunctionalOptimizer "
                "cannot tell which parameter it belongs to"
            )
        if hits:
            i = hits[0]
            per_param[path[i]][path[:i] + (PARAM,) + path[i + 1 :]] = leaf
        else:
            group[path] = leaf
    return per_param, group


def _fill(template: Template, key: str) -> tuple:
    return tuple(key if part == PARAM else part for part in template)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"{value!r} ({type(value).__name__})"


def one_value(name: str, value: Any) -> Any:
    """A group's tensor hyperparameter as a 0-d view; a float or a schedule passes as is.

    A group holds one value per hyperparameter, as torch.optim's tensor
    ``lr`` (0-d or one element): a one-element tensor of any shape is viewed
    as 0-d, so that it scales each parameter without broadcasting it to
    another shape (a ``(1, 1)`` lr would turn a 1-d update 2-d).  A tensor
    of several values would broadcast across a parameter's columns: a
    ``ValueError``.  The view shares the group's storage, so a scheduler's
    in-place ``fill_`` reaches it.
    """
    if not isinstance(value, torch.Tensor):
        return value
    if value.numel() != 1:
        raise ValueError(
            f"{name} must be a number or a one-element tensor (one value per param group), "
            f"got a tensor of shape {tuple(value.shape)}"
        )
    return value.view(()) if value.dim() else value


class FunctionalOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that runs a pure :class:`GradientTransformation`.

    Args:
      params: parameters or param-group dicts, as for any torch optimizer.
      tx: a ``GradientTransformation`` used for every group, or a factory
        ``(**hyperparameters) -> GradientTransformation`` called each step
        with the group's values of the keyword arguments below.  Use a
        factory taking ``lr`` for ``torch.optim.lr_scheduler`` (schedulers
        write ``group["lr"]``) and for groups with their own hyperparameters.
      **defaults: the hyperparameters (group entries) the factory takes.

    Example::

        opt = FunctionalOptimizer(model.parameters(),
                                  lambda lr: sm3fn.chain(sm3fn.scale_by_sm3(),
                                                         sm3fn.scale_by_learning_rate(lr)),
                                  lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s / 100) ** 2))

    The state layout is described in :mod:`sm3fn.optim.functional`.  A
    factory must give transforms whose state has the same structure for every
    value it is called with (for ``sm3fn.sm3``: do not change ``momentum``
    between 0 and > 0 mid-run; :class:`sm3fn.optim.SM3` allows it).
    """

    def __init__(self, params: ParamsT, tx: TransformOrFactory, **defaults: Any):
        if not isinstance(tx, GradientTransformation):
            if not callable(tx):
                raise TypeError(
                    f"tx must be a GradientTransformation or a factory returning one, got {type(tx).__name__}"
                )
        elif defaults:
            raise TypeError(
                f"hyperparameters {sorted(defaults)} were given with a fixed GradientTransformation; "
                "pass a factory (**hyperparameters) -> GradientTransformation to use them"
            )
        self._tx = tx
        # torch adds entries (e.g. "differentiable") to self.defaults: keep our own list
        self._hyperparameters = tuple(defaults)
        super().__init__(params, defaults)

    #: attributes that pickling and ``copy.deepcopy`` keep (torch.optim keeps only its own)
    _PICKLED: tuple[str, ...] = ("_tx", "_hyperparameters")

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), **{k: self.__dict__[k] for k in self._PICKLED}}

    # -- hooks that subclasses override -------------------------------------------------

    def _check_group(self, group: Mapping[str, Any]) -> None:
        """Checks a group's hyperparameters; raises before anything changes."""

    def _state_key(self, template: Template) -> str:
        """The ``optimizer.state[p]`` key of a state leaf (``PARAM`` marks the parameter)."""
        if any("." in part for part in template):
            raise ValueError(f"state path {template} has a '.' in a key; it cannot be named uniquely")
        return ".".join(template)

    def _state_template(self, key: str) -> Optional[Template]:
        """The inverse of :meth:`_state_key`; None for a key that is not the transform's."""
        return tuple(key.split("."))

    # -- the transform ------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
            self._transform(self.param_groups[-1])  # a factory checks its hyperparameters now
        except Exception:
            self.param_groups.pop()
            raise

    def _transform(self, group: Mapping[str, Any]) -> GradientTransformation:
        if isinstance(self._tx, GradientTransformation):
            return self._tx
        tx = self._tx(**{k: one_value(k, group[k]) for k in self._hyperparameters})
        if not isinstance(tx, GradientTransformation):
            raise TypeError(f"the tx factory must return a GradientTransformation, got {type(tx).__name__}")
        return tx

    def _index(self) -> dict[int, int]:
        """``id(param) -> its state_dict index``."""
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        return {id(p): i for i, p in enumerate(params)}

    def _fresh_state(
        self, tx: GradientTransformation, params: Mapping[str, torch.Tensor]
    ) -> dict[str, dict[str, torch.Tensor]]:
        """``tx.init`` of ``params`` (key -> tensor), as per-parameter state dicts."""
        if not params:
            return {}
        return self._named_state(tx.init(dict(params)), params)

    def _gather(self, tx: GradientTransformation, states: Mapping[str, Mapping[str, Any]]) -> TensorDictBase:
        """The transform's state, rebuilt from per-parameter state dicts."""
        state = tx.init({})  # the transform's skeleton: its empty nodes and group entries
        have_group: set = set()
        for key, entries in states.items():
            for name, value in entries.items():
                template = self._state_template(name)
                if template is None:
                    continue
                if PARAM in template:
                    state.set(_fill(template, key), value)
                elif template not in have_group:  # group entries: the first parameter's
                    state.set(template, value)
                    have_group.add(template)
        return state

    def _named_state(
        self, new_state: TensorDictBase, params: Mapping[str, torch.Tensor]
    ) -> dict[str, dict[str, torch.Tensor]]:
        """``new_state`` as the per-parameter state dicts of ``params`` (group entries in each)."""
        per_param, group = split_state(new_state, params)
        return {
            key: {self._state_key(t): v for t, v in itertools.chain(per_param.get(key, {}).items(), group.items())}
            for key in params
        }

    @staticmethod
    def _tree_keys(group: Mapping[str, Any], index: Mapping[int, int]) -> list[str]:
        """The keys of a group's parameters in the tree ``tx`` sees: their names when the
        optimizer was given ``model.named_parameters()`` (so masks and ``sparse=`` can
        match ``"0.bias"``), else ``param_<state_dict index>``."""
        names = group.get("param_names")
        if names and len(set(names)) == len(names):
            return list(names)
        return [param_key(index[id(p)]) for p in group["params"]]

    @staticmethod
    def _evaluate(closure: Optional[Callable[[], Any]]) -> Any:
        """Runs ``step``'s closure with autograd on (``step`` itself runs under no_grad)."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None):
        """One step of ``tx`` on every group; returns the closure's loss, if any."""
        loss = self._evaluate(closure)
        index = self._index()
        plans = []
        # parameters are written in place, one after another: two over one memory would
        # each get the other's update overwritten, so they are refused
        _checks.check_no_aliasing([(f"parameter {index[id(p)]}", p) for g in self.param_groups
                                   for p in g["params"] if p.grad is not None])
        for group in self.param_groups:  # compute everything first: a failure changes nothing
            self._check_group(group)
            tx = self._transform(group)
            keys = self._tree_keys(group, index)
            live = {
                key: p
                for key, p in zip(keys, group["params"])
                if p.grad is not None or self.state.get(p)
            }
            if not live:
                continue
            new = {k: p.detach() for k, p in live.items() if not self.state.get(p)}
            # parameters with state first: the group entries (a count) are read from them
            states = {k: self.state[p] for k, p in live.items() if k not in new}
            states.update(self._fresh_state(tx, new))
            params = {k: p.detach() for k, p in live.items()}
            grads = {k: p.grad for k, p in live.items()}
            updates, new_state = tx.update(grads, self._gather(tx, states), params)
            moved = {k for k, u in updates.items() if u is not None}
            plans.append((live, moved, apply_updates(params, updates), self._named_state(new_state, live)))
        for live, moved, new_params, new_states in plans:  # commit
            for k, p in live.items():
                if k in moved:
                    p.copy_(new_params[k])
                self.state[p].update(new_states[k])
        return loss

    # -- checkpoints --------------------------------------------------------------------

    def _expected_state(self, group: Mapping[str, Any], p: torch.Tensor) -> dict[str, torch.Tensor]:
        """What ``tx.init`` makes for ``p``, on ``meta`` tensors (shapes and dtypes only)."""
        probe = torch.empty(p.shape, dtype=p.dtype, device="meta")
        return self._fresh_state(self._transform(group), {param_key(0): probe})[param_key(0)]

    def _load_param_state(
        self, name: str, p: torch.Tensor, group: Mapping[str, Any], saved: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Checks one parameter's saved state; returns it on ``p``'s device, in the
        dtypes ``tx.init`` uses.  Raises ``ValueError`` naming ``name`` on a mismatch."""
        expected = self._expected_state(group, p)
        missing = sorted(set(expected) - set(saved))
        extra = sorted(set(saved) - set(expected))
        if missing or extra:
            raise ValueError(
                f"{name} (shape {tuple(p.shape)}): the loaded state has keys {sorted(saved)}, "
                f"expected {sorted(expected)}"
                + (f"; missing {missing}" if missing else "")
                + (f"; unexpected {extra}" if extra else "")
            )
        out = {}
        for key, like in expected.items():
            value = saved[key]
            if not isinstance(value, torch.Tensor) or value.shape != like.shape:
                raise ValueError(
                    f"{name} (shape {tuple(p.shape)}): loaded state[{key!r}] is {_describe(value)}, "
                    f"expected shape {tuple(like.shape)}"
                )
            out[key] = self._load_tensor(f"{name}: loaded state[{key!r}]", key, value, p.device, like.dtype)
        return out

    def _load_tensor(self, where: str, key: str, value: torch.Tensor, device: torch.device,
                     dtype: torch.dtype) -> torch.Tensor:
        """A loaded state tensor, checked, as a copy of its own on ``device`` in ``dtype``.

        Refused (``ValueError`` naming ``where``): elements that share memory
        (an ``expand``-ed tensor; the in-place step would write one element
        several times) and, for SM3 accumulators (``scale_by_sm3``'s
        ``accumulator_<i>``), negative or NaN values.  The copy keeps the
        optimizer from writing into the caller's ``state_dict``.
        """
        _checks.check_no_self_overlap(where, value)
        template = self._state_template(key)
        if template and template[-1].startswith(ACCUMULATOR_PREFIX):
            _checks.check_loaded_accumulator(where, value)
        elif template and template[0] == "momentum":  # sm3fn.sm3's momentum stage (ema)
            _checks.check_loaded_accumulator(where, value, nonnegative=False)
        return value.to(device=device, dtype=dtype, copy=True)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Loads a :meth:`state_dict`, checking every parameter's state first.

        Unlike torch.optim's, state that does not fit the parameters (another
        count, key or shape) is a ``ValueError`` naming the parameter and the
        shapes, raised before anything changes; tensors keep the statistics
        dtype ``tx.init`` uses instead of being cast to the parameter's dtype
        (float32 statistics of a bfloat16 parameter stay float32).
        """
        state_dict = dict(state_dict)  # shallow copy, as torch does
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        for key in ("state", "param_groups"):
            if key not in state_dict:
                raise ValueError(f"state_dict must hold {key!r}, got keys {sorted(state_dict)}")
        groups = self.param_groups
        saved_groups = deepcopy(state_dict["param_groups"])
        if len(groups) != len(saved_groups):
            raise ValueError(
                f"the loaded state_dict has {len(saved_groups)} parameter groups, the optimizer {len(groups)}"
            )
        for i, (g, sg) in enumerate(zip(groups, saved_groups)):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(
                    f"parameter group {i} has {len(g['params'])} parameters, "
                    f"the loaded one {len(sg['params'])}"
                )
        for sg in saved_groups:
            missing = [k for k in self._hyperparameters if k not in sg]
            if missing:
                raise ValueError(f"a loaded parameter group lacks the hyperparameters {missing}")
            self._check_group(sg)
        # saved id -> (param, its group as it will be after loading, its name)
        targets = {}
        for g, sg in zip(groups, saved_groups):
            names = sg.get("param_names") or g.get("param_names") or [None] * len(g["params"])
            for p, saved_id, pname in zip(g["params"], sg["params"], names):
                targets[saved_id] = (p, sg, pname)
        new_state: defaultdict = defaultdict(dict)
        for saved_id, saved in state_dict["state"].items():
            if saved_id not in targets:
                raise ValueError(
                    f"the loaded state_dict holds state for parameter {saved_id!r}, which is not in "
                    f"its param_groups (the optimizer has {len(targets)} parameters)"
                )
            p, sg, pname = targets[saved_id]
            name = f"parameter {saved_id}" + (f" ({pname!r})" if pname else "")
            if not isinstance(saved, Mapping):
                raise ValueError(f"{name}: the loaded state must be a dict, got {type(saved).__name__}")
            new_state[p] = self._load_param_state(name, p, sg, saved)

        def update_group(group, new_group):
            new_group["params"] = group["params"]
            if "param_names" in group and "param_names" not in new_group:
                new_group["param_names"] = group["param_names"]
            return new_group

        param_groups = [update_group(g, sg) for g, sg in zip(groups, saved_groups)]
        self.__setstate__({"state": new_state, "param_groups": param_groups})
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)
