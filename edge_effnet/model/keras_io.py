"""Keras model objects from specs or files: build + weights, save atomically, load .keras files."""
from __future__ import annotations


from ..console import import_keras
from ..errors import UserError
from ..fsutil import atomic_file
from .spec import ModelSpec


def create_model(spec: ModelSpec, weights: str | None = None, *, include_top: bool = True,
                 num_classes: int | None = None, **build_kwargs):
    """build_model(spec) with `weights` loaded (none | imagenet | PATH | torch:PATH)."""
    from ..limits import check_all

    check_all(num_classes=num_classes, batch_size=build_kwargs.get("batch_size"))
    import_keras()
    from .builder import build_model
    from .weights import load_weights

    if weights == "imagenet" and include_top and num_classes not in (None, spec.num_classes):
        raise UserError(f"--weights imagenet needs {spec.num_classes} classes (got --num-classes {num_classes})")
    model = build_model(spec, include_top=include_top, num_classes=num_classes, **build_kwargs)
    load_weights(model, spec, weights, include_top=include_top)
    return model


def build_and_save(spec: ModelSpec, output: str, weights: str | None = None, **kwargs):
    model = create_model(spec, weights, **kwargs)
    with atomic_file(output) as tmp:
        model.save(tmp)
    return model


def load_model_file(path: str):
    """A .keras model file (saved by `edge-effnet build` or any Keras 3 code)."""
    from .weights import check_keras_file

    check_keras_file(path)
    keras = import_keras()
    try:
        return keras.models.load_model(path, compile=False)
    except Exception as exc:
        raise UserError(f"cannot load {path} as a Keras model: {str(exc).splitlines()[0]}") from None


def data_init(model, images, logit_std: float = 3.0):
    """Give a random-weight model realistic activations, for export-fidelity tests and benchmarks
    when no trained weights exist (a random EfficientNet's features vanish: its scores are uniform).

    Every BatchNormalization takes its statistics from `images` (raw pixels, one pass in training
    mode with momentum 0), then the classifier is scaled so logits have std `logit_std`. Build the
    model with dropout=0 and drop_connect=0. The model is changed in place and returned.
    """
    import numpy as np

    keras = import_keras()
    x = np.asarray(images, np.float32)
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    saved = [bn.momentum for bn in bns]
    batch_model = keras.Model(model.inputs, model.outputs) if model.inputs[0].shape[0] is None else None
    if batch_model is None:  # a batch-1 graph: rebuild the same layers on a free batch dimension
        batch_model = keras.Model.from_config(_free_batch(model.get_config()))
        batch_model.set_weights(model.get_weights())
    for bn in batch_model.layers:
        if isinstance(bn, keras.layers.BatchNormalization):
            bn.momentum = 0.0
    batch_model(x, training=True)
    model.set_weights(batch_model.get_weights())
    for bn, momentum in zip(bns, saved):
        bn.momentum = momentum
    dense = model.layers[-1]
    features = keras.Model(model.inputs, dense.input)
    feats = np.concatenate([np.asarray(features(x[i:i + 1])) for i in range(len(x))])
    kernel, bias = dense.get_weights()
    logits = feats @ kernel
    dense.set_weights([kernel * (logit_std / max(float(logits.std()), 1e-12)), bias * 0])
    return model


def _free_batch(config: dict) -> dict:
    for layer in config["layers"]:
        if layer["class_name"] == "InputLayer":
            shape = layer["config"].get("batch_shape")
            layer["config"]["batch_shape"] = [None, *shape[1:]]
    return config


def count_model_macs(model) -> int:
    """Multiply-adds of a built Keras model's convolutions and dense layers, read from its layers.

    An independent check of scaling.count_macs (which counts from the spec): the same convention
    (no bias adds, batch norm, activations or pooling).
    """
    keras = import_keras()
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.DepthwiseConv2D):  # a Conv2D subclass in some versions: test first
            h, w = layer.output.shape[1:3]
            kh, kw, channels, multiplier = layer.kernel.shape
            total += h * w * kh * kw * channels * multiplier
        elif isinstance(layer, keras.layers.Conv2D):
            h, w = layer.output.shape[1:3]
            kh, kw, channels_in, channels_out = layer.kernel.shape
            total += h * w * kh * kw * channels_in * channels_out
        elif isinstance(layer, keras.layers.Dense):
            channels_in, channels_out = layer.kernel.shape
            positions = 1
            for d in layer.output.shape[1:-1]:
                positions *= d
            total += positions * channels_in * channels_out
    return int(total)
