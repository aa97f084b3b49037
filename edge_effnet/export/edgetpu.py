"""Edge TPU pre-flight: which ops of a .tflite file the Coral Edge TPU compiler will map, and why not.

The compiler maps ops to the Edge TPU in graph order until the first op it cannot map; that op
and everything after it run on the CPU. This report predicts that split from the file alone
(standard library only, no TensorFlow): every op with its version, whether the Edge TPU supports
it and why not (op, version, dtype, rank/size, dynamic shape), the index of the first
unsupported op and the share of the model's multiply-adds before it. The rules are data:
edge_effnet/data/edgetpu_ops.json (sources named inside).

When `edgetpu_compiler` is on PATH it is run as well and its log parsed into the report.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import tempfile
from functools import lru_cache

from ..fsutil import check_output, write_json
from ..runtime.tflite_reader import Model, Operator, read_tflite

COMPILER = "edgetpu_compiler"
COMPILER_TIMEOUT_S = 600
HOW_TO_COMPILE = (
    "edgetpu_compiler is not on PATH (it runs only on x86-64 Linux). Install it from Coral's apt repository: "
    "curl https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add - && "
    "echo 'deb https://packages.cloud.google.com/apt coral-edgetpu-stable main' | "
    "sudo tee /etc/apt/sources.list.d/coral-edgetpu.list && sudo apt-get update && "
    "sudo apt-get install edgetpu-compiler; then run: edgetpu_compiler -s {file}")


@lru_cache(maxsize=None)
def rules() -> dict:
    """The Edge TPU op table and model rules (data/edgetpu_ops.json)."""
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "edgetpu_ops.json")) as f:
        return json.load(f)


def _prod(shape) -> int:
    return math.prod(shape) if shape else 1


def op_macs(model: Model, op: Operator) -> int:
    """Multiply-adds of convolutions, depthwise convolutions and fully-connected layers (0 for other ops)."""
    t = [model.tensor(i) for i in op.inputs]
    out = model.tensor(op.outputs[0]) if op.outputs else None
    if out is None or len(t) < 2 or t[1] is None:
        return 0
    w = t[1].shape
    if op.op == "CONV_2D" and len(w) == 4:            # weights [out, kh, kw, in per group]
        return _prod(out.shape) * w[1] * w[2] * w[3]
    if op.op == "DEPTHWISE_CONV_2D" and len(w) == 4:  # weights [1, kh, kw, channels]
        return _prod(out.shape) * w[1] * w[2]
    if op.op == "FULLY_CONNECTED" and len(w) == 2:    # weights [out, in]
        return _prod(out.shape) * w[1]
    if op.op == "TRANSPOSE_CONV" and len(t) >= 3 and t[2] is not None and len(w) == 4:
        return _prod(t[2].shape) * w[0] * w[1] * w[2]  # inputs: output_shape, weights [out, kh, kw, in], input
    if op.op == "BATCH_MATMUL" and t[0] is not None and t[0].shape:
        return _prod(out.shape) * t[0].shape[-1]
    return 0


def _is_io_boundary(model: Model, op: Operator) -> bool:
    """A QUANTIZE from a float graph input or a DEQUANTIZE to a float graph output (runs on the CPU)."""
    kind = rules()["io_boundary_ops"]
    if op.op not in kind or not op.inputs or not op.outputs:
        return False
    src, dst = model.tensor(op.inputs[0]), model.tensor(op.outputs[0])
    if op.op == "QUANTIZE":
        return op.inputs[0] in model.inputs and src.dtype.startswith("FLOAT")
    return op.outputs[0] in model.outputs and dst.dtype.startswith("FLOAT")


def _check_limitation(model: Model, op: Operator, check: str) -> str | None:
    """The machine-checkable 'known limitations' of Coral's table."""
    data = model.tensor(op.inputs[0]) if op.inputs else None
    if check == "reduce_xy" and len(op.inputs) > 1 and data is not None:
        axes = model.tensor(op.inputs[1]).int_values()
        if axes is None:
            return "reduction axes are not a constant"
        axes = {a % len(data.shape) for a in axes} if data.shape else set(axes)
        if len(data.shape) == 4 and not axes <= {1, 2}:
            return f"reduces over axes {sorted(axes)}; the Edge TPU reduces only along x/y (axes 1, 2)"
    if check == "pad_xy" and len(op.inputs) > 1 and data is not None:
        pads = model.tensor(op.inputs[1]).int_values()
        if pads is None:
            return "paddings are not a constant"
        pairs = [pads[i:i + 2] for i in range(0, len(pads), 2)]
        if len(pairs) == 4 and any(any(p) for p in (pairs[0], pairs[3])):
            return "pads the batch or channel dimension; the Edge TPU pads only along x/y"
    if check == "constant_is_zero_padding":
        constants = [t for t in map(model.tensor, op.inputs) if t is not None and t.constant]
        if constants and len(op.inputs) != 2:
            return "concatenates a constant with more than one tensor; the Edge TPU takes one constant (zero padding)"
        for t in constants:
            zero = bytes([t.zero_point[0] % 256]) if t.dtype in ("INT8", "UINT8") and t.zero_point else b"\0"
            if not t.data:
                return f"concatenates a constant '{t.name}' too large to check for zeros (the Edge TPU takes only zeros)"
            if t.data.strip(zero):
                return f"concatenates a non-zero constant '{t.name}'; the Edge TPU takes only zeros (padding)"
    if check == "softmax_size" and data is not None:
        inner = [d for d in data.shape[1:]] if len(data.shape) > 1 else list(data.shape)
        if sum(d > 1 for d in inner) > 1:
            return f"input {tuple(data.shape)} is not 1-D; the Edge TPU softmax takes a 1-D input"
        if _prod(inner) > 16000:
            return f"input has {_prod(inner):,} elements (Edge TPU softmax: at most 16,000)"
    return None


