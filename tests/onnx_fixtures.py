"""Real photos and informative random-weight models for the ONNX tests.

A freshly initialised network gives nearly constant outputs (batch norm with unit statistics
shrinks every activation), so float-vs-int8 figures on it would mean nothing. settle_batchnorm sets
every batch-norm layer's statistics to those of real photos (data-dependent initialisation): the
outputs then vary from photo to photo as a trained model's do.
"""
from __future__ import annotations

import numpy as np


def photos(resolution: int, count: int = 16) -> np.ndarray:
    """uint8 (count, resolution, resolution, 3) crops of scikit-image's photographs (edge_effnet.photoset)."""
    from edge_effnet.evaluate.photoset import calibration_crops, render

    return render(calibration_crops(count), resolution)


def settle_batchnorm(model, x: np.ndarray) -> None:
    """Set every BatchNormalization's moving statistics to the batch statistics of `x`, in one pass."""
    import keras

    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in norms:
        layer.momentum = 0.0
    model(np.asarray(x, np.float32), training=True)
    for layer in norms:
        layer.momentum = 0.99
