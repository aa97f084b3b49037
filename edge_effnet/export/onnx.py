"""Keras model -> ONNX (tf2onnx), int8 QDQ ONNX (onnxruntime's quantizer), and their self-check.

The ONNX files keep the project's input contract: one float32 tensor of raw RGB pixels 0..255,
batch 1, preprocessing inside the graph. `layout="nchw"` adds a transpose at the input so an app
feeds (1, 3, H, W); the default is (1, H, W, 3) like the TFLite files. Node names follow the Keras
layer names (`stem_conv/convolution`, `block2a_se_reduce/Sigmoid`, `predictions/Softmax`).

int8 is shaped for onnxruntime's CPU kernels (measured, benchmarks/results/onnx_int8.md): its QDQ
fusions turn uint8-activation Conv/Sigmoid/Mul/Add/GlobalAveragePool into QLinear kernels, while
int8 activations leave most convolutions in float between Q/DQ pairs (B0 2.8x slower than float).
tf2onnx writes each global pooling as NCHW->NHWC Transpose + ReduceMean, which no int8 kernel takes
(a full-size transpose and a float mean in each squeeze-excite block): both files get a
GlobalAveragePool instead (exact). What onnxruntime runs faster in float stays float in the int8
file (formats.py, MODES["int8"].settings["onnx"]["float_ops"]).

tensorflow, tf2onnx, onnx and onnxruntime are imported inside the functions.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass

import numpy as np

from .. import __version__
from ..errors import UserError
from ..fsutil import atomic_file
from .formats import LAYOUTS

INPUT_NAME = "pixels"


@dataclass(frozen=True)
class OnnxOptions:
    opset: int = 18            # the newest tf2onnx 1.17 writes; onnxruntime and onnx2tf read it
    layout: str = "nhwc"       # nhwc | nchw (a transpose at the input)
    per_channel: bool = True   # int8: one weight scale per output channel


def _import_onnx_tools():
    from ..console import import_keras

    import_keras()  # tf2onnx imports TensorFlow: keep its C++ start-up lines off the console
    try:
        import onnx
        import onnxruntime  # noqa: F401
        import tf2onnx
    except ImportError as exc:
        raise UserError(f"ONNX export needs the onnx extra ({exc.name} is missing): "
                        "pip install 'edge-effnet[onnx]'") from None
    return onnx, tf2onnx


def pixels_for(images: np.ndarray, layout: str) -> np.ndarray:
    """uint8/float (N, H, W, 3) pixels -> float32 in the file's layout."""
    x = np.asarray(images, dtype=np.float32)
    return x.transpose(0, 3, 1, 2) if layout == "nchw" else x


def _layer_names(onnx_model, model) -> None:
    """tf2onnx names nodes and tensors `<model>_1/<layer>_1/<op>`: rename them `<layer>/<op>`."""
    layers = {layer.name for layer in model.layers}
    graph = onnx_model.graph

    scope = re.compile(re.escape(model.name) + r"(?:_\d+)?/([^/]+)/")

    def layer(match) -> str:
        name = match.group(1)
        name = name if name in layers else re.sub(r"_\d+$", "", name)
        return f"{name}/" if name in layers else match.group(0)

    def short(name: str) -> str:
        return scope.sub(layer, name)

    names = {n.name for n in graph.node} | {t for n in graph.node for t in (*n.input, *n.output)}
    names |= {i.name for i in graph.initializer} | {v.name for v in graph.value_info}
    mapping = {name: short(name) for name in names}
    counts: dict[str, int] = {}
    for new in mapping.values():
        counts[new] = counts.get(new, 0) + 1
    mapping = {old: new for old, new in mapping.items() if new != old and counts[new] == 1 and new not in names}
    for node in graph.node:
        node.name = mapping.get(node.name, node.name)
        node.input[:] = [mapping.get(t, t) for t in node.input]
        node.output[:] = [mapping.get(t, t) for t in node.output]
    for item in (*graph.initializer, *graph.value_info):
        item.name = mapping.get(item.name, item.name)


