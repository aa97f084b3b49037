"""Fold the input normalization into the stem convolution: same function, faster file.

The B-series graphs start with Rescaling(1/255) and a per-channel Normalization (ImageNet mean
and std). Converted as they are, these are two per-channel broadcast ops on the full-size input
that XNNPACK runs slowly: measured here on one core, 1.0 ms of B0's 4.4 ms int8 latency (0.7 ms
in fp32), where a scalar rescale (the Lite family's) costs nothing.

Both are affine per channel, y = a*x + b, and the stem convolution is linear, so
conv(W, pad0(a*x + b)) = conv(W*a, pad_m(x)) + sum(W*b), where pad_m pads the raw pixels with
m = -b/a (the mean: the value a*x + b maps to 0, i.e. what zero padding meant). The rewritten
graph pads raw pixels with constant rows and columns (CONCATENATION, a copy) and convolves
with the scaled kernel and a bias: exact in float; in int8 the padding constant is rounded to
a whole pixel value (only the last row and column of the stem read it).
"""
from __future__ import annotations

import keras  # imported by export code after models.import_keras()
import numpy as np
from keras import ops

FOLDED = "input normalization folded into the stem convolution (raw pixels padded with the mean)"


def _affine_chain(model):
    """The Rescaling / Normalization layers right after the input, as (layers, a, b) with
    y = a*x + b per channel, and the layer they feed; None if the graph does not start so."""
    layer = model.layers[0]
    if len(model.inputs) != 1 or not isinstance(layer, keras.layers.InputLayer):
        return None
    channels = int(model.inputs[0].shape[-1])
    a, b, chain = np.ones(channels), np.zeros(channels), []
    while True:
        nodes = layer._outbound_nodes
        if len(nodes) != 1:
            return None
        layer = nodes[0].operation
        if isinstance(layer, keras.layers.Rescaling):
            scale, offset = np.broadcast_to(layer.scale, channels), np.broadcast_to(layer.offset, channels)
        elif isinstance(layer, keras.layers.Normalization) and layer.axis in ((3,), (-1,)):
            std = np.sqrt(np.maximum(np.asarray(layer.variance).reshape(-1), keras.backend.epsilon()))
            scale, offset = 1.0 / std, -np.asarray(layer.mean).reshape(-1) / std
        else:
            return (chain, a, b, layer) if chain else None
        a, b = a * scale, b * scale + offset
        chain.append(layer)


def fold_input_normalization(model):
    """(model, note): a copy computing the same function with the input normalization folded into
    the stem convolution (see module doc), or the model itself and None when its graph does not
    start with Rescaling / Normalization -> ZeroPadding2D -> Conv2D (or the scale is not
    per-channel: then there is nothing slow to remove)."""
    found = _affine_chain(model)
    if found is None:
        return model, None
    chain, a, b, pad = found
    if np.all(a == a[0]) and np.all(b == b[0]) or not isinstance(pad, keras.layers.ZeroPadding2D) \
            or len(pad._outbound_nodes) != 1 or np.any(a == 0) or pad.data_format != "channels_last":
        return model, None
    conv = pad._outbound_nodes[0].operation
    if type(conv) is not keras.layers.Conv2D or conv.padding != "valid" or conv.groups != 1 \
            or conv.data_format != "channels_last":
        return model, None
    pad_value = -b / a

    def clone(layer):
        if layer in chain:
            return keras.layers.Identity(name=layer.name)
        if layer is pad:
            return ConstantPad(pad.padding, pad_value.tolist(), name=layer.name)
        if layer is conv:
            return keras.layers.Conv2D.from_config({**conv.get_config(), "use_bias": True})
        return layer.__class__.from_config(layer.get_config())

    folded = keras.models.clone_model(model, clone_function=clone)
    for layer in model.layers:
        if layer not in chain and layer is not conv and layer.weights:
            folded.get_layer(layer.name).set_weights(layer.get_weights())
    kernel = conv.get_weights()[0].astype(np.float64)  # (kh, kw, in, out)
    bias = np.einsum("hwio,i->o", kernel, b) + (conv.get_weights()[1] if conv.use_bias else 0.0)
    folded.get_layer(conv.name).set_weights([(kernel * a[None, None, :, None]).astype(np.float32),
                                             bias.astype(np.float32)])
    return folded, FOLDED


class ConstantPad(keras.layers.Layer):
    """ZeroPadding2D with one constant per channel instead of 0, as constant rows and columns
    concatenated to the input (static shapes: the converter keeps them as constants)."""

    def __init__(self, padding, values, **kwargs):
        super().__init__(**kwargs)
        self.padding = tuple(tuple(int(v) for v in p) for p in padding)
        self.values = [float(v) for v in values]

    def call(self, x):
        (top, bottom), (left, right) = self.padding
        value = ops.convert_to_tensor(np.asarray(self.values, np.float32).reshape(1, 1, 1, -1))
        batch = x.shape[0] if x.shape[0] is not None else ops.shape(x)[0]  # static (1) in exports: a constant

        def block(height, width):
            return ops.broadcast_to(value, (batch, height, width, len(self.values)))

        parts = [block(top, x.shape[2])] * bool(top) + [x] + [block(bottom, x.shape[2])] * bool(bottom)
        x = ops.concatenate(parts, axis=1) if len(parts) > 1 else x
        parts = [block(x.shape[1], left)] * bool(left) + [x] + [block(x.shape[1], right)] * bool(right)
        return ops.concatenate(parts, axis=2) if len(parts) > 1 else x

    def compute_output_shape(self, shape):
        (top, bottom), (left, right) = self.padding
        return (shape[0], shape[1] + top + bottom, shape[2] + left + right, shape[3])

    def get_config(self):
        return {**super().get_config(), "padding": self.padding, "values": self.values}
