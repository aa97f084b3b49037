"""export(): model -> converted file(s) -> self-check -> deployment bundle. The CLI calls this.

    from edge_effnet.export.api import ExportOptions, export
    result = export(ExportOptions(spec=get_variant("b0"), mode="int8", calib="photos/"))
    result.output, result.manifest["files"][0]["selfcheck"]

Order of work: cheap validation first (no TensorFlow), then images, then the model, then
conversion and self-check inside a temporary folder that becomes the bundle only at the end.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import time
from dataclasses import dataclass, field

from ..errors import UserError
from ..model.spec import ModelSpec
from . import bundle
from .sources import is_onnx
from .formats import (DEFAULT_FORMATS, DEFAULT_MODE, FORMATS, LAYOUTS, MODES, NORMALIZATIONS, ONNX2TF_MODES, Mode,
                      check_combination, get_mode)

NUM_CALIB = 100   # calibration images (int8, int16x8)
NUM_CHECK = 20    # self-check images (held out from the calibration images: export/images.py)
NUM_TUNE = 100    # held-out images --target-agreement measures on (neither calibration nor check images)


@dataclass
class ExportOptions:
    spec: ModelSpec | None = None        # a model named by variant/phi/width...
    model_path: str | None = None        # ...or a .keras file, or an .onnx file (-> tflite via onnx2tf)
    weights: str = "auto"                # auto | none | imagenet | PATH | torch:PATH (with spec): model/weights.py
    mode: str = DEFAULT_MODE             # a formats.MODES key
    io: str | None = None                # input/output dtype; None: the mode's default
    formats: tuple[str, ...] = DEFAULT_FORMATS
    calib: str | None = None             # folder or .npy; None: synthetic (accuracy unknown)
    num_calib: int = NUM_CALIB
    num_check: int = NUM_CHECK
    labels: str | None = None            # labels file, one class per line; ImageNet weights: ImageNet's
    weight_correction: str = "gptq"      # int8-weight TFLite modes, real calibration images: formats.WEIGHT_CORRECTIONS
    output: str | None = None            # bundle folder; None: <name>-<mode> in the cwd
    force: bool = False
    backend: str = "auto"                # runtime for the self-check
    layout: str = "nhwc"                 # ONNX files' input layout (nhwc | nchw)
    resolution: int | None = None        # .onnx model with dynamic height/width: fix them
    normalization: str | None = None     # .onnx model: the input it expects (formats.NORMALIZATIONS)
    accept_low_fidelity: bool = False    # keep a quantized file below its mode's fidelity floor (a warning)
    target_agreement: float | None = None  # mixed precision (export/mixed.py): top-1 agreement to reach, 0..1
    max_slowdown: float = 1.15           # ...within this latency of the full-int8 file (one core)


@dataclass
class ExportResult:
    output: str
    manifest: dict
    paths: list[str] = field(default_factory=list)


def model_name(options: ExportOptions) -> str:
    if options.spec is not None:
        return options.spec.name
    return os.path.splitext(os.path.basename(options.model_path))[0]  # as sources.py names it


def validate(options: ExportOptions) -> tuple[Mode, str, str]:
    """Cheap checks before any heavy import; returns (mode, io, output folder)."""
    from ..data import check_calibration_source
    from ..fsutil import check_output
    from ..limits import check_all
    from ..model.weights import check_keras_file, check_weights_arg

    if (options.spec is None) == (options.model_path is None):
        raise UserError("name one model: --variant/--phi/--width... or --model FILE.keras")
    onnx_model = is_onnx(options.model_path)
    if options.model_path is not None:
        if not options.model_path.endswith(".keras") and not onnx_model:
            raise UserError(f"--model takes a .keras or .onnx file (got {options.model_path})")
        if not os.path.isfile(options.model_path):
            raise UserError(f"model file not found: {options.model_path}")
        if not onnx_model:
            check_keras_file(options.model_path)
        if options.weights not in (None, "", "none", "auto"):
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
        if tuple(options.formats) != ("tflite",):
            raise UserError(f"--model {os.path.basename(options.model_path)} converts to --format tflite only "
                            f"(got {','.join(options.formats)})")
        if not mode.onnx2tf:
            raise UserError(f"{mode.flag} is not available for --model FILE.onnx "
                            f"(choose from {', '.join('--' + m for m in ONNX2TF_MODES)})")
    elif options.normalization is not None or options.resolution is not None:
        raise UserError(f"--{'normalization' if options.normalization else 'resolution'} applies to --model FILE.onnx")
    if options.normalization is not None and options.normalization not in NORMALIZATIONS:
        raise UserError(f"unknown normalization {options.normalization!r} (choose from {', '.join(NORMALIZATIONS)})")
    check_all(num_calib=options.num_calib, num_check=options.num_check)
    check_calibration_source(options.calib)
    if options.target_agreement is not None:
        _check_mixed(options, mode)
    if options.labels is not None and not os.path.isfile(options.labels):
        raise UserError(f"labels file not found: {options.labels}")
    output = options.output or bundle.default_output(model_name(options), mode.name)
    check_output(output, options.force, "bundle")
    return mode, io, output


def _check_mixed(options: ExportOptions, mode: Mode) -> None:
    from .mixed import MixedOptions

    if not mode.mixed_precision:
        modes = [m.flag for m in MODES.values() if m.mixed_precision]
        raise UserError(f"--target-agreement applies to {', '.join(modes)}; {mode.flag} "
                        + ("runs full int8 only (its report is written all the same)" if mode.name == "edgetpu"
                           else "has no mixed precision"))
    if "tflite" not in options.formats or is_onnx(options.model_path):
        raise UserError("--target-agreement applies to TFLite files converted from a Keras model")
    MixedOptions(options.target_agreement, options.max_slowdown).validate()


def export(options: ExportOptions, echo=None) -> ExportResult:
    """Export one model in one mode to every requested format; write the checked bundle.

    For each format: convert -> write -> self-check -> record; then the manifest. The source
    (sources.py: a Keras spec or file, an ONNX file) knows how to load, convert and describe itself.
    """
    import tempfile

    from ..fsutil import atomic_dir
    from ..model.weights import resolve_weights
    from .images import SYNTHETIC, export_images
    from .selfcheck import selfcheck
    from .sources import open_source

    echo = echo or (lambda line: print(line, file=sys.stderr))
    started = time.perf_counter()
    mode, io, output = validate(options)
    if options.model_path is not None and not is_onnx(options.model_path):
        echo(f"loading {options.model_path}")
    warnings, weights = [], None
    if options.spec is not None:
        resolved, weights = resolve_weights(options.weights, options.spec)
        options = dataclasses.replace(options, weights=resolved)
    source = open_source(options)
    calibration, check, calib_info, check_info, tuning = export_images(
        options.calib, source.resolution, options.num_calib, options.num_check, mode.calibration,
        NUM_TUNE if options.target_agreement is not None else 0)
    if weights is not None and not weights["trained"]:  # said once the input is known to be good
        warnings.append(bundle.RANDOM_WEIGHTS_WARNING if weights["requested"] != "auto" else
                        f"RANDOM weights: {weights['source']}; the model's predictions are meaningless")
        if weights["requested"] == "auto":
            echo(f"!! WARNING: {warnings[-1]}")
    elif weights is not None and weights["requested"] == "auto":
        echo(f"weights: {weights['source']}")
    if mode.calibration and calib_info["kind"] == SYNTHETIC:
        warnings.append(bundle.SYNTHETIC_WARNING)
    elif mode.calibration and options.calib is None:
        echo(f"calibration: {calib_info['count']} crops of {calib_info['source']} (pass --calib DIR for your data)")
    source.load(echo, mode)
    reference = source.reference(check)
    labels, labels_source = source.labels(options.labels)

    records, paths = [], []
    with atomic_dir(output, options.force) as tmp, tempfile.TemporaryDirectory(prefix="edge-effnet-") as scratch:
        for fmt_name in options.formats:
            fmt = FORMATS[fmt_name]
            file_io = fmt.io[0] if fmt.io else io
            filename = bundle.model_filename(source.name, mode.name, fmt.suffix)
            path = os.path.join(tmp, filename)
            t0 = time.perf_counter()
            inspected = source.write(path, fmt, mode, file_io, calibration if calibration is not None else check,
                                     not calib_info["synthetic"], labels, echo, tuning=tuning, scratch=scratch)
            if fmt.suffix == ".tflite":
                inspected["tflite_metadata"] = _embed_metadata(path, source.name, mode, file_io, labels)
            seconds = time.perf_counter() - t0
            figures = selfcheck(path, check, reference, _backend_for(options.backend, fmt.suffix), mode.min_cosine,
                                floor=mode.fidelity_floor if weights and weights["trained"] else None,
                                enforce_floor=not options.accept_low_fidelity,
                                onnx_qdq=fmt.suffix == ".onnx" and bool(mode.settings.get("onnx", {}).get("quantize")),
                                **source.check_options(fmt, mode))
            if "this_cpu_int8_kernels" in figures:
                warnings.append(figures["this_cpu_int8_kernels"]["warning"])
                echo(f"!! WARNING: {warnings[-1]}")
            if figures.get("fidelity_floor", {}).get("failed"):
                warnings.append(figures["fidelity_floor"]["failed"] + " (kept: --accept-low-fidelity)")
            record = _file_record(path, fmt.name, mode, file_io, seconds, inspected, figures)
            if mode.quant_report and fmt.suffix == ".tflite":
                record["quant_report"] = _quant_report(source, path, scratch, tmp, calibration, calib_info, echo,
                                                       record.get("mixed_precision"))
            _mode_report(mode, path, tmp, echo, record, warnings)
            records.append(record)
            paths.append(os.path.join(output, filename))
        manifest = bundle.build_manifest(
            **source.manifest(), resolution=source.resolution, num_classes=source.num_classes,
            mode={"name": mode.name, "description": mode.description, "io": io},
            calibration=calib_info if mode.calibration else None, files=records, labels=labels,
            labels_source=labels_source, warnings=warnings, check_images=check_info)
        manifest["weights"] = {"name": options.weights, **weights} if weights is not None else \
            {"name": "the model file's own", "requested": None, "trained": None,
             "source": f"{os.path.abspath(options.model_path)} (whether it was trained is not known)"}
        source.manifest_extra(manifest)
        manifest["export_seconds"] = round(time.perf_counter() - started, 2)
        bundle.write_bundle(tmp, manifest, labels)
    return ExportResult(output=output, manifest=manifest, paths=paths)


def _embed_metadata(path: str, name: str, mode: Mode, io: str, labels: list[str] | None) -> dict:
    """TFLite metadata in the file (export/metadata.py), so MediaPipe Tasks and Android's metadata
    readers take it as is: raw RGB pixels 0..255 (normalization is in the graph: mean 0, std 1; int8
    pixels are pixel - 128: mean 128), class scores with labels.txt as their axis labels."""
    from .. import __version__
    from .metadata import add_metadata

    mean = 128.0 if io == "int8" else 0.0
    with open(path, "rb") as f:
        data = add_metadata(f.read(), name=name, version=__version__, labels=labels, input_min=0, input_max=255,
                            mean=[mean], std=[1.0],
                            description=f"{name} image classifier ({mode.name}, {io} in/out), by edge_effnet "
                                        f"{__version__}; RGB pixels 0..255, normalization inside the graph")
    with open(path, "wb") as f:
        f.write(data)
    record = {"embedded": True, "normalization": {"mean": [mean], "std": [1.0]},
              "labels": "labels.txt (TENSOR_AXIS_LABELS)" if labels else None}
    if io not in ("uint8", "float32"):  # MediaPipe Tasks takes uint8 or float32 tensors only
        record["mediapipe_image_classifier"] = f"no: MediaPipe Tasks takes uint8 or float32 input, not {io}"
    return record


def _file_record(path: str, fmt: str, mode: Mode, io: str, seconds: float, inspected: dict, figures: dict) -> dict:
    """The manifest's record of one exported file: what it is, what it holds, how it checked."""
    record = {**bundle.file_record(path), "format": fmt, "mode": mode.name, "io": io,
              "input": figures.pop("input"), "output": figures.pop("output"),
              "export_seconds": round(seconds, 2), **inspected, "selfcheck": figures}
    record["verified_runtimes"] = [f"{figures['runtime']} {figures['runtime_version']}"]
    if len(record.get("float_activations", ())) > 20:
        record["float_activations"] = f"{len(record['float_activations'])} (float model)"
    return record


