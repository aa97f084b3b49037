"""TFLite metadata for image classifiers: what MediaPipe Tasks (and Android apps) read from a .tflite.

Metadata is a second flatbuffer (schema metadata_schema.fbs, file identifier "M001") held in
one of the model's buffers, which a `Model.metadata` entry named "TFLITE_METADATA" points to.
Associated files (labels.txt) are not in it: they are a zip archive of stored (uncompressed)
entries after the model flatbuffer, found by name. TFLite runtimes ignore both.

    data = add_metadata(open("m.tflite", "rb").read(), name="lite0", description="...", version="1",
                        labels=labels, input_min=0, input_max=255, mean=[0], std=[1])
    read_metadata(data)  # -> dict (for tests)

Adding metadata re-serializes the model with the generated TFLite schema of the installed
TensorFlow (its object API; the file is loaded without importing tensorflow), so no field the
converter wrote is dropped. Reading needs only `flatbuffers`.
"""
from __future__ import annotations

import functools
import importlib.util
import io
import os
import zipfile

import flatbuffers
import numpy as np
from flatbuffers.number_types import Float32Flags, Uint8Flags, Uint32Flags
from flatbuffers.table import Table

METADATA_NAME = "TFLITE_METADATA"   # the Model.metadata entry MediaPipe / TFLite Support look for
FILE_IDENTIFIER = b"M001"           # metadata flatbuffer identifier
MIN_PARSER_VERSION = "1.0.0"        # the newest schema version among the fields written (all 1.0.0)
LABELS_FILE = "labels.txt"

# metadata_schema.fbs facts. Fields are numbered in declaration order; a union field takes two
# slots (its type tag, then the value).
RGB = 1                                      # ColorSpaceType
TENSOR_AXIS_LABELS = 2                       # AssociatedFileType
FEATURE_PROPERTIES, IMAGE_PROPERTIES = 1, 2  # ContentProperties union tags
NORMALIZATION_OPTIONS = 1                    # ProcessUnitOptions union tag
FILE_TYPES = {0: "UNKNOWN", 1: "DESCRIPTIONS", 2: "TENSOR_AXIS_LABELS", 3: "TENSOR_VALUE_LABELS"}


# ---- writing -----------------------------------------------------------------------------------

def _table(b: flatbuffers.Builder, children: dict[int, int], tags: dict[int, int] | None = None) -> int:
    """A table from slot -> offset of an already built child, and slot -> uint8 value."""
    tags = tags or {}
    b.StartObject(max([*children, *tags], default=-1) + 1)
    for slot, value in tags.items():
        b.PrependUint8Slot(slot, value, 0)
    for slot, offset in children.items():
        b.PrependUOffsetTRelativeSlot(slot, offset, 0)
    return b.EndObject()


def _vector(b: flatbuffers.Builder, offsets: list[int]) -> int:
    b.StartVector(4, len(offsets), 4)
    for offset in reversed(offsets):
        b.PrependUOffsetTRelative(offset)
    return b.EndVector()


def _floats(b: flatbuffers.Builder, values) -> int:
    return b.CreateNumpyVector(np.asarray(values, dtype=np.float32).ravel())


