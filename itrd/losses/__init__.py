"""Distillation losses (ITRD and its baselines) and the registry of training methods built from them."""

from itrd.losses.crd import CRDLoss, nce_loss
from itrd.losses.itrd import DEFAULT_EPS, ITRDLoss, ITRDOutput, correlation_loss, mutual_information_loss
from itrd.losses.kd import KDLoss
from itrd.losses.methods import (
    Batch,
    Method,
    MethodOutput,
    build_method,
    method_defaults,
    method_names,
    method_needs_teacher,
)

__all__ = [
    "DEFAULT_EPS",
    "Batch",
    "CRDLoss",
    "ITRDLoss",
    "ITRDOutput",
    "KDLoss",
    "Method",
    "MethodOutput",
    "build_method",
    "correlation_loss",
    "method_defaults",
    "method_names",
    "method_needs_teacher",
    "mutual_information_loss",
    "nce_loss",
]
