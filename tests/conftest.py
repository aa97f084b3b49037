"""Shared fixtures: run the CLI in a subprocess, real photos from scikit-image."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tests never wait on the network: `export --weights auto` falls back at once (tests/test_weights.py
# covers the probe itself).
os.environ.setdefault("EDGE_EFFNET_OFFLINE", "1")


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return env


def run_cli(*args, cwd=None, timeout=900) -> subprocess.CompletedProcess:
    """`edge-effnet ARGS` in a fresh interpreter (as a user runs it)."""
    return subprocess.run([sys.executable, "-m", "edge_effnet", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=cli_env(), timeout=timeout)


def photo_path(name: str = "chelsea.png") -> str:
    skimage_data = pytest.importorskip("skimage.data")
    path = os.path.join(os.path.dirname(skimage_data.__file__), name)
    assert os.path.exists(path), path
    return path


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def chelsea():
    return photo_path("chelsea.png")


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """scikit-learn's digits as a class-folder image set: 10 classes x 6 images, 32 x 32 RGB PNGs."""
    pytest.importorskip("sklearn")
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from digits_folder import write_digits

    out = tmp_path_factory.mktemp("digits")
    write_digits(str(out), size=32, per_class=6)
    return out


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (CI set: .ci/run sets it) every extra is installed, so a skip can only hide a failure
    (a missing runtime, a broken sysroot): it fails there. Outside CI a skip says why in one line."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI") and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome, report.longrepr = "failed", f"skipped in CI, where nothing may be: {reason}"


TORCH_REPORTED = []  # the guard below reports torch's arrival once, not in every later test


@pytest.fixture(autouse=True)
def torch_stays_out(request):
    """torch is never imported into the test process (issue 17: a run that had loaded torch aborted
    later inside tf2onnx). Tests that need torch run it in a subprocess. Checked around every test,
    not once at the end, so the failure names the test that imported it (or, at the first test's
    setup, that a module imported it at collection)."""
    if "torch" in sys.modules and not TORCH_REPORTED:
        TORCH_REPORTED.append(request.node.nodeid)
        pytest.fail("torch is in the test process before this test (imported at collection or by a fixture): "
                    "run torch in a subprocess (see tests/test_torch_import.py's PEER)", pytrace=False)
    yield
    if "torch" in sys.modules and not TORCH_REPORTED:
        TORCH_REPORTED.append(request.node.nodeid)
        pytest.fail("this test imported torch into the test process: run torch in a subprocess "
                    "(see tests/test_torch_import.py's PEER)", pytrace=False)
