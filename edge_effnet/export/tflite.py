"""Keras model -> .tflite bytes for one mode of the formats table; what a .tflite file holds.

Conversion needs TensorFlow (imported inside the functions). Graphs are static, batch 1
(the model is built with batch_size=1), and take raw RGB pixels: preprocessing is in the graph.
"""
from __future__ import annotations

import contextlib
import logging
import warnings

import numpy as np

from ..errors import UserError
from .formats import Mode

# Ops that only appear around a dynamic batch dimension; an exported graph must have none.
DYNAMIC_SHAPE_OPS = ("SHAPE", "PACK", "STRIDED_SLICE")
# measure_ranges: float activations one probe pass keeps (B1 at 240 px: 138 MB in all; B7: ~5 GB)
MEASURE_BYTES = 1 << 30


def _pixels(images: np.ndarray, i: int) -> np.ndarray:
    """Calibration sample i: float pixels, batch 1. The first image gets one 0 and one 255 pixel so
    the input range is exactly 0..255: the uint8 input then has scale 1 and zero point 0 and an app
    feeds its raw bytes."""
    x = images[i].astype(np.float32)[None]
    if i == 0:
        x[0, 0, 0, :], x[0, 0, 1, :] = 0.0, 255.0
    return x


def representative_images(images: np.ndarray):
    """The representative data set (every calibration image, batch 1), with a progress bar."""
    from ..console import progress

    def gen():
        with progress(range(len(images)), "calibrating") as bar:
            for i in bar:
                yield [_pixels(images, i)]
    return gen


@contextlib.contextmanager
def measured_calibration(images: np.ndarray):
    """Within this context the TFLite converter's calibration step takes its activation ranges from
    measure_ranges (all threads, XNNPACK) instead of logging every image in its own interpreter.

    The stock step runs the float model on one thread without XNNPACK (B1: 0.25 s per image, 25 s
    of a 100-image export). It also logs an op's inputs after in-place ops (a residual ADD, the
    swish MUL) have overwritten them, so e.g. a projection conv's range covers the residual sum
    (3x wide in B0). Here the converter still calibrates, on the first image only, so the file
    has its usual structure; then every range it logged is replaced by the measured one."""
    from tensorflow.lite.python.optimize import calibrator

    stock = calibrator.Calibrator.calibrate

    def calibrate(self, dataset_gen):
        calibrated = stock(self, lambda: iter([[_pixels(images, 0)]]))
        return measure_ranges(calibrated, dataset_gen) or stock(self, dataset_gen)

    calibrator.Calibrator.calibrate = calibrate
    try:
        yield
    finally:
        calibrator.Calibrator.calibrate = stock


def measure_ranges(calibrated: bytes, dataset_gen) -> bytes | None:
    """`calibrated` (a float model with a logged min/max per tensor) with each of those ranges
    measured over dataset_gen's samples; None for a model this does not handle (several subgraphs,
    per-channel ranges). The logged tensors become graph outputs of a probe copy, which runs with
    XNNPACK on every core: outputs are written out whole, never computed in place. Outputs keep
    their memory, so big models take several passes of at most MEASURE_BYTES each."""
    import os

    from tensorflow.lite.tools import flatbuffer_utils

    from ..runtime import _tflite_interpreter_class, backend_for

    model = flatbuffer_utils.convert_bytearray_to_object(calibrated)
    graph = model.subgraphs[0]
    logged = [i for i, t in enumerate(graph.tensors)
              if t.quantization is not None and t.quantization.min is not None and len(t.quantization.min)]
    if len(model.subgraphs) != 1 or any(len(graph.tensors[i].quantization.min) != 1 for i in logged):
        return None
    interpreter_class, _ = _tflite_interpreter_class(backend_for("probe.tflite"))  # the first installed
    inputs, outputs = [int(i) for i in graph.inputs], graph.outputs
    passes, size = [[]], 0
    for i in (i for i in logged if i not in inputs):
        nbytes = 4 * int(np.prod(graph.tensors[i].shape))
        if passes[-1] and size + nbytes > MEASURE_BYTES:
            passes.append([])
            size = 0
        passes[-1].append(i)
        size += nbytes
    low, high = {i: np.inf for i in logged}, {i: -np.inf for i in logged}
    for n, probed in enumerate(passes):
        graph.outputs = np.array(probed, np.int32)
        read = probed + [i for i in inputs if i in low] * (n == 0)  # input ranges: from the first pass
        probe = interpreter_class(model_content=bytes(flatbuffer_utils.convert_object_to_bytearray(model)),
                                  num_threads=len(os.sched_getaffinity(0)))
        probe.allocate_tensors()
        for sample in dataset_gen():
            for i, x in zip(inputs, sample):
                probe.set_tensor(i, x)
            probe.invoke()
            for i in read:
                x = probe.get_tensor(i)
                low[i], high[i] = min(low[i], float(x.min())), max(high[i], float(x.max()))
    graph.outputs = outputs
    for i in logged:
        graph.tensors[i].quantization.min = np.array([low[i]], np.float32)
        graph.tensors[i].quantization.max = np.array([high[i]], np.float32)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def frozen_graph(model):
    """The model as one traced function with its weights as constants, input named "pixels".

    TFLiteConverter.from_keras_model first writes a SavedModel, tracing every layer again: 6x the
    CPU time of this path (a full-size B1: most of the export) for the same graph and outputs.
    """
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    fn = tf.function(lambda pixels: model(pixels, training=False))
    spec = tf.TensorSpec(model.inputs[0].shape, tf.float32, name="pixels")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_variables_to_constants_v2(fn.get_concrete_function(spec))


