"""Shared fixtures: run the CLI in a subprocess, real photos from scikit-image."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
