"""export(): model -> converted file(s) -> self-check -> deployment bundle. The CLI calls this.

    from edge_effnet.export.api import ExportOptions, export
    result = export(ExportOptions(spec=get_variant("b0"), mode="int8", calib="photos/"))
    result.output, result.manifest["files"][0]["selfcheck"]

Order of work: cheap validation first (no TensorFlow), then images, then the model, then
conversion and self-check inside a temporary folder that becomes the bundle only at the end.
"""
from __future__ import annotations

import importlib
import os
import sys
import time
from dataclasses import dataclass, field

from ..errors import UserError
from ..spec import ModelSpec
from . import bundle
from .formats import DEFAULT_FORMATS, DEFAULT_MODE, FORMATS, LAYOUTS, NORMALIZATIONS, Mode, check_combination, get_mode

NUM_CALIB = 100   # calibration images (int8, int16x8)
NUM_CHECK = 20    # self-check images (taken from the calibration images)


@dataclass
class ExportOptions:
    spec: ModelSpec | None = None        # a model named by variant/phi/width...
    model_path: str | None = None        # ...or a .keras file, or an .onnx file (-> tflite via onnx2tf)
    weights: str = "none"                # none | imagenet | PATH | torch:PATH (with spec)
    mode: str = DEFAULT_MODE             # a formats.MODES key
    io: str | None = None                # input/output dtype; None: the mode's default
    formats: tuple[str, ...] = DEFAULT_FORMATS
    calib: str | None = None             # folder or .npy; None: synthetic (accuracy unknown)
    num_calib: int = NUM_CALIB
    num_check: int = NUM_CHECK
    labels: str | None = None            # labels file, one class per line; ImageNet weights: ImageNet's
    weight_correction: str = "gptq"      # int8-weight TFLite modes, real calibration images: quantize.CORRECTIONS
    output: str | None = None            # bundle folder; None: <name>-<mode> in the cwd
    force: bool = False
    backend: str = "auto"                # runtime for the self-check
    layout: str = "nhwc"                 # ONNX files' input layout (nhwc | nchw)
    resolution: int | None = None        # .onnx model with dynamic height/width: fix them
    normalization: str | None = None     # .onnx model: the input it expects (formats.NORMALIZATIONS)


@dataclass
class ExportResult:
    output: str
    manifest: dict
    paths: list[str] = field(default_factory=list)


def model_name(options: ExportOptions) -> str:
    if options.spec is not None:
        return options.spec.name
    return os.path.splitext(os.path.basename(options.model_path))[0]


def validate(options: ExportOptions) -> tuple[Mode, str, str]:
    """Cheap checks before any heavy import; returns (mode, io, output folder)."""
    from ..fsutil import check_output
    from ..weights import check_weights_arg

    if (options.spec is None) == (options.model_path is None):
        raise UserError("name one model: --variant/--phi/--width... or --model FILE.keras")
    onnx_model = options.model_path is not None and options.model_path.lower().endswith(".onnx")
    if options.model_path is not None:
        if not options.model_path.endswith(".keras") and not onnx_model:
            raise UserError(f"--model takes a .keras or .onnx file (got {options.model_path})")
        if not os.path.isfile(options.model_path):
            raise UserError(f"model file not found: {options.model_path}")
        if options.weights not in (None, "", "none"):
            raise UserError("--weights applies to --variant/--phi/--width models; a --model file has its own")
    else:
        check_weights_arg(options.weights, options.spec)
    mode = get_mode(options.mode)
    io = check_combination(mode, tuple(options.formats), options.io)
    if options.layout not in LAYOUTS:
        raise UserError(f"--layout must be one of {', '.join(LAYOUTS)} (got {options.layout!r})")
    if options.layout != "nhwc" and "onnx" not in options.formats:
        raise UserError("--layout applies to --format onnx (TFLite files are NHWC)")
    if onnx_model:
        if options.resolution is not None and options.resolution < 1:
            raise UserError(f"resolution must be > 0 (got {options.resolution})")
        from .onnx2tflite import ONNX2TF_FILES

        if tuple(options.formats) != ("tflite",):
            raise UserError(f"--model {os.path.basename(options.model_path)} converts to --format tflite only "
                            f"(got {','.join(options.formats)})")
        if mode.name not in ONNX2TF_FILES:
            raise UserError(f"{mode.flag} is not available for --model FILE.onnx "
                            f"(choose from {', '.join('--' + m for m in ONNX2TF_FILES)})")
    elif options.normalization is not None or options.resolution is not None:
        raise UserError(f"--{'normalization' if options.normalization else 'resolution'} applies to --model FILE.onnx")
    if options.normalization is not None and options.normalization not in NORMALIZATIONS:
        raise UserError(f"unknown normalization {options.normalization!r} (choose from {', '.join(NORMALIZATIONS)})")
    if options.num_calib < 1 or options.num_check < 1:
        raise UserError("--num-calib must be >= 1")
    if options.calib is not None and not os.path.exists(options.calib):
        raise UserError(f"calibration source not found: {options.calib}")
    if options.labels is not None and not os.path.isfile(options.labels):
        raise UserError(f"labels file not found: {options.labels}")
    output = options.output or bundle.default_output(model_name(options), mode.name)
    check_output(output, options.force)
    return mode, io, output


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


