"""LMC and LLFC metrics: pure tensor formulas (float64) and streaming accumulators."""

from llfc.metrics.conditions import dist_com, sign_agreement, weak_additivity_distance
from llfc.metrics.cosine import (
    cosine_distance,
    normalized_distance,
    scale_coef,
    whole_cosine_distance,
)
from llfc.metrics.lmc import barriers, entezari_barrier, frankle_error_barrier
from llfc.metrics.streaming import RunningMoments, RunningSum

__all__ = [
    "RunningMoments",
    "RunningSum",
    "barriers",
    "cosine_distance",
    "dist_com",
    "entezari_barrier",
    "frankle_error_barrier",
    "normalized_distance",
    "scale_coef",
    "sign_agreement",
    "weak_additivity_distance",
    "whole_cosine_distance",
]