def _quant_report(source, path: str, scratch: str, folder: str, calibration, calib_info: dict, echo,
                  mixed: dict | None) -> dict:
    """export/quant_report.py on an exported file against the float file of the same graph, written
    to the bundle; the manifest keeps its summary."""
    from . import quant_report

    reference = source.float_reference(scratch)
    if reference is None:
        return {"skipped": "no float file of the same graph (onnx2tf conversions)"}
    echo("quantization report: per-layer error against the float file of the same graph")
    kind = {"photos": "calibration photo crops", "synthetic": "synthetic calibration images"}
    report = quant_report.report(path, reference, calibration,
                                 images_source=kind.get(calib_info["kind"], "calibration images"))
    report["reference"] = "float32 file of the same graph"
    report["reference_note"] = "the same graph and weights (before int8 weight correction) converted to float32"
    if mixed:
        report["mixed_precision"] = {k: mixed[k] for k in ("float_layers", "float_tensors", "result")}
    quant_report.write(folder, report)
    return quant_report.summary(report)


def _mode_report(mode: Mode, path: str, folder: str, echo, record: dict, warnings: list[str]) -> None:
    """The mode's extra step on an exported file (--edgetpu: the Edge TPU pre-flight) into its record."""
    if mode.report:
        module, function = mode.report.split(":")
        record["report"] = getattr(importlib.import_module(module), function)(path, folder, echo)
        if record["report"].get("warning"):
            warnings.append(record["report"]["warning"])