def load_model(options: ExportOptions):
    """The Keras float model, batch 1."""
    from ..models import create_model, import_keras, load_model_file

    import_keras()
    if options.spec is not None:
        return create_model(options.spec, options.weights, batch_size=1)
    return _batch1(load_model_file(options.model_path))


def export(options: ExportOptions, echo=None) -> ExportResult:
    """Export one model in one mode to every requested format; write the checked bundle."""
    from ..data import calibration_set
    from ..fsutil import atomic_dir
    from .selfcheck import reference_scores, selfcheck

    echo = echo or (lambda line: print(line, file=sys.stderr))
    started = time.perf_counter()
    mode, io, output = validate(options)
    name = model_name(options)
    if options.model_path is not None and options.model_path.lower().endswith(".onnx"):
        return export_onnx_model(options, mode, io, output, echo, started)
    warnings = []
    if options.spec is not None and options.weights in (None, "", "none"):
        warnings.append(bundle.RANDOM_WEIGHTS_WARNING)
    if mode.calibration and options.calib is None:
        warnings.append(bundle.SYNTHETIC_WARNING)

    model = None
    if options.spec is not None:
        resolution = options.spec.resolution
    else:  # the file says its resolution
        echo(f"loading {options.model_path}")
        model = load_model(options)
        resolution = int(model.inputs[0].shape[1])
    count = max(options.num_calib if mode.calibration else 0, options.num_check)
    images, calib_info = calibration_set(options.calib, resolution, count)
    check = images[:options.num_check]
    if model is None:
        echo(f"building {name} (resolution {resolution}, weights {options.weights or 'none'})")
        model = load_model(options)
    num_classes = int(model.outputs[0].shape[-1])
    labels, labels_source = bundle.bundle_labels(options.labels, num_classes, options.weights, options.model_path)
    reference = reference_scores(model, check)
    from .fold import fold_input_normalization  # same function, faster file; imports keras (loaded by now)

    model, rewrite = fold_input_normalization(model) if mode.fold_normalization else (model, None)

    records, paths, corrected_model = [], [], None
    with atomic_dir(output, options.force) as tmp:
        for fmt_name in options.formats:
            fmt = FORMATS[fmt_name]
            converter = importlib.import_module(fmt.module)
            file_io = fmt.io[0] if fmt.io else io
            echo(f"converting to {fmt.name} {mode.name}" + (f" ({file_io} in/out)" if file_io != "float32" else ""))
            extra = {"layout": options.layout, "metadata": {
                "variant": name, "labels": labels,
                "preprocessing": options.spec.preprocessing if options.spec else "in the .keras model"}}
            t0 = time.perf_counter()
            corrected = fmt_name == "tflite" and mode.calibration and options.weight_correction != "none" \
                and not calib_info["synthetic"]
            if corrected and corrected_model is None:
                from ..quantize import CORRECTIONS, prepare_int8

                echo(f"int8 weights: {CORRECTIONS[options.weight_correction]}, from "
                     f"{min(len(images), options.num_calib)} calibration images")
                corrected_model = prepare_int8(model, images[:options.num_calib], options.weight_correction)
            data = converter.convert(corrected_model if corrected else model, mode, file_io,
                                     images[:options.num_calib] if mode.calibration else None,
                                     **{k: v for k, v in extra.items() if k in fmt.options})
            seconds = time.perf_counter() - t0
            filename = bundle.model_filename(name, mode.name, fmt.suffix)
            path = os.path.join(tmp, filename)
            with open(path, "wb") as f:
                f.write(data)
            figures = selfcheck(path, check, reference, _backend_for(options.backend, fmt.suffix), mode.min_cosine,
                                mode.settings[fmt.name].get("max_abs_diff"))
            record = _file_record(path, fmt.name, mode, file_io, seconds, converter.inspect(path), figures)
            record["weight_correction"] = options.weight_correction if corrected else "none"
            _mode_report(mode, path, tmp, echo, record, warnings)
            records.append(record)
            paths.append(os.path.join(output, filename))
        calibration = None
        if mode.calibration:
            calibration = {**calib_info, "count": min(calib_info["count"], options.num_calib)}
        manifest = bundle.build_manifest(
            name=name, spec=options.spec, source=options.model_path or "builder", weights=options.weights or "none",
            resolution=resolution, num_classes=num_classes,
            mode={"name": mode.name, "description": mode.description, "io": io}, calibration=calibration,
            files=records, labels=labels, labels_source=labels_source, warnings=warnings,
            check_images={"source": calib_info["source"], "count": int(len(check)),
                          "synthetic": calib_info["synthetic"]})
        manifest["graph_rewrites"] = [rewrite] if rewrite else []
        manifest["export_seconds"] = round(time.perf_counter() - started, 2)
        bundle.write_bundle(tmp, manifest, labels)
    return ExportResult(output=output, manifest=manifest, paths=paths)


