"""Read a .tflite file's graph without TensorFlow: operators (with versions), tensors, order.

A .tflite file is a FlatBuffer (tensorflow/lite/schema/schema.fbs). This reader walks the few
tables it needs with `struct` and checks every offset against the file size, so a truncated or
foreign file gives one clear UserError instead of an IndexError deep inside a generic library.
Standard library only: `edge-effnet edgetpu-check` runs with the core install.

Field numbers below are the schema's field order (vtable slot = 4 + 2 * field).
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from functools import lru_cache

from ..errors import UserError

FILE_IDENTIFIER = b"TFL3"
# OperatorCode.deprecated_builtin_code is a byte; codes >= 127 live in builtin_code instead.
PLACEHOLDER_FOR_GREATER_OP_CODES = 127


@lru_cache(maxsize=None)
def schema_enums() -> dict:
    """BuiltinOperator and TensorType names (data/tflite_schema.json, index = enum value)."""
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "tflite_schema.json")) as f:
        return json.load(f)


def op_name(code: int) -> str:
    names = schema_enums()["builtin_operators"]
    return names[code] if 0 <= code < len(names) else f"BUILTIN_{code}"


def type_name(code: int) -> str:
    names = schema_enums()["tensor_types"]
    return names[code] if 0 <= code < len(names) else f"TYPE_{code}"


@dataclass(frozen=True)
class Tensor:
    index: int
    name: str
    dtype: str                     # FLOAT32, INT8, UINT8, INT32, ...
    shape: tuple[int, ...]
    shape_signature: tuple[int, ...]   # -1 marks a dynamic dimension
    constant: bool                 # has data in the file (weights, biases, shape/axis operands)
    scale: tuple[float, ...] = ()
    zero_point: tuple[int, ...] = ()
    data: bytes = b""              # raw bytes of constants up to SMALL_CONSTANT_BYTES, else b""

    @property
    def dynamic(self) -> bool:
        return any(d < 0 for d in self.shape_signature)

    def int_values(self) -> tuple[int, ...] | None:
        """Values of a small int32/int64 constant (e.g. MEAN axes), or None."""
        if not self.data or self.dtype not in ("INT32", "INT64"):
            return None
        fmt = "i" if self.dtype == "INT32" else "q"
        n = len(self.data) // struct.calcsize(fmt)
        return struct.unpack_from(f"<{n}{fmt}", self.data) if n else None


@dataclass(frozen=True)
class Operator:
    index: int                     # execution order in the subgraph
    op: str                        # builtin name, or CUSTOM
    version: int
    custom_code: str | None
    inputs: tuple[int, ...]        # tensor indices; -1 = optional input left out
    outputs: tuple[int, ...]


@dataclass(frozen=True)
class Model:
    path: str
    schema_version: int
    description: str
    tensors: tuple[Tensor, ...]
    operators: tuple[Operator, ...]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    num_subgraphs: int
    metadata: dict = field(default_factory=dict)  # small string metadata, e.g. min_runtime_version

    def tensor(self, i: int) -> Tensor | None:
        return self.tensors[i] if 0 <= i < len(self.tensors) else None


class _Reader:
    """Bounds-checked access to FlatBuffer tables, vectors and strings (little endian)."""

    def __init__(self, buf: bytes, path: str):
        self.buf, self.path = buf, path

    def _unpack(self, fmt: str, pos: int):
        size = struct.calcsize(fmt)
        if pos < 0 or pos + size > len(self.buf):
            raise UserError(f"{self.path}: corrupt or truncated .tflite file (offset {pos} is outside "
                            f"the file's {len(self.buf)} bytes)")
        return struct.unpack_from("<" + fmt, self.buf, pos)[0]

    def root(self) -> int:
        return self._unpack("I", 0)

    def _field(self, table: int, slot: int) -> int:
        """Absolute position of field `slot` in `table`, or 0 when absent (default value)."""
        vtable = table - self._unpack("i", table)
        vt_size = self._unpack("H", vtable)
        entry = 4 + 2 * slot
        if entry >= vt_size:
            return 0
        off = self._unpack("H", vtable + entry)
        return table + off if off else 0

    def scalar(self, table: int, slot: int, fmt: str, default):
        pos = self._field(table, slot)
        return self._unpack(fmt, pos) if pos else default

    def _deref(self, table: int, slot: int) -> int:
        pos = self._field(table, slot)
        return pos + self._unpack("I", pos) if pos else 0

    def table(self, table: int, slot: int) -> int:
        return self._deref(table, slot)

    def vector(self, table: int, slot: int) -> tuple[int, int]:
        """(position of the first element, length); (0, 0) when absent."""
        pos = self._deref(table, slot)
        if not pos:
            return 0, 0
        n = self._unpack("I", pos)
        return pos + 4, n

    def scalars(self, table: int, slot: int, fmt: str) -> tuple:
        start, n = self.vector(table, slot)
        size = struct.calcsize(fmt)
        if n and start + n * size > len(self.buf):
            raise UserError(f"{self.path}: corrupt or truncated .tflite file (a vector runs past the end)")
        return struct.unpack_from(f"<{n}{fmt}", self.buf, start) if n else ()

    def tables(self, table: int, slot: int) -> list[int]:
        start, n = self.vector(table, slot)
        return [start + 4 * i + self._unpack("I", start + 4 * i) for i in range(n)]

    def string(self, table: int, slot: int) -> str | None:
        pos = self._deref(table, slot)
        if not pos:
            return None
        n = self._unpack("I", pos)
        if pos + 4 + n > len(self.buf):
            raise UserError(f"{self.path}: corrupt or truncated .tflite file (a string runs past the end)")
        return self.buf[pos + 4:pos + 4 + n].decode("utf-8", errors="replace")


# schema.fbs field numbers
_MODEL = dict(version=0, operator_codes=1, subgraphs=2, description=3, buffers=4, metadata=6)
_OPCODE = dict(deprecated_builtin_code=0, custom_code=1, version=2, builtin_code=3)
_SUBGRAPH = dict(tensors=0, inputs=1, outputs=2, operators=3)
_TENSOR = dict(shape=0, type=1, buffer=2, name=3, quantization=4, shape_signature=7)
_QUANT = dict(scale=2, zero_point=3)
_OPERATOR = dict(opcode_index=0, inputs=1, outputs=2)
_BUFFER = dict(data=0, offset=1, size=2)
_METADATA = dict(name=0, buffer=1)
SMALL_CONSTANT_BYTES = 4096  # keep the bytes of constants this small (axes, paddings, shapes, pad blocks)


def read_tflite(path: str, subgraph: int = 0) -> Model:
    """Parse `path`; UserError (one line) if it is missing or not a .tflite FlatBuffer."""
    if not os.path.isfile(path):
        raise UserError(f"file not found: {path}")
    with open(path, "rb") as f:
        buf = f.read()
    if len(buf) < 8 or buf[4:8] != FILE_IDENTIFIER:
        raise UserError(f"{path} is not a TensorFlow Lite model (no 'TFL3' FlatBuffer identifier)")
    r = _Reader(buf, path)
    model = r.root()

    buffers = []  # (constant?, small bytes)
    for b in r.tables(model, _MODEL["buffers"]):
        start, n = r.vector(b, _BUFFER["data"])
        ext_offset = r.scalar(b, _BUFFER["offset"], "Q", 0)  # > 2 GB models keep data outside the FlatBuffer
        ext_size = r.scalar(b, _BUFFER["size"], "Q", 0)
        small = b""
        if 0 < n <= SMALL_CONSTANT_BYTES:
            small = buf[start:start + n]
        elif ext_offset and 0 < ext_size <= SMALL_CONSTANT_BYTES:
            small = buf[ext_offset:ext_offset + ext_size]
        buffers.append((n > 0 or ext_size > 0, small))

    codes = []
    for oc in r.tables(model, _MODEL["operator_codes"]):
        deprecated = r.scalar(oc, _OPCODE["deprecated_builtin_code"], "b", 0)
        builtin = r.scalar(oc, _OPCODE["builtin_code"], "i", 0)
        # TFLite's GetBuiltinCode: files written before builtin_code existed have only the byte;
        # codes above 126 store PLACEHOLDER_FOR_GREATER_OP_CODES (127) in the byte.
        code = max(builtin, deprecated)
        codes.append((op_name(code), r.scalar(oc, _OPCODE["version"], "i", 1),
                      r.string(oc, _OPCODE["custom_code"])))

    metadata = {}
    for md in r.tables(model, _MODEL["metadata"]):
        name, index = r.string(md, _METADATA["name"]), r.scalar(md, _METADATA["buffer"], "I", 0)
        if name and index < len(buffers) and buffers[index][1]:
            metadata[name] = buffers[index][1].split(b"\0")[0].decode("utf-8", errors="replace")

    subgraphs = r.tables(model, _MODEL["subgraphs"])
    if not subgraphs:
        raise UserError(f"{path} holds no subgraph")
    sg = subgraphs[subgraph]

    tensors = []
    for i, t in enumerate(r.tables(sg, _SUBGRAPH["tensors"])):
        shape = r.scalars(t, _TENSOR["shape"], "i")
        signature = r.scalars(t, _TENSOR["shape_signature"], "i") or shape
        b = r.scalar(t, _TENSOR["buffer"], "I", 0)
        constant, small = buffers[b] if b < len(buffers) else (False, b"")
        q = r.table(t, _TENSOR["quantization"])
        scale = r.scalars(q, _QUANT["scale"], "f") if q else ()
        zero = r.scalars(q, _QUANT["zero_point"], "q") if q else ()
        tensors.append(Tensor(i, r.string(t, _TENSOR["name"]) or "", type_name(r.scalar(t, _TENSOR["type"], "b", 0)),
                              tuple(shape), tuple(signature), constant, tuple(scale), tuple(zero), small))

    def tensor_refs(table: int, slot: int, what: str, optional: bool = False) -> tuple[int, ...]:
        refs = tuple(r.scalars(table, slot, "i"))
        bad = [i for i in refs if not (0 <= i < len(tensors) or (optional and i == -1))]
        if bad:
            raise UserError(f"{path}: corrupt .tflite file ({what} refers to tensor {bad[0]} of {len(tensors)})")
        return refs

    operators = []
    for i, o in enumerate(r.tables(sg, _SUBGRAPH["operators"])):
        idx = r.scalar(o, _OPERATOR["opcode_index"], "I", 0)
        if idx >= len(codes):
            raise UserError(f"{path}: corrupt .tflite file (operator {i} uses op code {idx} of {len(codes)})")
        name, version, custom = codes[idx]
        operators.append(Operator(i, name, version, custom,
                                  tensor_refs(o, _OPERATOR["inputs"], f"operator {i}", optional=True),
                                  tensor_refs(o, _OPERATOR["outputs"], f"operator {i}")))

    return Model(path=path, schema_version=r.scalar(model, _MODEL["version"], "I", 0),
                 description=r.string(model, _MODEL["description"]) or "", tensors=tuple(tensors),
                 operators=tuple(operators), inputs=tensor_refs(sg, _SUBGRAPH["inputs"], "the graph input"),
                 outputs=tensor_refs(sg, _SUBGRAPH["outputs"], "the graph output"), num_subgraphs=len(subgraphs),
                 metadata=metadata)
