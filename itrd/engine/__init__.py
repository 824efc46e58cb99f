"""The training engine: teacher training and distillation, checkpoints, resume, export."""

from itrd.engine.callbacks import CallbackList, Callbacks, NonFiniteLoss, StopRequested
from itrd.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from itrd.engine.evaluate import evaluate
from itrd.engine.hardware import resolve_device
from itrd.engine.trainer import RunDirError, Trainer, train
from itrd.engine.weights import WeightsError, read_state_dict

__all__ = [
    "CallbackList",
    "Callbacks",
    "CheckpointError",
    "NonFiniteLoss",
    "RunDirError",
    "StopRequested",
    "Trainer",
    "WeightsError",
    "evaluate",
    "load_checkpoint",
    "read_state_dict",
    "resolve_device",
    "save_checkpoint",
    "train",
]