def _file_record(path: str, fmt: str, mode: Mode, io: str, seconds: float, inspected: dict, figures: dict) -> dict:
    """The manifest's record of one exported file: what it is, what it holds, how it checked."""
    record = {**bundle.file_record(path), "format": fmt, "mode": mode.name, "io": io,
              "input": figures.pop("input"), "output": figures.pop("output"),
              "export_seconds": round(seconds, 2), **inspected, "selfcheck": figures}
    record["verified_runtimes"] = [f"{figures['runtime']} {figures['runtime_version']}"]
    if len(record.get("float_activations", ())) > 20:
        record["float_activations"] = f"{len(record['float_activations'])} (float model)"
    return record


def _mode_report(mode: Mode, path: str, folder: str, echo, record: dict, warnings: list[str]) -> None:
    """The mode's extra step on an exported file (--edgetpu: the Edge TPU pre-flight) into its record."""
    if mode.report:
        module, function = mode.report.split(":")
        record["report"] = getattr(importlib.import_module(module), function)(path, folder, echo)
        if record["report"].get("warning"):
            warnings.append(record["report"]["warning"])


def _backend_for(backend: str, suffix: str) -> str:
    """The --backend for the self-check of a `suffix` file: the user's when it runs such files."""
    from ..backends import BACKEND_TABLE

    return backend if BACKEND_TABLE.get(backend, ("",))[0] == suffix else "auto"


