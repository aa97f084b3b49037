"""export/fold.py: the input normalization folded into the stem convolution keeps the function."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import photo_path

PHOTOS = ["chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "camera.png", "logo.png"]


def photos(resolution: int) -> np.ndarray:
    from edge_effnet.data import load_image

    return np.stack([load_image(photo_path(n), resolution) for n in PHOTOS]).astype(np.float32)


def stem_outputs(model, images):
    import keras

    return np.asarray(keras.Model(model.inputs, model.get_layer("stem_bn").output)([images], training=False))


@pytest.mark.parametrize("resolution", [64, 65])  # even: pad bottom/right only; odd: every side
def test_folded_model_computes_the_same_function(resolution):
    from edge_effnet.export.fold import FOLDED, fold_input_normalization
    from edge_effnet.model.keras_io import create_model, data_init
    from edge_effnet.model.variants import from_scaling

    model = create_model(from_scaling(0.25, 0.25, resolution), None, batch_size=None, num_classes=10,
                         dropout=0.0, drop_connect=0.0)
    images = photos(resolution)
    data_init(model, images)  # scores far from uniform, so a difference would show
    folded, note = fold_input_normalization(model)
    assert note == FOLDED
    kinds = [type(layer).__name__ for layer in folded.layers]
    assert "Normalization" not in kinds and "Rescaling" not in kinds and "ConstantPad" in kinds
    before, after = stem_outputs(model, images), stem_outputs(folded, images)
    # the padded border (last row and column for 64 px) included
    assert np.abs(after - before).max() < 1e-4 * np.abs(before).max()
    want, got = np.asarray(model(images, training=False)), np.asarray(folded(images, training=False))
    assert np.abs(got - want).max() < 1e-4 and (got.argmax(1) == want.argmax(1)).all()
    assert want.std(axis=1).min() > 1e-3  # not near-uniform scores
    # the original is untouched
    assert "Normalization" in [type(layer).__name__ for layer in model.layers]


def test_models_without_a_per_channel_normalization_are_left_alone():
    from edge_effnet.export.fold import fold_input_normalization
    from edge_effnet.model.keras_io import create_model
    from edge_effnet.model.variants import from_scaling, get_variant

    lite = create_model(get_variant("lite0").with_options(resolution=64), None, batch_size=1)  # scalar rescale: free
    bare = create_model(from_scaling(0.25, 0.25, 64), None, batch_size=1, preprocessing=False)
    for model in (lite, bare):
        same, note = fold_input_normalization(model)
        assert same is model and note is None
