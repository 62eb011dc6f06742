"""Gradient transformations, one concept per module."""

from sm3fn.transforms.combine import chain, named_chain
from sm3fn.transforms.finite import apply_if_finite
from sm3fn.transforms.momentum import ema, trace
from sm3fn.transforms.scaling import scale, scale_by_learning_rate, scale_by_schedule
from sm3fn.transforms.sm3 import scale_by_sm3

__all__ = [
    "apply_if_finite",
    "chain",
    "named_chain",
    "ema",
    "trace",
    "scale",
    "scale_by_learning_rate",
    "scale_by_schedule",
    "scale_by_sm3",
]
