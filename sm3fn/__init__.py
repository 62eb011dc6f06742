"""sm3fn: the memory-efficient SM3 optimizer for PyTorch, as composable pure transforms.

    tx = sm3fn.sm3(learning_rate=0.1)
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    params = sm3fn.apply_updates(params, updates)
"""

from sm3fn import (
    func,
    optim,  # after the core: the optimizers build on it
    schedules,
    tree,
)
from sm3fn.alias import sm3
from sm3fn.base import (
    GradientTransformation,
    OptState,
    ScalarOrSchedule,
    Schedule,
    Tree,
    apply_updates,
    identity,
)
from sm3fn.func import stop_gradient
from sm3fn.inject import inject_hyperparams
from sm3fn.inplace import sm3_update_
from sm3fn.transforms import (
    MultiSteps,
    add_decayed_weights,
    apply_if_finite,
    averaged_params,
    chain,
    clip,
    clip_by_global_norm,
    ema,
    freeze,
    global_norm,
    masked,
    named_chain,
    parameter_averaging,
    partition,
    scale,
    scale_by_learning_rate,
    scale_by_schedule,
    scale_by_sm3,
    set_to_zero,
    trace,
    zero_nans,
)

__version__ = "0.1.0"

__all__ = [
    "MultiSteps",
    "clip",
    "freeze",
    "set_to_zero",
    "tree",
    "zero_nans",
    "GradientTransformation",
    "OptState",
    "Schedule",
    "ScalarOrSchedule",
    "Tree",
    "apply_if_finite",
    "add_decayed_weights",
    "apply_updates",
    "averaged_params",
    "chain",
    "clip_by_global_norm",
    "global_norm",
    "masked",
    "parameter_averaging",
    "partition",
    "schedules",
    "ema",
    "func",
    "identity",
    "inject_hyperparams",
    "named_chain",
    "optim",
    "scale",
    "scale_by_learning_rate",
    "scale_by_schedule",
    "scale_by_sm3",
    "sm3",
    "sm3_update_",
    "stop_gradient",
    "trace",
]
