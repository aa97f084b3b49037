"""The command line: help, variants, build, and one-line errors."""
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import cli_env, run_cli

COMMANDS = ["variants", "build", "edgetpu-check", "bench", "predict", "eval", "export", "train", "search", "quant-report"]


def _modules_after(code: str) -> set:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, env=cli_env(), check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("argv", [["--help"]] + [[c, "--help"] for c in COMMANDS] + [["variants"]])
def test_light_commands_import_no_tensorflow(argv):
    code = ("import sys\nfrom edge_effnet.cli import main\nsys.argv = ['edge-effnet'] + %r\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n" % argv)
    loaded = _modules_after(code)
    assert not {"tensorflow", "keras", "onnx", "torch"} & loaded


def test_help_is_fast():
    start = time.perf_counter()
    result = run_cli("--help")
    assert result.returncode == 0 and "variants" in result.stdout
    assert time.perf_counter() - start < 5  # generous: a cold interpreter on a loaded CI machine


def test_variants_json_lists_every_variant():
    result = run_cli("variants", "--json")
    assert result.returncode == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert len(rows) == 18
    assert rows["b0"]["params"] == 5_330_571 and rows["b0"]["family"] == "efficientnet"
    assert rows["edgetpu-s"]["num_classes"] == 1001
    for key in ("name", "family", "width", "depth", "resolution", "dropout", "params", "macs"):
        assert key in rows["lite0"]
    table = run_cli("variants").stdout
    assert "5,330,571" in table and "lite4" in table


def test_build_writes_model_and_reports(tmp_path):
    out = tmp_path / "m.keras"
    result = run_cli("build", "--phi", "0.5", "--num-classes", "10", "-o", out)
    assert result.returncode == 0, result.stderr
    assert out.exists() and "params" in result.stdout and "MACs" in result.stdout
    again = run_cli("build", "--phi", "0.5", "-o", out)
    assert again.returncode == 2 and "--force" in again.stderr


@pytest.mark.parametrize("args, message", [
    (["--variant", "b9"], "did you mean"),
    (["--width", "0", "--depth", "1"], "width must be in (0, 8]"),
    (["--width", "1", "--depth", "1", "--resolution", "0"], "resolution must be in [32, 4,096]"),
    (["--phi", "1", "--width", "1.1"], "together"),
    (["--variant", "b0", "--phi", "1"], "together"),
    (["--variant", "b0", "--weights", "/no/such.h5"], "not found"),
    (["--variant", "b0", "--bogus"], "No such option"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, args, message):
    out = tmp_path / "m.keras"
    result = run_cli("build", *args, "-o", out)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr
    assert os.listdir(tmp_path) == []


def test_unwritable_output_leaves_nothing(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    # root ignores permission bits; /sys refuses new files even to root
    target = "/sys/m.keras" if os.geteuid() == 0 else locked / "m.keras"
    try:
        result = run_cli("build", "--variant", "b0", "-o", target)
        assert result.returncode == 2 and "not writable" in result.stderr
        assert os.listdir(locked) == [] and not os.path.exists("/sys/m.keras")
    finally:
        locked.chmod(0o700)
    missing = run_cli("build", "--variant", "b0", "-o", tmp_path / "nope" / "m.keras")
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_interrupt_inside_c_run_python_still_exits_130(tmp_path):
    """CI once saw `python -m edge_effnet export` print "interrupted" and exit -2: a Ctrl-C that
    passes through C code running Python (PyRun_String, as pybind11 and TensorFlow's import do)
    makes CPython under -m replace sys.exit's code by a self-kill. The real one_line_errors, that
    real C path, under -m."""
    (tmp_path / "interrupted_app.py").write_text(
        "import ctypes\n"
        "from edge_effnet.console import one_line_errors\n"
        "run = ctypes.pythonapi.PyRun_String\n"
        "run.restype = ctypes.py_object\n"
        "run.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.py_object, ctypes.py_object]\n"
        "one_line_errors(lambda: run(b'raise KeyboardInterrupt', 257, {}, {}))\n")
    result = subprocess.run([sys.executable, "-m", "interrupted_app"], cwd=tmp_path, env=cli_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 130 and result.stderr == "edge-effnet: interrupted\n", result