def metadata_for(model, *, variant: str | None, preprocessing: str | None, layout: str,
                 labels: list[str] | None = None, extra: dict | None = None) -> dict[str, str]:
    """metadata_props of an exported file: strings only (labels as a JSON list)."""
    _, h, w, c = (int(d or 1) for d in model.inputs[0].shape)
    shape = [1, c, h, w] if layout == "nchw" else [1, h, w, c]
    props = {"producer": f"edge_effnet {__version__}", "variant": variant or model.name,
             "preprocessing": preprocessing or "unknown", "input": f"float32 RGB pixels 0..255, {layout.upper()}",
             "input_range": "0..255", "layout": layout, "input_shape": json.dumps(shape)}
    if labels is not None:
        props["labels"] = json.dumps(list(labels))
    props.update({k: str(v) for k, v in (extra or {}).items()})
    return props


def keras_to_onnx(model, output: str, *, metadata: dict[str, str] | None = None,
                  options: OnnxOptions = OnnxOptions()):
    """Write `model` (raw-pixel input, any batch dim) as a static batch-1 float ONNX file."""
    if options.layout not in LAYOUTS:
        raise UserError(f"layout must be one of {', '.join(LAYOUTS)} (got {options.layout!r})")
    onnx, tf2onnx = _import_onnx_tools()
    import tensorflow as tf

    _, h, w, c = model.inputs[0].shape
    if None in (h, w, c):
        raise UserError(f"ONNX export needs a fixed input size; the model's input is {tuple(model.inputs[0].shape)}")
    signature = [tf.TensorSpec((1, h, w, c), tf.float32, name=INPUT_NAME)]
    nchw = [INPUT_NAME] if options.layout == "nchw" else None
    try:
        proto, _ = tf2onnx.convert.from_keras(model, input_signature=signature, opset=options.opset,
                                              inputs_as_nchw=nchw)
    except Exception as exc:  # tf2onnx raises plain exceptions with its own text
        raise UserError(f"tf2onnx could not convert {model.name}: {str(exc).strip().splitlines()[0]}") from None
    _layer_names(proto, model)
    global_pools(proto)
    proto.producer_name, proto.producer_version = "edge_effnet", __version__
    onnx.helper.set_model_props(proto, metadata or {})
    onnx.checker.check_model(proto)
    with atomic_file(output) as tmp:
        onnx.save(proto, tmp)
    return proto


class _Calibration:
    """onnxruntime CalibrationDataReader over raw pixels, one image per step."""

    def __init__(self, images: np.ndarray, layout: str, input_name: str):
        self._batches = iter([{input_name: x[None]} for x in pixels_for(images, layout)])

    def get_next(self):
        return next(self._batches, None)


def _shapes(proto) -> dict[str, list]:
    from onnx import shape_inference

    inferred = shape_inference.infer_shapes(proto)
    return {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}


def global_pools(proto) -> int:
    """Transpose(NCHW->NHWC) -> ReduceMean over H, W (tf2onnx's global pooling) becomes
    GlobalAveragePool on the NCHW tensor; Reshapes to the shape they are given are dropped. Same
    function; the number of pools rewritten."""
    import onnx
    from onnx import helper, numpy_helper

    graph, shapes = proto.graph, _shapes(proto)
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    nodes, unused, count = [], set(), 0
    for node in graph.node:
        source = producer.get(node.input[0]) if node.op_type == "ReduceMean" else None
        perm = next((list(a.ints) for a in source.attribute if a.name == "perm"), None) if source else None
        axes = consts.get(node.input[1]) if len(node.input) > 1 else None
        if source is None or source.op_type != "Transpose" or perm != [0, 2, 3, 1] or axes is None \
                or sorted(int(a) % 4 for a in np.ravel(axes)) != [1, 2] or len(shapes.get(source.input[0], ())) != 4 \
                or None in shapes.get(node.output[0], [None]):
            nodes.append(node)
            continue
        pooled, shape = node.output[0] + "_pool", f"{node.name}/shape"
        graph.initializer.append(numpy_helper.from_array(np.array(shapes[node.output[0]], np.int64), shape))
        nodes += [helper.make_node("GlobalAveragePool", [source.input[0]], [pooled], name=node.name),
                  helper.make_node("Reshape", [pooled, shape], [node.output[0]], name=f"{node.name}/reshape")]
        if readers[source.output[0]] == 1 and source.output[0] not in outputs:
            unused.add(source.name)
        count += 1
    if count:
        del graph.node[:]
        graph.node.extend(n for n in nodes if n.name not in unused)
        _drop_noop_reshapes(proto)
        onnx.checker.check_model(proto)
    return count


