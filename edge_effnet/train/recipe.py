"""The training recipe's settings as data (standard library only: the CLI validates with it).

Paper section 5.2 and the official code: RMSProp (rho 0.9, momentum 0.9, epsilon 1e-3), BatchNorm
momentum 0.99, weight decay 1e-5, learning rate 0.016 per 256 images with warm-up and x0.97 every
2.4 epochs, label smoothing 0.1, stochastic depth with survival 0.8. train.py applies them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import UserError
from ..limits import check_all

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
        check_all(epochs=self.epochs, batch_size=self.batch_size, validation_split=self.validation_split,
                  learning_rate=self.learning_rate, seed=self.seed)
        if self.strategy not in STRATEGIES:
            raise UserError(f"unknown strategy {self.strategy!r} (choose from {', '.join(STRATEGIES)})")


def checkpoint_dir_for(output: str) -> str:
    return (output[:-len(".keras")] if output.endswith(".keras") else output) + ".ckpt"


def history_path_for(output: str) -> str:
    return (output[:-len(".keras")] if output.endswith(".keras") else output) + ".history.json"


def check_outputs(output: str, resume: bool = False, force: bool = False) -> None:
    """`train`'s three outputs before any work: OUT.keras and OUT.history.json (new, or replaced with
    --force), and OUT.ckpt (only a checkpoint folder of ours is resumed or, with --force, discarded)."""
    from ..fsutil import check_output

    check_output(output, force, ".keras")
    check_output(history_path_for(output), force, ".json")
    checkpoint = checkpoint_dir_for(output)
    if os.path.lexists(checkpoint):
        check_output(checkpoint, True, "checkpoint")  # refuses a folder that is not a checkpoint
        if not (resume or force):
            raise UserError(f"{checkpoint} holds an interrupted run; pass --resume to continue it "
                            "or --force to start over")
    elif resume:
        raise UserError(f"nothing to resume: no checkpoint at {checkpoint}")


def click_options(f):
    """The recipe's options of `train` and `search` (click, imported here only by the CLI); the
    defaults are TrainConfig's, the ranges limits.RANGES', so CLI and library cannot drift."""
    import click

    from ..limits import option_type as N

    d = TrainConfig()
    opts = [
        click.option("--epochs", type=N("epochs"), default=d.epochs, show_default=True),
        click.option("--batch-size", type=N("batch_size"), default=d.batch_size, show_default=True,
                     help="Global batch (split over the replicas of --strategy)."),
        click.option("--learning-rate", type=N("learning_rate"), help="Peak learning rate (default 0.016 x batch / 256)."),
        click.option("--validation-split", type=N("validation_split"), default=d.validation_split, show_default=True,
                     help="Fraction of every class held out for evaluation."),
        click.option("--no-augment", is_flag=True, help="Train without the shift/zoom/rotation augmentation."),
        click.option("--seed", type=N("seed"), default=d.seed, show_default=True),
        click.option("--strategy", type=click.Choice(STRATEGIES), default=d.strategy, show_default=True,
                     help="tf.distribute strategy: mirrored = all GPUs of this host, multi-worker = the hosts "
                          "in TF_CONFIG."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def config_from(opts: dict, **extra) -> TrainConfig:
    """The TrainConfig of the CLI's keyword arguments (popped from `opts`), checked."""
    names = ("epochs", "batch_size", "learning_rate", "validation_split", "seed", "strategy")
    config = TrainConfig(augment=not opts.pop("no_augment"), **{k: opts.pop(k) for k in names}, **extra)
    config.check()
    return config
