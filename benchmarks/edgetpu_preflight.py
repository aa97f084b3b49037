"""Edge TPU pre-flight of b0 (swish + squeeze-excite), lite0 and edgetpu-s int8 exports.

Exports each variant with `edge-effnet export --edgetpu` (the library call: full-integer int8,
uint8 in/out, batch 1, calibrated on scikit-image's photos) and runs the pre-flight report on the
file, plus contrasts that show what the report catches: b0 in float32, b0 int8 with float input and
output, b0 int8 with a dynamic batch, and Lite0 through the ONNX -> onnx2tf path.
Weights are random (op mapping does not depend on them). Writes
benchmarks/results/edgetpu_preflight.{md,json}.

    flock /work/bench.lock python benchmarks/edgetpu_preflight.py
"""
from __future__ import annotations

import collections
import datetime
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from edge_effnet.export.edgetpu import preflight, rules  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
NUM_CALIB = 32
CASES = [  # variant, label, how: an export mode (with its io) | "dynamic-batch" | "onnx2tf"
    ("b0", "int8 (--edgetpu)", ("edgetpu", "uint8")),
    ("lite0", "int8 (--edgetpu)", ("edgetpu", "uint8")),
    ("edgetpu-s", "int8 (--edgetpu)", ("edgetpu", "uint8")),
    ("b0", "float32 (--fp32, contrast)", ("fp32", "float32")),
    ("b0", "int8 with float32 input/output (--int8 --io float32, contrast)", ("int8", "float32")),
    ("b0", "int8, dynamic batch (contrast)", "dynamic-batch"),
    ("lite0", "int8 via ONNX and onnx2tf (peer path, contrast)", "onnx2tf"),
]


def machine() -> dict:
    import tensorflow as tf

    from edge_effnet.bench import load_average, machine_info

    return {**machine_info(), "tensorflow": tf.__version__,
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "loadavg_start": load_average()}


def make_file(variant: str, how, photos: str, folder: str) -> tuple[str, float]:
    """The .tflite file for one case and its conversion time in seconds."""
    from edge_effnet.data import calibration_set
    from edge_effnet.export.api import ExportOptions, export
    from edge_effnet.variants import get_variant

    spec = get_variant(variant)
    if isinstance(how, tuple):
        mode, io = how
        result = export(ExportOptions(spec=spec, mode=mode, io=io, calib=photos, num_calib=NUM_CALIB,
                                      output=os.path.join(folder, f"{variant}-{mode}-{io}")))
        record = result.manifest["files"][0]
        return os.path.join(result.output, record["file"]), record["export_seconds"]
    from edge_effnet.builder import build_model

    images, _ = calibration_set(photos, spec.resolution, NUM_CALIB)
    path = os.path.join(folder, f"{variant}-{how}.tflite")
    start = time.perf_counter()
    if how == "dynamic-batch":
        from edge_effnet.export import tflite
        from edge_effnet.export.formats import MODES

        with open(path, "wb") as f:
            f.write(tflite.convert(build_model(spec, batch_size=None), MODES["int8"], "uint8", images))
    else:
        from edge_effnet.export.onnx import keras_to_onnx
        from edge_effnet.export.onnx2tflite import ImportOptions, convert_onnx_file

        onnx_path = os.path.join(folder, f"{variant}.onnx")
        keras_to_onnx(build_model(spec, batch_size=1), onnx_path)
        convert_onnx_file(onnx_path, {"int8": path}, images, ImportOptions(normalization="raw", io="uint8"))
    return path, time.perf_counter() - start


def summarize(variant: str, label: str, report: dict, seconds: float) -> dict:
    limits = rules()["parse_max_version"]
    versions = collections.Counter((row["op"], row["version"]) for row in report["ops"])
    first = report["first_unsupported_index"]
    return {
        "variant": variant, "export": label, "convert_s": round(seconds, 1),
        "size_mb": round(report["size_bytes"] / 1e6, 2), "quantization": report["quantization"]["status"],
        "ops_total": report["ops_total"], "maps_fully": report["maps_fully"],
        "first_unsupported_index": first, "first_unsupported_op": report["first_unsupported_op"],
        "first_unsupported_reasons": report["first_unsupported_reasons"],
        "ops_on_edgetpu": report["ops_on_edgetpu"], "macs_total": report["macs_total"],
        "macs_on_edgetpu": report["macs_on_edgetpu"], "mac_share_on_edgetpu": report["mac_share_on_edgetpu"],
        "min_runtime_version": report["min_runtime_version"],
        "op_versions": {f"{op} v{v}": {"count": n, "compiler16_max": limits.get(op)}
                        for (op, v), n in sorted(versions.items())},
        "verdict": report["verdict"],
    }