def check_op(model: Model, op: Operator) -> list[str]:
    """Reasons the Edge TPU cannot run `op` (empty: it can)."""
    r = rules()
    if op.op == "CUSTOM":
        if op.custom_code == "edgetpu-custom-op":
            return []
        return [f"custom op '{op.custom_code}' is not an Edge TPU operation"]
    reasons = []
    parse_max = r["parse_max_version"].get(op.op)
    if parse_max is None:
        reasons.append(f"{op.op} is newer than the TFLite inside compiler {r['compiler_version']} (it cannot parse it)")
    elif op.version > parse_max:
        reasons.append(f"version {op.version} > {parse_max}, the newest {op.op} compiler {r['compiler_version']} parses")
    spec = r["ops"].get(op.op)
    if spec is None:
        reasons.append(f"{op.op} is not an Edge TPU operation")
    found: dict[str, list] = {}  # problem -> tensors with it; one reason per problem
    for t in (model.tensor(i) for i in (*op.inputs, *op.outputs)):
        if t is None:
            continue
        if t.constant:
            if t.dtype not in r["constant_dtypes"]:
                found.setdefault(f"{t.dtype} weights (must be int8)", []).append(t)
            continue
        if t.dtype not in r["activation_dtypes"]:
            found.setdefault(f"{t.dtype} tensor (the Edge TPU computes in int8/uint8)", []).append(t)
        if t.dynamic:
            found.setdefault(f"dynamic shape {tuple(t.shape_signature)} (sizes must be fixed)", []).append(t)
        outer = t.shape[:-r["max_dims_above_one"]]
        if len(t.shape) > r["max_rank"] or any(d > 1 for d in outer):
            found.setdefault(f"shape {tuple(t.shape)}: at most {r['max_rank']} dims and only the "
                             f"{r['max_dims_above_one']} innermost may exceed 1", []).append(t)
    for problem, tensors in found.items():
        more = f" and {len(tensors) - 1} more" if len(tensors) > 1 else ""
        reasons.append(f"{problem}: '{tensors[0].name}'{more}")
    if spec is not None and spec.get("check"):
        why = _check_limitation(model, op, spec["check"])
        if why:
            reasons.append(why)
    return reasons


