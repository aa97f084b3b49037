"""Per-layer quantization report: where a quantized .tflite file departs from its float file.

Both files come from the same graph, so their activation tensors share names. On a few
calibration images, for each op of the float file (execution order) whose output the quantized
file also has:

- snr_db: signal-to-error power of the quantized file's value of that tensor against the float
  file's, in dB (the error accumulated up to there: weights, rounding, ranges).
- share: how much of the output error the op adds. The float file is run once per op with the
  quantized file's values injected into every tensor live after that op (a cut through the
  graph: residual streams included); D_k is its output error. D before the first op is 0 and the
  cut after the last op is the quantized file itself, so the increments D_k - D_(k-1) add up
  exactly to the file's output error: each op's part, its weights, rounding and range included.
  Ops are ranked by it. Output error: the logits (the input of a final SOFTMAX) as error power
  over signal variance; output_snr_db is the same in dB.

The injection is one probe copy of the float file in which every matched tensor t feeds its
consumers as t * keep_t + value_t, two new graph inputs (1 and 0, or 0 and the quantized value at a cut).
The probe copies need TensorFlow's flatbuffer tools (export time); reading a saved report
(`load`, `format_table`) needs nothing but the standard library.
"""
from __future__ import annotations

import json
import os

import numpy as np

from ..errors import UserError

REPORT_FILE = "quant_report.json"
NUM_IMAGES = 16   # images the report runs at most (each costs one float run per op)...
CUT_RUNS = 640    # ...and float runs in all: fewer images for big graphs, never fewer than MIN_IMAGES
MIN_IMAGES = 4
TOP = 5           # layers in the console table and the manifest summary
QUANTIZED = ("INT8", "UINT8", "INT16")


def _layers(tensor_name: str) -> list[str]:
    """The Keras layers named in a tensor's fused TF op names, in order
    ('model/block4c_project_bn_1/batchnorm/add_1;model/block4c_project_conv_1/conv' -> [block4c_project_bn, ...])."""
    layers = []
    for part in tensor_name.split(";"):
        pieces = part.split("/")
        if len(pieces) > 1:
            head, _, tail = pieces[1].rpartition("_")
            layer = head if tail.isdigit() and head else pieces[1]
            if layer not in layers:
                layers.append(layer)
    return layers


def layer_label(tensor_name: str) -> str:
    """A short name for the op writing `tensor_name`: its conv / add / classifier layer if it names one."""
    layers = _layers(tensor_name)
    preferred = [x for x in layers if x.endswith(("conv", "dwconv", "add", "predictions", "pool"))]
    return (preferred or layers or [tensor_name])[0]


def _logits(model) -> int:
    """The tensor the output error is measured on: a final SOFTMAX's input, else the first output."""
    out = model.outputs[0]
    producer = next((op for op in model.operators if out in op.outputs), None)
    return producer.inputs[0] if producer is not None and producer.op == "SOFTMAX" else out


