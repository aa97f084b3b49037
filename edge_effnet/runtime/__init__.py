"""Open an exported model in a runtime and run it on raw RGB pixels.

For a .tflite file only numpy and the interpreter are imported (ai-edge-litert,
else tflite-runtime, else tf.lite), so this module works on a Raspberry Pi with
`pip install edge-effnet[runtime]` and nothing else. Never import tensorflow or
keras at module level here.
"""
from __future__ import annotations

import os
import platform
import re

import numpy as np

from .backends import BACKEND_TABLE, BACKENDS, MODEL_EXTENSIONS, TFLITE_BACKENDS  # noqa: F401 (re-exported)
from ..errors import UserError


def backend_for(path: str, backend: str = "auto") -> str:
    """The backend that runs `path`: `backend` checked against the file type, or the first installed."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in MODEL_EXTENSIONS:
        raise UserError(f"unsupported model file {path}: expected {', '.join(MODEL_EXTENSIONS)}")
    if backend != "auto":
        if backend not in BACKEND_TABLE:
            raise UserError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
        if BACKEND_TABLE[backend].extension != ext:
            fits = [b for b, row in BACKEND_TABLE.items() if row.extension == ext]
            raise UserError(f"backend {backend} cannot run {ext} files ({path}); use {' or '.join(fits)}")
        return backend
    candidates = [b for b, row in BACKEND_TABLE.items() if row.extension == ext]
    for name in candidates[:-1]:  # the last one (tf-lite for .tflite) is the fallback
        try:
            __import__(BACKEND_TABLE[name].module)
            return name
        except ImportError:
            continue
    return candidates[-1]


def check_model_file(path: str) -> None:
    """Cheap checks of a model file before any runtime opens it: it exists, is a file, and a .tflite
    starts with the TFL3 FlatBuffer identifier, a .keras is a Keras archive (zip with config.json)."""
    if not os.path.exists(path):
        raise UserError(f"model file not found: {path}")
    if not os.path.isfile(path):
        raise UserError(f"{path} is a folder, not a model file")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".keras":
        from ..model.weights import check_keras_file

        check_keras_file(path)
    elif ext == ".tflite":
        try:
            with open(path, "rb") as f:
                head = f.read(8)
        except OSError as exc:
            raise UserError(f"cannot read {path}: {exc.strerror}") from None
        if len(head) < 8 or head[4:8] != b"TFL3":
            raise UserError(f"{path} is not a TensorFlow Lite model (no 'TFL3' FlatBuffer identifier)")


def _tflite_interpreter_class(backend: str):
    try:
        if backend == "litert":
            from ai_edge_litert.interpreter import Interpreter
            import ai_edge_litert as mod
        elif backend == "tflite-runtime":
            from tflite_runtime.interpreter import Interpreter
            import tflite_runtime as mod
        else:
            from ..console import import_keras

            import_keras()
            import tensorflow as mod
            Interpreter = mod.lite.Interpreter
    except ImportError as exc:
        raise UserError(f"backend {backend} is not installed ({exc}); {BACKEND_TABLE[backend].install}") from None
    return Interpreter, getattr(mod, "__version__", "unknown")


def configure_tf_threads(num_threads: int):
    """Import TensorFlow with `num_threads` intra-op threads and one inter-op thread; returns tf.

    TensorFlow fixes its thread pools when it initialises (the first op or variable), so this
    must run before any model is built or loaded in the process.
    """
    from ..console import import_keras

    import_keras()
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(num_threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        now = tf.config.threading.get_intra_op_parallelism_threads()
        raise UserError(f"TensorFlow already runs in this process with {now or 'default'} intra-op threads; "
                        f"start a new process to use {num_threads}") from None
    return tf


def prepare_backend(backend: str, num_threads: int = 1) -> str:
    """Import `backend` (and set TensorFlow's threads for keras) before any model is opened.

    Returns the backend's version. Lets a caller time imports apart from model start-up.
    """
    if backend in TFLITE_BACKENDS:
        return _tflite_interpreter_class(backend)[1]
    if backend == "keras":
        return configure_tf_threads(num_threads).__version__
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError(f"onnxruntime is not installed: {BACKEND_TABLE['onnxruntime'].install}") from None
    return ort.__version__


_MISSING_OP = re.compile(r"Didn't find op for builtin opcode '(\w+)' version '(\d+)'")


def _open_error(path: str, backend: str, exc: Exception) -> UserError:
    text = str(exc)
    missing = _MISSING_OP.search(text)
    if missing:
        return UserError(f"{backend} cannot run {path}: op {missing.group(1)} version {missing.group(2)} "
                         "is newer than this runtime knows; upgrade the runtime or re-export")
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return UserError(f"{backend} cannot open {path}: {first}")


class Runner:
    """A loaded model: `inputs`/`outputs` describe tensors; `run(x)` feeds raw tensors."""

    backend: str
    version: str
    inputs: list[dict]
    outputs: list[dict]

    def run(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.inputs[0]["shape"])

    def classify(self, pixels: np.ndarray) -> np.ndarray:
        """Float scores for a batch-1 image of raw RGB pixels (H, W, 3) or (1, H, W, 3), 0..255."""
        x = np.asarray(pixels, dtype=np.float32)
        if x.ndim == 3:
            x = x[None]
        spec = self.inputs[0]
        dtype = np.dtype(spec["dtype"])
        if spec.get("layout") == "nchw":
            x = x.transpose(0, 3, 1, 2)
        if np.issubdtype(dtype, np.integer):
            scale, zero = spec.get("scale") or 1.0, spec.get("zero_point") or 0
            info = np.iinfo(dtype)
            x = np.clip(np.round(x / scale + zero), info.min, info.max).astype(dtype)
        else:
            x = x.astype(dtype)
        y = self.run(x)
        out = self.outputs[0]
        if np.issubdtype(y.dtype, np.integer):
            y = (y.astype(np.float32) - (out.get("zero_point") or 0)) * (out.get("scale") or 1.0)
        return y.reshape(-1).astype(np.float32)


class TFLiteRunner(Runner):
    def __init__(self, path: str, backend: str, num_threads: int = 1):
        Interpreter, self.version = _tflite_interpreter_class(backend)
        self.backend, self.path = backend, path
        from ..console import quiet_output

        try:
            with quiet_output():  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
                self.interpreter = Interpreter(model_path=path, num_threads=num_threads)
                self.interpreter.allocate_tensors()
        except Exception as exc:  # the interpreters raise ValueError/RuntimeError with C++ text
            raise _open_error(path, backend, exc) from None
        self.inputs = [self._describe(d) for d in self.interpreter.get_input_details()]
        self.outputs = [self._describe(d) for d in self.interpreter.get_output_details()]
        self._in = self.interpreter.get_input_details()[0]["index"]
        self._out = self.interpreter.get_output_details()[0]["index"]

    @staticmethod
    def _describe(d: dict) -> dict:
        scale, zero = d.get("quantization", (0.0, 0))
        return {"name": d["name"], "shape": [int(v) for v in d["shape"]], "dtype": np.dtype(d["dtype"]).name,
                "scale": float(scale) or None, "zero_point": int(zero) if scale else None}

    def run(self, x: np.ndarray) -> np.ndarray:
        self.interpreter.set_tensor(self._in, x)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self._out).copy()


# onnxruntime's int8 (uint8 x int8) kernels on x86 without VNNI add pairs of products in 16 bits with
# saturation (vpmaddubsw), so they do not compute what a QDQ file defines: measured on an AVX2 EPYC,
# Lite0 int8 top-1 88% against 96% for the same file in onnxruntime's reference QDQ arithmetic (its
# int8 fusions off). ARM and x86 with VNNI accumulate in 32 bits. onnxruntime's own remedy (7-bit
# weights, reduce_range) lost as much on that host, fusions on or off (86-90%).
SATURATION_NOTE = "onnxruntime's int8 kernels on x86 without VNNI saturate 16-bit sums"
QDQ_FUSIONS = ["QDQSelectorActionTransformer"]  # the onnxruntime optimizer that makes QLinearConv & co.


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (Linux: the first flags/Features line of /proc/cpuinfo; else empty)."""
    try:
        with open(cpuinfo) as f:
            return set(next((line.split(":", 1)[1].split() for line in f if line.startswith(("flags", "Features"))),
                            []))
    except OSError:
        return set()


def onnx_int8_exact(machine: str | None = None, flags: set[str] | None = None) -> bool:
    """Whether onnxruntime's int8 kernels on this CPU compute int8 QDQ files exactly (SATURATION_NOTE)."""
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i386", "i686"):
        return True
    return bool({"avx512_vnni", "avx_vnni"} & (cpu_flags() if flags is None else flags))


class OnnxRunner(Runner):
    def __init__(self, path: str, num_threads: int = 1, reference_qdq: bool = False):
        """reference_qdq: run int8 QDQ nodes as dequantize -> float op -> quantize (the file's exact
        arithmetic, slower) instead of onnxruntime's fused int8 kernels."""
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError(f"onnxruntime is not installed: {BACKEND_TABLE['onnxruntime'].install}") from None
        self.backend, self.version, self.path = "onnxruntime", ort.__version__, path
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = num_threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"],
                                                disabled_optimizers=QDQ_FUSIONS if reference_qdq else None)
        except Exception as exc:
            raise _open_error(path, "onnxruntime", exc) from None
        self.inputs = [self._describe(i) for i in self.session.get_inputs()]
        self.outputs = [self._describe(o) for o in self.session.get_outputs()]

    @staticmethod
    def _describe(t) -> dict:
        dtype = {"tensor(float)": "float32", "tensor(uint8)": "uint8", "tensor(int8)": "int8",
                 "tensor(float16)": "float16"}.get(t.type, t.type)
        shape = [d if isinstance(d, int) else -1 for d in t.shape]
        layout = "nchw" if len(shape) == 4 and shape[1] == 3 and shape[3] != 3 else "nhwc"
        return {"name": t.name, "shape": shape, "dtype": dtype, "scale": None, "zero_point": None,
                "layout": layout}

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.outputs[0]["name"]], {self.inputs[0]["name"]: x})[0]


