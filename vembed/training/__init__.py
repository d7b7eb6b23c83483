"""Training: the accelerate loop, checkpoints and exact resume."""

from vembed.training.checkpoint import latest_checkpoint, verify_checkpoint
from vembed.training.loop import TrainResult, train

__all__ = ["TrainResult", "latest_checkpoint", "train", "verify_checkpoint"]
