"""Width/depth/resolution scaling and exact parameter / multiply-add counts.

Standard library only. The builder and the counts both walk the same
`plan()`, so the analytic count and the Keras model cannot drift apart.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UserError
from .spec import ModelSpec

# Paper, section 3.3: found by grid search at phi = 1.
ALPHA, BETA, GAMMA = 1.2, 1.1, 1.15
BASE_RESOLUTION = 224


def round_filters(filters: float, width: float, divisor: int = 8) -> int:
    """Channels scaled by `width`, rounded to a multiple of `divisor` (official rule)."""
    filters *= width
    new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    if new < 0.9 * filters:  # never round down by more than 10%
        new += divisor
    return int(new)


def round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(depth * repeats))


def compound(phi: float, alpha: float = ALPHA, beta: float = BETA, gamma: float = GAMMA,
             base_resolution: int = BASE_RESOLUTION) -> tuple[float, float, int]:
    """Paper eq. 3: depth = alpha^phi, width = beta^phi, resolution = gamma^phi * base."""
    for label, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
        if not value >= 1.0:
            raise UserError(f"{label} must be >= 1 (got {value})")
    depth = alpha ** phi
    width = beta ** phi
    resolution = int(round(base_resolution * gamma ** phi))
    return width, depth, resolution


def flops_factor(alpha: float, beta: float, gamma: float) -> float:
    """How much FLOPS grow per unit of phi: alpha * beta^2 * gamma^2 (paper: ~2)."""
    return alpha * beta ** 2 * gamma ** 2


@dataclass(frozen=True)
class BlockPlan:
    """One concrete MBConv block after scaling."""

    name: str  # layer-name prefix, e.g. "block2a_" (keras.applications naming)
    kernel_size: int
    strides: int
    channels_in: int  # channels of the tensor that enters the block
    filters_in: int  # nominal input filters (drives expansion, SE and the skip rule)
    filters_out: int
    expanded: int  # channels after the expansion phase
    expand: bool  # has an expansion conv (1x1, or kxk when fused)
    se_filters: int  # 0 = no squeeze-excite
    fused: bool
    residual: bool
    drop_rate: float
    in_size: int
    out_size: int


@dataclass(frozen=True)
class Plan:
    resolution: int
    stem_filters: int
    stem_size: int
    blocks: tuple[BlockPlan, ...]
    head_filters: int


def _out(size: int, strides: int) -> int:
    return -(-size // strides)  # "same" padding


def plan(spec: ModelSpec, resolution: int | None = None) -> Plan:
    """Every concrete block of `spec` with its channels, stride and feature-map size."""
    res = resolution or spec.resolution
    if res < 32:
        raise UserError(f"resolution must be at least 32 (got {res})")
    div = spec.depth_divisor

    def filters(n: int) -> int:
        return round_filters(n, spec.width, div)

    stem = spec.stem_filters if spec.fix_stem_head else filters(spec.stem_filters)
    head = spec.head_filters if spec.fix_stem_head else filters(spec.head_filters)
    last = len(spec.blocks) - 1
    repeats = [
        b.repeats if spec.fix_first_last_repeats and i in (0, last) else round_repeats(b.repeats, spec.depth)
        for i, b in enumerate(spec.blocks)
    ]
    total = float(sum(repeats))
    size = _out(res, 2)
    stem_size = size
    channels = stem
    out: list[BlockPlan] = []
    for stage, (block, count) in enumerate(zip(spec.blocks, repeats)):
        f_in, f_out = filters(block.filters_in), filters(block.filters_out)
        for j in range(count):
            strides = block.strides if j == 0 else 1
            if j > 0:
                f_in = f_out
            expand = block.expand_ratio != 1
            expanded = f_in * block.expand_ratio if expand else channels
            se = max(1, int(f_in * block.se_ratio)) if 0 < block.se_ratio <= 1 else 0
            new_size = _out(size, strides)
            out.append(BlockPlan(
                name=f"block{stage + 1}{chr(97 + j)}_",
                kernel_size=block.kernel_size,
                strides=strides,
                channels_in=channels,
                filters_in=f_in,
                filters_out=f_out,
                expanded=expanded,
                expand=expand,
                se_filters=se,
                fused=block.fused,
                residual=block.id_skip and strides == 1 and channels == f_out,  # the real input: lite fixes the stem
                drop_rate=spec.drop_connect * len(out) / total,
                in_size=size,
                out_size=new_size,
            ))
            channels, size = f_out, new_size
    return Plan(res, stem, stem_size, tuple(out), head)


def _bn(channels: int) -> int:
    return 4 * channels  # gamma, beta, moving mean, moving variance


def count_params(spec: ModelSpec, include_top: bool = True, num_classes: int | None = None) -> int:
    """Exact parameter count of the model `builder.build_model` makes (Keras count_params)."""
    p = plan(spec)
    classes = spec.num_classes if num_classes is None else num_classes
    total = 7 if spec.preprocessing == "imagenet" else 0  # Normalization: mean, variance, count
    total += 3 * 3 * 3 * p.stem_filters + _bn(p.stem_filters)
    for b in p.blocks:
        k2 = b.kernel_size ** 2
        if b.fused and not b.expand:
            total += k2 * b.channels_in * b.filters_out + _bn(b.filters_out)
            continue
        if b.expand:
            total += (k2 if b.fused else 1) * b.channels_in * b.expanded + _bn(b.expanded)
        if not b.fused:
            total += k2 * b.expanded + _bn(b.expanded)
        if b.se_filters:
            total += b.expanded * b.se_filters + b.se_filters + b.se_filters * b.expanded + b.expanded
        total += b.expanded * b.filters_out + _bn(b.filters_out)
    last = p.blocks[-1].filters_out
    total += last * p.head_filters + _bn(p.head_filters)
    if include_top:
        total += p.head_filters * classes + classes
    return total


def count_macs(spec: ModelSpec, include_top: bool = True, num_classes: int | None = None,
               resolution: int | None = None) -> int:
    """Multiply-adds of convolutions and the classifier (the paper's "FLOPS")."""
    p = plan(spec, resolution)
    classes = spec.num_classes if num_classes is None else num_classes
    total = p.stem_size ** 2 * 9 * 3 * p.stem_filters
    for b in p.blocks:
        k2 = b.kernel_size ** 2
        hw_in, hw_out = b.in_size ** 2, b.out_size ** 2
        if b.fused and not b.expand:
            total += hw_out * k2 * b.channels_in * b.filters_out
            continue
        if b.expand:
            total += (hw_out * k2 if b.fused else hw_in) * b.channels_in * b.expanded
        if not b.fused:
            total += hw_out * k2 * b.expanded
        if b.se_filters:
            total += 2 * b.expanded * b.se_filters
        total += hw_out * b.expanded * b.filters_out
    last = p.blocks[-1]
    total += last.out_size ** 2 * last.filters_out * p.head_filters
    if include_top:
        total += p.head_filters * classes
    return total
