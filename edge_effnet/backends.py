"""The runtimes that time and run exported models, as data (standard library only).

The CLI lists these choices in --help without importing numpy or an interpreter.
"""
from __future__ import annotations

# backend: (file extension it runs, Python module, how to install it)
BACKEND_TABLE: dict[str, tuple[str, str, str]] = {
    "litert": (".tflite", "ai_edge_litert", "pip install 'edge-effnet[runtime]'"),
    "tflite-runtime": (".tflite", "tflite_runtime", "pip install 'edge-effnet[runtime-legacy]' (needs numpy < 2)"),
    "tf-lite": (".tflite", "tensorflow", "pip install 'edge-effnet[convert]'"),
    "onnxruntime": (".onnx", "onnxruntime", "pip install 'edge-effnet[onnx]'"),
    "keras": (".keras", "keras", "pip install 'edge-effnet[convert]'"),
}
TFLITE_BACKENDS = tuple(b for b, row in BACKEND_TABLE.items() if row[0] == ".tflite")  # auto: first importable
BACKENDS = ("auto",) + tuple(BACKEND_TABLE)
MODEL_EXTENSIONS = tuple(dict.fromkeys(row[0] for row in BACKEND_TABLE.values()))