def _drop_noop_reshapes(proto) -> None:
    """Reshape(Reshape(x)) reads x; a Reshape to its input's own shape goes; then what nobody reads."""
    graph, shapes = proto.graph, _shapes(proto)
    producer = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    renamed, kept = {}, []
    for node in graph.node:
        node.input[:] = [renamed.get(i, i) for i in node.input]
        if node.op_type == "Reshape" and node.output[0] not in outputs:
            source = node.input[0]
            while source in producer and producer[source].op_type == "Reshape":
                source = producer[source].input[0]
            node.input[0] = source
            if shapes.get(source) == shapes.get(node.output[0]) and None not in shapes.get(source, [None]):
                renamed[node.output[0]] = source
                continue
        kept.append(node)
    read, live = set(outputs), []
    for node in reversed(kept):
        if any(o in read for o in node.output):
            live.append(node)
            read.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(live))
    initializers = [i for i in graph.initializer if i.name in read]
    del graph.initializer[:]
    graph.initializer.extend(initializers)


def _float_swish(proto) -> list[str]:
    """x * Sigmoid(x) -> com.microsoft QuickGelu(x, alpha=1) (the same function, onnxruntime's fused
    float kernel), with the output's shape recorded so the quantizer calibrates what follows."""
    from onnx import helper

    graph, shapes = proto.graph, _shapes(proto)
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    replaced, gone = {}, set()
    for node in graph.node:
        gates = [producer[i] for i in node.input if i in producer and producer[i].op_type == "Sigmoid"]
        if node.op_type != "Mul" or not gates or readers[gates[0].output[0]] != 1:
            continue
        gate = gates[0]
        if [i for i in node.input if i != gate.output[0]] != [gate.input[0]]:
            continue  # a squeeze-excite gate (x * sigmoid(y)): stays
        gone.add(gate.name)
        replaced[node.name] = helper.make_node("QuickGelu", [gate.input[0]], [node.output[0]], name=node.name,
                                               domain="com.microsoft", alpha=1.0)
        shape = shapes.get(node.output[0])
        if shape and None not in shape:
            graph.value_info.append(helper.make_tensor_value_info(node.output[0], 1, shape))
    nodes = [replaced.get(n.name, n) for n in graph.node if n.name not in gone]
    del graph.node[:]
    graph.node.extend(nodes)
    if replaced and not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return list(replaced)


