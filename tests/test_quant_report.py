"""The per-layer quantization report (edge_effnet.export.quant_report): a layer made hard to quantize
ranks first, the shares add up to the file's output error, and `edge-effnet quant-report` prints a
bundle's report or computes one for a .tflite file."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_cli
from edge_effnet.evaluate import photoset

DAMAGED = "block2a_expand_conv"


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """A small Lite model (trained-like activations from photos, models.data_init) with one conv made
    hard to quantize and its float function kept: one of its input channels is always 0 (the
    previous projection writes nothing there) and its weights on that channel are 1000x its largest
    real weight. Float ignores them; int8 gives each output channel one scale (max|w| / 127), so every
    real weight of that layer rounds to 0. Returns the int8 file, the float file of the same graph,
    the calibration images and their folder."""
    import keras

    from edge_effnet.export import tflite
    from edge_effnet.export.formats import MODES
    from edge_effnet.model.keras_io import create_model, data_init
    from edge_effnet.model.variants import from_scaling

    keras.utils.set_random_seed(0)
    spec = from_scaling(0.5, 0.5, 64, family="lite")
    model = create_model(spec, batch_size=1, dropout=0.0, drop_connect=0.0, num_classes=10)
    calib = photoset.render(photoset.calibration_crops(24), 64)
    project, layer = model.get_layer("block1a_project_conv"), model.get_layer(DAMAGED)
    dead = 0
    weights = project.get_weights()
    weights[0][..., dead] = 0
    project.set_weights(weights)
    data_init(model, calib)  # the dead channel: BatchNorm of 0 with beta 0 is 0
    kernel = layer.get_weights()[0]
    kernel[0, 0, dead, :] = 1000 * np.abs(kernel).max()
    layer.set_weights([kernel])
    folder = tmp_path_factory.mktemp("damaged")
    paths = {m: str(folder / f"small_{m}.tflite") for m in ("int8", "fp32")}
    for m, path in paths.items():
        with open(path, "wb") as f:
            f.write(tflite.convert(model, MODES[m], "uint8" if m == "int8" else "float32", calib))
    np.save(folder / "calib.npy", calib)
    return paths["int8"], paths["fp32"], calib, folder


def test_damaged_layer_ranks_first(damaged):
    from edge_effnet.export.quant_report import report, summary

    int8, fp32, calib, _ = damaged
    rep = report(int8, fp32, calib, num_images=8)
    ranked = sorted(rep["layers"], key=lambda x: x["rank"])
    assert ranked[0]["layer"] == DAMAGED, [(x["layer"], round(x["share"], 3)) for x in ranked[:5]]
    assert ranked[0]["share"] > 2 * ranked[1]["share"]
    # the cuts telescope: the shares add up to the whole output error
    assert abs(sum(x["share"] for x in rep["layers"]) - 1) < 1e-6
    assert rep["output"]["snr_db"] is not None and rep["images"] == 8
    assert all(x["dtype"] in ("INT8", "UINT8") for x in rep["layers"])
    assert summary(rep)["top_layers"][0]["layer"] == DAMAGED


def test_cli_computes_a_report_for_a_file_and_prints_a_saved_one(damaged, tmp_path):
    int8, fp32, _, folder = damaged
    out = tmp_path / "report.json"
    result = run_cli("quant-report", int8, "--reference", fp32, "--calib", folder / "calib.npy", "--json", out)
    assert result.returncode == 0, result.stderr
    assert DAMAGED in result.stdout.splitlines()[2]  # the first ranked row
    saved = json.loads(out.read_text())
    assert saved["ranking"][0] == DAMAGED
    again = run_cli("quant-report", out)
    assert again.returncode == 0 and DAMAGED in again.stdout
    missing = run_cli("quant-report", int8)
    assert missing.returncode == 2 and "--reference" in missing.stderr and len(missing.stderr.splitlines()) == 1
    bundle = run_cli("quant-report", tmp_path)
    assert bundle.returncode == 2 and "no quantization report" in bundle.stderr


def test_layer_labels():
    from edge_effnet.export.quant_report import layer_label

    assert layer_label("m_1/block4c_project_bn_1/batchnorm/add_1;m_1/block4c_project_conv_1/convolution") == \
        "block4c_project_conv"
    assert layer_label("m_1/block2b_add_1/Add") == "block2b_add"
    assert layer_label("tfl.quantize") == "tfl.quantize"
