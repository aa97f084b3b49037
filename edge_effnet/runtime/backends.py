"""The runtimes that time and run exported models, as data (standard library only).

The CLI lists these choices in --help without importing numpy or an interpreter. choose_files()
picks what a bundle folder (.tflite and/or .onnx files) runs in here, from what is installed
(found without importing it).
"""
from __future__ import annotations

import importlib.util
import os
from typing import Callable, NamedTuple

from ..errors import UserError


class Backend(NamedTuple):
    extension: str   # the model files it runs
    module: str      # the Python module that is the runtime
    install: str     # how to get it
    package: str     # its name on PyPI, as a user reads it in a message
    light: bool      # runs on a device without TensorFlow (the runtime extras)


BACKEND_TABLE: dict[str, Backend] = {
    "litert": Backend(".tflite", "ai_edge_litert", "pip install 'edge-effnet[runtime]'", "ai-edge-litert", True),
    "tflite-runtime": Backend(".tflite", "tflite_runtime",
                              "pip install 'edge-effnet[runtime-legacy]' (needs numpy < 2)", "tflite-runtime", True),
    "tf-lite": Backend(".tflite", "tensorflow", "pip install 'edge-effnet[convert]'", "tensorflow", False),
    "onnxruntime": Backend(".onnx", "onnxruntime", "pip install 'edge-effnet[runtime-onnx]'", "onnxruntime", True),
    "keras": Backend(".keras", "keras", "pip install 'edge-effnet[convert]'", "keras", False),
}
TFLITE_BACKENDS = tuple(b for b, row in BACKEND_TABLE.items() if row.extension == ".tflite")  # auto: first importable
BACKENDS = ("auto",) + tuple(BACKEND_TABLE)
MODEL_EXTENSIONS = tuple(dict.fromkeys(row.extension for row in BACKEND_TABLE.values()))
# What a folder's files run in with --backend auto: the light runtimes first (a Pi has only those),
# so a bundle with .tflite and .onnx runs its .tflite in LiteRT, else its .onnx in onnxruntime.
AUTO_ORDER = tuple(sorted(BACKEND_TABLE, key=lambda b: not BACKEND_TABLE[b].light))


def extension_of(backend: str) -> str | None:
    """The model files `backend` runs (None for auto or an unknown name)."""
    row = BACKEND_TABLE.get(backend)
    return row.extension if row else None


def is_installed(backend: str) -> bool:
    """Whether `backend`'s module can be found (not imported: no TensorFlow start-up for a look)."""
    return importlib.util.find_spec(BACKEND_TABLE[backend].module) is not None


def _either(names: list[str]) -> str:
    if len(names) == 1:
        return f"{names[0]} is not installed"
    return f"neither {', '.join(names[:-1])} nor {names[-1]} is installed"


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def choose_files(folder: str, files: list[str], backend: str = "auto",
                 installed: Callable[[str], bool] | None = None) -> tuple[list[str], str, str]:
    """(the files of `folder` to run, the backend that runs them, one line saying which and why).

    `files` are the folder's file names. With --backend auto: the files of the first backend in
    AUTO_ORDER that is installed and has files here (all files of that type: a folder can hold
    several). Raises UserError, one line naming what to install, when no installed runtime runs any.
    """
    installed = installed or is_installed
    models = sorted((f for f in files if os.path.splitext(f)[1].lower() in MODEL_EXTENSIONS),
                    key=lambda f: (MODEL_EXTENSIONS.index(os.path.splitext(f)[1].lower()), f))
    where = folder.rstrip(os.sep) + os.sep
    if not models:
        raise UserError(f"no model files ({', '.join(MODEL_EXTENSIONS)}) in folder {folder}")

    def of(name: str) -> list[str]:
        return [f for f in models if f.lower().endswith(BACKEND_TABLE[name].extension)]

    if backend != "auto":
        if not of(backend):
            raise UserError(f"{where} holds no {extension_of(backend)} file for --backend {backend} "
                            f"(it holds {_and(models)})")
        return of(backend), backend, f"{where}: {_and(of(backend))} in {BACKEND_TABLE[backend].package} (--backend)"
    skipped = []
    for name in AUTO_ORDER:
        if not of(name):
            continue
        if installed(name):
            why = f" ({_either(skipped)})" if skipped else ""
            return of(name), name, f"{where}: {_and(of(name))} in {BACKEND_TABLE[name].package}{why}"
        if BACKEND_TABLE[name].light:
            skipped.append(BACKEND_TABLE[name].package)
    light = [name for name in AUTO_ORDER if of(name) and BACKEND_TABLE[name].light]
    first = light[0] if light else next(name for name in AUTO_ORDER if of(name))
    runtimes = [BACKEND_TABLE[name].package for name in (light or [first])]
    raise UserError(f"{where} holds {_and(models)}, but {_either(runtimes)}: {BACKEND_TABLE[first].install}")