class KerasRunner(Runner):
    """A .keras file (`path`) or an in-memory Keras `model`, run by TensorFlow with `num_threads`."""

    def __init__(self, path: str | None, num_threads: int = 1, model=None):
        from ..model.keras_io import load_model_file

        tf = configure_tf_threads(num_threads)
        self.backend, self.version, self.path = "keras", tf.__version__, path
        self.model = load_model_file(path) if model is None else model
        shape = [1 if d is None else int(d) for d in self.model.inputs[0].shape]
        self.inputs = [{"name": self.model.inputs[0].name, "shape": shape, "dtype": "float32",
                        "scale": None, "zero_point": None}]
        self.outputs = [{"name": "output", "shape": [int(d or 1) for d in self.model.outputs[0].shape],
                         "dtype": "float32", "scale": None, "zero_point": None}]
        self._fn = tf.function(lambda x: self.model(x, training=False))

    def run(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self._fn(x))


def open_model(path: str, backend: str = "auto", num_threads: int = 1, reference_qdq: bool = False) -> Runner:
    """Load `path` (.tflite, .onnx, .keras) in `backend` with `num_threads` threads (reference_qdq:
    OnnxRunner)."""
    check_model_file(path)
    from ..limits import check

    check("threads", num_threads, optional=False)
    backend = backend_for(path, backend)
    if backend in TFLITE_BACKENDS:
        return TFLiteRunner(path, backend, num_threads)
    if backend == "onnxruntime":
        return OnnxRunner(path, num_threads, reference_qdq)
    return KerasRunner(path, num_threads)
