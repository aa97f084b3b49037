"""The variant table (data) and the ways to name a model: variant, phi, or explicit scaling.

Standard library only. Sources: EfficientNet paper (Tan & Le 2019) and the
official tensorflow/tpu code (efficientnet_builder.py, lite/, edgetpu/).
"""
from __future__ import annotations

import difflib
from typing import NamedTuple
import math

from ..errors import UserError
from ..limits import check_all
from .scaling import ALPHA, BASE_RESOLUTION, BETA, GAMMA, compound
from .spec import ModelSpec, decode_block

B0_BLOCKS = (
    "r1_k3_s11_e1_i32_o16_se0.25",
    "r2_k3_s22_e6_i16_o24_se0.25",
    "r2_k5_s22_e6_i24_o40_se0.25",
    "r3_k3_s22_e6_i40_o80_se0.25",
    "r3_k5_s11_e6_i80_o112_se0.25",
    "r4_k5_s22_e6_i112_o192_se0.25",
    "r1_k3_s11_e6_i192_o320_se0.25",
)
EDGETPU_BLOCKS = (
    "r1_k3_s11_e4_i24_o24_c1_noskip",
    "r2_k3_s22_e8_i24_o32_c1",
    "r4_k3_s22_e8_i32_o48_c1",
    "r5_k5_s22_e8_i48_o96",
    "r4_k5_s11_e8_i96_o144",
    "r2_k5_s22_e8_i144_o192",
)


def _strip_se(block: str) -> str:
    return "_".join(t for t in block.split("_") if not t.startswith("se"))


# A family is the core builder plus named flags, each with its reason.
FAMILIES: dict[str, dict] = {
    "efficientnet": dict(
        blocks=B0_BLOCKS,
        activation="swish",
        preprocessing="imagenet",  # 0..255 RGB -> /255 -> ImageNet mean/std, as keras.applications
        num_classes=1000,
    ),
    "lite": dict(
        blocks=tuple(_strip_se(b) for b in B0_BLOCKS),  # SE is poorly supported on many edge delegates
        activation="relu6",  # bounded activation quantizes well
        fix_stem_head=True,  # stem and head are not scaled: keeps small models small
        fix_first_last_repeats=True,  # first and last stage repeats not scaled: same reason
        preprocessing="lite",  # (x - 127) / 128
        num_classes=1000,
    ),
    "edgetpu": dict(
        blocks=EDGETPU_BLOCKS,  # fused MBConv early: full 3x3 convs use the TPU's MAC array better
        activation="relu",  # swish and sigmoid are slow or unmapped on the Edge TPU
        preprocessing="lite",  # (x - 127) / 128, as the official edgetpu code
        num_classes=1001,  # official checkpoints: background class at index 0
    ),
}

class Variant(NamedTuple):
    family: str
    width: float
    depth: float
    resolution: int
    dropout: float


VARIANTS: dict[str, Variant] = {k: Variant(*row) for k, row in {  # name: family, width, depth, resolution, dropout
    "b0": ("efficientnet", 1.0, 1.0, 224, 0.2),
    "b1": ("efficientnet", 1.0, 1.1, 240, 0.2),
    "b2": ("efficientnet", 1.1, 1.2, 260, 0.3),
    "b3": ("efficientnet", 1.2, 1.4, 300, 0.3),
    "b4": ("efficientnet", 1.4, 1.8, 380, 0.4),
    "b5": ("efficientnet", 1.6, 2.2, 456, 0.4),
    "b6": ("efficientnet", 1.8, 2.6, 528, 0.5),
    "b7": ("efficientnet", 2.0, 3.1, 600, 0.5),
    "b8": ("efficientnet", 2.2, 3.6, 672, 0.5),
    "l2": ("efficientnet", 4.3, 5.3, 800, 0.5),
    "lite0": ("lite", 1.0, 1.0, 224, 0.2),
    "lite1": ("lite", 1.0, 1.1, 240, 0.2),
    "lite2": ("lite", 1.1, 1.2, 260, 0.3),
    "lite3": ("lite", 1.2, 1.4, 280, 0.3),
    "lite4": ("lite", 1.4, 1.8, 300, 0.3),
    "edgetpu-s": ("edgetpu", 1.0, 1.0, 224, 0.2),
    "edgetpu-m": ("edgetpu", 1.0, 1.1, 240, 0.2),
    "edgetpu-l": ("edgetpu", 1.2, 1.4, 300, 0.3),
}.items()}

ALIASES = {f"efficientnet-{n}": n for n in VARIANTS} | {f"efficientnet{n}": n for n in VARIANTS}


def make_spec(name: str, family: str, width: float, depth: float, resolution: int,
              dropout: float, phi: float | None = None) -> ModelSpec:
    if family not in FAMILIES:
        raise UserError(f"unknown family {family!r} (choose from {', '.join(FAMILIES)})")
    check_all(width=width, depth=depth, resolution=resolution, dropout=dropout)
    flags = dict(FAMILIES[family])
    blocks = tuple(decode_block(b) for b in flags.pop("blocks"))
    return ModelSpec(name=name, family=family, width=width, depth=depth, resolution=int(resolution),
                     dropout=dropout, blocks=blocks, phi=phi, **flags)