def _backend_for(backend: str, suffix: str) -> str:
    """The --backend for the self-check of a `suffix` file: the user's when it runs such files."""
    from ..runtime.backends import extension_of

    return backend if extension_of(backend) == suffix else "auto"


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
        if rec.get("quant_report", {}).get("file"):
            from .quant_report import format_table, load

            lines += format_table(load(result.output)).splitlines()
        if rec.get("mixed_precision"):
            lines.append(_mixed_line(rec["mixed_precision"]))
        if rec.get("report", {}).get("summary"):
            lines.append(rec["report"]["summary"])
    lines.append(f"bundle: {result.output}/ (manifest.json" + (", labels.txt" if result.manifest["labels"] else "")
                 + f"), {result.manifest['export_seconds']:.1f} s in all")
    return lines


def _mixed_line(m: dict) -> str:
    r = m["result"]
    kept = ", ".join(m["float_layers"]) or "nothing"
    return (f"mixed precision: kept {kept} in float ({len(m['float_tensors'])} ops); top-1 agreement "
            f"{m['full_int8']['top1_agreement']:.1%} -> {r['top1_agreement']:.1%} on {m['held_out_images']['count']} "
            f"held-out images (target {m['target_agreement']:.1%}), latency x{r['latency_ratio']:.2f} of full int8; "
            f"{m['stopped']}")


def warning_lines(result_or_warnings) -> list[str]:
    warnings = result_or_warnings.manifest["warnings"] if isinstance(result_or_warnings, ExportResult) \
        else result_or_warnings
    if not warnings:
        return []
    bar = "!" * 78
    return [bar] + [f"!! WARNING: {w}" for w in warnings] + [bar]

