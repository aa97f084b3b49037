"""The training recipe's settings as data (standard library only: the CLI validates with it).

Paper section 5.2 and the official code: RMSProp (rho 0.9, momentum 0.9, epsilon 1e-3), BatchNorm
momentum 0.99, weight decay 1e-5, learning rate 0.016 per 256 images with warm-up and x0.97 every
2.4 epochs, label smoothing 0.1, stochastic depth with survival 0.8. train.py applies them.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError

STRATEGIES = ("default", "mirrored", "multi-worker")  # tf.distribute strategies to train under


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float | None = None  # None: 0.016 per 256 images (paper: 0.256 at batch 4096)
    warmup_epochs: float | None = None  # None: min(5, epochs / 5) -- the paper's 5, shrunk for short runs
    decay_rate: float = 0.97
    decay_epochs: float = 2.4
    rho: float = 0.9
    momentum: float = 0.9
    epsilon: float = 1e-3
    weight_decay: float = 1e-5
    label_smoothing: float = 0.1
    drop_connect: float = 0.2  # stochastic depth: survival probability 0.8 at the last block
    validation_split: float = 0.2
    augment: bool = True
    freeze_backbone: bool = False
    seed: int = 0
    strategy: str = "default"  # default | mirrored (the GPUs of one host) | multi-worker (hosts from TF_CONFIG)

    def peak_learning_rate(self) -> float:
        return self.learning_rate if self.learning_rate is not None else 0.016 * self.batch_size / 256

    def warmup(self) -> float:
        return self.warmup_epochs if self.warmup_epochs is not None else min(5.0, self.epochs / 5)

    def check(self) -> None:
        """UserError for values no run can use (cheap: called before any data is read)."""
        if self.epochs < 1:
            raise UserError(f"epochs must be >= 1 (got {self.epochs})")
        if self.batch_size < 1:
            raise UserError(f"batch size must be >= 1 (got {self.batch_size})")
        if not 0 < self.validation_split < 1:
            raise UserError(f"the validation split must be between 0 and 1 (got {self.validation_split})")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise UserError(f"the learning rate must be > 0 (got {self.learning_rate})")
        if self.strategy not in STRATEGIES:
            raise UserError(f"unknown strategy {self.strategy!r} (choose from {', '.join(STRATEGIES)})")