def export_onnx_model(options: ExportOptions, mode: Mode, io: str, output: str, echo, started: float) -> ExportResult:
    """`--model FILE.onnx`: an ONNX model made elsewhere -> TFLite through onnx2tf (offline), checked
    against onnxruntime running the source file, in the same bundle as every export."""
    from ..data import calibration_set
    from ..fsutil import atomic_dir
    from . import onnx2tflite, tflite
    from .selfcheck import selfcheck

    imported = onnx2tflite.ImportOptions(resolution=options.resolution, normalization=options.normalization, io=io)
    model = onnx2tflite.load_onnx(options.model_path)
    source = onnx2tflite.inspect_onnx(options.model_path, imported, model)
    name = model_name(options)
    for note in source.notes:
        echo(f"{options.model_path}: {note}")
    warnings = [bundle.SYNTHETIC_WARNING] if mode.calibration and options.calib is None else []
    resolution = source.resolution[0]
    if source.resolution[1] != resolution:
        raise UserError(f"{options.model_path}: input is {source.resolution[0]}x{source.resolution[1]}; "
                        "exports take square images")
    count = max(options.num_calib if mode.calibration else 0, options.num_check)
    images, calib_info = calibration_set(options.calib, resolution, count)
    check = images[:options.num_check]
    reference = onnx2tflite.source_scores(source, check)
    num_classes = int(reference.shape[1])
    if "labels" in source.metadata and not options.labels:  # our own ONNX files carry them
        import json

        labels, labels_source = json.loads(source.metadata["labels"]), "the ONNX file's metadata"
    else:
        labels, labels_source = bundle.bundle_labels(options.labels, num_classes, None, options.model_path)
    with atomic_dir(output, options.force) as tmp:
        filename = bundle.model_filename(name, mode.name, ".tflite")
        path = os.path.join(tmp, filename)
        echo(f"converting {options.model_path} to tflite {mode.name} with onnx2tf (offline, "
             f"{len(images[:options.num_calib])} calibration images)")
        t0 = time.perf_counter()
        onnx2tflite.convert_onnx(source, model, {mode.name: path}, images[:options.num_calib], imported)
        seconds = time.perf_counter() - t0
        # the float limit of ONNX files holds for ONNX -> TFLite too
        figures = selfcheck(path, check, reference, _backend_for(options.backend, ".tflite"), mode.min_cosine,
                            mode.settings.get("onnx", {}).get("max_abs_diff"),
                            against=f"onnxruntime running {os.path.basename(options.model_path)}",
                            as_probabilities=True)
        record = _file_record(path, "tflite", mode, io, seconds, {"converter": "onnx2tf", **tflite.inspect(path)},
                              figures)
        _mode_report(mode, path, tmp, echo, record, warnings)
        calibration = {**calib_info, "count": min(calib_info["count"], options.num_calib)} if mode.calibration else None
        manifest = bundle.build_manifest(
            name=name, spec=None, source=os.path.abspath(options.model_path), weights="from the ONNX file",
            resolution=resolution, num_classes=num_classes,
            mode={"name": mode.name, "description": mode.description, "io": io}, calibration=calibration,
            files=[record], labels=labels, labels_source=labels_source, warnings=warnings,
            check_images={"source": calib_info["source"], "count": int(len(check)),
                          "synthetic": calib_info["synthetic"]})
        mean, std = NORMALIZATIONS[source.normalization]
        manifest["preprocessing"]["in_graph_normalization"] = (
            "as built into the ONNX model (it takes 0..255 pixels)" if source.normalization == "raw" else
            {"kind": source.normalization, "added_by": "edge_effnet, in front of the ONNX graph",
             "formula": "(pixel / 255 - mean) / std", "mean": list(mean), "std": list(std)})
        manifest["onnx_source"] = onnx2tflite.describe(source)
        manifest["export_seconds"] = round(time.perf_counter() - started, 2)
        bundle.write_bundle(tmp, manifest, labels)
    return ExportResult(output=output, manifest=manifest, paths=[os.path.join(output, filename)])


def summary(result: ExportResult) -> list[str]:
    """Console lines for a finished export (the CLI prints these)."""
    lines = []
    for rec in result.manifest["files"]:
        check = rec["selfcheck"]
        overlap = next(k for k in check if k.startswith("top") and k.endswith("_overlap"))  # top-k, k <= classes
        lines.append(f"wrote {os.path.join(result.output, rec['file'])}: {rec['size_bytes'] / 1e6:.2f} MB, "
                     f"input {rec['input']['dtype']} {rec['input']['shape']}, "
                     f"output {rec['output']['dtype']} {rec['output']['shape']}, "
                     f"converted in {rec['export_seconds']:.1f} s")
        lines.append(f"self-check ({check['runtime']} {check['runtime_version']}, {check['images']} images): "
                     f"top-1 agreement {check['top1_agreement']:.1%}, top-{overlap[3:-8]} overlap {check[overlap]:.1%}, "
                     f"cosine {check['cosine_mean']:.4f} (min {check['cosine_min']:.4f})")
        if check.get("top1_note"):
            lines.append(check["top1_note"])
        if rec.get("report", {}).get("summary"):
            lines.append(rec["report"]["summary"])
    lines.append(f"bundle: {result.output}/ (manifest.json" + (", labels.txt" if result.manifest["labels"] else "")
                 + f"), {result.manifest['export_seconds']:.1f} s in all")
    return lines


def warning_lines(result_or_warnings) -> list[str]:
    warnings = result_or_warnings.manifest["warnings"] if isinstance(result_or_warnings, ExportResult) \
        else result_or_warnings
    if not warnings:
        return []
    bar = "!" * 78
    return [bar] + [f"!! WARNING: {w}" for w in warnings] + [bar]

