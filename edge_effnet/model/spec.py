"""Model specifications as plain data: block specs, model specs, block strings.

Standard library only: this module is imported by `edge-effnet --help` and
`edge-effnet variants`, which must never pull in TensorFlow.

Block strings follow the official EfficientNet code (tensorflow/tpu), e.g.
``r2_k3_s22_e6_i16_o24_se0.25``: repeats, kernel, strides, expand ratio,
input and output filters, squeeze-excite ratio; ``c1`` marks a fused MBConv
(full kxk expansion conv instead of 1x1 + depthwise) and ``noskip`` drops the
residual connection.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from ..errors import UserError

# Input contract of every exported model: raw RGB pixels 0..255; the graph normalizes
# (x - mean) / std per channel. "imagenet" is keras.applications' B-series (torchvision
# statistics scaled to 0..255); "lite" is the official Lite/EdgeTPU (x - 127) / 128.
PREPROCESSING = {
    "imagenet": {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]},
    "lite": {"mean": [127.0, 127.0, 127.0], "std": [128.0, 128.0, 128.0]},
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_TOKEN = re.compile(r"^(r|k|s|e|i|o|se|c)(\d+(?:\.\d+)?)$")


@dataclass(frozen=True)
class BlockSpec:
    """One stage of MBConv blocks, before width/depth scaling."""

    repeats: int
    kernel_size: int
    strides: int
    expand_ratio: int
    filters_in: int
    filters_out: int
    se_ratio: float = 0.0
    id_skip: bool = True
    fused: bool = False


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build, count and export one network."""

    name: str
    family: str
    width: float
    depth: float
    resolution: int
    dropout: float
    blocks: tuple[BlockSpec, ...]
    activation: str = "swish"
    stem_filters: int = 32
    head_filters: int = 1280
    fix_stem_head: bool = False
    fix_first_last_repeats: bool = False
    num_classes: int = 1000
    drop_connect: float = 0.2
    preprocessing: str = "imagenet"
    depth_divisor: int = 8
    phi: float | None = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def with_options(self, **changes) -> "ModelSpec":
        return replace(self, **changes)


def decode_block(text: str) -> BlockSpec:
    """Parse an official block string into a BlockSpec."""
    values: dict[str, str] = {}
    id_skip = True
    for token in text.strip().split("_"):
        if token == "noskip":
            id_skip = False
            continue
        match = _TOKEN.match(token)
        if not match:
            raise UserError(f"bad token {token!r} in block string {text!r}")
        values[match.group(1)] = match.group(2)
    missing = {"r", "k", "s", "e", "i", "o"} - values.keys()
    if missing:
        raise UserError(f"block string {text!r} lacks {', '.join(sorted(missing))}")
    strides = values["s"]
    if len(strides) != 2 or strides[0] != strides[1]:
        raise UserError(f"block string {text!r}: only square strides (s11, s22) are supported")
    return BlockSpec(
        repeats=int(values["r"]),
        kernel_size=int(values["k"]),
        strides=int(strides[0]),
        expand_ratio=int(values["e"]),
        filters_in=int(values["i"]),
        filters_out=int(values["o"]),
        se_ratio=float(values.get("se", 0.0)),
        id_skip=id_skip,
        fused=values.get("c", "0") == "1",
    )


def encode_block(block: BlockSpec) -> str:
    """Inverse of decode_block."""
    parts = [
        f"r{block.repeats}",
        f"k{block.kernel_size}",
        f"s{block.strides}{block.strides}",
        f"e{block.expand_ratio}",
        f"i{block.filters_in}",
        f"o{block.filters_out}",
    ]
    if block.se_ratio:
        parts.append(f"se{block.se_ratio:g}")
    if block.fused:
        parts.append("c1")
    if not block.id_skip:
        parts.append("noskip")
    return "_".join(parts)


def spec_to_dict(spec: ModelSpec) -> dict:
    """JSON-friendly description (blocks as strings), e.g. for manifests."""
    return {
        "name": spec.name,
        "family": spec.family,
        "phi": spec.phi,
        "width": spec.width,
        "depth": spec.depth,
        "resolution": spec.resolution,
        "dropout": spec.dropout,
        "drop_connect": spec.drop_connect,
        "activation": spec.activation,
        "num_classes": spec.num_classes,
        "stem_filters": spec.stem_filters,
        "head_filters": spec.head_filters,
        "fix_stem_head": spec.fix_stem_head,
        "fix_first_last_repeats": spec.fix_first_last_repeats,
        "preprocessing": spec.preprocessing,
        "blocks": [encode_block(b) for b in spec.blocks],
    }