def markdown(rows: list[dict], info: dict) -> str:
    lines = ["# Edge TPU pre-flight: b0, lite0, edgetpu-s", "",
             f"{info['date']}, {info['cpu_model']} ({info['cpu_count']} cores), TensorFlow {info['tensorflow']}, "
             f"load average {info['loadavg_start'][0]:.2f} at start. Made by `benchmarks/edgetpu_preflight.py`; "
             "rules: `edge_effnet/data/edgetpu_ops.json` (Edge TPU compiler 16). `edgetpu_compiler` is not "
             "installable here (x86-64 Linux apt package from Coral), so these are the pre-flight's predictions.", "",
             "| variant | export | ops | quantization | maps fully | first CPU op | ops on TPU | MACs | MAC share on TPU |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        first = "-" if r["first_unsupported_index"] is None else \
            f"#{r['first_unsupported_index']} {r['first_unsupported_op']}"
        lines.append(f"| {r['variant']} | {r['export']} | {r['ops_total']} | {r['quantization']} | "
                     f"{'yes' if r['maps_fully'] else 'no'} | {first} | {r['ops_on_edgetpu']} | "
                     f"{r['macs_total'] / 1e6:,.1f}M | {100 * r['mac_share_on_edgetpu']:.1f}% |")
    from edge_effnet.scaling import count_macs
    from edge_effnet.variants import get_variant

    same = all(r["macs_total"] == count_macs(get_variant(r["variant"])) for r in rows)
    lines += ["", "MACs are the multiply-adds of the file's CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED ops, "
              "from their weight and output shapes; "
              + ("in every row they equal the spec's analytic count (`scaling.count_macs`)." if same else
                 "they differ from the spec's analytic count (`scaling.count_macs`) in some rows.")
              + " MAC share on TPU: the share of them in ops before the first op that falls back to the CPU."]
    lines += ["", "Op versions the TF converter wrote, against the newest compiler 16 parses:", ""]
    for r in rows:
        if r["quantization"].startswith("full-integer"):
            ops = ", ".join(f"{k} (max {v['compiler16_max']}) x{v['count']}" for k, v in r["op_versions"].items())
            lines.append(f"- {r['variant']}, {r['export']}: {ops}; min_runtime_version {r['min_runtime_version']}")
    lines += ["", "Verdicts:", ""] + [f"- {r['variant']}, {r['export']}: {r['verdict']}" for r in rows]
    return "\n".join(lines) + "\n"


def render(json_path: str) -> None:
    """Rewrite the .md from the .json (after a change to the markdown only)."""
    with open(json_path) as f:
        saved = json.load(f)
    with open(os.path.join(RESULTS, "edgetpu_preflight.md"), "w") as f:
        f.write(markdown(saved["rows"], saved["machine"]))


def main():
    from edge_effnet.bench import load_average
    from edge_effnet.models import import_keras

    import_keras()
    info = machine()
    import skimage.data

    photos = os.path.dirname(skimage.data.__file__)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant, label, how in CASES:
            path, seconds = make_file(variant, how, photos, tmp)
            rows.append(summarize(variant, label, preflight(path), seconds))
            print(rows[-1]["variant"], rows[-1]["export"], rows[-1]["verdict"], file=sys.stderr)
    info["loadavg_end"] = load_average()
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "edgetpu_preflight.json"), "w") as f:
        json.dump({"machine": info, "calibration": f"{NUM_CALIB} scikit-image photos",
                   "weights": "random (untrained)", "rows": rows}, f, indent=1)
    with open(os.path.join(RESULTS, "edgetpu_preflight.md"), "w") as f:
        f.write(markdown(rows, info))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--render"]:
        render(os.path.join(RESULTS, "edgetpu_preflight.json"))
    else:
        main()
