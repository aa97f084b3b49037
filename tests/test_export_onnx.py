"""ONNX export: float (tf2onnx) and int8 QDQ (onnxruntime) files checked in onnxruntime against Keras."""
import json

import numpy as np
import pytest

from onnx_fixtures import photos, settle_batchnorm

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("tf2onnx")


def _model(resolution=None, **kwargs):
    from edge_effnet.models import create_model, import_keras
    from edge_effnet.variants import resolve_spec

    import_keras().utils.set_random_seed(0)
    spec = resolve_spec(resolution=resolution, **kwargs)
    model = create_model(spec, batch_size=1, num_classes=10, dropout=0.0, drop_connect=0.0)
    images = photos(spec.resolution)
    settle_batchnorm(model, images)
    return spec, model, images


def _export(tmp_path, spec, model, images, layout="nhwc", int8=True):
    from edge_effnet.export.onnx import OnnxOptions, export_onnx, metadata_for

    labels = [f"class {i}" for i in range(10)]
    outputs = {"fp32": str(tmp_path / f"{layout}.onnx")}
    if int8:
        outputs["int8"] = str(tmp_path / f"{layout}_int8.onnx")
    meta = metadata_for(model, variant=spec.name, preprocessing=spec.preprocessing, layout=layout, labels=labels)
    return export_onnx(model, outputs, images, metadata=meta, options=OnnxOptions(layout=layout))


@pytest.fixture(scope="module")
def small():
    return _model(width=0.25, depth=0.25, resolution=64)


@pytest.fixture(scope="module")
def exported(small, tmp_path_factory):
    spec, model, images = small
    return _export(tmp_path_factory.mktemp("onnx"), spec, model, images)


def test_small_variant_float_and_int8_pass_self_check(small, exported):
    spec, model, images = small
    report = exported
    float_check, int8_check = report["checks"]["fp32"], report["checks"]["int8"]
    assert float_check["passed"] and float_check["max_abs_diff"] <= 1e-4
    assert float_check["top1_agreement"] == 1.0 and float_check["images"] == len(images) >= 12
    # int8 on real photos: close to the float probabilities, not identical
    # a random-weight model on 16 photos: far better than chance (0.1), not float-exact
    assert 0 < int8_check["max_abs_diff"] and int8_check["mean_abs_diff"] < 0.05
    assert int8_check["top1_agreement"] >= 0.5 and int8_check["top5_overlap"] >= 0.7

    proto = onnx.load(report["files"]["fp32"])
    (image,) = proto.graph.input
    assert image.name == "pixels"
    assert [d.dim_value for d in image.type.tensor_type.shape.dim] == [1, 64, 64, 3]
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 18
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["variant"] == spec.name and meta["preprocessing"] == "imagenet"
    assert meta["input_range"] == "0..255" and meta["layout"] == "nhwc"
    assert json.loads(meta["labels"])[:2] == ["class 0", "class 1"] and len(json.loads(meta["labels"])) == 10
    names = [n.name for n in proto.graph.node]
    assert "predictions/Softmax" in names and any(n.startswith("block1a_dwconv/") for n in names)
    assert not any(n.startswith(model.name) for n in names)  # no `<model>_1/<layer>_1/` prefixes left

    quantized = onnx.load(report["files"]["int8"])
    ops = {n.op_type for n in quantized.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    init = {i.name: i for i in quantized.graph.initializer}
    per_channel = [n for n in quantized.graph.node if n.op_type == "DequantizeLinear"
                   and init.get(n.input[0]) is not None and init[n.input[0]].data_type == onnx.TensorProto.INT8
                   and np.prod(init[n.input[1]].dims) > 1]
    assert per_channel, "weights should carry one scale per output channel"
    from edge_effnet.export.onnx import inspect

    info = inspect(report["files"]["int8"])
    assert info["opset"] == 18 and info["layout"] == "nhwc" and info["dynamic_shape_ops"] == []
    assert "int8 static QDQ" in info["quantization"] and {"op": "Softmax", "count": 1} in info["ops"]
    assert inspect(report["files"]["fp32"])["quantization"] == "none (float32)"
    qmeta = {p.key: p.value for p in quantized.metadata_props}
    assert qmeta["variant"] == spec.name and "per-channel" in qmeta["quantization"]
    assert qmeta["calibration_images"] == str(len(images))


def test_nchw_layout_takes_nchw_pixels_and_gives_the_same_probabilities(tmp_path, small):
    from edge_effnet.runtime import open_model

    spec, model, images = small
    report = _export(tmp_path, spec, model, images, layout="nchw", int8=False)
    assert report["checks"]["fp32"]["passed"]
    runner = open_model(report["files"]["fp32"])
    assert runner.inputs[0]["shape"] == [1, 3, 64, 64] and runner.inputs[0]["layout"] == "nchw"
    direct = runner.run(images[:1].transpose(0, 3, 1, 2).astype(np.float32)).reshape(-1)
    keras_probs = np.asarray(model(images[:1].astype(np.float32))).reshape(-1)
    np.testing.assert_allclose(direct, keras_probs, atol=1e-5)
    meta = {p.key: p.value for p in onnx.load(report["files"]["fp32"]).metadata_props}
    assert meta["layout"] == "nchw" and json.loads(meta["input_shape"]) == [1, 3, 64, 64]


@pytest.mark.slow
def test_b0_float_and_int8_pass_self_check(tmp_path):
    spec, model, images = _model(variant="b0")
    report = _export(tmp_path, spec, model, images)
    assert report["checks"]["fp32"]["passed"], report["checks"]["fp32"]
    int8_check = report["checks"]["int8"]
    assert int8_check["max_abs_diff"] < 0.2 and int8_check["top5_overlap"] >= 0.6, int8_check


def test_bad_layout_is_a_user_error(tmp_path, small):
    from edge_effnet.errors import UserError
    from edge_effnet.export.onnx import OnnxOptions, keras_to_onnx

    with pytest.raises(UserError, match="layout must be one of nhwc, nchw"):
        keras_to_onnx(small[1], str(tmp_path / "x.onnx"), options=OnnxOptions(layout="chw"))
    assert not list(tmp_path.iterdir())


def test_bench_times_onnx_in_onnxruntime_on_one_thread(exported, tmp_path):
    """`edge-effnet bench` runs .onnx files in onnxruntime: 1 intra-op, 1 inter-op thread, sequential."""
    import onnxruntime as ort

    from conftest import run_cli
    from edge_effnet.runtime import open_model

    session = open_model(exported["files"]["int8"]).session
    opts = session.get_session_options()
    assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (1, 1)
    assert opts.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    out = tmp_path / "bench.json"
    result = run_cli("bench", exported["files"]["fp32"], exported["files"]["int8"], "--runs", 5, "--json", out)
    assert result.returncode == 0, result.stderr
    records = json.loads(out.read_text())["models"]
    assert [r["backend"] for r in records] == ["onnxruntime", "onnxruntime"]
    assert all(r["threads"] == 1 and r["runs"] == 5 and r["input_shape"] == [1, 64, 64, 3] for r in records)
    assert all(len(r["runs_ms"]) == 5 and min(r["runs_ms"]) > 0 for r in records)
