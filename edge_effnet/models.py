"""Model objects from specs or files: build + weights, save atomically, load .keras files."""
from __future__ import annotations

import os
import sys
import tempfile

from .errors import UserError
from .fsutil import atomic_file
from .spec import ModelSpec


def import_keras():
    """Import keras (and TensorFlow) with TensorFlow's C++ start-up log lines kept off the console.

    Those lines are written to fd 2 before TF_CPP_MIN_LOG_LEVEL takes effect; they are replayed
    only if the import fails.
    """
    if "keras" in sys.modules:
        return sys.modules["keras"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")  # CPU toolkit: skip the CUDA probe
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            import keras
            import tensorflow  # noqa: F401
        except BaseException:
            os.dup2(saved, 2)
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    return keras


def create_model(spec: ModelSpec, weights: str | None = None, *, include_top: bool = True,
                 num_classes: int | None = None, **build_kwargs):
    """build_model(spec) with `weights` loaded (none | imagenet | PATH | torch:PATH)."""
    import_keras()
    from .builder import build_model
    from .weights import load_weights

    if weights == "imagenet" and include_top and num_classes not in (None, spec.num_classes):
        raise UserError(f"--weights imagenet needs {spec.num_classes} classes (got --num-classes {num_classes})")
    model = build_model(spec, include_top=include_top, num_classes=num_classes, **build_kwargs)
    load_weights(model, spec, weights, include_top=include_top)
    return model


def build_and_save(spec: ModelSpec, output: str, weights: str | None = None, **kwargs):
    model = create_model(spec, weights, **kwargs)
    with atomic_file(output) as tmp:
        model.save(tmp)
    return model


def load_model_file(path: str):
    """A .keras model file (saved by `edge-effnet build` or any Keras 3 code)."""
    if not os.path.isfile(path):
        raise UserError(f"model file not found: {path}")
    keras = import_keras()
    try:
        return keras.models.load_model(path, compile=False)
    except Exception as exc:
        raise UserError(f"cannot load {path} as a Keras model: {str(exc).splitlines()[0]}") from None