def quantization(model: Model) -> dict:
    """Whether the model is full-integer, and if not a clear reason (the compiler says 'Model not quantized')."""
    activations = [t for t in model.tensors if not t.constant]
    weights = [t for op in model.operators if op.op in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
               for t in [model.tensor(op.inputs[1])] if t is not None]
    float_act = [t for t in activations if t.dtype.startswith(("FLOAT", "BFLOAT"))]
    int8_act = [t for t in activations if t.dtype in ("INT8", "UINT8")]
    int8_w = [t for t in weights if t.dtype in ("INT8", "UINT8")]
    io = {"input": [_io(model, i) for i in model.inputs], "output": [_io(model, i) for i in model.outputs]}
    if not float_act:
        return dict(status="full-integer", reason="every activation and weight is int8/uint8", **io)
    example = float_act[0]
    if not int8_act and not int8_w:
        reason = (f"not quantized: every tensor is floating point (e.g. '{example.name}' {example.dtype}); the Edge TPU "
                  "runs only full-integer int8 models. Export with `edge-effnet export --edgetpu` (full-integer "
                  "quantization calibrated on images) or convert with a representative dataset and "
                  "TFLITE_BUILTINS_INT8.")
        return dict(status="not quantized", reason=reason, **io)
    if int8_w and not int8_act:
        reason = ("not quantized: only the weights are int8 (dynamic-range quantization); activations stay float, "
                  f"e.g. '{example.name}' {example.dtype}. The Edge TPU needs full-integer quantization "
                  "(a representative dataset and TFLITE_BUILTINS_INT8).")
        return dict(status="not quantized", reason=reason, **io)
    if {t.index for t in float_act} <= {*model.inputs, *model.outputs}:
        return dict(status="full-integer, float I/O",
                    reason="int8 inside; the float input/output QUANTIZE/DEQUANTIZE run on the CPU "
                           "(uint8 input/output avoids them)", **io)
    return dict(status="partially quantized",
                reason=f"{len(float_act)} of {len(activations)} activation tensors are float (e.g. '{example.name}'): "
                       "ops on them run on the CPU", **io)


