"""An ONNX model made elsewhere (PyTorch, tf2onnx, ...) -> TFLite, float and full-int8, via onnx2tf.

The converted files get the project's input contract: raw RGB pixels 0..255, NHWC, batch 1. The
input normalization the ONNX model expects (`normalization`, see NORMALIZATIONS) is written into
the graph in front of it before conversion, so the TFLite file needs no preprocessing in the app.

onnx2tf fetches a sample file from the internet in two places (int8 calibration without -cind, and
a dummy inference for one 4-D 3-channel input). It always runs here offline: in a temporary working
folder holding that sample file made from our own calibration images (the file it looks for first),
with -cind pointing at the same images, and with the proxy variables pointing nowhere.
"""
from __future__ import annotations

import importlib.util
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

import numpy as np

from ..errors import UserError
from .formats import MODES, NORMALIZATIONS, ONNX2TF_MODES

SAMPLE_FILE = "calibration_image_sample_data_20x128x128x3_float32.npy"  # onnx2tf's own name for it
SAMPLE_SHAPE = (20, 128, 128, 3)
OFFLINE_PROXY = "http://127.0.0.1:9"  # discard port: any download attempt fails at once
PIXELS = "pixels"


@dataclass(frozen=True)
class ImportOptions:
    resolution: int | None = None        # needed when the ONNX input has dynamic height/width
    normalization: str | None = None     # None: the file's metadata (ours: raw), else imagenet
    per_channel: bool = True             # quantized modes: one weight scale per output channel
    io: str = "uint8"                    # int8 mode: input/output dtype (uint8 | int8 | float32)


@dataclass
class SourceModel:
    """What inspect_onnx found in the file: enough to prepare, convert and check it."""
    path: str
    input_name: str
    layout: str                      # nchw | nhwc
    resolution: tuple[int, int]      # height, width (fixed)
    normalization: str
    output_name: str
    opset: int
    ops: list[str]
    metadata: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _import_onnx():
    try:
        import onnx
    except ImportError:
        raise UserError("ONNX import needs the onnx extra: pip install 'edge-effnet[onnx]'") from None
    return onnx


def onnx2tf_ops() -> set[str]:
    """The ONNX ops onnx2tf converts: one module per op in onnx2tf.ops (found without importing TF)."""
    spec = importlib.util.find_spec("onnx2tf")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("onnx2tf is not installed: pip install 'edge-effnet[onnx]'")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "ops")
    return {m.name for m in pkgutil.iter_modules([folder]) if not m.name.startswith("_")}


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _all_nodes(sub)


def _dims(value_info) -> list:
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None)
            for d in value_info.type.tensor_type.shape.dim]


def load_onnx(path: str):
    """The ModelProto in `path`, or a one-line UserError saying why it is not a usable ONNX model."""
    if not os.path.isfile(path):
        raise UserError(f"model file not found: {path}")
    onnx = _import_onnx()
    try:
        model = onnx.load(path)
    except Exception as exc:  # protobuf DecodeError, or external-data errors
        raise UserError(f"{path} is not an ONNX model ({type(exc).__name__}: "
                        f"{str(exc).strip().splitlines()[0] if str(exc).strip() else 'cannot parse'})") from None
    if not model.graph.node or not model.graph.input or not model.opset_import:
        raise UserError(f"{path} is not an ONNX model (no graph, inputs or opset in it)")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise UserError(f"{path} is not a valid ONNX model: {str(exc).strip().splitlines()[0]}") from None
    return model


