"""One Keras 3 builder for every family (B-series, Lite, EdgeTPU).

Layer names and creation order follow keras.applications.efficientnet
(`stem_conv`, `block2b_expand_conv`, `top_conv`, `predictions`, ...), so the
weight files keras.applications uses load into the B-series models unchanged.
"""
from __future__ import annotations

import sys

import keras
import numpy as np
from keras import layers

from .scaling import BlockPlan, plan
from .spec import IMAGENET_MEAN, IMAGENET_STD, ModelSpec

# keras.applications' initializers (variance scaling, as the official TF code).
CONV_INIT = {"class_name": "VarianceScaling",
             "config": {"scale": 2.0, "mode": "fan_out", "distribution": "truncated_normal"}}
DENSE_INIT = {"class_name": "VarianceScaling",
              "config": {"scale": 1.0 / 3.0, "mode": "fan_out", "distribution": "uniform"}}



def correct_pad(size: int, kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """TF-style asymmetric 'same' padding for stride 2 (as keras imagenet_utils.correct_pad)."""
    adjust = 1 - size % 2
    half = kernel_size // 2
    return ((half - adjust, half), (half - adjust, half))


def _conv_bn(x, filters, kernel_size, strides, activation, prefix, conv="conv", bn="bn", act="activation"):
    if strides == 2:
        x = layers.ZeroPadding2D(correct_pad(x.shape[1], kernel_size), name=f"{prefix}{conv}_pad")(x)
    x = layers.Conv2D(filters, kernel_size, strides=strides, padding="valid" if strides == 2 else "same",
                      use_bias=False, kernel_initializer=CONV_INIT, name=f"{prefix}{conv}")(x)
    x = layers.BatchNormalization(axis=3, name=f"{prefix}{bn}")(x)
    if activation:
        x = layers.Activation(activation, name=f"{prefix}{act}")(x)
    return x


def mbconv(inputs, b: BlockPlan, activation: str):
    """MBConv (1x1 expand, depthwise, optional squeeze-excite, 1x1 project) or its fused form."""
    p = b.name
    if b.fused and not b.expand:
        x = _conv_bn(inputs, b.filters_out, b.kernel_size, b.strides, activation, p, "fused_conv", "fused_bn",
                     "fused_activation")
    else:
        x = inputs
        if b.fused:
            x = _conv_bn(x, b.expanded, b.kernel_size, b.strides, activation, p, "fused_conv", "fused_bn",
                         "fused_activation")
        elif b.expand:
            x = _conv_bn(x, b.expanded, 1, 1, activation, p, "expand_conv", "expand_bn", "expand_activation")
        if not b.fused:
            if b.strides == 2:
                x = layers.ZeroPadding2D(correct_pad(x.shape[1], b.kernel_size), name=f"{p}dwconv_pad")(x)
            x = layers.DepthwiseConv2D(b.kernel_size, strides=b.strides,
                                       padding="valid" if b.strides == 2 else "same", use_bias=False,
                                       depthwise_initializer=CONV_INIT, name=f"{p}dwconv")(x)
            x = layers.BatchNormalization(axis=3, name=f"{p}bn")(x)
            x = layers.Activation(activation, name=f"{p}activation")(x)
        if b.se_filters:
            se = layers.GlobalAveragePooling2D(name=f"{p}se_squeeze")(x)
            se = layers.Reshape((1, 1, b.expanded), name=f"{p}se_reshape")(se)
            se = layers.Conv2D(b.se_filters, 1, padding="same", activation=activation,
                               kernel_initializer=CONV_INIT, name=f"{p}se_reduce")(se)
            se = layers.Conv2D(b.expanded, 1, padding="same", activation="sigmoid",
                               kernel_initializer=CONV_INIT, name=f"{p}se_expand")(se)
            x = layers.multiply([x, se], name=f"{p}se_excite")
        x = _conv_bn(x, b.filters_out, 1, 1, None, p, "project_conv", "project_bn")
    if b.residual:
        if b.drop_rate > 0:
            x = layers.Dropout(b.drop_rate, noise_shape=(None, 1, 1, 1), name=f"{p}drop")(x)
        x = layers.add([x, inputs], name=f"{p}add")
    return x


def set_normalization(layer, mean, variance) -> None:
    """Set a Normalization layer's statistics; finalize_state makes its call() use them."""
    count = layer.get_weights()[2]
    layer.set_weights([np.asarray(mean, np.float32), np.asarray(variance, np.float32), count])
    layer.finalize_state()


def preprocessing_layers(x, kind: str):
    """Raw 0..255 RGB in; the network's normalization inside the graph."""
    if kind == "imagenet":
        x = layers.Rescaling(1.0 / 255.0)(x)
        norm = layers.Normalization(axis=3)
        x = norm(x)
        # keras.applications leaves these at 0/1 until weights load; we set ImageNet's
        # statistics so a fresh model has the documented input contract too.
        set_normalization(norm, IMAGENET_MEAN, np.square(IMAGENET_STD))
        return x
    if kind == "lite":
        return layers.Rescaling(1.0 / 128.0, offset=-127.0 / 128.0)(x)
    raise ValueError(f"unknown preprocessing {kind!r}")


def build_model(spec: ModelSpec, *, include_top: bool = True, num_classes: int | None = None,
                resolution: int | None = None, batch_size: int | None = None, dropout: float | None = None,
                drop_connect: float | None = None, preprocessing: bool = True, pooling: str | None = None,
                classifier_activation: str | None = "softmax") -> keras.Model:
    """Build `spec` as a functional Keras model (input: RGB pixels 0..255, NHWC).

    batch_size fixes the batch dimension; exports use 1 so converted graphs are static.
    """
    # Keras walks the functional graph recursively; l2 (~150 blocks) needs more than the default 1000.
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    if drop_connect is not None:
        spec = spec.with_options(drop_connect=drop_connect)
    p = plan(spec, resolution)
    classes = spec.num_classes if num_classes is None else num_classes
    rate = spec.dropout if dropout is None else dropout
    inputs = layers.Input(shape=(p.resolution, p.resolution, 3), batch_size=batch_size)
    x = preprocessing_layers(inputs, spec.preprocessing) if preprocessing else inputs
    x = _conv_bn(x, p.stem_filters, 3, 2, spec.activation, "stem_", "conv", "bn", "activation")
    for block in p.blocks:
        x = mbconv(x, block, spec.activation)
    x = _conv_bn(x, p.head_filters, 1, 1, spec.activation, "top_", "conv", "bn", "activation")
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        if rate > 0:
            x = layers.Dropout(rate, name="top_dropout")(x)
        x = layers.Dense(classes, activation=classifier_activation, kernel_initializer=DENSE_INIT,
                         name="predictions")(x)
    elif pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif pooling == "max":
        x = layers.GlobalMaxPooling2D(name="max_pool")(x)
    name = spec.name.replace(".", "_")
    return keras.Model(inputs, x, name=f"efficientnet_{name}".replace("-", "_"))
