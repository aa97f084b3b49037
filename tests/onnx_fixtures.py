"""Real photos and informative random-weight models for the ONNX tests.

A freshly initialised network gives nearly constant outputs (batch norm with unit statistics
shrinks every activation), so float-vs-int8 figures on it would mean nothing. settle_batchnorm sets
every batch-norm layer's statistics to those of real photos (data-dependent initialisation): the
outputs then vary from photo to photo as a trained model's do.
"""
from __future__ import annotations

import os

import numpy as np

from conftest import photo_path

PHOTOS = ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "motorcycle_left.png", "horse.png",
          "hubble_deep_field.jpg", "retina.jpg", "immunohistochemistry.png", "logo.png", "brick.png",
          "grass.png", "gravel.png", "color.png", "page.png", "coins.png")


def photos(resolution: int) -> np.ndarray:
    """uint8 (N, resolution, resolution, 3) center crops of scikit-image's photos."""
    from edge_effnet.data import load_image

    folder = os.path.dirname(photo_path())
    paths = [os.path.join(folder, name) for name in PHOTOS if os.path.exists(os.path.join(folder, name))]
    return np.stack([load_image(p, resolution) for p in paths])


def settle_batchnorm(model, x: np.ndarray) -> None:
    """Set every BatchNormalization's moving statistics to the batch statistics of `x`, in one pass."""
    import keras

    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in norms:
        layer.momentum = 0.0
    model(np.asarray(x, np.float32), training=True)
    for layer in norms:
        layer.momentum = 0.99