def inspect_onnx(path: str, options: ImportOptions = ImportOptions(), model=None) -> SourceModel:
    """Check that `path` is a one-image-in, one-tensor-out model onnx2tf can convert; fix its size."""
    model = model if model is not None else load_onnx(path)
    onnx = _import_onnx()
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise UserError(f"{path}: expected one image input and one output, found {len(inputs)} input(s) "
                        f"and {len(graph.output)} output(s)")
    image = inputs[0]
    if image.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise UserError(f"{path}: input {image.name!r} is {onnx.TensorProto.DataType.Name(image.type.tensor_type.elem_type)}"
                        ", expected FLOAT")
    dims = _dims(image)
    if len(dims) != 4 or 3 not in (dims[1], dims[3]):
        raise UserError(f"{path}: input {image.name!r} has shape {dims}; expected an RGB image "
                        "(N, 3, H, W) or (N, H, W, 3)")
    layout = "nchw" if dims[1] == 3 else "nhwc"
    hw = dims[2:4] if layout == "nchw" else dims[1:3]
    notes = []
    if any(not isinstance(d, int) for d in hw):
        if options.resolution is None:
            raise UserError(f"{path}: input {image.name!r} has dynamic height/width {dims}; "
                            "pass --resolution N to fix them")
        hw = [options.resolution, options.resolution]
    elif options.resolution is not None and tuple(hw) != (options.resolution,) * 2:
        raise UserError(f"{path}: input size is fixed at {hw[0]}x{hw[1]}; --resolution {options.resolution} "
                        "cannot change it")
    if dims[0] not in (1, None) and not isinstance(dims[0], str):
        raise UserError(f"{path}: batch dimension is {dims[0]}; exports are batch 1")
    if not isinstance(dims[0], int):
        notes.append("batch dimension fixed at 1")

    out_dims = _dims(graph.output[0])
    if len([d for d in out_dims[1:] if isinstance(d, int) and d != 1]) > 1:
        raise UserError(f"{path}: output {graph.output[0].name!r} has shape {out_dims}; expected a classifier "
                        "(one score vector per image)")
    known = onnx2tf_ops()
    ops = sorted({n.op_type for n in _all_nodes(graph)})
    bad = sorted({n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}:{n.op_type}"
                  for n in _all_nodes(graph)
                  if n.op_type not in known or n.domain not in ("", "ai.onnx", "com.microsoft")})
    if bad:
        raise UserError(f"{path}: unsupported op{'s' if len(bad) > 1 else ''} for TFLite conversion "
                        f"(onnx2tf): {', '.join(bad)}")

    metadata = {p.key: p.value for p in model.metadata_props}
    normalization = options.normalization
    if normalization is None:
        normalization = "raw" if metadata.get("input_range") == "0..255" else "imagenet"
        notes.append(f"input normalization {normalization!r} "
                     f"({'from the file' if normalization == 'raw' else 'assumed; pass --normalization'})")
    if normalization not in NORMALIZATIONS:
        raise UserError(f"unknown normalization {normalization!r}; choose from {', '.join(NORMALIZATIONS)}")
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    return SourceModel(path=path, input_name=image.name, layout=layout, resolution=(int(hw[0]), int(hw[1])),
                       normalization=normalization, output_name=graph.output[0].name, opset=opset, ops=ops,
                       metadata=metadata, notes=notes)


def _unique(name: str, taken: set[str]) -> str:
    candidate, i = name, 0
    while candidate in taken:
        i += 1
        candidate = f"{name}_{i}"
    return candidate


