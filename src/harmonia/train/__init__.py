"""Training: the supervised trainer, its hook points, checkpoints and logs."""

from harmonia.train.callbacks import Callback
from harmonia.train.trainer import Trainer, TrainResult, seed_everything, train

__all__ = ["Callback", "TrainResult", "Trainer", "seed_everything", "train"]
