"""Edge TPU pre-flight: the .tflite reader and the report, on real TFLite conversions."""
import json

import numpy as np
import pytest

from conftest import run_cli
from edge_effnet.export.edgetpu import parse_compiler_log, preflight
from edge_effnet.runtime.tflite_reader import read_tflite

RES = 32


def _convert(model, path, mode, images):
    import tensorflow as tf

    from edge_effnet.export.tflite import frozen_graph

    converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen_graph(model)])
    if mode in ("int8", "int8-float-io", "dynamic"):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode.startswith("int8"):
        converter.representative_dataset = lambda: ([x[None]] for x in images)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if mode == "int8":
        converter.inference_input_type = converter.inference_output_type = tf.uint8
    path.write_bytes(converter.convert())
    return str(path)


def _leaky_model():
    """conv3x3(8) -> conv3x3(16) -> LeakyReLU (not an Edge TPU op) -> conv1x1(8) -> pool -> dense(10)."""
    from edge_effnet.console import import_keras

    keras = import_keras()
    L = keras.layers
    x = inputs = keras.Input((RES, RES, 3), batch_size=1)
    x = L.Conv2D(8, 3, padding="same")(x)
    x = L.Conv2D(16, 3, padding="same")(x)
    x = L.LeakyReLU(0.1)(x)
    x = L.Conv2D(8, 1)(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(10)(x))


def _cumsum_model():
    """A float model with CUMSUM (builtin code 128: stored in builtin_code, not the deprecated byte)."""
    from edge_effnet.console import import_keras

    keras = import_keras()
    import tensorflow as tf

    x = inputs = keras.Input((RES, RES, 3), batch_size=1)
    x = keras.layers.Conv2D(4, 3, padding="same")(x)
    x = keras.layers.Lambda(lambda t: tf.math.cumsum(t, axis=1))(x)
    return keras.Model(inputs, keras.layers.Conv2D(2, 1)(x))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from edge_effnet.model.builder import build_model
    from edge_effnet.model.variants import resolve_spec

    folder = tmp_path_factory.mktemp("edgetpu")
    images = np.random.default_rng(0).uniform(0, 255, (4, RES, RES, 3)).astype(np.float32)
    leaky = _leaky_model()
    spec = resolve_spec(width=0.5, depth=0.25, resolution=64, family="lite")
    tiny = build_model(spec, batch_size=1, num_classes=10)
    tiny_images = np.random.default_rng(1).uniform(0, 255, (4, 64, 64, 3)).astype(np.float32)
    return {
        "leaky_int8": _convert(leaky, folder / "leaky_int8.tflite", "int8", images),
        "leaky_float": _convert(leaky, folder / "leaky_float.tflite", "float", images),
        "leaky_float_io": _convert(leaky, folder / "leaky_float_io.tflite", "int8-float-io", images),
        "leaky_dynamic": _convert(leaky, folder / "leaky_dynamic.tflite", "dynamic", images),
        "cumsum_float": _convert(_cumsum_model(), folder / "cumsum.tflite", "float", images),
        "tiny_int8": _convert(tiny, folder / "tiny_int8.tflite", "int8", tiny_images),
        "tiny_spec": spec,
    }


def _conv_macs(h, w, k, cin, cout):
    return h * w * k * k * cin * cout


def test_reader_matches_the_interpreter(models):
    from ai_edge_litert.interpreter import Interpreter

    for key in ("leaky_int8", "cumsum_float", "tiny_int8"):
        model = read_tflite(models[key])
        interp = Interpreter(models[key])
        ops = interp._get_ops_details()
        assert [o.op for o in model.operators] == [d["op_name"] for d in ops]
        assert [list(o.outputs) for o in model.operators] == [list(d["outputs"]) for d in ops]
        inp = interp.get_input_details()[0]
        assert model.tensor(model.inputs[0]).shape == tuple(inp["shape"])
        assert model.tensor(model.inputs[0]).dtype == np.dtype(inp["dtype"]).name.upper()


def test_op_codes_above_127_are_read_from_builtin_code(models):
    model = read_tflite(models["cumsum_float"])
    assert "CUMSUM" in [o.op for o in model.operators]  # code 128: the deprecated byte holds 127