def prepare(model, source: SourceModel):
    """A copy of `model` taking (1, 3, H, W) raw pixels 0..255: [Transpose] -> Mul -> Add -> the model.

    onnx2tf turns the NCHW input into NHWC; the normalization runs on the pixels inside the graph.
    """
    onnx = _import_onnx()
    from onnx import helper, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    h, w = source.resolution
    mean, std = (np.asarray(v, np.float32) for v in NORMALIZATIONS[source.normalization])
    scale, bias = 1.0 / (255.0 * std), -mean / std
    taken = {t for n in graph.node for t in (*n.input, *n.output)} | {i.name for i in graph.initializer}
    taken |= {i.name for i in graph.input} | {o.name for o in graph.output}
    pixels = _unique(PIXELS, taken)
    taken.add(pixels)
    nodes, initializers, current = [], [], pixels
    if source.layout == "nhwc":
        out = _unique("pixels_nhwc", taken)
        taken.add(out)
        nodes.append(helper.make_node("Transpose", [current], [out], perm=[0, 2, 3, 1], name="input_to_nhwc"))
        current = out
    if source.normalization != "raw":
        shape = (1, 3, 1, 1) if source.layout == "nchw" else (1, 1, 1, 3)
        for op, value in (("Mul", scale), ("Add", bias)):
            const, out = _unique(f"normalize_{op.lower()}_value", taken), _unique(f"normalize_{op.lower()}", taken)
            taken |= {const, out}
            initializers.append(numpy_helper.from_array(value.reshape(shape).astype(np.float32), const))
            nodes.append(helper.make_node(op, [current, const], [out], name=f"normalize_{op.lower()}"))
            current = out
    if nodes:  # the last new node writes the model's original input tensor
        nodes[-1].output[0] = source.input_name
    old = next(i for i in graph.input if i.name == source.input_name)
    new_input = helper.make_tensor_value_info(pixels if nodes else source.input_name, onnx.TensorProto.FLOAT,
                                              [1, 3, h, w])
    inputs = [new_input if i.name == source.input_name else i for i in graph.input]
    del graph.input[:]
    graph.input.extend(inputs)
    del old
    graph.initializer.extend(initializers)
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + existing)
    value_info = [v for v in graph.value_info if v.name != source.input_name]
    del graph.value_info[:]
    graph.value_info.extend(value_info)
    return model, new_input.name


def source_inputs(source: SourceModel, images: np.ndarray) -> np.ndarray:
    """Raw pixels (N, H, W, 3) -> what the source ONNX model takes (normalized, its layout)."""
    mean, std = (np.asarray(v, np.float32) for v in NORMALIZATIONS[source.normalization])
    x = (np.asarray(images, np.float32) / 255.0 - mean) / std
    return x.transpose(0, 3, 1, 2) if source.layout == "nchw" else x