def _io(model: Model, i: int) -> dict:
    t = model.tensor(i)
    return {"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}


def preflight(path: str) -> dict:
    """The pre-flight report for one .tflite file (a JSON-ready dict)."""
    model = read_tflite(path)
    r = rules()
    rows, first, blocked = [], None, []
    for op in model.operators:
        reasons = check_op(model, op)
        boundary = _is_io_boundary(model, op)
        parse_max = r["parse_max_version"].get(op.op)
        if op.op != "CUSTOM" and (parse_max is None or op.version > parse_max):
            blocked.append(f"#{op.index} {op.op} v{op.version}")
        if reasons and not boundary and first is None:
            first = op.index
        rows.append({"index": op.index, "op": op.op if op.op != "CUSTOM" else f"CUSTOM:{op.custom_code}",
                     "version": op.version, "max_version": parse_max,
                     "supported": not reasons, "reasons": reasons,
                     "device": "cpu" if boundary or reasons or (first is not None and op.index > first) else "edgetpu",
                     "note": "float I/O conversion (CPU)" if boundary else "",
                     "macs": op_macs(model, op),
                     "output_shape": list(model.tensor(op.outputs[0]).shape) if op.outputs else []})
    if blocked:  # the compiler refuses the whole file: nothing maps
        for row in rows:
            row["device"] = "cpu"
    total = sum(row["macs"] for row in rows)
    on_tpu = sum(row["macs"] for row in rows if row["device"] == "edgetpu")
    quant = quantization(model)
    report = {
        "file": os.path.abspath(path),
        "size_bytes": os.path.getsize(path),
        "schema_version": model.schema_version,
        "min_runtime_version": model.metadata.get("min_runtime_version"),
        "subgraphs": model.num_subgraphs,
        "quantization": quant,
        "ops_total": len(rows),
        "first_unsupported_index": first,
        "first_unsupported_op": rows[first]["op"] if first is not None else None,
        "first_unsupported_reasons": rows[first]["reasons"] if first is not None else [],
        "compiler_would_reject": blocked,
        "ops_on_edgetpu": sum(row["device"] == "edgetpu" for row in rows),
        "macs_total": total,
        "macs_on_edgetpu": on_tpu,
        "mac_share_on_edgetpu": round(on_tpu / total, 6) if total else (0.0 if first is not None or blocked else 1.0),
        "maps_fully": first is None and not blocked,
        "already_compiled": any(row["op"] == "CUSTOM:edgetpu-custom-op" for row in rows),
        "rules": {"compiler_version": r["compiler_version"], "source": "edge_effnet/data/edgetpu_ops.json",
                  **r["sources"]},
        "ops": rows,
    }
    report["verdict"] = verdict(report)
    return report


def verdict(report: dict) -> str:
    q = report["quantization"]
    if report["compiler_would_reject"]:
        return (f"edgetpu_compiler {report['rules']['compiler_version']} cannot parse this file: op version too new for "
                f"it ({', '.join(report['compiler_would_reject'][:3])})")
    if q["status"] == "not quantized":
        return q["reason"]
    if report["maps_fully"]:
        io = report["ops_total"] - report["ops_on_edgetpu"]
        if io:
            return (f"maps fully: {report['ops_on_edgetpu']} ops with all {_macs(report['macs_total'])} MACs on the "
                    f"Edge TPU; the {io} float input/output conversions run on the CPU (uint8 I/O avoids them)")
        return (f"maps fully: all {report['ops_total']} ops can run on the Edge TPU "
                f"({_macs(report['macs_total'])} MACs)")
    i = report["first_unsupported_index"]
    return (f"does not map fully: op #{i} {report['first_unsupported_op']} ({'; '.join(report['first_unsupported_reasons'])})"
            f" and the {report['ops_total'] - i - 1} ops after it run on the CPU; the Edge TPU gets "
            f"{report['ops_on_edgetpu']} ops, {100 * report['mac_share_on_edgetpu']:.1f}% of the MACs")


def _macs(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def format_report(report: dict) -> str:
    """Console table: one line per op, then the verdict."""
    lines = [f"{report['file']}: {report['ops_total']} ops, {_macs(report['macs_total'])} MACs, "
             f"quantization: {report['quantization']['status']}",
             f"{'#':>4} {'op':<24} {'ver':>3} {'max':>3} {'device':<7} {'MACs':>10}  why not"]
    for row in report["ops"]:
        why = "; ".join(row["reasons"]) or row["note"]
        if row["device"] == "cpu" and not row["reasons"] and not row["note"]:
            why = "after the first unsupported op"
        lines.append(f"{row['index']:>4} {row['op'][:24]:<24} {row['version']:>3} "
                     f"{row['max_version'] if row['max_version'] is not None else '-':>3} {row['device']:<7} "
                     f"{row['macs']:>10,}  {why}")
    compiler = report.get("compiler")
    if compiler:
        if compiler.get("ran"):
            lines.append(f"edgetpu_compiler {compiler.get('version', '?')}: {compiler.get('ops_on_edgetpu', '?')} ops on "
                         f"the Edge TPU, {compiler.get('ops_on_cpu', '?')} on the CPU, "
                         f"{compiler.get('edgetpu_subgraphs', '?')} Edge TPU subgraph(s), on-chip "
                         f"{compiler.get('on_chip_memory_used', '?')}, off-chip {compiler.get('off_chip_memory_used', '?')}"
                         + (f"; error: {compiler['error']}" if compiler.get("error") else ""))
        else:
            lines.append(compiler["how_to_compile"])
    lines.append(report["verdict"])
    return "\n".join(lines)


# ---- the real compiler, when present ------------------------------------------------------------

_LOG_FIELDS = {
    "version": r"Edge TPU Compiler version (\S+)",
    "on_chip_memory_used": r"On-chip memory used for caching model parameters: (\S+)",
    "on_chip_memory_remaining": r"On-chip memory remaining for caching model parameters: (\S+)",
    "off_chip_memory_used": r"Off-chip memory used for streaming uncached model parameters: (\S+)",
    "edgetpu_subgraphs": r"Number of Edge TPU subgraphs: (\d+)",
    "total_ops": r"Total number of operations: (\d+)",
    "ops_on_edgetpu": r"Number of operations that will run on Edge TPU: (\d+)",
    "ops_on_cpu": r"Number of operations that will run on CPU: (\d+)",
    "output_model": r"Output model: (\S+)",
}


def parse_compiler_log(text: str) -> dict:
    """edgetpu_compiler's console output -> fields; the per-operator table as (op, count, status) rows."""
    out = {}
    for key, pattern in _LOG_FIELDS.items():
        m = re.search(pattern, text)
        if m:
            out[key] = int(m.group(1)) if m.group(1).isdigit() else m.group(1)
    if "ops_on_edgetpu" not in out and "total_ops" in out and "successfully compiled" in text \
            and "not all operations" not in text:
        out["ops_on_edgetpu"], out["ops_on_cpu"] = out["total_ops"], 0  # a fully mapped model prints no split
    out["operators"] = [{"op": m.group(1), "count": int(m.group(2)), "status": m.group(3).strip()}
                        for m in re.finditer(r"^([A-Z][A-Z0-9_]+)\s+(\d+)\s+(\S.*)$", text, re.M)]
    errors = [line.strip() for line in text.splitlines()
              if line.strip().startswith(("ERROR", "Invalid model", "Model could not be parsed", "Internal compiler error"))]
    if errors:
        out["error"] = " ".join(errors)
    return out


def find_compiler() -> str | None:
    return shutil.which(COMPILER)


def run_compiler(path: str, out_dir: str, timeout: int = COMPILER_TIMEOUT_S) -> dict:
    """Run edgetpu_compiler -s on `path` into `out_dir`; the parsed log (and where its files went)."""
    exe = find_compiler()
    if exe is None:
        return {"ran": False, "how_to_compile": HOW_TO_COMPILE.format(file=os.path.basename(path))}
    try:
        proc = subprocess.run([exe, "-s", "-o", out_dir, path], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ran": True, "error": f"edgetpu_compiler took longer than {timeout} s"}
    text = proc.stdout + proc.stderr
    parsed = parse_compiler_log(text)
    if proc.returncode != 0 and "error" not in parsed:
        parsed["error"] = f"exit code {proc.returncode}: {text.strip().splitlines()[-1] if text.strip() else ''}"
    return {"ran": True, "exit_code": proc.returncode, **parsed, "log": text}


def check(path: str, json_out: str | None = None, force: bool = False, compiler: bool = True) -> dict:
    """`edge-effnet edgetpu-check`: the pre-flight report, plus the compiler's verdict when it is installed."""

    if json_out:
        check_output(json_out, force, ".json")
    report = preflight(path)
    if compiler:
        with tempfile.TemporaryDirectory(prefix="edge-effnet-edgetpu-") as tmp:
            result = run_compiler(path, tmp)
        result.pop("output_model", None)  # it was in a temporary folder
        report["compiler"] = result
    if json_out:
        write_json(json_out, report)
    return report


def fully_mapped(report: dict) -> bool:
    """The pre-flight says every op maps, and so does the compiler when it ran."""
    compiler = report.get("compiler") or {}
    if compiler.get("ran") and (compiler.get("error") or compiler.get("ops_on_cpu", 0) > 0):
        return False
    return report["maps_fully"]



PREFLIGHT_FILE = "edgetpu_preflight.json"


def bundle_report(path: str, folder: str, echo=print) -> dict:
    """`export --edgetpu`'s last step: the pre-flight report (edgetpu_preflight.json) in the bundle,
    and edgetpu_compiler's model and log next to it when the compiler is on PATH."""
    report = preflight(path)
    if find_compiler():
        echo("compiling for the Edge TPU with edgetpu_compiler")
    compiler = run_compiler(path, folder)
    compiler.pop("log", None)  # the compiler writes its own <name>_edgetpu.log into the bundle
    report["compiler"] = compiler
    report["file"] = os.path.basename(path)
    write_json(os.path.join(folder, PREFLIGHT_FILE), report)
    record = {"preflight": PREFLIGHT_FILE, "maps_fully": fully_mapped(report), "ops_total": report["ops_total"],
              "first_unsupported_index": report["first_unsupported_index"],
              "first_unsupported_op": report["first_unsupported_op"],
              "mac_share_on_edgetpu": report["mac_share_on_edgetpu"], "verdict": report["verdict"]}
    if compiler["ran"]:
        stem = os.path.splitext(os.path.basename(path))[0]
        record["compiled"] = sorted(f for f in os.listdir(folder) if f.startswith(f"{stem}_edgetpu"))
        record["compiler"] = {k: v for k, v in compiler.items() if k != "operators"}
        done = f"compiled with edgetpu_compiler {compiler.get('version', '?')}: {', '.join(record['compiled'])}"
    else:
        record["how_to_compile"] = compiler["how_to_compile"]
        done = (f"compile it on x86-64 Linux: edgetpu_compiler -s {os.path.basename(path)} "
                "(apt package edgetpu-compiler, see " + PREFLIGHT_FILE + ")")
    record["summary"] = f"Edge TPU pre-flight ({PREFLIGHT_FILE}): {report['verdict']}; {done}"
    if not record["maps_fully"]:
        record["warning"] = f"not every op runs on the Edge TPU: {report['verdict']}"
    return record