def test_first_unsupported_op_and_mac_share(models):
    report = preflight(models["leaky_int8"])
    ops = [row["op"] for row in report["ops"]]
    # QUANTIZE (uint8 -> int8 input), CONV_2D, CONV_2D, then the LeakyReLU
    assert ops[:4] == ["QUANTIZE", "CONV_2D", "CONV_2D", "LEAKY_RELU"]
    assert report["first_unsupported_index"] == 3 and report["first_unsupported_op"] == "LEAKY_RELU"
    assert "not an Edge TPU operation" in report["first_unsupported_reasons"][0]
    assert not report["maps_fully"] and report["quantization"]["status"] == "full-integer"
    before = _conv_macs(RES, RES, 3, 3, 8) + _conv_macs(RES, RES, 3, 8, 16)
    total = before + _conv_macs(RES, RES, 1, 16, 8) + 8 * 10
    assert report["macs_total"] == total and report["macs_on_edgetpu"] == before
    assert report["mac_share_on_edgetpu"] == pytest.approx(before / total, abs=1e-6)
    devices = [row["device"] for row in report["ops"]]
    assert devices[:3] == ["edgetpu"] * 3 and set(devices[3:]) == {"cpu"}
    assert "LEAKY_RELU" in report["verdict"] and "run on the CPU" in report["verdict"]


def test_float_input_output_conversions_stay_on_the_cpu(models):
    report = preflight(models["leaky_float_io"])
    rows = report["ops"]
    assert report["quantization"]["status"] == "full-integer, float I/O"
    assert rows[0]["op"] == "QUANTIZE" and rows[0]["device"] == "cpu" and rows[0]["note"]
    assert rows[-1]["op"] == "DEQUANTIZE" and rows[-1]["device"] == "cpu"
    # the float input conversion does not end the Edge TPU segment: the LeakyReLU still does
    assert report["first_unsupported_op"] == "LEAKY_RELU" and [r["device"] for r in rows[1:3]] == ["edgetpu"] * 2


def test_float_model_is_not_quantized(models):
    report = preflight(models["leaky_float"])
    q = report["quantization"]
    assert q["status"] == "not quantized"
    assert "not quantized" in q["reason"] and "FLOAT32" in q["reason"] and "int8" in q["reason"]
    assert report["first_unsupported_index"] == 0 and report["mac_share_on_edgetpu"] == 0.0
    assert report["verdict"] == q["reason"]
    assert any("FLOAT32 tensor" in r for r in report["ops"][0]["reasons"])
    dynamic = preflight(models["leaky_dynamic"])["quantization"]
    assert dynamic["status"] == "not quantized" and "dynamic-range" in dynamic["reason"]


def test_builder_model_maps_fully_and_macs_match_the_spec(models):
    from edge_effnet.model.scaling import count_macs

    report = preflight(models["tiny_int8"])
    assert report["maps_fully"], report["verdict"]
    assert report["first_unsupported_index"] is None and report["mac_share_on_edgetpu"] == 1.0
    assert report["macs_total"] == count_macs(models["tiny_spec"], num_classes=10)
    assert all(row["version"] <= row["max_version"] for row in report["ops"])
    assert report["quantization"]["input"][0]["dtype"] == "UINT8"


def test_cli_strict_and_json(models, tmp_path):
    out = tmp_path / "r.json"
    ok = run_cli("edgetpu-check", models["leaky_int8"], "--json", out)
    assert ok.returncode == 0, ok.stderr
    assert "LEAKY_RELU" in ok.stdout and "edgetpu_compiler" in ok.stdout
    saved = json.loads(out.read_text())
    assert saved["first_unsupported_index"] == 3 and len(saved["ops"]) == saved["ops_total"]
    strict = run_cli("edgetpu-check", models["leaky_int8"], "--strict")
    assert strict.returncode == 1
    assert "does not map fully" in strict.stderr and len(strict.stderr.strip().splitlines()) == 1
    assert run_cli("edgetpu-check", models["tiny_int8"], "--strict").returncode == 0
    again = run_cli("edgetpu-check", models["tiny_int8"], "--json", out)
    assert again.returncode == 2 and "--force" in again.stderr


