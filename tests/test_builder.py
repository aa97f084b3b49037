"""The Keras builder against keras.applications and against the analytic counts."""
import numpy as np
import pytest

from edge_effnet.console import import_keras
from edge_effnet.model.scaling import count_params
from edge_effnet.model.variants import VARIANTS, from_phi, get_variant

keras = import_keras()
from edge_effnet.model.builder import build_model  # noqa: E402
from edge_effnet.data import load_image  # noqa: E402
from edge_effnet.model.weights import load_weights  # noqa: E402

KERAS_APPS = {f"b{i}": getattr(keras.applications, f"EfficientNetB{i}") for i in range(8)}


@pytest.fixture(autouse=True)
def _fresh_session():
    yield
    keras.backend.clear_session()


@pytest.mark.parametrize("name", sorted(KERAS_APPS))
def test_params_equal_keras_applications(name):
    ours = build_model(get_variant(name))
    theirs = KERAS_APPS[name](weights=None)
    assert ours.count_params() == theirs.count_params() == count_params(get_variant(name))
    assert [w.shape for w in ours.weights] == [w.shape for w in theirs.weights]
    assert [l.name for l in ours.layers[3:]] == [l.name for l in theirs.layers[3:]]  # after input/rescale/norm


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("b8", "l2") else n
                                  for n in VARIANTS if n not in KERAS_APPS])
def test_analytic_count_equals_keras_count(name):
    spec = get_variant(name)
    assert build_model(spec).count_params() == count_params(spec)


@pytest.mark.parametrize("phi", [0.5, 1.5, 3.0])
@pytest.mark.parametrize("family", ["efficientnet", "lite", "edgetpu"])
def test_analytic_count_for_phi(phi, family):
    spec = from_phi(phi, family=family)
    assert build_model(spec).count_params() == count_params(spec)


def test_lite0_trainable_parameters():
    model = build_model(get_variant("lite0"))
    assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == 4_652_008


def test_options_batch_classes_no_top():
    model = build_model(get_variant("b0"), batch_size=1, num_classes=10, resolution=160)
    assert tuple(model.input.shape) == (1, 160, 160, 3) and tuple(model.output.shape) == (1, 10)
    assert count_params(get_variant("b0"), num_classes=10) == model.count_params()
    features = build_model(get_variant("lite0"), include_top=False, pooling="avg")
    assert tuple(features.output.shape) == (None, 1280)
    assert features.count_params() == count_params(get_variant("lite0"), include_top=False)


def test_fresh_b_model_normalizes_with_imagenet_statistics():
    model = build_model(get_variant("b0"))
    normalized = keras.Model(model.input, model.get_layer(index=2).output)
    got = np.asarray(normalized(np.full((1, 224, 224, 3), 255.0, np.float32)))[0, 0, 0]
    np.testing.assert_allclose(got, (1 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]),
                               rtol=1e-5)


def _prediction(model, pixels):
    return np.asarray(model(pixels[None].astype(np.float32), training=False))


@pytest.mark.parametrize("name", ["b0", "b3"])
def test_keras_applications_weights_load_and_match(name, tmp_path, chelsea):
    """Weights saved by keras.applications (Keras 3 .weights.h5) load by structure and give its outputs."""
    spec = get_variant(name)
    theirs = KERAS_APPS[name](weights=None)
    rng = np.random.default_rng(0)  # non-trivial BN statistics so a mix-up would show
    for w in theirs.weights:
        if "moving" in w.path or "gamma" in w.path:
            w.assign(rng.uniform(0.5, 1.5, w.shape).astype("float32"))
    path = str(tmp_path / f"{name}.weights.h5")
    theirs.save_weights(path)
    ours = build_model(spec)
    load_weights(ours, spec, path)
    pixels = load_image(chelsea, spec.resolution)
    diff = np.abs(_prediction(ours, pixels) - _prediction(theirs, pixels)).max()
    assert diff <= 1e-5


def test_legacy_h5_with_imagenet_normalization_quirk(tmp_path, chelsea):
    """keras' ImageNet files are legacy HDF5 and store the std in the variance slot; we load and correct it."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    theirs = keras.applications.EfficientNetB0(weights=None)
    norm = next(l for l in theirs.layers if l.__class__.__name__ == "Normalization")
    norm.set_weights([np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225]), np.array(0)])
    norm.finalize_state()
    path = str(tmp_path / "efficientnetb0.h5")
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, theirs)
    # keras.applications with weights="imagenet": an extra Rescaling(1/sqrt(std)) after Normalization
    reference = keras.Sequential([theirs.layers[0], theirs.layers[1], theirs.layers[2]])
    pixels = load_image(chelsea, 224)[None].astype(np.float32)
    expected = np.asarray(reference(pixels)) / np.sqrt(np.array([0.229, 0.224, 0.225]))
    ours = build_model(get_variant("b0"))
    load_weights(ours, get_variant("b0"), path)
    ours_norm = keras.Sequential([ours.layers[0], ours.layers[1], ours.layers[2]])
    np.testing.assert_allclose(np.asarray(ours_norm(pixels)), expected, atol=1e-4)
    np.testing.assert_allclose(ours.get_layer("stem_conv").get_weights()[0],
                               theirs.get_layer("stem_conv").get_weights()[0])
