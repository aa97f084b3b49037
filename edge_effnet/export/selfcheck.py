"""Does an exported file load, run and agree with the Keras float model?

The exported file is opened with the light runtime (edge_effnet.runtime.open_model: no
TensorFlow for .tflite), fed the same raw pixels as the Keras model, and compared: top-1
agreement, top-5 overlap, cosine similarity of the score vectors. A file that does not load or
run raises CheckFailed (exit code 1).
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import CheckFailed, UserError


def reference_scores(model, images: np.ndarray) -> np.ndarray:
    """The Keras float model's scores for raw pixels (N, H, W, 3), one image at a time (batch 1)."""
    from ..console import import_keras

    import_keras()
    import tensorflow as tf

    fn = tf.function(lambda x: model(x, training=False))
    return np.stack([np.asarray(fn(tf.constant(img[None].astype(np.float32)))).reshape(-1) for img in images])


def agreement(reference: np.ndarray, scores: np.ndarray, k: int = 5) -> dict:
    """evaluate.agreement (top-1 agreement, top-k overlap, KL, per-confidence bins) of two
    (N, classes) score arrays, plus the cosine similarity and largest difference of the raw scores."""
    from ..evaluate.metrics import agreement as follows

    reference, scores = np.asarray(reference, np.float64), np.asarray(scores, np.float64)
    if reference.shape != scores.shape:
        raise CheckFailed(f"output shape {scores.shape[1:]} differs from the Keras model's {reference.shape[1:]}")
    figures = follows(scores, reference, k=min(k, reference.shape[1]))
    figures["images"] = figures.pop("count")
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(scores, axis=1)
    cosine = np.sum(reference * scores, axis=1) / np.maximum(norms, 1e-30)
    figures.update(cosine_mean=float(np.mean(cosine)), cosine_min=float(np.min(cosine)),
                   worst_image=int(np.argmin(cosine)), max_abs_diff=float(np.max(np.abs(reference - scores))))
    return figures


def resolvable(reference: np.ndarray, step: float) -> float:
    """Fraction of images whose reference top-1 leads the runner-up by more than `step`, the
    output's quantization step (0 for float outputs): only there can a file's top-1 agree."""
    top2 = -np.sort(-np.asarray(reference, np.float64), axis=1)[:, :2]
    if top2.shape[1] < 2:
        return 1.0
    return float(np.mean(top2[:, 0] - top2[:, 1] > step))


def _below_floor(figures: dict, floor: dict, path: str, against: str) -> str | None:
    """One line saying how a file falls below its fidelity floor, or None."""
    name = os.path.basename(path)
    if figures["cosine_min"] < floor["cosine_min"]:
        return (f"self-check: {name} is far from {against} on check image {figures['worst_image'] + 1} of "
                f"{figures['images']}: cosine {figures['cosine_min']:.3f} < {floor['cosine_min']}")
    if figures["top1_agreement"] < floor["top1_agreement"]:
        return (f"self-check: {name} agrees with {against} on the top-1 class of {figures['top1_agreement']:.0%} of "
                f"{figures['images']} check images (floor {floor['top1_agreement']:.0%})")
    return None


def run_file(path: str, images: np.ndarray, backend: str = "auto", num_threads: int = 1,
             reference_qdq: bool = False):
    """Scores of an exported file on raw pixels, and the runner (for its input/output details)."""
    from ..console import quiet_output
    from ..runtime import open_model

    try:
        with quiet_output():  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
            runner = open_model(path, backend, num_threads, reference_qdq=reference_qdq)
        scores = np.stack([runner.classify(img) for img in images])
    except CheckFailed:
        raise
    except UserError as exc:
        raise CheckFailed(f"self-check: {exc}") from None
    except Exception as exc:  # interpreter failures arrive as RuntimeError/ValueError with C++ text
        raise CheckFailed(f"self-check: {path} failed to run: {str(exc).strip().splitlines()[0]}") from None
    if not np.all(np.isfinite(scores)):
        raise CheckFailed(f"self-check: {path} produced non-finite scores")
    return scores, runner