def build_metadata(*, name: str, description: str, version: str, author: str, labels: list[str] | None,
                   input_min: float, input_max: float, mean: list[float], std: list[float]) -> bytes:
    """The ModelMetadata flatbuffer of a classifier with one image input and one score output."""
    if len(mean) != len(std) or len(mean) not in (1, 3):
        raise ValueError("mean and std need the same length, 1 or 3 (one per RGB channel)")
    b = flatbuffers.Builder(1024)
    text = b.CreateString
    # input: RGB image, (pixel - mean) / std, raw pixel range as stats
    image = _table(b, {1: _table(b, {}, {0: RGB})}, {0: IMAGE_PROPERTIES})
    normalization = _table(b, {1: _table(b, {0: _floats(b, mean), 1: _floats(b, std)})}, {0: NORMALIZATION_OPTIONS})
    stats = _table(b, {0: _floats(b, [input_max] * len(mean)), 1: _floats(b, [input_min] * len(mean))})
    image_tensor = _table(b, {0: text("image"), 1: text(f"RGB pixels, {input_min:g}..{input_max:g}."),
                              3: image, 4: _vector(b, [normalization]), 5: stats})
    # output: class scores, named by labels.txt (one name per line, in output order)
    scores = _table(b, {1: _table(b, {})}, {0: FEATURE_PROPERTIES})
    files = {}
    if labels is not None:
        labels_file = _table(b, {0: text(LABELS_FILE), 1: text("Class names, one per line, in output order.")},
                             {2: TENSOR_AXIS_LABELS})
        files = {6: _vector(b, [labels_file])}
    score_tensor = _table(b, {0: text("probability"), 1: text("Class scores."), 3: scores, **files})
    subgraph = _table(b, {2: _vector(b, [image_tensor]), 3: _vector(b, [score_tensor])})
    model = _table(b, {0: text(name), 1: text(description), 2: text(version), 3: _vector(b, [subgraph]),
                       4: text(author), 7: text(MIN_PARSER_VERSION)})
    b.Finish(model, file_identifier=FILE_IDENTIFIER)
    return bytes(b.Output())


