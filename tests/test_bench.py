"""The latency harness: exact run counts, interleaving, records, --compare, errors, the light path.

No timed assertions: only counts, orderings and arithmetic on real measurements.
"""
import csv
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import cli_env, run_cli

SMALL = dict(width=0.25, depth=0.25, resolution=64)  # a real EfficientNet, small enough to convert fast


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A small EfficientNet as .keras and as a batch-1 float .tflite (the project's TFLite converter)."""
    from edge_effnet.export.formats import get_mode
    from edge_effnet.export.tflite import convert
    from edge_effnet.model.keras_io import create_model
    from edge_effnet.model.variants import from_scaling

    folder = tmp_path_factory.mktemp("tiny")
    model = create_model(from_scaling(**SMALL), batch_size=1, num_classes=10)
    model.save(folder / "tiny.keras")
    (folder / "tiny.tflite").write_bytes(convert(model, get_mode("fp32")))
    return {"tflite": str(folder / "tiny.tflite"), "keras": str(folder / "tiny.keras"),
            "params": model.count_params()}


def _record(path):
    with open(path) as f:
        return json.load(f)


def test_default_is_exactly_20_timed_runs_with_each_time(tiny, tmp_path):
    out = tmp_path / "out.json"
    result = run_cli("bench", tiny["tflite"], "--json", out)
    assert result.returncode == 0, result.stderr
    record = _record(out)
    (m,) = record["models"]
    assert record["settings"]["runs"] == 20 and m["runs"] == 20 and len(m["runs_ms"]) == 20
    assert len(m["warmup_ms"]) == record["settings"]["warmup"] == 2
    assert all(t > 0 for t in m["runs_ms"])
    assert m["mean_ms"] == pytest.approx(sum(m["runs_ms"]) / 20)
    assert m["min_ms"] == min(m["runs_ms"]) and m["max_ms"] == max(m["runs_ms"])
    assert m["min_ms"] <= m["p50_ms"] <= m["p90_ms"] <= m["max_ms"]
    assert m["startup_ms"] > 0 and m["first_run_ms"] > 0 and m["import_ms"] > 0
    assert m["model_size_mb"] == round(os.path.getsize(tiny["tflite"]) / 1e6, 3)
    assert m["input_shape"] == [1, 64, 64, 3] and m["input_dtype"] == "float32"
    assert m["backend"] == "litert" and m["backend_version"] and m["threads"] == 1 and m["ratio_to_first"] == 1
    assert record["machine"]["cpu_model"] and len(record["load_avg_before"]) == 3
    # the timed process's own peak (numpy + interpreter + a 0.5 MB model), not pytest's with TensorFlow loaded
    assert 0 < record["peak_rss_mb"] < 400
    assert record["settings"]["affinity_cpus"] == sorted(os.sched_getaffinity(0))  # no --cpu: unchanged
    assert "tiny.tflite" in result.stdout and "mean ms" in result.stdout and f"wrote {out}" in result.stdout


def test_library_benchmark_gives_the_process_its_cpus_back(tiny):
    """Pinned while timing only: a caller left on one core runs numpy's threaded BLAS ~100x slower."""
    from edge_effnet.bench import BenchOptions, Target, benchmark

    before = os.sched_getaffinity(0)
    cpu = max(before)
    record = benchmark([Target("t", "litert", path=tiny["tflite"])], BenchOptions(runs=2, warmup=0, cpu=cpu))
    assert record["settings"]["affinity_cpus"] == [cpu]
    assert os.sched_getaffinity(0) == before


def test_two_models_are_interleaved_with_ratios_csv_and_compare(tiny, tmp_path):
    a, b = tmp_path / "a.tflite", tmp_path / "b.tflite"
    shutil.copy(tiny["tflite"], a)
    shutil.copy(tiny["tflite"], b)
    cpu = max(os.sched_getaffinity(0))
    result = run_cli("bench", a, b, "--runs", 5, "--warmup", 1, "--cpu", cpu,
                     "--json", tmp_path / "x.json", "--csv", tmp_path / "x.csv")
    assert result.returncode == 0, result.stderr
    record = _record(tmp_path / "x.json")
    ma, mb = record["models"]
    assert [ma["name"], mb["name"]] == ["a.tflite", "b.tflite"] and record["settings"]["interleaved"]
    assert ma["runs"] == mb["runs"] == 5 and len(ma["warmup_ms"]) == 1
    for i in range(5):  # A B A B ...: each B run starts after A's run of the same round, before A's next
        assert ma["runs_at_ms"][i] < mb["runs_at_ms"][i]
        if i < 4:
            assert mb["runs_at_ms"][i] < ma["runs_at_ms"][i + 1]
    assert ma["ratio_to_first"] == 1 and mb["ratio_to_first"] == pytest.approx(mb["mean_ms"] / ma["mean_ms"])
    assert record["settings"]["affinity_cpus"] == [cpu] and record["settings"]["cpu"] == cpu
    assert mb["import_ms"] is None  # the backend import is counted once, on the first model

    with open(tmp_path / "x.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["a.tflite", "b.tflite"]
    assert {"mean_ms", "p90_ms", "startup_ms", "model_size_mb", "peak_rss_mb"} <= set(rows[0])
    assert [float(t) for t in rows[1]["runs_ms"].split()] == pytest.approx(mb["runs_ms"], abs=1e-4)
    assert float(rows[1]["mean_ms"]) == pytest.approx(mb["mean_ms"])

    again = run_cli("bench", a, b, "--runs", 3, "--warmup", 0, "--json", tmp_path / "y.json")
    assert again.returncode == 0, again.stderr
    other = _record(tmp_path / "y.json")
    cmp = run_cli("bench", "--compare", tmp_path / "x.json", tmp_path / "y.json")
    assert cmp.returncode == 0, cmp.stderr
    line = next(line for line in cmp.stdout.splitlines() if line.startswith("b.tflite"))
    assert f"{other['models'][1]['mean_ms'] / mb['mean_ms']:.2f}x" in line
    assert f"{mb['mean_ms']:.2f}" in line and "B / A" in cmp.stdout


def test_keras_file_runs_in_tensorflow_with_the_threads_asked_for(tiny):
    code = ("import json, tensorflow as tf\n"
            "from edge_effnet.bench import BenchOptions, benchmark, resolve_targets\n"
            f"r = benchmark(resolve_targets([{tiny['keras']!r}]), BenchOptions(runs=3, warmup=0))\n"
            "m = r['models'][0]\n"
            "t = tf.config.threading\n"
            "print(json.dumps([m['backend'], m['runs'], m['params'], t.get_intra_op_parallelism_threads(),"
            " t.get_inter_op_parallelism_threads()]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=600)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["keras", 3, tiny["params"], 1, 1]


def test_variant_names_files_and_bundle_folders_resolve_without_loading(tiny, tmp_path):
    from edge_effnet.bench import resolve_targets
    from edge_effnet.errors import UserError

    bundle = tmp_path / "b1-int8"
    bundle.mkdir()
    shutil.copy(tiny["tflite"], bundle / "b1_int8.tflite")
    (bundle / "manifest.json").write_text("{}")
    (bundle / "b1.onnx").write_text("not opened: a folder stands for its .tflite files")
    targets = resolve_targets([tiny["tflite"], "b1", "efficientnet-b7", tiny["tflite"], str(bundle)])
    assert [(t.name, t.backend, t.variant) for t in targets] == [
        ("tiny.tflite#1", "litert", None), ("b1", "keras", "b1"), ("b7", "keras", "b7"),
        ("tiny.tflite#2", "litert", None), ("b1_int8.tflite", "litert", None)]
    assert targets[-1].path == str(bundle / "b1_int8.tflite")
    assert [t.name for t in resolve_targets([str(bundle)], "onnxruntime")] == ["b1.onnx"]
    (bundle / "b1_int8.tflite").unlink()
    assert [t.name for t in resolve_targets([str(bundle)])] == ["b1.onnx"]  # no .tflite: the .onnx
    (bundle / "b1.onnx").unlink()
    with pytest.raises(UserError, match="no model files"):
        resolve_targets([str(bundle)])


@pytest.mark.parametrize("case, message", [
    ("missing", "not found"),
    ("text", "not a TensorFlow Lite model"),
    ("truncated", "not a valid Flatbuffer"),
    ("runs0", "runs must be in [1, 100,000]"),
    ("backend", "cannot run .tflite files"),
    ("suffix", "unsupported model file"),
    ("variant", "did you mean"),
    ("compare", "not an `edge-effnet bench --json` record"),
])
def test_bad_input_is_one_line_exit_2(tiny, tmp_path, case, message):
    model = tmp_path / "m.tflite"
    data = open(tiny["tflite"], "rb").read()
    args = {"missing": [tmp_path / "nope.tflite"], "runs0": [tiny["tflite"], "--runs", 0],
            "backend": [tiny["tflite"], "--backend", "onnxruntime"], "suffix": [tmp_path / "m.txt"],
            "variant": ["b9"], "text": [model], "truncated": [model]}.get(case)
    if case == "text":
        model.write_text("not a model\n")
    elif case == "truncated":
        model.write_bytes(data[: len(data) // 2])
    elif case == "suffix":
        (tmp_path / "m.txt").write_text("x")
    out = tmp_path / "out.json"
    if case == "compare":
        (tmp_path / "a.json").write_text('{"models": []}')
        result = run_cli("bench", "--compare", tmp_path / "a.json", tmp_path / "a.json")
    else:
        result = run_cli("bench", *args, "--json", out)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".out")]


def test_timing_a_tflite_imports_no_tensorflow(tiny, tmp_path):
    argv = ["edge-effnet", "bench", tiny["tflite"], "--runs", "2", "--json", str(tmp_path / "o.json")]
    code = ("import sys, json\nfrom edge_effnet.cli import main\n"
            f"sys.argv = {argv!r}\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=300)
    assert out.returncode == 0, out.stderr
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert _record(tmp_path / "o.json")["models"][0]["runs"] == 2  # it really timed the model
    assert "ai_edge_litert" in loaded or "tflite_runtime" in loaded
    assert not {"tensorflow", "keras", "onnx", "onnxruntime", "torch"} & loaded


def test_a_bundle_folder_runs_the_first_file_an_installed_runtime_runs():
    """runtime.backends.choose_files: .tflite in ai-edge-litert or tflite-runtime, else .onnx in
    onnxruntime, else TensorFlow; the line says which and why; none: one line naming what to install."""
    from edge_effnet.errors import UserError
    from edge_effnet.runtime.backends import choose_files

    files = ["b1_int8.onnx", "manifest.json", "b1_int8.tflite", "labels.txt"]

    def only(*names):
        return lambda backend: backend in names

    assert choose_files("b1-int8", files, installed=only("litert", "onnxruntime"))[:2] == (["b1_int8.tflite"], "litert")
    legacy = choose_files("b1-int8", files, installed=only("tflite-runtime"))
    assert legacy[:2] == (["b1_int8.tflite"], "tflite-runtime")
    chosen, backend, note = choose_files("b1-int8", files, installed=only("onnxruntime", "tf-lite"))
    assert (chosen, backend) == (["b1_int8.onnx"], "onnxruntime")  # a light runtime before TensorFlow
    assert note == "b1-int8/: b1_int8.onnx in onnxruntime (neither ai-edge-litert nor tflite-runtime is installed)"
    assert choose_files("b1-int8", files, installed=only("tf-lite"))[:2] == (["b1_int8.tflite"], "tf-lite")
    assert choose_files("b1-int8", files, "onnxruntime", installed=only())[:2] == (["b1_int8.onnx"], "onnxruntime")
    with pytest.raises(UserError) as none:
        choose_files("b1-int8/", files, installed=only())
    assert str(none.value) == ("b1-int8/ holds b1_int8.tflite and b1_int8.onnx, but neither ai-edge-litert, "
                               "tflite-runtime nor onnxruntime is installed: pip install 'edge-effnet[runtime]'")
    with pytest.raises(UserError, match=r"holds b1_int8.onnx, but onnxruntime is not installed: "
                                        r"pip install 'edge-effnet\[runtime-onnx\]'$"):
        choose_files("b1-int8", ["b1_int8.onnx"], installed=only("litert"))
    with pytest.raises(UserError, match="holds no .tflite file for --backend litert"):
        choose_files("b1-int8", ["b1_int8.onnx"], "litert")


BLOCK = """import runpy, sys
for name in sys.argv[1].split(","):
    sys.modules[name] = None  # as if not installed: import fails, importlib.util.find_spec finds nothing
sys.argv = sys.argv[2:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def test_bench_of_a_bundle_no_installed_runtime_opens_is_one_line(tiny, tmp_path):
    bundle = tmp_path / "b1-int8"
    bundle.mkdir()
    shutil.copy(tiny["tflite"], bundle / "b1_int8.tflite")
    (bundle / "b1_int8.onnx").write_text("never opened")
    (tmp_path / "block.py").write_text(BLOCK)
    blocked = "ai_edge_litert,tflite_runtime,onnxruntime,tensorflow,keras"
    out = subprocess.run([sys.executable, tmp_path / "block.py", blocked, "edge_effnet", "bench", bundle],
                         capture_output=True, text=True, env=cli_env(), timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        f"edge-effnet: error: {bundle}/ holds b1_int8.tflite and b1_int8.onnx, but neither ai-edge-litert, "
        "tflite-runtime nor onnxruntime is installed: pip install 'edge-effnet[runtime]'"]
    fine = run_cli("bench", bundle, "--runs", 1, "--warmup", 0)
    assert fine.returncode == 0 and f"bench: {bundle}/: b1_int8.tflite in ai-edge-litert" in fine.stderr, fine.stderr
