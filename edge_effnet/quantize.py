"""Make a float Keras model quantize better: bias correction for int8 weights.

Full-integer TFLite stores each conv / depthwise / dense kernel as int8 with one scale per output
channel (BatchNorm folded in first): scale = max|w| / 127. The rounding error of those weights
shifts the mean of every output channel (Nagel et al. 2019, "Data-Free Quantization Through
Weight Equalization and Bias Correction"), and the shifts add up layer after layer. On real
photos this is what makes int8 EfficientNet-Lite change its top-1 class on ambiguous images.

`correct_bias(model, images)` measures, layer by layer in graph order, the mean of each output
channel in the float model and in a copy whose kernels are rounded the way the converter will round
them (with the corrections made so far), and moves the layer's bias (the BatchNorm beta, or the
Dense bias) by the difference. The returned model is still float, computes almost the same
function (the shifts are tiny), and converts with any TFLite mode; the int8 file then follows the
float model more closely. Calibration images are needed anyway for int8.
"""
from __future__ import annotations

import contextlib

import numpy as np

WEIGHT_LEVELS = 127  # symmetric int8 weights: [-127, 127] * scale


def _fake_quantize(w: np.ndarray, channel_axis: int) -> np.ndarray:
    axes = tuple(a for a in range(w.ndim) if a != channel_axis % w.ndim)
    scale = np.abs(w).max(axis=axes, keepdims=True) / WEIGHT_LEVELS
    scale = np.where(scale == 0, 1.0, scale)
    return np.round(w / scale) * scale


def _bn_factor(bn) -> np.ndarray:
    gamma, _, _, var = bn.get_weights()
    return gamma / np.sqrt(var + bn.epsilon)


def correctable_layers(model) -> list[tuple]:
    """(kernel layer, BatchNorm layer or None) pairs, in graph order: conv -> BN, or Dense."""
    import keras

    pairs = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.Dense):
            pairs.append((layer, None))
            continue
        if not isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)) or layer.use_bias:
            continue
        nodes = layer._outbound_nodes
        bn = nodes[0].operation if len(nodes) == 1 else None
        if isinstance(bn, keras.layers.BatchNormalization):
            pairs.append((layer, bn))
    return pairs


def _quantized_kernel(layer, bn) -> np.ndarray:
    """The kernel as the converter will store it, expressed in the unfolded layer."""
    import keras

    kernel = layer.get_weights()[0]
    if bn is None:  # Dense: (in, out), one scale per output
        return _fake_quantize(kernel, -1)
    f = _bn_factor(bn)
    if isinstance(layer, keras.layers.DepthwiseConv2D):  # (kh, kw, channels, 1)
        folded = kernel * f[None, None, :, None]
        return _fake_quantize(folded, 2) / f[None, None, :, None]
    folded = kernel * f  # Conv2D (kh, kw, in, out)
    return _fake_quantize(folded, -1) / np.where(f == 0, 1.0, f)


def _channel_means(model, outputs, images: np.ndarray, batch: int = 25) -> list[np.ndarray]:
    import keras

    probe = keras.Model(model.inputs, outputs)
    sums = None
    for i in range(0, len(images), batch):
        got = probe(images[i:i + batch].astype(np.float32), training=False)
        got = got if isinstance(got, (list, tuple)) else [got]
        s = [np.asarray(g, np.float64).reshape(-1, g.shape[-1]).sum(0) / (np.prod(g.shape[1:-1]) or 1) for g in got]
        sums = s if sums is None else [a + b for a, b in zip(sums, s)]
    return [s / len(images) for s in sums]


def correct_bias(model, images: np.ndarray, progress_label: str | None = "correcting biases"):
    """A copy of `model` whose biases compensate the mean error of int8 weights (see module doc)."""
    from .data import progress

    clone, quant = _copy(model), _copy(model)
    pairs = correctable_layers(model)
    float_means = _channel_means(model, [bn.output if bn else layer.input for layer, bn in pairs], images)
    items = list(zip(pairs, float_means))
    with progress(items, progress_label) if progress_label else contextlib.nullcontext(items) as items:
        for (layer, bn), want in items:
            q_layer = quant.get_layer(layer.name)
            c_layer = clone.get_layer(layer.name)
            weights = q_layer.get_weights()
            if bn is None:  # Dense: mean logits from the mean input, float vs rounded kernel
                kernel, bias = c_layer.get_weights()
                q_kernel = _quantized_kernel(c_layer, None)
                got_in = _channel_means(quant, [q_layer.input], images)[0]
                shift = got_in @ q_kernel - want @ kernel
                c_layer.set_weights([kernel, bias - shift])
                q_layer.set_weights([q_kernel, bias - shift])
                continue
            q_bn, c_bn = quant.get_layer(bn.name), clone.get_layer(bn.name)
            q_layer.set_weights([_quantized_kernel(c_layer, c_bn)] + weights[1:])
            got = _channel_means(quant, [q_bn.output], images)[0]
            gamma, beta, mean, var = c_bn.get_weights()
            beta = beta - (got - want)
            c_bn.set_weights([gamma, beta, mean, var])
            q_bn.set_weights([gamma, beta, mean, var])
    return clone


def _copy(model):
    import keras

    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    for layer in copy.layers:
        if isinstance(layer, keras.layers.Normalization):
            layer.finalize_state()  # set_weights alone leaves call() on the old statistics
    return copy