def convert(model, mode: Mode, io: str = "float32", calibration: np.ndarray | None = None) -> bytes:
    """Convert a batch-1 Keras model to a .tflite flatbuffer in `mode` (see formats.MODES)."""
    return _run_converter(model, mode, io, calibration)


def calibrate(model, mode: Mode, io: str, calibration: np.ndarray) -> bytes:
    """The converter's own calibrate-only output for a full-integer `mode`: the float graph with the
    measured activation ranges, which its quantization step reads. quantize_calibrated() finishes it
    as convert() would, as often as needed (export/mixed.py tries several float-op sets)."""
    return _run_converter(model, mode, io, calibration, calibrate_only=True)


def quantize_calibrated(calibrated: bytes, io: str, keep_float: tuple[str, ...] = ()) -> bytes:
    """The converter's quantization step (its MLIR quantizer, as convert() runs it) on a calibrate()
    output, with the ops writing the tensors named in `keep_float` left in float: the quantizer
    puts DEQUANTIZE before and QUANTIZE after them (`denylisted_nodes`, TF 2.21)."""
    from ..console import quiet_output

    import tensorflow as tf
    from tensorflow.lite.python import convert as tf_convert

    with warnings.catch_warnings(), quiet_output((1, 2)):
        warnings.simplefilter("ignore")
        return tf_convert.mlir_quantize(calibrated, input_data_type=tf.as_dtype(io), output_data_type=tf.as_dtype(io),
                                        denylisted_nodes=list(keep_float) or None)


def _run_converter(model, mode: Mode, io: str, calibration, calibrate_only: bool = False) -> bytes:
    from ..console import import_keras, quiet_output

    import_keras()
    import tensorflow as tf

    absl = logging.getLogger("absl")  # "consider providing the trackable_obj": frozen graphs need none
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen_graph(model)])
        _configure(tf, converter, mode, io, calibration)
        converter._experimental_calibrate_only = calibrate_only
        measured = measured_calibration(calibration) if mode.calibration else contextlib.nullcontext()
        with warnings.catch_warnings(), quiet_output((1, 2)), measured:
            warnings.simplefilter("ignore")
            return converter.convert()
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"TFLite conversion ({mode.name}) failed: {str(exc).strip().splitlines()[-1]}") from None
    finally:
        absl.setLevel(level)


def _configure(tf, converter, mode: Mode, io: str, calibration) -> None:
    """Apply the mode's settings (formats.MODES data) to a TFLiteConverter."""
    settings = mode.settings["tflite"]
    converter.optimizations = [getattr(tf.lite.Optimize, o) for o in settings.get("optimizations", ())]
    if "supported_ops" in settings:
        converter.target_spec.supported_ops = [getattr(tf.lite.OpsSet, o) for o in settings["supported_ops"]]
    if "supported_types" in settings:
        converter.target_spec.supported_types = [tf.as_dtype(t) for t in settings["supported_types"]]
    for name, value in settings.get("attributes", {}).items():
        setattr(converter, name, value)
    if mode.calibration:
        if calibration is None or not len(calibration):
            raise UserError(f"{mode.flag} needs calibration images")
        converter.representative_dataset = representative_images(calibration)
        if io != "float32":
            converter.inference_input_type = converter.inference_output_type = tf.as_dtype(io)


def inspect(path: str) -> dict:
    """What the file holds (read by runtime.tflite_reader): ops with versions, the minimum runtime the
    converter recorded, tensor types (and which activations stayed float), dynamic-shape ops."""
    from ..runtime.tflite_reader import read_tflite

    model = read_tflite(path)
    counts: dict[tuple[str, int], int] = {}
    for op in model.operators:
        counts[op.op, op.version] = counts.get((op.op, op.version), 0) + 1
    dtypes: dict[str, int] = {}
    for t in model.tensors:
        dtypes[t.dtype] = dtypes.get(t.dtype, 0) + 1
    float_activations = [t.name for t in model.tensors if t.dtype in ("FLOAT32", "FLOAT16") and not t.constant]
    ops = [{"op": op, "version": v, "count": n} for (op, v), n in sorted(counts.items())]
    return {"ops": ops, "num_ops": len(model.operators), "min_runtime_version": model.metadata.get("min_runtime_version"),
            "tensor_types": dict(sorted(dtypes.items())), "float_activations": float_activations,
            "dynamic_shape_ops": sorted({o["op"] for o in ops if o["op"] in DYNAMIC_SHAPE_OPS})}