def selfcheck(path: str, images: np.ndarray, reference: np.ndarray, backend: str = "auto",
              min_cosine: float | None = None, max_abs_diff: float | None = None,
              against: str = "the Keras model", as_probabilities: bool = False, floor: dict | None = None,
              enforce_floor: bool = True, onnx_qdq: bool = False) -> dict:
    """Run `path` on `images` and compare with `reference` (the Keras scores); a dict of figures.

    as_probabilities: compare both sides as probabilities (logits through a softmax), for a
    reference such as an imported ONNX model's raw outputs. max_abs_diff limits the largest difference.
    floor (formats.Mode.fidelity_floor): minimum top-1 agreement and worst-image cosine, applied when
    the reference is informative; below it CheckFailed, or with enforce_floor=False a recorded note.
    onnx_qdq (an int8 QDQ .onnx file): where this CPU's onnxruntime int8 kernels are not exact
    (runtime.SATURATION_NOTE), the check runs the file's reference arithmetic, which ARM devices and
    VNNI CPUs compute, and records what this CPU's kernels give under "this_cpu_int8_kernels".
    """
    from ..evaluate.metrics import to_probabilities
    from ..runtime import SATURATION_NOTE, onnx_int8_exact

    reference_qdq = onnx_qdq and not onnx_int8_exact()
    scores, runner = run_file(path, images, backend, reference_qdq=reference_qdq)
    if as_probabilities:
        reference, scores = to_probabilities(reference), to_probabilities(scores)
    figures = agreement(reference, scores)
    figures.update(runtime=runner.backend, runtime_version=runner.version, input=runner.inputs[0],
                   output=runner.outputs[0])
    step = 0.0 if as_probabilities else (runner.outputs[0].get("scale") or 0.0)
    figures["top1_resolvable"] = resolvable(reference, step)
    if reference_qdq:
        fused = agreement(reference, run_file(path, images, backend)[0])
        figures["checked_with"] = "onnxruntime's reference QDQ arithmetic (its int8 fusions off)"
        figures["this_cpu_int8_kernels"] = {"exact": False, "why": SATURATION_NOTE,
                                            **{k: fused[k] for k in ("top1_agreement", "cosine_mean", "cosine_min")}}
        figures["this_cpu_int8_kernels"]["warning"] = (
            f"{os.path.basename(path)}: this CPU's onnxruntime int8 kernels (x86 without VNNI) saturate: top-1 "
            f"{fused['top1_agreement']:.0%}, worst cosine {fused['cosine_min']:.3f} here, against "
            f"{figures['top1_agreement']:.0%} / {figures['cosine_min']:.3f} as the file is defined (checked so), which "
            "ARM devices and VNNI CPUs compute")
    if figures["top1_resolvable"] < 0.5:
        figures["top1_note"] = (
            f"top-1 agreement is not informative: on {1 - figures['top1_resolvable']:.0%} of the images the "
            f"reference's top-1 leads its runner-up by less than the output's step ({step:.4f}), so the "
            "classes tie in the file (near-uniform scores: random weights?)")
    if floor:
        figures["fidelity_floor"] = {**floor, "applied": figures["top1_resolvable"] >= 0.5}
        failure = figures["fidelity_floor"]["applied"] and _below_floor(figures, floor, path, against)
        if failure and enforce_floor:
            raise CheckFailed(failure + "; pass --accept-low-fidelity to keep the file anyway")
        if failure:
            figures["fidelity_floor"]["failed"] = failure
    if min_cosine is not None and figures["cosine_mean"] < min_cosine:
        raise CheckFailed(f"self-check: {path} disagrees with {against} (mean cosine "
                          f"{figures['cosine_mean']:.4f} < {min_cosine}); the conversion is broken")
    if max_abs_diff is not None and figures["max_abs_diff"] > max_abs_diff:
        raise CheckFailed(f"self-check: {path} differs from {against} by {figures['max_abs_diff']:.2e} "
                          f"in probability (limit {max_abs_diff:.0e})")
    return figures
