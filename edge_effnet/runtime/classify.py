"""Classify images with a model file (.tflite, .onnx, .keras) or a variant built on the spot.

The same preprocessing as the export: data.load_image (square center crop, bicubic resize,
raw RGB 0..255); the model's graph normalizes. `edge-effnet predict` calls `predict`.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import numpy as np

from ..evaluate.metrics import to_probabilities
from .backends import MODEL_EXTENSIONS
from ..errors import UserError
from . import Runner


@dataclass
class PredictOptions:
    top: int = 5
    weights: str = "imagenet"  # for a variant name; model files carry their weights
    backend: str = "auto"
    num_threads: int = 1


@dataclass
class Prediction:
    image: str
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (class index, name, probability)


def resolve_model(model: str, weights: str = "imagenet"):
    """Cheap check (no TensorFlow) of a MODEL_OR_VARIANT argument: ("file", path) or ("variant", spec)."""
    from ..model.variants import get_variant
    from ..model.weights import check_weights_arg

    if os.path.splitext(model)[1].lower() in MODEL_EXTENSIONS or os.path.sep in model or os.path.exists(model):
        from . import check_model_file

        check_model_file(model)
        return "file", model
    try:
        spec = get_variant(model)
    except UserError as exc:
        raise UserError(f"{model!r} is neither a model file ({', '.join(MODEL_EXTENSIONS)}) nor a variant: "
                        f"{exc}") from None
    check_weights_arg(weights, spec)
    return "variant", spec


def open_classifier(model: str, weights: str = "imagenet", backend: str = "auto", num_threads: int = 1) -> Runner:
    """A Runner for a model file, or for a variant built with `weights` (ImageNet by default)."""
    from . import KerasRunner, configure_tf_threads, open_model

    kind, target = resolve_model(model, weights)
    if kind == "file":
        return open_model(target, backend, num_threads)
    if backend not in ("auto", "keras"):
        raise UserError(f"a variant name runs in Keras; backend {backend!r} needs an exported file")
    from ..model.keras_io import create_model

    configure_tf_threads(num_threads)  # before TensorFlow starts, i.e. before the model is built
    return KerasRunner(None, num_threads, model=create_model(target, weights, batch_size=1))


def resolution_of(runner: Runner) -> int:
    shape = runner.input_shape
    return int(shape[2] if runner.inputs[0].get("layout") == "nchw" else shape[1])


def class_names(runner: Runner) -> tuple[list[str], str]:
    from ..model.labels import labels_for

    count = int(runner.outputs[0]["shape"][-1])
    path = getattr(runner, "path", None)
    return labels_for(count, path if path and os.path.isfile(path) else None)


def warn_skipped(errors: list[str], total: int) -> None:
    """One warning per unreadable image, or, when none of the `total` could be read, one error."""
    if errors and len(errors) == total:
        raise UserError(f"none of the {total} image(s) could be read: {errors[0]}"
                        + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))
    for error in errors:
        print(f"warning: {error} (skipped)", file=sys.stderr)


def predict(model: str, images: list[str], options: PredictOptions = PredictOptions()) -> list[Prediction]:
    """Top-k classes for each readable image (folders: the images in them); unreadable ones are
    reported on stderr and skipped."""
    from ..data import expand_images, load_image
    from ..limits import check_all

    check_all(top=options.top, threads=options.num_threads)
    images = expand_images(images)
    runner = open_classifier(model, options.weights, options.backend, options.num_threads)
    resolution, (names, _) = resolution_of(runner), class_names(runner)
    results, errors = [], []
    for path in images:
        try:
            pixels = load_image(path, resolution)
        except UserError as exc:
            errors.append(str(exc))
            continue
        p = to_probabilities(runner.classify(pixels))[0]
        top = np.argsort(-p)[:options.top]
        results.append(Prediction(path, [(int(i), names[i], float(p[i])) for i in top]))
    warn_skipped(errors, len(images))
    return results
