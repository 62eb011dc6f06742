"""Gradient transformations, one concept per module."""

from sm3fn.transforms.accumulation import MultiSteps
from sm3fn.transforms.averaging import averaged_params, parameter_averaging
from sm3fn.transforms.clipping import clip, clip_by_global_norm, global_norm
from sm3fn.transforms.combine import chain, named_chain
from sm3fn.transforms.finite import apply_if_finite, zero_nans
from sm3fn.transforms.freezing import freeze, set_to_zero
from sm3fn.transforms.masking import masked, partition
from sm3fn.transforms.momentum import ema, trace
from sm3fn.transforms.preconditioner import scale_by_sm3
from sm3fn.transforms.scaling import scale, scale_by_learning_rate, scale_by_schedule
from sm3fn.transforms.weight_decay import add_decayed_weights

__all__ = [
    "MultiSteps",
    "clip",
    "freeze",
    "set_to_zero",
    "zero_nans",
    "apply_if_finite",
    "add_decayed_weights",
    "averaged_params",
    "clip_by_global_norm",
    "global_norm",
    "masked",
    "parameter_averaging",
    "partition",
    "chain",
    "named_chain",
    "ema",
    "trace",
    "scale",
    "scale_by_learning_rate",
    "scale_by_schedule",
    "scale_by_sm3",
]
