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
