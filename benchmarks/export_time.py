"""Export time: `edge-effnet export --variant b1 --int8` against the plain TFLiteConverter, one run.

Both get the same B1 (edge_effnet's builder, batch 1, random weights: conversion time does not
depend on them) and the same 100 real calibration crops (a .npy of scikit-image photo crops), each
in a fresh Python process as a user runs it (TensorFlow import included), interleaved round by
round so the machine's load falls on both alike. The plain path is what the TFLite docs show for
full-integer quantization: optimizations DEFAULT, a representative dataset, TFLITE_BUILTINS_INT8,
uint8 input and output. Ours adds GPTQ rounding + bias correction, measured activation ranges, the
self-check, metadata and the bundle.

    python benchmarks/export_time.py [--rounds 2] [--lock FILE]

Writes benchmarks/results/export_time.{md,json} (with the provenance block, benchmarks/_common.py).
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import _common
from export_matrix import cli_export_b1

NAME = "export_time"
PLAIN = r'''
import sys
import numpy as np
import tensorflow as tf
from edge_effnet.model.builder import build_model
from edge_effnet.model.variants import get_variant

images = np.load(sys.argv[1]).astype(np.float32)
spec = get_variant("b1")
model = build_model(spec, batch_size=1)
images = tf.image.resize(images, (spec.resolution, spec.resolution)).numpy()
converter = tf.lite.TFLiteConverter.from_keras_model(model)
converter.optimizations = [tf.lite.Optimize.DEFAULT]
converter.representative_dataset = lambda: ([image[None]] for image in images)
converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
converter.inference_input_type = tf.uint8
converter.inference_output_type = tf.uint8
with open(sys.argv[2], "wb") as f:
    f.write(converter.convert())
'''


def plain_converter_b1(folder: str, calib: str, index: int) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PLAIN, calib, os.path.join(folder, f"plain-{index}.tflite")],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": _common.ROOT})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return {"command": "TFLiteConverter.from_keras_model(b1), full int8, uint8 I/O, same 100 crops",
            "wall_s": round(wall, 1), "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    _common.add_lock_argument(parser)
    parser.add_argument("--out", default=_common.RESULTS, help="folder for export_time.{md,json}")
    args = parser.parse_args()

    run = _common.start()
    ours, plain = [], []
    with tempfile.TemporaryDirectory() as folder:
        calib = _common.save_calibration(folder, 100, 256, "crops.npy")
        with _common.bench_lock(args.lock):
            for i in range(args.rounds):
                _common.log(NAME, f"round {i + 1}/{args.rounds}: edge-effnet export")
                os.makedirs(os.path.join(folder, f"r{i}"))
                ours.append(cli_export_b1(os.path.join(folder, f"r{i}"), calib, "gptq"))
                _common.log(NAME, f"round {i + 1}/{args.rounds}: plain converter")
                plain.append(plain_converter_b1(folder, calib, i))
    ratios = [o["wall_s"] / p["wall_s"] for o, p in zip(ours, plain)]
    record = {"rounds": args.rounds, "ours": ours, "plain": plain,
              "wall_ratio_ours_to_plain": [round(r, 2) for r in ratios],
              "median_wall_ratio": round(statistics.median(ratios), 2)}
    lines = ["# Export time: edge-effnet export --variant b1 --int8 vs the plain TFLiteConverter", "",
             f"B1, batch 1, 100 real calibration crops, each conversion a fresh process, {args.rounds} interleaved "
             "rounds (ours, plain, ours, plain, ...). Ratio = our wall time / the plain converter's in the same round.",
             "", "| round | ours wall s | ours CPU s | plain wall s | plain CPU s | ours / plain (wall) |",
             "|---|---|---|---|---|---|"]
    for i, (o, p, r) in enumerate(zip(ours, plain, ratios), 1):
        lines.append(f"| {i} | {o['wall_s']} | {o['cpu_s']} | {p['wall_s']} | {p['cpu_s']} | {r:.2f} |")
    lines += ["", f"Median ratio ours / plain: **{record['median_wall_ratio']}x**. Ours: `{ours[0]['command']}` "
              "(default weights auto: no B1 ImageNet weights offline here, so random, said loudly; GPTQ + bias "
              "correction, measured ranges, self-check, metadata, bundle)."]
    _common.write_results(NAME, record, "\n".join(lines) + "\n", run.finish(), args.out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
