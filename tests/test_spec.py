import pytest

from edge_effnet.errors import UserError
from edge_effnet.model.spec import BlockSpec, decode_block, encode_block
from edge_effnet.model.variants import B0_BLOCKS, EDGETPU_BLOCKS


@pytest.mark.parametrize("text", B0_BLOCKS + EDGETPU_BLOCKS)
def test_block_strings_round_trip(text):
    assert encode_block(decode_block(text)) == text


def test_decode_fields():
    assert decode_block("r2_k5_s22_e6_i24_o40_se0.25") == BlockSpec(
        repeats=2, kernel_size=5, strides=2, expand_ratio=6, filters_in=24, filters_out=40, se_ratio=0.25)
    fused = decode_block("r1_k3_s11_e4_i24_o24_c1_noskip")
    assert fused.fused and not fused.id_skip and fused.se_ratio == 0


@pytest.mark.parametrize("bad", ["r1_k3_s12_e1_i32_o16", "r1_k3_e1_i32_o16", "r1_x3_s11_e1_i32_o16"])
def test_decode_rejects_bad_strings(bad):
    with pytest.raises(UserError):
        decode_block(bad)
