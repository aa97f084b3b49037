"""Automatic mixed precision: full int8, with the ops that hurt the output most kept in float, until
top-1 agreement with the float file reaches a target on held-out images or a latency budget is spent.

    data, record = search(model, mode, io, calibration, held_out, reference, folder, MixedOptions(0.99), echo)

1. Calibrate once (tflite.calibrate); the full-int8 file is tflite.quantize_calibrated() of it.
2. Rank ops by their share of the output error (export/quant_report.py) on the calibration images.
3. In that order, keep one more op in float together with the ops that read its output (so the
   tensor it writes stays float: an op kept alone in float still rounds its output to int8 for the
   next op), re-quantize (no new calibration), and measure on the held-out images: the logits error
   against the float file (error power over signal variance: continuous, so a step's effect shows
   on 100 images, where top-1 agreement moves by whole images), top-1 agreement, and the latency
   against the full-int8 file (edge_effnet.bench, one core, interleaved). A step that costs more than
   `max_slowdown` is undone; so is one that does not cut the logits error by 10% or that lowers
   top-1 agreement. Stop when top-1 agreement reaches the target, or after `max_steps` re-quantizations.

Float, not int16 activations: TFLite runs a mixed file's float ops with XNNPACK and int16x8 ops with
reference kernels; whole-model int16x8 Lite0 took 203 ms on one core against 5.95 ms fp32 and 2.56 ms
int8 (benchmarks/results/export_matrix.md; int8_mixed.md measures it again beside the mixed files).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..errors import UserError

WHY_FLOAT = ("float: the runtimes run float ops with XNNPACK, int16x8 ops with reference kernels (whole-model "
             "int16x8 Lite0: ~35x slower than fp32 on one core, benchmarks/results/int8_mixed.md)")
TIMING = {"runs": 30, "warmup": 5}
LOGIT_GAIN = 0.9  # a step is kept when it cuts the logits error on the held-out images by 10%


@dataclass(frozen=True)
class MixedOptions:
    target_agreement: float              # top-1 agreement with the float file on held-out images, 0..1
    max_slowdown: float = 1.15           # latency of the mixed file / the full-int8 file, one core
    max_steps: int = 8                   # re-quantizations tried
    report_images: int | None = None     # images for the ranking (quant_report's default when None)

    def validate(self) -> None:
        if not 0 < self.target_agreement <= 1:
            raise UserError(f"--target-agreement must be in (0, 1], e.g. 0.99 (got {self.target_agreement})")
        if self.max_slowdown < 1:
            raise UserError(f"--max-slowdown must be >= 1, e.g. 1.15 (got {self.max_slowdown})")


def consumers(reference: str) -> dict[str, list[str]]:
    """tensor name -> the output tensor names of the ops that read it (the float file's graph)."""
    from ..runtime.tflite_reader import read_tflite

    model = read_tflite(reference)
    readers: dict[str, list[str]] = {}
    for op in model.operators:
        for i in op.inputs:
            if i >= 0 and op.outputs:
                readers.setdefault(model.tensors[i].name, []).append(model.tensors[op.outputs[0]].name)
    return readers


def scores(path: str, images: np.ndarray) -> np.ndarray:
    from ..export.selfcheck import run_file

    return run_file(path, images)[0]


def fidelity(path: str, images: np.ndarray, reference: tuple, logits_name: str) -> dict:
    """Top-1 agreement with the float file (`reference`: its scores and logits) and the logits error."""
    from .quant_report import tensor_values
    from .selfcheck import agreement

    reference_scores, reference_logits = reference
    figures = agreement(reference_scores, scores(path, images))
    logits = tensor_values(path, logits_name, images)
    error = np.sum((logits - reference_logits) ** 2) / np.sum((reference_logits - reference_logits.mean(1, keepdims=True)) ** 2)
    return {"top1_agreement": round(figures["top1_agreement"], 4), "logit_error": round(float(error), 6)}


def latency_ratio(path: str, baseline: str) -> dict:
    """Single-core latency of `path` over `baseline`, timed interleaved by edge_effnet.bench."""
    from ..bench import BenchOptions, Target, benchmark

    cpu = sorted(os.sched_getaffinity(0))[-1]
    targets = [Target("full-int8", "auto", path=baseline), Target("mixed", "auto", path=path)]
    from ..runtime import backend_for

    targets = [Target(t.name, backend_for(t.path), path=t.path) for t in targets]
    record = benchmark(targets, BenchOptions(threads=1, cpu=cpu, **TIMING))
    ms = {m["name"]: m["p50_ms"] for m in record["models"]}
    return {"ratio": round(ms["mixed"] / ms["full-int8"], 3), "mixed_ms": round(ms["mixed"], 3),
            "full_int8_ms": round(ms["full-int8"], 3)}


def search(model, mode, io: str, calibration: np.ndarray, held_out: tuple, reference: str, folder: str,
           options: MixedOptions, echo) -> tuple[bytes, dict]:
    """The mixed-precision file's bytes and its record (see module doc). `held_out` is (images, record);
    `reference` the float .tflite file of the same graph; `folder` a scratch folder."""
    from . import quant_report, tflite

    images, held_info = held_out
    calibrated = tflite.calibrate(model, mode, io, calibration)
    full = tflite.quantize_calibrated(calibrated, io)
    full_path = os.path.join(folder, "full-int8.tflite")
    with open(full_path, "wb") as f:
        f.write(full)
    name = quant_report.logits_name(reference)
    floats = (scores(reference, images), quant_report.tensor_values(reference, name, images))
    base = fidelity(full_path, images, floats, name)
    record = {"target_agreement": options.target_agreement, "max_slowdown": options.max_slowdown,
              "held_out_images": held_info, "higher_precision": WHY_FLOAT, "full_int8": base, "steps": [],
              "float_layers": [], "float_tensors": []}
    echo(f"mixed precision: full int8 agrees with the float file on {base['top1_agreement']:.1%} of "
         f"{len(images)} held-out images (target {options.target_agreement:.1%})")
    if base["top1_agreement"] >= options.target_agreement:
        return full, {**record, "result": {**base, "latency_ratio": 1.0}, "stopped": "full int8 meets the target"}
    report = quant_report.report(full_path, reference, calibration, images_source="calibration images",
                                 **({"num_images": options.report_images} if options.report_images else {}))
    readers = consumers(reference)
    ranked = [x for x in sorted(report["layers"], key=lambda x: x["rank"]) if x["share"] > 0]
    kept, best, best_data = [], {**base, "latency_ratio": 1.0}, full
    stopped = (f"target not reached after trying the {options.max_steps} most harmful ops (max_steps)"
               if len(ranked) > options.max_steps else "target not reached: no op left to raise")
    for layer in ranked[:options.max_steps]:
        group = [layer["tensor"]] + readers.get(layer["tensor"], [])
        trial = kept + [t for t in group if t not in kept]
        data = tflite.quantize_calibrated(calibrated, io, tuple(trial))
        path = os.path.join(folder, f"mixed-{len(record['steps'])}.tflite")
        with open(path, "wb") as f:
            f.write(data)
        timing = latency_ratio(path, full_path)
        step = {"raise": layer["layer"], "share": round(layer["share"], 4), "float_ops": len(trial), **timing}
        if timing["ratio"] > options.max_slowdown:
            step.update(kept=False, why=f"latency x{timing['ratio']} > x{options.max_slowdown}")
        else:
            figures = fidelity(path, images, floats, name)
            better = figures["logit_error"] < LOGIT_GAIN * best["logit_error"] and \
                figures["top1_agreement"] >= best["top1_agreement"]
            step.update(figures, kept=better, why=None if better else "top-1 agreement fell" if
                        figures["top1_agreement"] < best["top1_agreement"] else "logits error not 10% lower")
            if better:
                kept, best, best_data = trial, {**figures, "latency_ratio": timing["ratio"]}, data
                record["float_layers"].append(layer["layer"])
        record["steps"].append(step)
        echo(f"  {'kept' if step['kept'] else 'undone'}: {layer['layer']} in float "
             f"(latency x{timing['ratio']:.2f}" + (f", agreement {step['top1_agreement']:.1%}" if "top1_agreement" in step
                                                   else "") + ")")
        if best["top1_agreement"] >= options.target_agreement:
            stopped = "target reached"
            break
    if kept:  # the chosen file timed again, on its own against the full-int8 file
        path = os.path.join(folder, "mixed-chosen.tflite")
        with open(path, "wb") as f:
            f.write(best_data)
        best.update(latency_ratio=latency_ratio(path, full_path)["ratio"])
    record.update(result={**best, "reached_target": best["top1_agreement"] >= options.target_agreement},
                  float_tensors=kept, stopped=stopped)
    return best_data, record
