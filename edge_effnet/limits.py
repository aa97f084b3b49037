"""Every number the tool takes, with its range: one table, one check, one click type.

A value outside its range (zero, negative, NaN, inf or absurdly large) is refused before any work,
with the range in the message; nothing is silently replaced by a default. The upper bounds of the
resource options (threads, classes, resolution, runs, grid) protect the machine: a 2-billion-class
classifier or 10^11 timed runs is a typo, not a request. Standard library only (+ click, lazily).
"""
from __future__ import annotations

import math
from typing import NamedTuple

from .errors import UserError


class Range(NamedTuple):
    low: float
    high: float
    integer: bool = False
    low_open: bool = False   # low itself excluded: (low, high]
    high_open: bool = False  # high itself excluded: [low, high)

    def text(self) -> str:
        fmt = (lambda v: f"{int(v):,}") if self.integer else (lambda v: f"{v:g}")
        return f"{'(' if self.low_open else '['}{fmt(self.low)}, {fmt(self.high)}{')' if self.high_open else ']'}"


MAX_RESOLUTION = 4096
RANGES: dict[str, Range] = {
    # the model (L2, the largest variant: width 4.3, depth 5.3, resolution 800, phi ~15)
    "width": Range(0, 8, low_open=True),
    "depth": Range(0, 20, low_open=True),
    "resolution": Range(32, MAX_RESOLUTION, integer=True),
    "phi": Range(0, 16),
    "alpha": Range(1, 4),
    "beta": Range(1, 4),
    "gamma": Range(1, 4),
    "dropout": Range(0, 1, high_open=True),
    "num_classes": Range(1, 100_000, integer=True),  # ImageNet-21k has 21,843
    "batch_size": Range(1, 4096, integer=True),
    # export
    "num_calib": Range(1, 10_000, integer=True),
    "num_check": Range(1, 10_000, integer=True),
    "target_agreement": Range(0, 1, low_open=True),   # --int8 mixed precision: top-1 agreement to reach
    "max_slowdown": Range(1, 100),                    # its latency budget, as a ratio to full int8
    # bench, predict, eval
    "runs": Range(1, 100_000, integer=True),
    "warmup": Range(0, 10_000, integer=True),
    "threads": Range(1, 256, integer=True),
    "cpu": Range(0, 4095, integer=True),
    "top": Range(1, 1000, integer=True),
    "limit": Range(1, 10_000_000, integer=True),
    # train
    "epochs": Range(1, 10_000, integer=True),
    "learning_rate": Range(0, 10, low_open=True),
    "validation_split": Range(0, 1, low_open=True, high_open=True),
    "seed": Range(0, 2**32 - 1, integer=True),
    # search (grid step 0.01 already gives ~10^5 points to test; candidates are trained one by one)
    "grid_step": Range(0.01, 1),
    "tolerance": Range(0, 2),
    "target_macs": Range(0, 1e15, low_open=True),
    "target_ms": Range(0, 1e6, low_open=True),
    "base_resolution": Range(32, MAX_RESOLUTION, integer=True),
    "max_candidates": Range(1, 500, integer=True),
    "latency_runs": Range(1, 100_000, integer=True),
}
MAX_GRID = RANGES["max_candidates"].high  # a search plans at most this many candidates


def problem(name: str, value) -> str | None:
    """Why `value` is no valid `name` (a RANGES key), or None when it is."""
    r = RANGES[name]
    label = name.replace("_", " ")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{label} must be a number in {r.text()} (got {value!r})"
    if not math.isfinite(value):
        return f"{label} must be a finite number in {r.text()} (got {value})"
    if r.integer and value != int(value):
        return f"{label} must be a whole number in {r.text()} (got {value:g})"
    low_ok = value > r.low if r.low_open else value >= r.low
    high_ok = value < r.high if r.high_open else value <= r.high
    if not (low_ok and high_ok):
        return f"{label} must be in {r.text()} (got {f'{value:,}' if isinstance(value, int) else f'{value:g}'})"
    return None


def check(name: str, value, optional: bool = True):
    """`value` if it is in the range of `name`; UserError otherwise. None passes when optional."""
    if value is None and optional:
        return None
    why = problem(name, value)
    if why:
        raise UserError(why)
    return value


def check_all(**values) -> None:
    """check() every keyword (name=value); None values are skipped."""
    for name, value in values.items():
        check(name, value)


def option_type(name: str):
    """A click parameter type for `name`: parses an int or float and checks its range."""
    import click

    r = RANGES[name]

    class Number(click.ParamType):
        def __init__(self):
            self.name = f"{'integer' if r.integer else 'number'} in {r.text()}"

        def convert(self, value, param, ctx):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                number = value
            else:
                try:
                    number = int(value, 10) if r.integer else float(value)
                except ValueError:
                    self.fail(f"{value!r} is not {'a whole number' if r.integer else 'a number'}; "
                              f"expected {self.name}", param, ctx)
            why = problem(name, number)
            if why:
                self.fail(why, param, ctx)
            return number

    return Number()
