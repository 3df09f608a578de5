"""Pretraining PFNs on prior curves (single process or torchrun DDP)."""

from train.config import TrainConfig, load_config
from train.loop import Trainer, train

__all__ = ["TrainConfig", "Trainer", "load_config", "train"]