def _probe(content: bytes, outputs: list[int], inject: list[int] = ()) -> tuple[bytes, dict[int, tuple[int, int]]]:
    """A copy of a model whose graph outputs are `outputs` and where each tensor t of `inject` reaches
    its consumers as t * keep_t + value_t (keep_t a 1-element and value_t a full-size new graph input:
    1 and 0 leave t as computed, 0 and v replace it by v whatever was computed upstream).
    Returns (model, {t: (keep input, value input)})."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(content))
    graph = model.subgraphs[0]
    controls, replaced = {}, {}
    if inject:
        def opcode(builtin):
            codes = [c.builtinCode for c in model.operatorCodes]
            if builtin not in codes:
                code = schema.OperatorCodeT()
                code.builtinCode, code.deprecatedBuiltinCode, code.version = builtin, builtin, 1
                model.operatorCodes.append(code)
                return len(model.operatorCodes) - 1
            return codes.index(builtin)

        def tensor(name, shape):
            t = schema.TensorT()
            t.shape, t.type, t.name, t.buffer = np.array(shape, np.int32), schema.TensorType.FLOAT32, name.encode(), 0
            graph.tensors.append(t)
            return len(graph.tensors) - 1

        def operator(code, options_type, options, inputs, output):
            op = schema.OperatorT()
            op.opcodeIndex, op.builtinOptionsType, op.builtinOptions = code, options_type, options
            op.inputs, op.outputs = np.array(inputs, np.int32), np.array([output], np.int32)
            return op

        mul, add = opcode(schema.BuiltinOperator.MUL), opcode(schema.BuiltinOperator.ADD)
        for t in inject:
            shape = graph.tensors[t].shape
            controls[t] = (tensor(f"quant_report/keep_{t}", [1]), tensor(f"quant_report/value_{t}", shape))
            replaced[t] = (tensor(f"quant_report/kept_{t}", shape), tensor(f"quant_report/replaced_{t}", shape))
        for op in graph.operators:
            op.inputs = np.array([replaced[int(i)][1] if int(i) in replaced else int(i) for i in op.inputs], np.int32)
        new = []
        for t in inject:
            (keep, value), (kept, out) = controls[t], replaced[t]
            new.append((t, [operator(mul, schema.BuiltinOptions.MulOptions, schema.MulOptionsT(), [t, keep], kept),
                            operator(add, schema.BuiltinOptions.AddOptions, schema.AddOptionsT(), [kept, value], out)]))
        # the new ops right after the op writing their tensor (graph inputs: first): the order stays valid
        written = {int(o): n for n, op in enumerate(graph.operators) for o in op.outputs}
        slots = [[] for _ in range(len(graph.operators) + 1)]
        for t, ops in new:
            slots[written.get(t, -1) + 1] += ops
        graph.operators = slots[0] + [x for n, op in enumerate(graph.operators) for x in [op] + slots[n + 1]]
        graph.inputs = np.concatenate([graph.inputs, np.array([i for t in inject for i in controls[t]], np.int32)])
    graph.outputs = np.array([replaced[t][1] if t in replaced else t for t in outputs], np.int32)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model)), controls


class _Probe:
    """An interpreter on probe bytes: feed raw pixels (and injected values), read float outputs."""

    def __init__(self, content: bytes, threads: int):
        from ..console import quiet_output
        from ..runtime import _tflite_interpreter_class, backend_for

        interpreter_class, _ = _tflite_interpreter_class(backend_for("probe.tflite"))
        with quiet_output():
            self.it = interpreter_class(model_content=content, num_threads=threads)
            self.it.allocate_tensors()
        self.inputs = {d["index"]: d for d in self.it.get_input_details()}
        self.outputs = self.it.get_output_details()
        self.pixels = self.it.get_input_details()[0]

    def set_pixels(self, image: np.ndarray) -> None:
        d = self.pixels
        x = image[None].astype(np.float32)
        if np.issubdtype(d["dtype"], np.integer):
            scale, zero = d["quantization"]
            info = np.iinfo(d["dtype"])
            x = np.clip(np.round(x / (scale or 1.0) + zero), info.min, info.max)
        self.it.set_tensor(d["index"], x.astype(d["dtype"]))

    def set(self, index: int, value: np.ndarray) -> None:
        self.it.set_tensor(index, value.astype(np.float32).reshape(self.inputs[index]["shape"]))

    def run(self) -> list[np.ndarray]:
        self.it.invoke()
        values = []
        for d in self.outputs:
            v = self.it.get_tensor(d["index"]).astype(np.float32)
            scale, zero = d["quantization"]
            values.append((v - zero) * scale if np.issubdtype(d["dtype"], np.integer) else v)
        return values


def tensor_values(path: str, name: str, images: np.ndarray, threads: int | None = None) -> np.ndarray:
    """The values (dequantized) of the tensor named `name` in the .tflite file `path`, one row per image."""
    from ..runtime.tflite_reader import read_tflite

    model = read_tflite(path)
    index = next((t.index for t in model.tensors if t.name == name), None)
    if index is None:
        raise UserError(f"{os.path.basename(path)} has no tensor named {name}")
    with open(path, "rb") as f:
        probe = _Probe(_probe(f.read(), [index])[0], threads or len(os.sched_getaffinity(0)))
    rows = []
    for image in images:
        probe.set_pixels(image)
        rows.append(probe.run()[0].reshape(-1))
    return np.stack(rows)


def logits_name(path: str) -> str:
    """The name of the tensor the output error is measured on (see _logits)."""
    from ..runtime.tflite_reader import read_tflite

    model = read_tflite(path)
    return model.tensors[_logits(model)].name


def _matched(quantized, reference) -> list[tuple]:
    """(float op, its output tensor in the float file, the same tensor in the quantized file), in the
    float file's execution order. Same name, else the one output of an op of the same type and shape
    that names a Keras layer of the float one (the converter names fused ops after whichever of their
    TF ops it kept, which can differ between two weight sets of one graph)."""
    by_name = {t.name: t for t in quantized.tensors if not t.constant}
    by_kind: dict[tuple, list] = {}
    for op in quantized.operators:
        for i in op.outputs[:1]:
            t = quantized.tensors[i]
            by_kind.setdefault((op.op, t.shape), []).append(t)
    pairs, used = [], set()
    for op in reference.operators:
        if not op.outputs:
            continue
        out = reference.tensors[op.outputs[0]]
        twin = by_name.get(out.name)
        if twin is None:
            layers = set(_layers(out.name))
            near = [t for t in by_kind.get((op.op, out.shape), ()) if layers & set(_layers(t.name)) and t.index not in used]
            twin = near[0] if len(near) == 1 else None
        if twin is not None and out.dtype == "FLOAT32" and twin.shape == out.shape:
            pairs.append((op, out, twin))
            used.add(twin.index)
    return pairs


def report(quantized: str, reference: str, images: np.ndarray, num_images: int | None = None,
           images_source: str = "calibration images", threads: int | None = None) -> dict:
    """The per-layer report of `quantized` against `reference` (the float file of the same graph)."""
    from ..runtime.tflite_reader import read_tflite

    qmodel, fmodel = read_tflite(quantized), read_tflite(reference)
    logits = _logits(fmodel)
    last = next((n for n, op in enumerate(fmodel.operators) if logits in op.outputs), len(fmodel.operators))
    pairs = [p for p in _matched(qmodel, fmodel) if p[0].index <= fmodel.operators[last].index]  # up to the logits
    if not pairs:
        raise UserError(f"{os.path.basename(quantized)} and {os.path.basename(reference)} share no activation "
                        "tensor names: the report needs the float file of the same graph")
    if num_images is None:
        num_images = max(MIN_IMAGES, min(NUM_IMAGES, CUT_RUNS // len(pairs)))
    images = np.asarray(images)[:num_images]
    threads = threads or len(os.sched_getaffinity(0))
    tensors = [f.index for _, f, _ in pairs]
    with open(quantized, "rb") as f:
        qprobe = _Probe(_probe(f.read(), [q.index for _, _, q in pairs])[0], threads)
    with open(reference, "rb") as f:
        content = f.read()
    fclean = _Probe(_probe(content, [logits] + tensors)[0], threads)  # float values of every matched tensor
    content, controls = _probe(content, [logits], tensors)
    fprobe = _Probe(content, threads)                                 # the cuts: logits only
    last_use = {}
    for n, op in enumerate(fmodel.operators):
        for i in op.inputs:
            last_use[i] = n
    for i in fmodel.outputs:
        last_use[i] = len(fmodel.operators)
    step = {op.index: n for n, op in enumerate(fmodel.operators)}
    cuts = [[j for j in range(k + 1) if last_use.get(tensors[j], -1) > step[op.index]]
            for k, (op, _, _) in enumerate(pairs)]  # matched tensors live after each matched op
    signal, error = np.zeros(len(pairs)), np.zeros(len(pairs))
    cut_error, out_signal = np.zeros(len(pairs)), 0.0
    one, zero = np.ones(1, np.float32), np.zeros(1, np.float32)
    for image in images:
        qprobe.set_pixels(image)
        qvalues = qprobe.run()
        fclean.set_pixels(image)
        clean = fclean.run()
        fprobe.set_pixels(image)
        for t in tensors:
            keep, value = controls[t]
            fprobe.set(keep, one)
            fprobe.set(value, np.zeros(fmodel.tensors[t].shape, np.float32))
        reference_logits, fvalues = clean[0].reshape(-1), clean[1:]
        out_signal += float(np.sum((reference_logits - reference_logits.mean()) ** 2))
        qvalues = [q.reshape(f.shape) for q, f in zip(qvalues, fvalues)]
        signal += [float(np.sum(f.astype(np.float64) ** 2)) for f in fvalues]
        error += [float(np.sum((q - f).astype(np.float64) ** 2)) for q, f in zip(qvalues, fvalues)]
        before = set()
        for k, live in enumerate(cuts):
            for j in before - set(live):
                keep, value = controls[tensors[j]]
                fprobe.set(keep, one)
                fprobe.set(value, np.zeros_like(qvalues[j]))
            for j in set(live) - before:
                keep, value = controls[tensors[j]]
                fprobe.set(keep, zero)
                fprobe.set(value, qvalues[j])
            cut_error[k] += float(np.sum((fprobe.run()[0].reshape(-1) - reference_logits) ** 2))
            before = set(live)
    total = cut_error[-1]
    increments = np.diff(np.concatenate([[0.0], cut_error]))
    layers = []
    for k, (op, f, q) in enumerate(pairs):
        layers.append({
            "layer": layer_label(f.name), "op": op.op, "tensor": f.name, "dtype": q.dtype,
            "scale": float(q.scale[0]) if len(q.scale) == 1 else None,
            "zero_point": int(q.zero_point[0]) if len(q.zero_point) == 1 else None,
            "snr_db": _db(signal[k], error[k]),
            "share": float(increments[k] / total) if total > 0 else 0.0,
        })
    order = sorted(range(len(layers)), key=lambda k: -layers[k]["share"])
    for rank, k in enumerate(order, 1):
        layers[k]["rank"] = rank
    return {
        "file": os.path.basename(quantized), "reference": os.path.basename(reference),
        "images": int(len(images)), "images_source": images_source,
        "output": {"tensor": fmodel.tensors[logits].name, "snr_db": _db(out_signal, total)},
        "method": "snr_db: quantized vs float value of each tensor; share: the part of the output (logits) error "
                  "added by each op, from the float file run with the quantized file's values injected at the cut "
                  "after each op (shares add up to 1)",
        "layers": layers,
        "ranking": [layers[k]["layer"] for k in order],
    }


def _db(signal: float, error: float) -> float | None:
    if error <= 0:
        return None  # exact
    return round(float(10 * np.log10(max(signal, 1e-30) / error)), 2)


def summary(rep: dict, top: int = TOP) -> dict:
    """The manifest's summary of a report."""
    ranked = sorted(rep["layers"], key=lambda x: x["rank"])[:top]
    return {"file": REPORT_FILE, "images": rep["images"], "output_snr_db": rep["output"]["snr_db"],
            "top_layers": [{"layer": x["layer"], "op": x["op"], "share": round(x["share"], 4), "snr_db": x["snr_db"]}
                           for x in ranked]}