@pytest.mark.parametrize("content, message", [
    (None, "file not found"),
    (b"just some text, not a model\n", "not a TensorFlow Lite model"),
    ("truncate", "corrupt or truncated"),
])
def test_cli_bad_input_is_one_line_exit_2(models, tmp_path, content, message):
    path = tmp_path / "bad.tflite"
    if content == "truncate":
        path.write_bytes(open(models["tiny_int8"], "rb").read()[:400])
    elif content is not None:
        path.write_bytes(content)
    result = run_cli("edgetpu-check", path, "--strict")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and result.stdout == ""


def test_compiler_log_is_parsed():
    log = """Edge TPU Compiler version 16.0.384591198

Model compiled successfully in 412 ms.

Input model: m.tflite
Input size: 5.14MiB
Output model: m_edgetpu.tflite
Output size: 5.36MiB
On-chip memory used for caching model parameters: 4.21MiB
On-chip memory remaining for caching model parameters: 3.01MiB
Off-chip memory used for streaming uncached model parameters: 0.00B
Number of Edge TPU subgraphs: 1
Total number of operations: 68
Operation log: m_edgetpu.log

Model successfully compiled but not all operations are supported by the Edge TPU.
Number of operations that will run on Edge TPU: 66
Number of operations that will run on CPU: 2

Operator                       Count      Status

CONV_2D                        38         Mapped to Edge TPU
LEAKY_RELU                     1          Operation not supported
"""
    parsed = parse_compiler_log(log)
    assert parsed["version"] == "16.0.384591198" and parsed["edgetpu_subgraphs"] == 1
    assert parsed["ops_on_edgetpu"] == 66 and parsed["ops_on_cpu"] == 2
    assert parsed["on_chip_memory_used"] == "4.21MiB" and parsed["off_chip_memory_used"] == "0.00B"
    assert parsed["operators"][1] == {"op": "LEAKY_RELU", "count": 1, "status": "Operation not supported"}
    failed = parse_compiler_log("Edge TPU Compiler version 16.0.384591198\nERROR: Didn't find op for builtin "
                                "opcode 'CONV_2D' version '6'.\nInvalid model: m.tflite\nModel could not be parsed\n")
    assert "CONV_2D' version '6'" in failed["error"] and failed["operators"] == []


