"""benchmarks/_common.py: the provenance block every benchmark writes, the lock, the legacy Python,
and no machine paths under benchmarks/. Fast: no TensorFlow, no benchmark is run."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCHMARKS)

import _common  # noqa: E402

FIELDS = ("commit", "dirty", "date", "machine", "versions", "load_avg_before", "load_avg_after", "command")
SCRIPTS = sorted(f for f in os.listdir(BENCHMARKS) if f.endswith(".py") and f != "_common.py")
MACHINE_PATH = re.compile(r"/(work|root|home)/")


@pytest.fixture(scope="module")
def provenance():
    run = _common.start(["benchmarks/table4.py", "--lock", "/work/bench.lock", f"--out={BENCHMARKS}/results"])
    return run.finish()


def test_provenance_has_every_field(provenance):
    for field in FIELDS:
        assert field in provenance, field
    assert re.fullmatch(r"[0-9a-f]{40}", provenance["commit"])  # the test runs in a git checkout
    assert isinstance(provenance["dirty"], bool) and isinstance(provenance["dirty_files"], list)
    assert provenance["date"].endswith("+00:00")  # UTC, ISO 8601
    assert provenance["machine"]["cpu_model"] and provenance["machine"]["cpu_count"] >= 1
    assert provenance["versions"]["python"] and provenance["versions"]["numpy"]
    assert len(provenance["load_avg_before"]) == 3 and len(provenance["load_avg_after"]) == 3


def test_command_is_exact_but_carries_no_machine_path(provenance):
    assert provenance["command"] == ["python", "benchmarks/table4.py", "--lock", ".../bench.lock",
                                     "--out=benchmarks/results"]
    assert not MACHINE_PATH.search(json.dumps(provenance["command"]))


def test_provenance_needs_no_tensorflow():
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import _common; _common.start().finish(); "
            "heavy = [m for m in ('tensorflow', 'keras', 'torch', 'onnxruntime') if m in sys.modules]; "
            "assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_write_results_puts_provenance_in_json_and_markdown(tmp_path, provenance):
    clean = {**provenance, "dirty": False, "dirty_files": []}
    data = _common.write_results("demo", {"rows": [1, 2]}, "# Demo\n\nbody\n", clean, str(tmp_path))
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert saved == data
    assert saved["commit"] == saved["provenance"]["commit"] == provenance["commit"]
    assert saved["rows"] == [1, 2] and saved["benchmark"] == "demo"
    md = (tmp_path / "demo.md").read_text()
    assert md.startswith("# Demo\n\nProvenance: commit `" + provenance["commit"][:12] + "` (clean tree)")
    assert "WARNING" not in md and md.rstrip().endswith("body")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # atomic writes leave no partial file


def test_a_dirty_tree_is_said_loudly(tmp_path, provenance):
    dirty = {**provenance, "dirty": True, "dirty_files": ["edge_effnet/export/api.py"]}
    _common.write_results("demo", {}, "# Demo\n\nbody\n", dirty, str(tmp_path))
    md = (tmp_path / "demo.md").read_text()
    head = md.split("body")[0]
    assert "WARNING: DIRTY TREE" in head and "edge_effnet/export/api.py" in head


def test_lock_comes_from_the_option_or_the_environment(tmp_path, monkeypatch):
    import argparse

    monkeypatch.delenv(_common.LOCK_ENV, raising=False)
    parser = argparse.ArgumentParser()
    _common.add_lock_argument(parser)
    assert parser.parse_args([]).lock is None  # no default machine path: no lock
    monkeypatch.setenv(_common.LOCK_ENV, str(tmp_path / "env.lock"))
    parser = argparse.ArgumentParser()
    _common.add_lock_argument(parser)
    assert parser.parse_args([]).lock == str(tmp_path / "env.lock")
    with _common.bench_lock(None):
        pass
    with _common.bench_lock(str(tmp_path / "bench.lock")):
        assert (tmp_path / "bench.lock").exists()


def test_legacy_python_comes_from_one_variable(monkeypatch, capsys):
    monkeypatch.delenv(_common.LEGACY_ENV, raising=False)
    assert _common.legacy_python() is None
    assert _common.LEGACY_ENV in capsys.readouterr().err  # says so, and the caller skips its rows
    monkeypatch.setenv(_common.LEGACY_ENV, sys.executable)
    assert _common.legacy_python() == sys.executable
    monkeypatch.setenv(_common.LEGACY_ENV, os.path.join(ROOT, "no-such-python"))
    with pytest.raises(SystemExit):
        _common.legacy_python()


def test_no_machine_paths_under_benchmarks():
    found = []
    for parent, dirs, files in os.walk(BENCHMARKS):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            path = os.path.join(parent, name)
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except UnicodeDecodeError:
                continue  # a plot
            found += [f"{os.path.relpath(path, ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
                      for m in MACHINE_PATH.finditer(text)]
    assert not found, found


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_uses_the_shared_module(script):
    with open(os.path.join(BENCHMARKS, script)) as f:
        text = f.read()
    assert "import _common" in text and "_common.write_results(" in text and "_common.start(" in text
    for copy in ("import fcntl", "def versions(", "def bench_lock(", "EDGE_EFFNET_LEGACY_PYTHON\", \"/",
                 'os.environ.get("EDGE_EFFNET_LEGACY_PYTHON"', "json.dump(", "machine_info()"):
        assert copy not in text, f"{script} has its own {copy!r}: use benchmarks/_common.py"


def test_vector_flags_name_the_simd_the_kernels_pick(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu sse2 ssse3 sse4_1 avx avx2 fma avx512f avx512_vnni ht\n"
                   "processor\t: 1\nflags\t\t: fpu\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 asimddp\n")
    assert _common.vector_flags(str(x86)) == ["avx", "avx2", "avx512_vnni", "avx512f", "fma", "sse4_1"]
    assert _common.vector_flags(str(arm)) == ["asimd", "asimddp"]
    assert _common.vector_flags(str(tmp_path / "missing")) == []
