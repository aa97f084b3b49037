"""int8 weight preparation (edge_effnet.quantize) on a small model with real photos: the promises
it makes (kernels on the converter's grid, lower layer error, float channel means kept) and the
result through the real TFLite converter."""
import numpy as np
import pytest

from edge_effnet.evaluate import photoset
from edge_effnet.model.variants import from_scaling


@pytest.fixture(scope="module")
def small():
    """A small B-family model (SE convs with biases, swish) with random weights and BatchNorm
    statistics from photos (models.data_init), so its activations and logits look trained; the
    classifier gives logits (a softmax would hide small differences)."""
    import keras

    from edge_effnet.model.keras_io import create_model, data_init

    keras.utils.set_random_seed(0)
    spec = from_scaling(0.25, 0.25, 64, family="efficientnet")
    model = create_model(spec, batch_size=1, dropout=0.0, drop_connect=0.0)
    calib = photoset.render(photoset.calibration_crops(32), 64)
    data_init(model, calib)
    model.layers[-1].activation = keras.activations.linear
    return model, calib[:16], photoset.render(photoset.evaluation_crops(24), 64)


def test_prepared_kernels_sit_on_the_converters_int8_grid(small):
    from edge_effnet.export.quantize import LEVELS, folded_rows, int8_targets, prepare_int8

    model, calib, _ = small
    prepared = prepare_int8(model, calib, "gptq", progress_label=None)
    targets = int8_targets(prepared)
    kinds = {layer.__class__.__name__ for layer, _ in targets}
    assert kinds == {"Conv2D", "DepthwiseConv2D", "Dense"} and len(targets) >= 20
    changed = 0
    for layer, bn in targets:
        rows = folded_rows(layer, bn)
        scale = np.abs(rows).max(axis=-1, keepdims=True) / LEVELS
        levels = rows / np.where(scale == 0, 1, scale)
        # the converter recomputes max|w| / 127 and rounds: it must find exactly these weights
        assert np.abs(levels - np.round(levels)).max() < 2e-3, layer.name
        assert np.all(np.abs(np.round(levels)).max(axis=-1)[scale[..., 0] > 0] == LEVELS), layer.name
        before = folded_rows(model.get_layer(layer.name), bn and model.get_layer(bn.name))
        changed += not np.allclose(np.round(before / scale) * scale, rows, atol=1e-6 * np.abs(rows).max())
    assert changed >= len(targets) // 2  # GPTQ rounds differently from nearest in most layers


def test_gptq_lowers_each_layers_output_error(small):
    from edge_effnet.export.quantize import folded_rows, gptq, int8_targets, layer_statistics, nearest

    model, calib, _ = small
    targets = [t for t in int8_targets(model) if t[1] is not None]  # conv / depthwise with BatchNorm
    _, grams = layer_statistics(model, targets, calib)
    better = 0
    for (layer, bn), gram in zip(targets, grams):
        rows = folded_rows(layer, bn)

        def error(q):  # E ||(q - w) x||^2 over the layer's real input patches
            d = q - rows
            return float(np.einsum("grk,gkl,grl->", d, gram, d))
        e_gptq, e_nearest = error(gptq(rows, gram)), error(nearest(rows))
        assert e_gptq <= e_nearest * 1.05, layer.name
        better += e_gptq < 0.9 * e_nearest
    assert better >= len(targets) // 2


def test_bias_correction_keeps_float_channel_means(small):
    """Each corrected layer, given the float model's inputs, has the float model's channel means."""
    import keras

    from edge_effnet.export.quantize import int8_targets, prepare_int8

    model, calib, _ = small
    prepared = prepare_int8(model, calib, "bias", progress_label=None)
    pairs = [(layer, bn) for layer, bn in int8_targets(model) if bn is not None]
    inputs = keras.Model(model.inputs, [layer.input for layer, _ in pairs])(calib.astype(np.float32))
    worst_before = worst_after = 0.0
    for (layer, bn), x in zip(pairs, inputs):
        def means(m):
            y = m.get_layer(bn.name)(m.get_layer(layer.name)(x), training=False)
            return np.asarray(y).reshape(-1, y.shape[-1]).mean(0)
        want, after = means(model), means(prepared)
        scale = np.abs(want).max() + 1
        worst_after = max(worst_after, np.abs(after - want).max() / scale)
        bn_p = prepared.get_layer(bn.name)
        beta_shift = np.abs(bn_p.get_weights()[1] - bn.get_weights()[1]).max()
        worst_before = max(worst_before, beta_shift / scale)
    assert worst_after < 1e-3 < worst_before  # the correction moved betas, and the means hold


def test_prepared_int8_follows_the_float_model_more_closely(small, tmp_path):
    """Through the real converter and LiteRT: GPTQ + bias correction beats the converter's own rounding.
    int16x8 (int16 activations, int8 weights) so that the weights' error is what shows."""
    from edge_effnet.export.formats import MODES
    from edge_effnet.export.tflite import convert
    from edge_effnet.export.quantize import prepare_int8
    from edge_effnet.runtime import open_model

    model, calib, held_out = small
    want = np.asarray(model(held_out.astype(np.float32), training=False))
    errors = {}
    for correction in ("none", "gptq"):
        data = convert(prepare_int8(model, calib, correction, progress_label=None), MODES["int16x8"], "float32", calib)
        path = tmp_path / f"{correction}.tflite"
        path.write_bytes(data)
        runner = open_model(str(path))
        got = np.concatenate([runner.run(x[None].astype(np.float32)) for x in held_out])
        errors[correction] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    assert errors["gptq"] < 0.9 * errors["none"], errors  # measured: 0.18 vs 0.23 relative error
