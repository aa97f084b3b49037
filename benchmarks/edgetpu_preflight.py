"""Edge TPU pre-flight of b0 (swish + squeeze-excite), lite0 and edgetpu-s int8 exports.

Exports each variant with `edge-effnet export --edgetpu` (the library call: full-integer int8,
uint8 in/out, batch 1, calibrated on crops of scikit-image's photos) and runs the pre-flight report on the
file, plus contrasts that show what the report catches: b0 in float32, b0 int8 with float input and
output, b0 int8 with a dynamic batch, and Lite0 through the ONNX -> onnx2tf path.
Weights are random (op mapping does not depend on them). Writes
benchmarks/results/edgetpu_preflight.{md,json} (with the provenance block, benchmarks/_common.py).

    python benchmarks/edgetpu_preflight.py [--lock FILE]      # --render: rewrite the .md from the .json
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time

import _common

from edge_effnet.export.edgetpu import preflight, rules

NAME = "edgetpu_preflight"
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


def make_file(variant: str, how, folder: str) -> tuple[str, float]:
    """The .tflite file for one case and its conversion time in seconds."""
    from edge_effnet.data import calibration_set
    from edge_effnet.export.api import ExportOptions, export
    from edge_effnet.model.variants import get_variant

    spec = get_variant(variant)
    photos = os.path.join(folder, f"calib-{spec.resolution}.npy")
    if not os.path.exists(photos):
        _common.save_calibration(folder, NUM_CALIB, spec.resolution, os.path.basename(photos))
    if isinstance(how, tuple):
        mode, io = how
        result = export(ExportOptions(spec=spec, weights="none", mode=mode, io=io, calib=photos, num_calib=NUM_CALIB,
                                      output=os.path.join(folder, f"{variant}-{mode}-{io}")))
        record = result.manifest["files"][0]
        return os.path.join(result.output, record["file"]), record["export_seconds"]
    from edge_effnet.model.builder import build_model

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


def markdown(rows: list[dict]) -> str:
    lines = ["# Edge TPU pre-flight: b0, lite0, edgetpu-s", "",
             f"Made by `benchmarks/edgetpu_preflight.py`, calibrated on {_common.photo_note(NUM_CALIB)}; "
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
    from edge_effnet.model.scaling import count_macs
    from edge_effnet.model.variants import get_variant

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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _common.add_lock_argument(parser)
    parser.add_argument("--out", default=_common.RESULTS, help="folder for edgetpu_preflight.{md,json}")
    parser.add_argument("--render", action="store_true", help="rewrite the .md from the .json, run nothing")
    args = parser.parse_args(argv)
    if args.render:
        with open(os.path.join(args.out, f"{NAME}.json")) as f:
            saved = json.load(f)
        _common.write_markdown(NAME, markdown(saved["rows"]), saved.get("provenance"), args.out)
        return
    from edge_effnet.console import import_keras

    run = _common.start()
    import_keras()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, _common.bench_lock(args.lock):  # convert_s is a timing
        for variant, label, how in CASES:
            path, seconds = make_file(variant, how, tmp)
            rows.append(summarize(variant, label, preflight(path), seconds))
            print(rows[-1]["variant"], rows[-1]["export"], rows[-1]["verdict"], file=sys.stderr)
    record = {"calibration": _common.photo_note(NUM_CALIB), "weights": "random (untrained)", "rows": rows}
    _common.write_results(NAME, record, markdown(rows), run.finish(), args.out)


if __name__ == "__main__":
    main()
