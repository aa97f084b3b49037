"""The spec layer alone (no TensorFlow): rounding, compound scaling, exact counts vs REFERENCE.md."""
import pytest

from edge_effnet.errors import UserError
from edge_effnet.model.scaling import compound, count_macs, count_params, flops_factor, plan, round_filters, round_repeats
from edge_effnet.model.variants import get_variant, resolve_spec

# REFERENCE.md: keras.applications parameter counts (include_top, 1000 classes) and computed MACs.
KERAS_PARAMS = {"b0": 5_330_571, "b1": 7_856_239, "b2": 9_177_569, "b3": 12_320_535, "b4": 19_466_823,
                "b5": 30_562_527, "b6": 43_265_143, "b7": 66_658_687}
REFERENCE_MACS = {"b0": 0.386e9, "b1": 0.687e9, "b2": 0.994e9, "b3": 1.827e9, "b4": 4.394e9, "b5": 10.266e9,
                  "b6": 19.068e9, "b7": 37.746e9}
# The paper's Table 2 "FLOPS" column (rounded): ours differ by -1.9% (B1) .. +4.6% (B4), as the README says.
PAPER_FLOPS = {"b0": 0.39e9, "b1": 0.70e9, "b2": 1.0e9, "b3": 1.8e9, "b4": 4.2e9, "b5": 9.9e9, "b6": 19e9, "b7": 37e9}
# REFERENCE.md: stem/head and (channels, repeats) of stages 1..7.
STAGES = {
    "b0": (32, 1280, "16x1, 24x2, 40x2, 80x3, 112x3, 192x4, 320x1"),
    "b1": (32, 1280, "16x2, 24x3, 40x3, 80x4, 112x4, 192x5, 320x2"),
    "b2": (32, 1408, "16x2, 24x3, 48x3, 88x4, 120x4, 208x5, 352x2"),
    "b3": (40, 1536, "24x2, 32x3, 48x3, 96x5, 136x5, 232x6, 384x2"),
    "b4": (48, 1792, "24x2, 32x4, 56x4, 112x6, 160x6, 272x8, 448x2"),
    "b5": (48, 2048, "24x3, 40x5, 64x5, 128x7, 176x7, 304x9, 512x3"),
    "b6": (56, 2304, "32x3, 40x6, 72x6, 144x8, 200x8, 344x11, 576x3"),
    "b7": (64, 2560, "32x4, 48x7, 80x7, 160x10, 224x10, 384x13, 640x4"),
}


def test_round_filters_official_rule():
    assert round_filters(32, 1.0) == 32
    assert round_filters(32, 1.1) == 32  # 35.2 -> 32 (within 10%)
    assert round_filters(40, 1.1) == 48  # 44 -> 48
    assert round_filters(16, 1.2) == 24  # 19.2 -> 16 is < 0.9 * 19.2, so + 8
    assert round_filters(1, 0.1) == 8  # never below the divisor
    assert round_repeats(3, 1.1) == 4 and round_repeats(1, 1.0) == 1


def test_compound_scaling_formula():
    width, depth, res = compound(1.0)
    assert (width, depth, res) == (pytest.approx(1.1), pytest.approx(1.2), 258)
    width, depth, res = compound(2.0, alpha=1.3, beta=1.05, gamma=1.1)
    assert width == pytest.approx(1.05 ** 2) and depth == pytest.approx(1.69) and res == round(224 * 1.21)
    assert flops_factor(1.2, 1.1, 1.15) == pytest.approx(1.92, abs=0.005)
    with pytest.raises(UserError):
        compound(1.0, alpha=0.9)


@pytest.mark.parametrize("name", sorted(KERAS_PARAMS))
def test_b_series_params_and_macs_match_reference(name):
    spec = get_variant(name)
    assert count_params(spec) == KERAS_PARAMS[name]
    assert count_macs(spec) == pytest.approx(REFERENCE_MACS[name], rel=0.01)
    assert -0.019 - 1e-3 <= count_macs(spec) / PAPER_FLOPS[name] - 1 <= 0.046 + 1e-3


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_channels_and_repeats(name):
    stem, head, stages = STAGES[name]
    p = plan(get_variant(name))
    assert (p.stem_filters, p.head_filters) == (stem, head)
    got = []
    for stage in range(1, 8):
        blocks = [b for b in p.blocks if b.name.startswith(f"block{stage}")]
        got.append(f"{blocks[0].filters_out}x{len(blocks)}")
    assert ", ".join(got) == stages


def test_lite_keeps_stem_head_and_end_stage_repeats():
    p = plan(get_variant("lite4"))  # width 1.4, depth 1.8
    assert (p.stem_filters, p.head_filters) == (32, 1280)
    assert sum(b.name.startswith("block1") for b in p.blocks) == 1
    assert sum(b.name.startswith("block7") for b in p.blocks) == 1
    assert sum(b.name.startswith("block2") for b in p.blocks) == 4  # ceil(2 * 1.8)
    assert all(b.se_filters == 0 for b in p.blocks)


def test_edgetpu_fused_stages_and_classes():
    spec = get_variant("edgetpu-s")
    p = plan(spec)
    assert spec.num_classes == 1001 and spec.activation == "relu"
    fused = [b for b in p.blocks if b.fused]
    assert len(fused) == 1 + 2 + 4 and all(b.name[5] in "123" for b in fused)
    first = p.blocks[0]
    assert (first.channels_in, first.expanded, first.filters_out, first.residual) == (32, 96, 24, False)


def test_resolve_spec_rules():
    assert resolve_spec(variant="B1").name == "b1"
    assert resolve_spec(variant="efficientnet-b3").resolution == 300
    assert resolve_spec(variant="b0", resolution=160).resolution == 160
    assert resolve_spec(phi=1.0).width == pytest.approx(1.1)
    assert resolve_spec(width=1.1, depth=1.2, resolution=260).resolution == 260
    for bad in (dict(variant="b0", phi=1.0), dict(phi=1.0, width=1.1), dict(), dict(variant="b0", alpha=1.3),
                dict(width=0, depth=1.0), dict(width=1.0, depth=1.0, resolution=0), dict(variant="b0", resolution=-5),
                dict(phi=-1.0)):
        with pytest.raises(UserError):
            resolve_spec(**bad)


def test_unknown_variant_suggests_close_names():
    with pytest.raises(UserError, match="did you mean .*lite0"):
        get_variant("lite00")
