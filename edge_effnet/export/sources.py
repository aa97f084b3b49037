"""What can be exported: one class per kind of source, each with the same small interface.

    source.name, source.resolution          known before any image is read
    source.load(echo)                       the heavy part (build or load the model)
    source.num_classes, source.reference(images)
    source.labels(labels_file)              (labels, where they came from)
    source.write(path, fmt, mode, io, calibration, options, echo) -> record fields
    source.float_reference(folder)          the float .tflite file of the same graph (quant report), or None
    source.check_options(fmt)               how the self-check compares (against what, limits)
    source.manifest(...)                    the manifest fields that say where the model came from

The export pipeline (api.export) loops formats over any source; a new kind of source is one
class here and one line in `open_source`.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os

from ..errors import UserError
from . import bundle
from .formats import NORMALIZATIONS, WEIGHT_CORRECTIONS, Format, Mode


def _batch1(model):
    """The same model with its batch dimension fixed to 1 (static graph, no SHAPE/PACK ops)."""
    if model.inputs[0].shape[0] == 1:
        return model
    config = model.get_config()
    for layer in config["layers"]:
        if layer["class_name"] == "InputLayer":
            shape = layer["config"].get("batch_shape") or layer["config"].get("batch_input_shape")
            layer["config"]["batch_shape"] = [1, *shape[1:]]
            layer["config"].pop("batch_input_shape", None)
    fixed = model.__class__.from_config(config)
    fixed.set_weights(model.get_weights())
    return fixed


class KerasSource:
    """A model built from a spec (variant, phi, width...) with its weights, or a .keras file."""

    def __init__(self, options):
        self.options, self.spec, self.model = options, options.spec, None
        self.name = self.spec.name if self.spec is not None else \
            os.path.splitext(os.path.basename(options.model_path))[0]
        self.rewrite, self.corrected, self.reference_file = None, None, None
        if self.spec is not None:
            self.resolution = self.spec.resolution
        else:  # the file says its resolution
            self.model = self._load()
            self.resolution = int(self.model.inputs[0].shape[1])

    def _load(self):
        from ..console import import_keras
        from ..model.keras_io import create_model, load_model_file

        import_keras()
        if self.spec is not None:
            return create_model(self.spec, self.options.weights, batch_size=1)
        return _batch1(load_model_file(self.options.model_path))

    def load(self, echo, mode: Mode) -> None:
        if self.model is None:
            echo(f"building {self.name} (resolution {self.resolution}, weights {self.options.weights or 'none'})")
            self.model = self._load()
        self.num_classes = int(self.model.outputs[0].shape[-1])
        self.mode = mode

    def reference(self, images):
        from .selfcheck import reference_scores

        scores = reference_scores(self.model, images)
        if self.mode.fold_normalization:  # same function, faster file (export/fold.py)
            from .fold import fold_input_normalization

            self.model, self.rewrite = fold_input_normalization(self.model)
        return scores

    def labels(self, labels_file: str | None):
        return bundle.bundle_labels(labels_file, self.num_classes, self.options.weights, self.options.model_path)

    def write(self, path: str, fmt: Format, mode: Mode, io: str, calibration, real_images: bool, labels,
              echo, tuning=None, scratch: str | None = None) -> dict:
        """Convert with the format's module and write `path`; the record fields this adds. With
        options.target_agreement (TFLite, a mode with mixed_precision): export/mixed.py on the
        `tuning` images (images, record), its scratch files in `scratch`."""
        options = self.options
        echo(f"converting to {fmt.name} {mode.name}" + (f" ({io} in/out)" if io != "float32" else ""))
        model, corrected = self.model, (fmt.name == "tflite" or mode.settings[fmt.name].get("corrected_weights")) \
            and mode.calibration and options.weight_correction != "none" and real_images
        if corrected:
            if self.corrected is None:
                from .quantize import prepare_int8

                echo(f"int8 weights: {WEIGHT_CORRECTIONS[options.weight_correction]}, from "
                     f"{len(calibration)} calibration images")
                self.corrected = prepare_int8(model, calibration, options.weight_correction)
            model = self.corrected
        converter = importlib.import_module(fmt.module)
        extra = {"layout": options.layout, "metadata": {
            "variant": self.name, "labels": labels,
            "preprocessing": self.spec.preprocessing if self.spec else "in the .keras model"}}
        mixed = None
        if fmt.name == "tflite" and options.target_agreement is not None and mode.mixed_precision:
            from .mixed import MixedOptions, search

            data, mixed = search(model, mode, io, calibration, tuning, self.float_reference(scratch), scratch,
                                 MixedOptions(options.target_agreement, options.max_slowdown), echo)
        else:
            data = converter.convert(model, mode, io, calibration if mode.calibration else None,
                                     **{k: v for k, v in extra.items() if k in fmt.options})
        with open(path, "wb") as f:
            f.write(data)
        record = {**converter.inspect(path), "weight_correction": options.weight_correction if corrected else "none"}
        return {**record, "mixed_precision": mixed} if mixed else record

    def float_reference(self, folder: str) -> str:
        """The fp32 .tflite file of the model's graph with its own (uncorrected) weights, converted once
        into `folder`: what quantized files of the same graph are measured against."""
        if self.reference_file is None:
            from .formats import MODES
            from .tflite import convert

            self.reference_file = os.path.join(folder, f"{self.name}_float-reference.tflite")
            with open(self.reference_file, "wb") as f:
                f.write(convert(self.model, MODES["fp32"], "float32"))
        return self.reference_file

    def check_options(self, fmt: Format, mode: Mode) -> dict:
        return {"max_abs_diff": mode.settings[fmt.name].get("max_abs_diff")}

    def manifest(self) -> dict:
        return {"name": self.name, "spec": self.spec, "source": self.options.model_path or "builder",
                "weights": self.options.weights or "none"}  # a spec's: replaced by api.export's full record

    def manifest_extra(self, manifest: dict) -> None:
        manifest["graph_rewrites"] = [self.rewrite] if self.rewrite else []


class OnnxSource:
    """An ONNX model made elsewhere (`--model FILE.onnx`) -> TFLite through onnx2tf (offline),
    checked against onnxruntime running the source file."""

    def __init__(self, options):
        from . import onnx2tflite

        self.options, self.spec = options, None
        self.name = os.path.splitext(os.path.basename(options.model_path))[0]
        self.imported = onnx2tflite.ImportOptions(resolution=options.resolution, normalization=options.normalization)
        self.onnx = onnx2tflite.load_onnx(options.model_path)
        self.source = onnx2tflite.inspect_onnx(options.model_path, self.imported, self.onnx)
        self.resolution = self.source.resolution[0]
        if self.source.resolution[1] != self.resolution:
            raise UserError(f"{options.model_path}: input is {self.source.resolution[0]}x{self.source.resolution[1]}; "
                            "exports take square images")

    def load(self, echo, mode: Mode) -> None:
        for note in self.source.notes:
            echo(f"{self.options.model_path}: {note}")

    def reference(self, images):
        from .onnx2tflite import source_scores

        scores = source_scores(self.source, images)
        self.num_classes = int(scores.shape[1])
        return scores

    def labels(self, labels_file: str | None):
        if "labels" in self.source.metadata and not labels_file:  # our own ONNX files carry them
            return json.loads(self.source.metadata["labels"]), "the ONNX file's metadata"
        return bundle.bundle_labels(labels_file, self.num_classes, None, self.options.model_path)

    def write(self, path: str, fmt: Format, mode: Mode, io: str, calibration, real_images: bool, labels,
              echo, tuning=None, scratch: str | None = None) -> dict:
        from . import onnx2tflite, tflite

        echo(f"converting {self.options.model_path} to tflite {mode.name} with onnx2tf (offline, "
             f"{len(calibration)} calibration images)")
        onnx2tflite.convert_onnx(self.source, self.onnx, {mode.name: path}, calibration,
                                 dataclasses.replace(self.imported, io=io))
        return {"converter": "onnx2tf", **tflite.inspect(path)}

    def float_reference(self, folder: str) -> None:
        return None  # onnx2tf's float file is not the same graph as its quantized one

    def check_options(self, fmt: Format, mode: Mode) -> dict:
        # the float limit of ONNX files holds for ONNX -> TFLite too
        return {"max_abs_diff": mode.settings.get("onnx", {}).get("max_abs_diff"), "as_probabilities": True,
                "against": f"onnxruntime running {os.path.basename(self.options.model_path)}"}

    def manifest(self) -> dict:
        return {"name": self.name, "spec": None, "source": os.path.abspath(self.options.model_path),
                "weights": "from the ONNX file"}

    def manifest_extra(self, manifest: dict) -> None:
        from .onnx2tflite import describe

        mean, std = NORMALIZATIONS[self.source.normalization]
        manifest["preprocessing"]["in_graph_normalization"] = (
            "as built into the ONNX model (it takes 0..255 pixels)" if self.source.normalization == "raw" else
            {"kind": self.source.normalization, "added_by": "edge_effnet, in front of the ONNX graph",
             "formula": "(pixel / 255 - mean) / std", "mean": list(mean), "std": list(std)})
        manifest["onnx_source"] = describe(self.source)


def is_onnx(path: str | None) -> bool:
    return path is not None and path.lower().endswith(".onnx")


def open_source(options):
    """The source an ExportOptions names (cheap checks were done by api.validate)."""
    return OnnxSource(options) if is_onnx(options.model_path) else KerasSource(options)

