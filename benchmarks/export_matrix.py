"""Export matrix: variant x mode x runtime -> size, single-core latency, export time, agreement.

Each (variant, mode) is exported with `edge_effnet.export.api.export` (calibration: 100 real photo
crops from skimage, edge_effnet.photoset; self-check: 20 of them), then every file is timed with
edge_effnet.bench (1 thread, pinned to one core, 20 runs, interleaved) in ai-edge-litert (this
venv) and in tflite-runtime 2.14 (the numpy<2 Python at $EDGE_EFFNET_LEGACY_PYTHON; unset: those
columns are skipped).
Agreement = the export's self-check against the Keras float model: lite0 has its real ImageNet
weights; b0 (no offline weights) has random weights, so its rows are for size and speed only (a
random EfficientNet's scores are near-uniform and chaotic; even data_init's photo BatchNorm
statistics left a B0 whose fp32 file has cosine 0.987 to Keras). Also times
the README's `edge-effnet export --variant b1 --int8` with 100 calibration images as a user runs
it, once per --weight-correction.

    python benchmarks/export_matrix.py [--variants lite0,b0] [--modes ...] [--lock FILE]

Only the timing holds the lock (--lock or $EDGE_EFFNET_BENCH_LOCK). Writes
benchmarks/results/export_matrix.{md,json} (with the provenance block, benchmarks/_common.py).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import _common

ROOT = _common.ROOT
NAME = "export_matrix"
WEIGHTS = {"lite0": "imagenet"}  # the others: random (no offline ImageNet weights): timing only
LEGACY_BENCH = r'''
import json, sys
from edge_effnet.bench import BenchOptions, Target, benchmark
paths = sys.argv[2:]
record = benchmark([Target(name=p, backend="tflite-runtime", path=p) for p in paths],
                   BenchOptions(runs=20, threads=1, cpu=int(sys.argv[1])))
print(json.dumps(record))
'''


def time_files(paths: list[str], cpu: int, legacy: str | None) -> dict[str, dict]:
    """{runtime: {path: bench entry}} for ai-edge-litert here and tflite-runtime 2.14 in `legacy` (a Python)."""
    from edge_effnet.bench import BenchOptions, Target, benchmark

    out = {"ai-edge-litert": {e["path"]: e for e in benchmark(
        [Target(name=p, backend="litert", path=p) for p in paths], BenchOptions(runs=20, threads=1, cpu=cpu))["models"]}}
    if legacy:
        done = subprocess.run([legacy, "-c", LEGACY_BENCH, str(cpu), *paths], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": ROOT})
        if done.returncode:
            raise SystemExit(done.stderr)
        out["tflite-runtime"] = {e["path"]: e for e in json.loads(done.stdout.strip().splitlines()[-1])["models"]}
    return out


def cli_export_b1(folder: str, calib: str, correction: str) -> dict:
    """The README's main job with 100 calibration images, timed as a user runs it (a fresh process)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "edge_effnet", "export", "--variant", "b1", "--int8", "--calib", calib,
                           "--num-calib", "100", "--weight-correction", correction,
                           "-o", os.path.join(folder, f"b1-int8-{correction}")], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise SystemExit(done.stderr)
    return {"command": f"edge-effnet export --variant b1 --int8 --calib CROPS --num-calib 100 --weight-correction {correction}",
            "wall_s": round(wall, 1), "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="lite0,b0")
    parser.add_argument("--modes", default="fp32,fp16,dynamic,int8,int16x8")
    parser.add_argument("--cpu", type=int, default=1)
    _common.add_lock_argument(parser)
    parser.add_argument("--out", default=_common.RESULTS, help="folder for export_matrix.{md,json}")
    args = parser.parse_args()

    from edge_effnet.export.api import ExportOptions, export
    from edge_effnet.export.formats import WEIGHT_CORRECTIONS as CORRECTIONS
    from edge_effnet.model.variants import get_variant

    run = _common.start()
    legacy = _common.legacy_python("the tflite-runtime 2.14 columns")
    rows, files = [], {}
    with tempfile.TemporaryDirectory() as folder:
        calib = _common.save_calibration(folder, 100, 256, "crops.npy")
        for variant in args.variants.split(","):
            for mode in args.modes.split(","):
                start = time.perf_counter()
                result = export(ExportOptions(spec=get_variant(variant), weights=WEIGHTS.get(variant, "none"),
                                              mode=mode, calib=calib,
                                              output=os.path.join(folder, f"{variant}-{mode}")),
                                echo=lambda line: print(line, file=sys.stderr))
                rec = result.manifest["files"][0]
                check = rec["selfcheck"]
                rows.append({"variant": variant, "weights": WEIGHTS.get(variant, "none (random)"),
                             "weight_correction": rec.get("weight_correction"), "mode": mode,
                             "size_mb": round(rec["size_bytes"] / 1e6, 2), "io": rec["io"],
                             "convert_s": rec["export_seconds"], "export_wall_s": round(time.perf_counter() - start, 1),
                             "top1_agreement": check["top1_agreement"], "top5_overlap": check["top5_overlap"],
                             "cosine_mean": round(check["cosine_mean"], 4), "check_images": check["images"],
                             "min_runtime_version": rec["min_runtime_version"]})
                files[(variant, mode)] = result.paths[0]
        with _common.bench_lock(args.lock):  # timing runs never overlap other benchmarks (exports above need no lock)
            timings = time_files(list(files.values()), args.cpu, legacy)
            b1 = [cli_export_b1(folder, calib, c) for c in CORRECTIONS]
    for row in rows:
        path = files[(row["variant"], row["mode"])]
        for runtime, entries in timings.items():
            row[f"{runtime}_ms"] = round(entries[path]["mean_ms"], 2)
            row[f"{runtime}_version"] = entries[path]["backend_version"]
    for variant in args.variants.split(","):
        by_mode = {r["mode"]: r for r in rows if r["variant"] == variant}
        if "fp32" in by_mode:
            for r in by_mode.values():
                for runtime in timings:
                    r[f"{runtime}_speedup_vs_fp32"] = round(by_mode["fp32"][f"{runtime}_ms"] / r[f"{runtime}_ms"], 2)
    record = {"timing": "1 thread, pinned to CPU "
              f"{args.cpu}, 20 runs after 2 warm-ups, interleaved per runtime (edge_effnet.bench)",
              "calibration": "100 real photo crops (edge_effnet.evaluate.photoset), agreement on 20 of them",
              "runtimes": list(timings), "rows": rows, "b1_int8_cli_export": b1}
    provenance = run.finish(legacy=legacy)
    runtimes = list(timings)
    head = ["variant", "mode", "io", "size MB", "convert s", "export s"] + [f"{r} ms" for r in runtimes] + \
        [f"{r} x fp32" for r in runtimes] + ["top-1 agree", "top-5 overlap", "cosine"]
    lines = ["# Export matrix (variant x mode x runtime)", "",
             f"{record['timing']} (on a shared machine compare within a column).",
             "Runtimes: " + ", ".join(f"{r} {rows[0][r + '_version']}" for r in runtimes)
             + ("" if legacy else f" (tflite-runtime 2.14 not timed: ${_common.LEGACY_ENV} was not set)") + ". "
             "Agreement: self-check vs the Keras float model on 20 real photo crops (lite0: real ImageNet "
             "weights; b0: random weights, agreement n/a). int8-weight modes use the default "
             "--weight-correction gptq.", "",
             "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        cells = [r["variant"], r["mode"], r["io"], r["size_mb"], r["convert_s"], r["export_wall_s"]]
        cells += [r[f"{rt}_ms"] for rt in runtimes] + [r[f"{rt}_speedup_vs_fp32"] for rt in runtimes]
        if r["variant"] in WEIGHTS:
            cells += [f"{r['top1_agreement']:.0%}", f"{r['top5_overlap']:.0%}", r["cosine_mean"]]
        else:
            cells += ["n/a"] * 3
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "The README's main job with 100 calibration images, in a fresh process as a user runs it:", ""]
    lines += [f"- `{b['command']}`: {b['wall_s']} s wall, {b['cpu_s']} s CPU" for b in b1]
    _common.write_results(NAME, record, "\n".join(lines) + "\n", provenance, args.out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