def get_variant(name: str) -> ModelSpec:
    """The official variant `name` (b0..b7, b8, l2, lite0..4, edgetpu-s/m/l)."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in VARIANTS:
        close = difflib.get_close_matches(key, list(VARIANTS) + list(ALIASES), n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(close)}?" if close else f"; choose from {', '.join(VARIANTS)}"
        raise UserError(f"unknown variant {name!r}{hint}")
    return make_spec(key, *VARIANTS[key])


def dropout_for_phi(phi: float) -> float:
    """Official dropout schedule: 0.2 (b0, b1), 0.3 (b2, b3), 0.4 (b4, b5), 0.5 (b6+)."""
    return min(0.5, 0.2 + 0.1 * math.floor(max(phi, 0) / 2))


def from_phi(phi: float, alpha: float = ALPHA, beta: float = BETA, gamma: float = GAMMA,
             base_resolution: int = BASE_RESOLUTION, family: str = "efficientnet") -> ModelSpec:
    """Compound scaling of the family's base network (paper eq. 3)."""
    check_all(phi=phi, alpha=alpha, beta=beta, gamma=gamma)
    width, depth, resolution = compound(phi, alpha, beta, gamma, base_resolution)
    name = f"phi{phi:g}" if (alpha, beta, gamma) == (ALPHA, BETA, GAMMA) else \
        f"phi{phi:g}-a{alpha:g}-b{beta:g}-g{gamma:g}"
    return make_spec(name, family, width, depth, resolution, dropout_for_phi(phi), phi=phi)


def from_scaling(width: float, depth: float, resolution: int, dropout: float = 0.2,
                 family: str = "efficientnet") -> ModelSpec:
    """Explicit width/depth/resolution multipliers."""
    name = f"custom-w{width:g}-d{depth:g}-r{resolution}"
    return make_spec(name, family, width, depth, resolution, dropout)


def all_variants() -> list[ModelSpec]:
    return [get_variant(n) for n in VARIANTS]


def variant_rows() -> list[dict]:
    """Every variant with its exact parameter and MAC counts (`edge-effnet variants`)."""
    from .scaling import count_macs, count_params

    return [dict(name=s.name, family=s.family, width=s.width, depth=s.depth, resolution=s.resolution,
                 dropout=s.dropout, num_classes=s.num_classes, params=count_params(s), macs=count_macs(s))
            for s in all_variants()]


def variants_table(rows: list[dict]) -> str:
    lines = [f"{'name':<10} {'family':<12} {'width':>5} {'depth':>5} {'res':>4} {'dropout':>7} "
             f"{'classes':>7} {'params':>12} {'MACs':>8}"]
    for r in rows:
        lines.append(f"{r['name']:<10} {r['family']:<12} {r['width']:>5g} {r['depth']:>5g} {r['resolution']:>4} "
                     f"{r['dropout']:>7g} {r['num_classes']:>7} {r['params']:>12,} {r['macs'] / 1e9:>7.3f}B")
    return "\n".join(lines)


def resolve_spec(variant: str | None = None, phi: float | None = None, alpha: float | None = None,
                 beta: float | None = None, gamma: float | None = None, width: float | None = None,
                 depth: float | None = None, resolution: int | None = None,
                 family: str | None = None) -> ModelSpec:
    """One spec from exactly one way of naming a model (variant | phi | width/depth/resolution)."""
    explicit = width is not None or depth is not None
    given = [label for label, on in (("--variant", variant is not None), ("--phi", phi is not None),
                                     ("--width/--depth", explicit)) if on]
    if len(given) > 1:
        raise UserError(f"{' and '.join(given)} were given together; name the model one way")
    if not given:
        raise UserError("name a model: --variant NAME, --phi X, or --width W --depth D --resolution R")
    if phi is None and any(v is not None for v in (alpha, beta, gamma)):
        raise UserError("--alpha/--beta/--gamma only apply with --phi")
    if family is not None and variant is not None:
        raise UserError("--family does not apply with --variant (the variant names its family)")
    check_all(resolution=resolution)
    if variant is not None:
        spec = get_variant(variant)
    elif phi is not None:
        spec = from_phi(phi, ALPHA if alpha is None else alpha, BETA if beta is None else beta,
                        GAMMA if gamma is None else gamma, family=family or "efficientnet")
    else:
        spec = from_scaling(1.0 if width is None else width, 1.0 if depth is None else depth,
                            BASE_RESOLUTION if resolution is None else resolution,
                            family=family or "efficientnet")
    if resolution is not None and resolution != spec.resolution:
        spec = spec.with_options(resolution=int(resolution))
    return spec