def write_sample_file(folder: str, images: np.ndarray) -> str:
    """onnx2tf's sample file (20x128x128x3 float32 in 0..1) made from our images."""
    from ..data import resize_batch

    reps = -(-SAMPLE_SHAPE[0] // len(images))
    batch = np.concatenate([images] * reps)[:SAMPLE_SHAPE[0]]
    sample = resize_batch(batch, SAMPLE_SHAPE[1]).astype(np.float32) / 255.0
    path = os.path.join(folder, SAMPLE_FILE)
    np.save(path, sample)
    return path


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _onnx2tf_error(log: str) -> str:
    """The most telling line of a failed onnx2tf run."""
    lines = [_ANSI.sub("", line).strip() for line in log.splitlines()]
    for marker in ("ERROR:", "Error:", "Error", "WARNING: Full INT8"):
        hits = [line for line in lines if marker in line and len(line) > len(marker) + 2]
        if hits:
            return hits[-1 if marker != "ERROR:" else 0][:300]
    return next((line for line in reversed(lines) if line), "no output")[:300]


def run_onnx2tf(prepared_path: str, input_name: str, calibration: np.ndarray, workdir: str,
                modes, options: ImportOptions) -> dict[str, str]:
    """Run onnx2tf once (a subprocess, offline, cwd=workdir) -> {mode: path of the file it wrote}."""
    if importlib.util.find_spec("onnx2tf") is None:
        raise UserError("onnx2tf is not installed: pip install 'edge-effnet[onnx]'")
    write_sample_file(workdir, calibration)
    calib = os.path.join(workdir, "calibration_pixels.npy")
    np.save(calib, np.asarray(calibration, np.float32) / 255.0)  # -cind data is 0..1, NHWC
    out = os.path.join(workdir, "out")
    stem = os.path.splitext(os.path.basename(prepared_path))[0]
    cmd = [sys.executable, "-m", "onnx2tf", "-i", prepared_path, "-o", out, "-coton", "denorm", "-v", "warn"]
    if any(MODES[m].calibration for m in modes):  # quantized files need -oiqt and calibration data
        io = options.io if options.io in ("uint8", "int8") else "int8"  # the full-integer files' dtype
        cmd += ["-oiqt", "-qt", "per-channel" if options.per_channel else "per-tensor", "-iqd", io, "-oqd", io,
                "-cind", input_name, calib, "[[[[0.0, 0.0, 0.0]]]]", f"[[[[{1 / 255!r}, {1 / 255!r}, {1 / 255!r}]]]]"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", HTTP_PROXY=OFFLINE_PROXY, HTTPS_PROXY=OFFLINE_PROXY,
               http_proxy=OFFLINE_PROXY, https_proxy=OFFLINE_PROXY, NO_PROXY="", no_proxy="",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))  # onnxsim
    log_path = os.path.join(workdir, "onnx2tf.log")
    with open(log_path, "w") as log:
        code = subprocess.run(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    files = {}
    for mode in modes:
        table = MODES[mode].onnx2tf
        files[mode] = os.path.join(out, f"{stem}_{table.get(options.io, table.get('float32'))}.tflite")
    missing = [kind for kind, path in files.items() if not os.path.isfile(path)]
    if code != 0 or missing:
        with open(log_path, errors="replace") as f:
            text = f.read()
        fd, kept = tempfile.mkstemp(prefix="edge-effnet-onnx2tf-", suffix=".log")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        what = "failed" if code != 0 else f"wrote no {' and no '.join(missing)} file"
        raise UserError(f"onnx2tf {what}: {_onnx2tf_error(text)} (full log: {kept})")
    return files


def source_scores(source: SourceModel, images: np.ndarray) -> np.ndarray:
    """The source ONNX file's outputs in onnxruntime for raw pixels (normalized as it expects)."""
    from ..runtime import open_model

    runner = open_model(source.path, "onnxruntime")
    return np.stack([runner.run(x[None]).reshape(-1) for x in source_inputs(source, images)])


def convert_onnx(source: SourceModel, model, outputs: dict[str, str], calibration: np.ndarray,
                 options: ImportOptions = ImportOptions()) -> None:
    """Convert the ONNX `model` (inspected as `source`) into TFLite files {mode: OUT}, one onnx2tf run.

    `calibration` holds raw pixels (N, H, W, 3) at the source's resolution; it calibrates the
    quantized modes and makes onnx2tf's sample file.
    """
    import shutil

    from ..fsutil import atomic_file

    unknown = [m for m in outputs if m not in ONNX2TF_MODES]
    if not outputs or unknown:
        raise UserError(f"mode {unknown[0] if unknown else None!r} is not available for ONNX -> TFLite "
                        f"(choose from {', '.join(ONNX2TF_MODES)})")
    calibration = np.asarray(calibration)
    if calibration.shape[1:3] != source.resolution:
        raise UserError(f"calibration images are {calibration.shape[1]}x{calibration.shape[2]}; "
                        f"{source.path} takes {source.resolution[0]}x{source.resolution[1]}")
    onnx = _import_onnx()
    with tempfile.TemporaryDirectory(prefix="edge-effnet-onnx2tf-") as work:
        prepared, input_name = prepare(model, source)
        prepared_path = os.path.join(work, "model.onnx")
        onnx.save(prepared, prepared_path)
        made = run_onnx2tf(prepared_path, input_name, calibration, work, outputs, options)
        for mode, made_path in made.items():
            with atomic_file(outputs[mode]) as tmp:
                shutil.copyfile(made_path, tmp)


def convert_onnx_file(path: str, outputs: dict[str, str], calibration: np.ndarray,
                      options: ImportOptions = ImportOptions()) -> SourceModel:
    """Load, inspect and convert the ONNX file at `path` (convert_onnx for a caller holding a path)."""
    model = load_onnx(path)
    source = inspect_onnx(path, options, model)
    convert_onnx(source, model, outputs, calibration, options)
    return source


def describe(source: SourceModel) -> dict:
    """The manifest's record of the source file."""
    return {"path": os.path.abspath(source.path), "input": source.input_name, "layout": source.layout,
            "resolution": list(source.resolution), "normalization": source.normalization,
            "normalization_mean_std": [list(v) for v in NORMALIZATIONS[source.normalization]],
            "opset": source.opset, "ops": source.ops, "notes": source.notes, "output": source.output_name,
            "metadata": {k: v for k, v in source.metadata.items() if k != "labels"}}
