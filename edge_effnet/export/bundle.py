"""The deployment bundle: model file(s) + manifest.json + labels.txt, written atomically.

Layout of a bundle folder (e.g. `b1-int8/`):
    b1_int8.tflite   the model (one file per exported format)
    manifest.json    what an app needs to feed it and what was checked (see build_manifest)
    labels.txt       one class name per line, when the classes are known

Readers (tools/rpi_classify.py, the benchmarks, other exporters) use read_manifest().
No TensorFlow: standard library and the package's own data modules.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import sys

from .. import __version__
from ..data import CROP_PADDING
from ..errors import UserError
from ..fsutil import write_json
from ..model.labels import LABELS_FILE as LABELS
from ..model.spec import PREPROCESSING, ModelSpec, spec_to_dict

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
SYNTHETIC_WARNING = ("calibrated on SYNTHETIC images: the accuracy of this model is UNKNOWN; "
                     "pass --calib DIR_OR_NPY with a few hundred real images from your domain")
RANDOM_WEIGHTS_WARNING = ("random weights (--weights none): the model is untrained, its predictions "
                          "are meaningless; use --weights imagenet|PATH or --model FILE.keras")

def default_output(name: str, mode: str) -> str:
    """The bundle folder when -o is not given: `<model>-<mode>` in the current folder."""
    return f"{name}-{mode}"


def model_filename(name: str, mode: str, suffix: str) -> str:
    return f"{name.replace('.', '_')}_{mode}{suffix}"


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_record(path: str) -> dict:
    return {"file": os.path.basename(path), "size_bytes": os.path.getsize(path), "sha256": sha256(path)}


def tool_versions() -> dict:
    """Versions of the tools that made the bundle (only modules already imported: no import cost)."""
    versions = {"edge_effnet": __version__, "python": platform.python_version()}
    for module in ("numpy", "tensorflow", "keras", "ai_edge_litert", "tflite_runtime", "onnx", "onnxruntime",
                   "tf2onnx", "onnx2tf"):
        if module in sys.modules:
            versions[module] = getattr(sys.modules[module], "__version__", "unknown")
    return versions


def preprocessing_record(spec: ModelSpec | None, resolution: int) -> dict:
    """How an app turns a photo into the model's input (normalization is inside the graph)."""
    record = {"input": "raw RGB pixels, NHWC, batch 1", "pixel_range": [0, 255], "resolution": resolution,
              "resize": "center square crop of crop_fraction x the short side, bicubic resize to resolution",
              "crop_fraction": round(resolution / (resolution + CROP_PADDING), 6),
              "color": "RGB (grayscale and RGBA converted to RGB)"}
    if spec is not None:
        record["in_graph_normalization"] = {"kind": spec.preprocessing, **PREPROCESSING[spec.preprocessing],
                                            "formula": "(pixel - mean) / std"}
    else:
        record["in_graph_normalization"] = "as built into the given .keras model (edge-effnet builds take 0..255)"
    return record


def build_manifest(*, name: str, spec: ModelSpec | None, source: str, weights: str, resolution: int,
                   num_classes: int, mode: dict, calibration: dict | None, files: list[dict],
                   labels: list[str] | None, labels_source: str, warnings: list[str], check_images: dict) -> dict:
    """The manifest as a dict. `files` holds one record per exported file (file_record + inspect
    + selfcheck figures); the first is the primary model."""
    return {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "name": name,
        "source": source,
        "spec": spec_to_dict(spec) if spec is not None else None,
        "weights": weights,
        "warnings": warnings,
        "num_classes": num_classes,
        "labels": LABELS if labels else None,
        "labels_source": labels_source,
        "preprocessing": preprocessing_record(spec, resolution),
        "quantization": mode,
        "calibration": calibration,
        "check_images": check_images,
        "files": files,
        "tools": tool_versions(),
    }


def write_bundle(folder: str, manifest: dict, labels: list[str] | None) -> None:
    """Write manifest.json and labels.txt into `folder` (the temporary folder of atomic_dir)."""
    if labels:
        from ..model.labels import write_labels

        write_labels(os.path.join(folder, LABELS), labels)
    write_json(os.path.join(folder, MANIFEST), manifest)


def bundle_labels(path: str | None, num_classes: int, weights: str | None, model_path: str | None
                  ) -> tuple[list[str] | None, str]:
    """The class names a bundle ships, and where they came from (or why there are none).

    --labels FILE wins; ImageNet weights (or a .keras file with 1000/1001 outputs) give ImageNet's
    names; an untrained model's classes are not known, so it ships no labels.txt.
    """
    from ..model.labels import imagenet_labels, read_labels

    if path:
        labels = read_labels(path)
        if len(labels) != num_classes:
            raise UserError(f"labels file {path} has {len(labels)} names but the model has {num_classes} classes")
        return labels, os.path.abspath(path)
    trained = model_path is not None or weights not in (None, "", "none")
    if trained and num_classes in (1000, 1001):
        return imagenet_labels(num_classes), "imagenet" if model_path is None else "imagenet (1000/1001 outputs)"
    return None, "unknown: untrained model or custom classes; pass --labels FILE"


def read_manifest(bundle: str) -> dict:
    """The manifest of a bundle folder (or of the folder holding a given model file)."""
    folder = bundle if os.path.isdir(bundle) else os.path.dirname(os.path.abspath(bundle))
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{folder} is not an export bundle (no {MANIFEST})") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise UserError(f"{path}: unknown manifest schema {manifest.get('schema_version')!r}")
    return manifest