@functools.lru_cache(maxsize=1)
def _model_schema():
    """The generated TFLite schema module (object API), from TensorFlow's files, else MediaPipe's."""
    for package, relative in (("tensorflow", "lite/python/schema_py_generated.py"),
                              ("mediapipe", "tasks/metadata/schema_py_generated.py")):
        spec = importlib.util.find_spec(package)
        path = spec and spec.origin and os.path.join(os.path.dirname(spec.origin), relative)
        if path and os.path.exists(path):
            module_spec = importlib.util.spec_from_file_location(f"_{package}_tflite_schema", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
            return module
    raise ImportError("adding TFLite metadata needs tensorflow (for its generated TFLite schema)")


def add_metadata(model_bytes: bytes, *, name: str, description: str, version: str,
                 labels: list[str] | None, input_min: float, input_max: float,
                 mean: list[float], std: list[float], author: str = "edge_effnet") -> bytes:
    """`model_bytes` with classifier metadata (and labels.txt) added; earlier metadata is replaced."""
    schema = _model_schema()
    model = schema.ModelT.InitFromPackedBuf(bytearray(model_bytes), 0)
    graph = model.subgraphs[0]
    if len(model.subgraphs) != 1 or len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise ValueError("metadata is written for one subgraph with one input and one output")
    if any(buffer.offset for buffer in model.buffers):
        raise ValueError("buffers stored outside the flatbuffer (models over 2 GB) are not supported")
    metadata = build_metadata(name=name, description=description, version=version, author=author,
                              labels=labels, input_min=input_min, input_max=input_max, mean=mean, std=std)
    model.metadata = model.metadata or []
    entry = next((m for m in model.metadata if m.name.decode() == METADATA_NAME), None)
    if entry is None:
        model.buffers.append(schema.BufferT())
        entry = schema.MetadataT()
        entry.name, entry.buffer = METADATA_NAME, len(model.buffers) - 1
        model.metadata.append(entry)
    model.buffers[entry.buffer].data = np.frombuffer(metadata, dtype=np.uint8)
    builder = flatbuffers.Builder(len(model_bytes) + len(metadata) + 4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")  # an old zip tail is not carried over
    out = io.BytesIO(builder.Output())
    if labels is not None:
        # "w" on a stream positioned after the flatbuffer: zip offsets count from the file's start,
        # so the whole file is a valid zip. MediaPipe reads stored (uncompressed) entries only.
        out.seek(0, io.SEEK_END)
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as archive:
            archive.writestr(zipfile.ZipInfo(LABELS_FILE, (1980, 1, 1, 0, 0, 0)), "\n".join(labels))
    return out.getvalue()


# ---- reading (plain flatbuffers tables, no generated code) --------------------------------------

def _at(t: Table, slot: int) -> int:
    return t.Offset(4 + 2 * slot)  # 0 when the field is absent


def _text(t: Table, slot: int) -> str | None:
    return t.String(t.Pos + _at(t, slot)).decode() if _at(t, slot) else None


def _scalar(t: Table, slot: int, flags=Uint8Flags) -> int:
    return t.Get(flags, t.Pos + _at(t, slot)) if _at(t, slot) else 0


def _child(t: Table, slot: int) -> Table | None:
    return Table(t.Bytes, t.Indirect(t.Pos + _at(t, slot))) if _at(t, slot) else None


def _children(t: Table | None, slot: int) -> list[Table]:
    if t is None or not _at(t, slot):
        return []
    start = t.Vector(_at(t, slot))
    return [Table(t.Bytes, t.Indirect(start + 4 * i)) for i in range(t.VectorLen(_at(t, slot)))]


def _array(t: Table, slot: int, flags=Float32Flags) -> np.ndarray:
    return t.GetVectorAsNumpy(flags, _at(t, slot)) if _at(t, slot) else np.zeros(0)


def _root(data) -> Table:
    data = bytearray(data)
    return Table(data, flatbuffers.encode.Get(flatbuffers.packer.uoffset, data, 0))


def _tensor(t: Table) -> dict:
    info = {"name": _text(t, 0), "description": _text(t, 1)}
    content = _child(t, 3)
    if content is not None:
        kind = _scalar(content, 0)
        info["content"] = {FEATURE_PROPERTIES: "FeatureProperties", IMAGE_PROPERTIES: "ImageProperties"}.get(kind, kind)
        if kind == IMAGE_PROPERTIES:
            info["color_space"] = {1: "RGB", 2: "GRAYSCALE"}.get(_scalar(_child(content, 1), 0), "UNKNOWN")
    for unit in _children(t, 4):
        if _scalar(unit, 0) == NORMALIZATION_OPTIONS:
            options = _child(unit, 1)
            info["mean"], info["std"] = _array(options, 0).tolist(), _array(options, 1).tolist()
    if _child(t, 5) is not None:
        info["max"], info["min"] = _array(_child(t, 5), 0).tolist(), _array(_child(t, 5), 1).tolist()
    info["associated_files"] = [{"name": _text(f, 0), "type": FILE_TYPES.get(_scalar(f, 2), _scalar(f, 2))}
                                for f in _children(t, 6)]
    return info


def read_metadata(path_or_bytes) -> dict:
    """The TFLITE_METADATA of a .tflite file (path or bytes) as a dict, {} if it has none;
    "files" maps each associated file's name to its text."""
    if isinstance(path_or_bytes, (bytes, bytearray)):
        data = bytes(path_or_bytes)
    else:
        with open(path_or_bytes, "rb") as f:
            data = f.read()
    model = _root(data)
    entries = [e for e in _children(model, 6) if _text(e, 0) == METADATA_NAME]  # Model.metadata
    if not entries:
        return {}
    buffer = _children(model, 4)[_scalar(entries[0], 1, Uint32Flags)]          # Model.buffers[i].data
    blob = _array(buffer, 0, Uint8Flags).tobytes()
    if blob[4:8] != FILE_IDENTIFIER:
        raise ValueError(f"metadata identifier {blob[4:8]!r}, expected {FILE_IDENTIFIER!r}")
    md = _root(blob)
    subgraph = (_children(md, 3) or [None])[0]
    result = {"name": _text(md, 0), "description": _text(md, 1), "version": _text(md, 2),
              "author": _text(md, 4), "min_parser_version": _text(md, 7),
              "inputs": [_tensor(t) for t in _children(subgraph, 2)],
              "outputs": [_tensor(t) for t in _children(subgraph, 3)], "files": {}}
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            result["files"] = {n: archive.read(n).decode("utf-8") for n in archive.namelist()}
    except zipfile.BadZipFile:
        pass
    return result
