"""Keras model -> .tflite bytes for one mode of the formats table; what a .tflite file holds.

Conversion needs TensorFlow (imported inside the functions). Graphs are static, batch 1
(the model is built with batch_size=1), and take raw RGB pixels: preprocessing is in the graph.
"""
from __future__ import annotations

import logging
import warnings

import numpy as np

from ..errors import UserError
from .formats import Mode

# Ops that only appear around a dynamic batch dimension; an exported graph must have none.
DYNAMIC_SHAPE_OPS = ("SHAPE", "PACK", "STRIDED_SLICE")


def representative_images(images: np.ndarray):
    """The representative data set: float pixels, batch 1, with a progress bar.

    The first image gets one 0 and one 255 pixel so the input range is exactly 0..255:
    the uint8 input then has scale 1 and zero point 0 and an app feeds its raw bytes.
    """
    from ..data import progress

    def gen():
        with progress(range(len(images)), "calibrating") as bar:
            for i in bar:
                x = images[i].astype(np.float32)[None]
                if i == 0:
                    x[0, 0, 0, :], x[0, 0, 1, :] = 0.0, 255.0
                yield [x]
    return gen


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
    from ..models import import_keras, quiet_output

    import_keras()
    import tensorflow as tf

    absl = logging.getLogger("absl")  # "consider providing the trackable_obj": frozen graphs need none
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen_graph(model)])
        _configure(tf, converter, mode, io, calibration)
        with warnings.catch_warnings(), quiet_output((1, 2)):
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
    """What the file holds: ops with versions, the minimum runtime the converter recorded,
    tensor types (and which activations stayed float), dynamic-shape ops."""
    from ..models import import_keras

    import_keras()
    from tensorflow.lite.python import schema_py_generated as schema

    with open(path, "rb") as f:
        buf = f.read()
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(buf, 0))
    op_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    type_names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    codes = [(op_names.get(max(c.builtinCode, c.deprecatedBuiltinCode), "CUSTOM"), c.version)
             for c in model.operatorCodes]
    graph = model.subgraphs[0]
    counts: dict[tuple[str, int], int] = {}
    for op in graph.operators:
        key = codes[op.opcodeIndex]
        counts[key] = counts.get(key, 0) + 1
    metadata = {m.name.decode(): model.buffers[m.buffer].data for m in (model.metadata or [])}
    min_runtime = metadata.get("min_runtime_version")
    if min_runtime is not None:
        min_runtime = bytes(min_runtime).split(b"\0")[0].decode()
    dtypes: dict[str, int] = {}
    float_activations = []
    for t in graph.tensors:
        name = type_names.get(t.type, str(t.type))
        dtypes[name] = dtypes.get(name, 0) + 1
        constant = t.buffer and model.buffers[t.buffer].data is not None
        if name in ("FLOAT32", "FLOAT16") and not constant:
            float_activations.append(t.name.decode())
    ops = [{"op": op, "version": v, "count": n} for (op, v), n in sorted(counts.items())]
    return {"ops": ops, "num_ops": len(graph.operators), "min_runtime_version": min_runtime,
            "tensor_types": dict(sorted(dtypes.items())), "float_activations": float_activations,
            "dynamic_shape_ops": sorted({o["op"] for o in ops if o["op"] in DYNAMIC_SHAPE_OPS})}
