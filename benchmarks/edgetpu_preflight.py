"""Edge TPU pre-flight of b0 (swish + squeeze-excite), lite0 and edgetpu-s int8 exports.

Exports each variant the way `edge-effnet export --edgetpu` does (full-integer int8, uint8 in/out,
batch 1, calibrated on scikit-image's photos) and runs the pre-flight report on the file, plus two
contrasts that show what the report catches: b0 left in float32, and b0 int8 with a dynamic batch.
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
CASES = [  # variant, label, quantize (None: float), io dtype, batch
    ("b0", "int8 (--edgetpu)", "int8", "uint8", 1),
    ("lite0", "int8 (--edgetpu)", "int8", "uint8", 1),
    ("edgetpu-s", "int8 (--edgetpu)", "int8", "uint8", 1),
    ("b0", "float32 (contrast)", None, "float32", 1),
    ("b0", "int8, float32 input/output (contrast)", "int8", "float32", 1),
    ("b0", "int8, dynamic batch (contrast)", "int8", "uint8", None),
]


def machine() -> dict:
    import tensorflow as tf

    from edge_effnet.bench import load_average, machine_info

    return {**machine_info(), "tensorflow": tf.__version__,
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "loadavg_start": load_average()}


def convert(variant: str, quantize: str | None, io: str, batch: int | None, calibration, path: str) -> float:
    import tensorflow as tf

    from edge_effnet.builder import build_model
    from edge_effnet.variants import get_variant

    model = build_model(get_variant(variant), batch_size=batch)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if quantize:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([x[None].astype("float32")] for x in calibration)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = converter.inference_output_type = getattr(tf, io)
    start = time.perf_counter()
    data = converter.convert()
    seconds = time.perf_counter() - start
    with open(path, "wb") as f:
        f.write(data)
    return seconds


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
    lines += ["", "Op versions the TF converter wrote, against the newest compiler 16 parses:", ""]
    for r in rows:
        if r["quantization"].startswith("full-integer"):
            ops = ", ".join(f"{k} (max {v['compiler16_max']}) x{v['count']}" for k, v in r["op_versions"].items())
            lines.append(f"- {r['variant']}, {r['export']}: {ops}; min_runtime_version {r['min_runtime_version']}")
    lines += ["", "Verdicts:", ""] + [f"- {r['variant']}, {r['export']}: {r['verdict']}" for r in rows]
    return "\n".join(lines) + "\n"


def main():
    from edge_effnet.bench import load_average
    from edge_effnet.data import calibration_set
    from edge_effnet.models import import_keras

    import_keras()
    info = machine()
    import skimage.data

    photos = os.path.dirname(skimage.data.__file__)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant, label, quantize, io, batch in CASES:
            from edge_effnet.variants import get_variant

            calibration, _ = calibration_set(photos, get_variant(variant).resolution, count=32)
            path = os.path.join(tmp, f"{variant}-{len(rows)}.tflite")
            seconds = convert(variant, quantize, io, batch, calibration, path)
            rows.append(summarize(variant, label, preflight(path), seconds))
            print(rows[-1]["variant"], rows[-1]["export"], rows[-1]["verdict"], file=sys.stderr)
    info["loadavg_end"] = load_average()
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "edgetpu_preflight.json"), "w") as f:
        json.dump({"machine": info, "calibration": "32 scikit-image photos", "weights": "random (untrained)",
                   "rows": rows}, f, indent=1)
    with open(os.path.join(RESULTS, "edgetpu_preflight.md"), "w") as f:
        f.write(markdown(rows, info))


if __name__ == "__main__":
    main()