def format_table(rep: dict, top: int = TOP) -> str:
    """A short console table: output SNR and the `top` layers that add most of the output error."""
    lines = [f"quantization report: {rep['file']} vs {rep['reference']} on {rep['images']} {rep['images_source']}: "
             f"output SNR {_fmt_db(rep['output']['snr_db'])}",
             f"  {'rank':>4}  {'layer':<28} {'op':<18} {'share of output error':>21}  {'SNR here':>9}"]
    for x in sorted(rep["layers"], key=lambda x: x["rank"])[:top]:
        lines.append(f"  {x['rank']:>4}  {x['layer'][:28]:<28} {x['op'][:18]:<18} {x['share']:>21.1%}  "
                     f"{_fmt_db(x['snr_db']):>9}")
    if rep.get("mixed_precision"):
        kept = rep["mixed_precision"].get("float_layers") or []
        lines.append(f"  kept float (mixed precision): {', '.join(kept) if kept else 'none'}")
    return "\n".join(lines)


def _fmt_db(value) -> str:
    return "exact" if value is None else f"{value:.1f} dB"


def write(folder: str, rep: dict) -> str:
    from ..fsutil import write_json

    path = os.path.join(folder, REPORT_FILE)
    write_json(path, rep)
    return path


def load(path: str) -> dict:
    """A saved report: a bundle folder (its quant_report.json) or the JSON file itself."""
    file = os.path.join(path, REPORT_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise UserError(f"no quantization report in {path} (bundles of --int8, --int16x8 and --edgetpu exports "
                        f"have {REPORT_FILE}; for a .tflite file pass --reference FLOAT.tflite and --calib)")
    try:
        with open(file) as f:
            rep = json.load(f)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {file}: {exc}") from None
    if "layers" not in rep:
        raise UserError(f"{file} is not a quantization report")
    return rep


def command(path: str, reference: str | None, calib: str | None, json_out: str | None,
            force: bool = False) -> str:
    """`edge-effnet quant-report`: a bundle's (or a saved JSON) report as a table; for a quantized .tflite
    file, the report computed against `reference` on `calib` images. `json_out`: also write it there."""
    from ..fsutil import check_output, write_json

    if json_out:
        check_output(json_out, force, ".json")  # before any work
    if os.path.isdir(path) or path.endswith(".json"):
        if reference or calib:
            raise UserError("--reference and --calib apply to a .tflite FILE (a bundle has its report)")
        rep = load(path)
    else:
        rep = _computed(path, reference, calib)
    text = format_table(rep, top=2 * TOP)
    if json_out:
        write_json(json_out, rep)
        text += f"\nwrote {json_out}"
    return text


def _computed(path: str, reference: str | None, calib: str | None) -> dict:
    if not path.endswith(".tflite") or not os.path.isfile(path):
        raise UserError(f"not a bundle folder, report JSON or .tflite file: {path}")
    if not reference or not calib:
        raise UserError(f"{path}: pass --reference FLOAT.tflite (the float file of the same graph) and --calib "
                        "DIR_OR_NPY (calibration images) to compute its report")
    for what in (reference, calib):
        if not os.path.exists(what):
            raise UserError(f"not found: {what}")
    from ..data import calibration_set
    from ..runtime.tflite_reader import read_tflite

    model = read_tflite(path)
    resolution = int(model.tensors[model.inputs[0]].shape[1])
    images, info = calibration_set(calib, resolution, NUM_IMAGES)
    return report(path, reference, images, images_source=f"images of {info['source']}")