def test_check_imports_no_tensorflow(models):
    import subprocess
    import sys

    from conftest import cli_env

    code = ("import sys\nfrom edge_effnet.cli import main\nsys.argv = ['edge-effnet', 'edgetpu-check', %r]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "print('LOADED', sorted({'tensorflow', 'keras', 'onnx'} & set(sys.modules)))" % models["tiny_int8"])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), check=True)
    assert out.stdout.strip().splitlines()[-1] == "LOADED []"


def test_corrupt_files_give_a_user_error_not_a_crash(models, tmp_path):
    import random

    from edge_effnet.errors import UserError

    original = open(models["leaky_int8"], "rb").read()
    rng, outcomes = random.Random(0), {"report": 0, "error": 0}
    for trial in range(300):
        data = bytearray(original)
        for _ in range(rng.choice([1, 4, 32])):
            data[rng.randrange(8, len(data))] = rng.randrange(256)
        if trial % 5 == 0:
            data = data[:rng.randrange(8, len(data))]
        path = tmp_path / f"{trial}.tflite"
        path.write_bytes(bytes(data))
        try:
            preflight(str(path))
            outcomes["report"] += 1
        except UserError:
            outcomes["error"] += 1
    assert outcomes["report"] > 0 and outcomes["error"] > 0


def test_export_edgetpu_bundle(tmp_path, chelsea):
    import os

    out = tmp_path / "bundle"
    photos = os.path.dirname(chelsea)
    result = run_cli("export", "--width", "0.5", "--depth", "0.25", "--resolution", "64", "--family", "edgetpu",
                     "--edgetpu", "--calib", photos, "--num-calib", "8", "-o", out)
    assert result.returncode == 0, result.stderr
    assert "Edge TPU pre-flight" in result.stdout and "maps fully" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    record = manifest["files"][0]
    assert record["mode"] == "edgetpu" and record["io"] == "uint8"
    assert record["input"]["dtype"] == "uint8" and record["input"]["shape"] == [1, 64, 64, 3]
    assert record["report"]["maps_fully"] and record["report"]["preflight"] == "edgetpu_preflight.json"
    report = json.loads((out / "edgetpu_preflight.json").read_text())
    assert report["file"] == record["file"] and report["quantization"]["status"] == "full-integer"
    assert report["mac_share_on_edgetpu"] == 1.0 and report["compiler"]["ran"] is False
    assert "apt-get install edgetpu-compiler" in report["compiler"]["how_to_compile"]
    fused = [row for row in report["ops"] if row["op"] == "CONV_2D" and row["macs"]]
    assert fused and all(row["version"] <= row["max_version"] for row in report["ops"])
    # the quantization report is written here too, and the file stays full int8 (no mixed precision)
    assert record["quant_report"]["file"] == "quant_report.json" and (out / "quant_report.json").exists()
    assert "mixed_precision" not in record and record["float_activations"] == []
    assert "quantization report" in result.stdout


@pytest.mark.parametrize("extra, message", [
    (["--io", "float32"], "--io float32 does not apply to --edgetpu"),
    (["--int8"], "conflict"),
    (["--target-agreement", "0.99"], "runs full int8 only"),
])
def test_export_edgetpu_bad_options(tmp_path, extra, message):
    result = run_cli("export", "--variant", "edgetpu-s", "--edgetpu", *extra, "-o", tmp_path / "x")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
    assert not (tmp_path / "x").exists()


@pytest.mark.slow  # onnx2tf: about two minutes on a loaded 2-core machine
def test_export_onnx_model_for_the_edgetpu_warns_when_it_does_not_map(tmp_path, chelsea):
    """An ONNX model from elsewhere (here: the LeakyReLU model) -> onnx2tf int8 -> pre-flight in the bundle."""
    import os

    from edge_effnet.export.onnx import keras_to_onnx

    source = tmp_path / "leaky.onnx"
    keras_to_onnx(_leaky_model(), str(source))
    out = tmp_path / "bundle"
    result = run_cli("export", "--model", source, "--normalization", "unit", "--edgetpu",
                     "--calib", os.path.dirname(chelsea), "--num-calib", "8", "-o", out)
    assert result.returncode == 0, result.stderr
    assert "WARNING: not every op runs on the Edge TPU" in result.stderr
    record = json.loads((out / "manifest.json").read_text())["files"][0]
    report = json.loads((out / "edgetpu_preflight.json").read_text())
    assert record["io"] == "uint8" and record["report"]["first_unsupported_op"] == "LEAKY_RELU"
    assert report["first_unsupported_op"] == "LEAKY_RELU" and 0 < report["mac_share_on_edgetpu"] < 1


def test_edgetpu_export_keeps_the_normalization_the_int8_export_folds(tmp_path, chelsea):
    """--int8 folds a B-series model's per-channel input normalization into a mean-padded stem
    (export/fold.py); the Edge TPU compiler would stop at that constant CONCATENATION, so
    --edgetpu keeps SUB / MUL, which map."""
    import os

    photos = os.path.dirname(chelsea)
    common = ["--width", "0.25", "--depth", "0.25", "--resolution", "64", "--calib", photos, "--num-calib", "8"]
    assert run_cli("export", *common, "--int8", "-o", tmp_path / "int8").returncode == 0
    int8 = json.loads((tmp_path / "int8" / "manifest.json").read_text())
    folded = preflight(str(tmp_path / "int8" / int8["files"][0]["file"]))
    assert int8["graph_rewrites"] and not folded["maps_fully"]
    assert folded["first_unsupported_op"] == "CONCATENATION" and folded["mac_share_on_edgetpu"] == 0.0
    assert "non-zero constant" in folded["first_unsupported_reasons"][0], folded["first_unsupported_reasons"]
    result = run_cli("export", *common, "--edgetpu", "-o", tmp_path / "edgetpu")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "edgetpu" / "manifest.json").read_text())
    assert manifest["graph_rewrites"] == [] and manifest["files"][0]["report"]["maps_fully"]