def _stem(proto) -> list[str]:
    """The first Conv and every node it depends on (preprocessing, padding)."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    first = next((n for n in proto.graph.node if n.op_type == "Conv"), None)
    if first is None:
        return []
    found, todo = [first.name], list(first.input)
    while todo:
        node = producer.get(todo.pop())
        if node is not None and node.name not in found:
            found.append(node.name)
            todo += list(node.input)
    return found


def _output_softmax(proto) -> list[str]:
    """A Softmax that produces a graph output stays float: 8-bit steps of 1/255 would round every
    probability below 0.002 to zero (most of 1000 classes)."""
    outputs = {o.name for o in proto.graph.output}
    return [n.name for n in proto.graph.node if n.op_type == "Softmax" and set(n.output) & outputs]


FLOAT_OPS = {"stem": _stem, "output_softmax": _output_softmax}  # "swish": _float_swish rewrites the graph


def quantize_onnx(float_path: str, output: str, images: np.ndarray, *, options: OnnxOptions = OnnxOptions(),
                  settings: dict | None = None):
    """Static int8 QDQ quantization of `float_path`, calibrated on `images` (N, H, W, 3 pixels).

    `settings` (formats.MODES["int8"].settings["onnx"]): activations uint8|int8, MinMax calibration,
    int8 per-channel weights (options.per_channel), float_ops kept float. Float32 input and output
    stay, so the file takes the same raw pixels as the float one.
    """
    _import_onnx_tools()
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, \
        quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(_Calibration, CalibrationDataReader):
        pass

    settings = {"activations": "int8", "calibration": "MinMax", "float_ops": ("output_softmax",), **(settings or {})}
    if len(images) == 0:
        raise UserError("int8 quantization needs at least one calibration image")
    source = onnx.load(float_path)
    props = {p.key: p.value for p in source.metadata_props}
    float_ops = tuple(settings["float_ops"])
    with tempfile.TemporaryDirectory(prefix="edge-effnet-quant-") as work, atomic_file(output) as tmp:
        swish = _float_swish(source) if "swish" in float_ops else []
        rewritten, prepared = os.path.join(work, "rewritten.onnx"), os.path.join(work, "prepared.onnx")
        onnx.save(source, rewritten)
        quant_pre_process(rewritten, prepared, skip_symbolic_shape=True)
        excluded = [name for op in float_ops if op in FLOAT_OPS for name in FLOAT_OPS[op](onnx.load(prepared))]
        activations = QuantType.QUInt8 if settings["activations"] == "uint8" else QuantType.QInt8
        quantize_static(prepared, tmp, Reader(images, options.layout, source.graph.input[0].name),
                        quant_format=QuantFormat.QDQ, per_channel=options.per_channel,
                        activation_type=activations, weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, settings["calibration"]),
                        nodes_to_exclude=excluded)
        quantized = onnx.load(tmp)
        kept = [op for op in float_ops if op != "swish" or swish]
        props.update({"quantization": f"int8 static QDQ (onnxruntime): {settings['activations']} activations, "
                                      f"int8 {'per-channel' if options.per_channel else 'per-tensor'} weights, "
                                      f"{settings['calibration']} calibration"
                                      + (f"; float: {', '.join(kept)}" if kept else ""),
                      "calibration_images": str(len(images))})
        onnx.helper.set_model_props(quantized, props)  # the quantizer drops metadata_props
        onnx.save(quantized, tmp)
    return output


def convert(model, mode, io: str = "float32", calibration: np.ndarray | None = None, *, layout: str = "nhwc",
            metadata: dict | None = None) -> bytes:
    """The ONNX file for `mode` (its settings["onnx"] in the formats table) as bytes: float, or int8
    QDQ calibrated on `calibration` (raw pixels). `metadata`: variant, preprocessing, labels. The int8
    file quantizes `model` as given: export passes the GPTQ-rounded copy (settings corrected_weights)."""
    settings = mode.settings["onnx"]
    options = OnnxOptions(opset=settings.get("opset", OnnxOptions.opset), layout=layout,
                          per_channel=settings.get("per_channel", True))
    props = metadata_for(model, layout=layout, **(metadata or {"variant": None, "preprocessing": None}))
    with tempfile.TemporaryDirectory(prefix="edge-effnet-onnx-") as work:
        path = os.path.join(work, "model.onnx")
        keras_to_onnx(model, path, metadata=props, options=options)
        if settings.get("quantize"):
            if calibration is None or not len(calibration):
                raise UserError(f"{mode.flag} ONNX needs calibration images")
            path = quantize_onnx(path, os.path.join(work, "model_int8.onnx"), calibration, options=options,
                                 settings=settings)
        with open(path, "rb") as f:
            return f.read()


def inspect(path: str) -> dict:
    """What an ONNX file holds: op counts, opset, input layout, how it is quantized."""
    import onnx

    proto = onnx.load(path, load_external_data=False)
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}:{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    props = {p.key: p.value for p in proto.metadata_props}
    return {"ops": [{"op": op, "count": n} for op, n in sorted(counts.items())], "num_ops": len(proto.graph.node),
            "opset": max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=None),
            "layout": props.get("layout"), "quantization": props.get("quantization", "none (float32)"),
            "dynamic_shape_ops": sorted({op for op in counts if op in ("Shape", "ConstantOfShape", "NonZero")})}
