"""The export formats and quantization modes, as data.

This table drives the CLI (one `--<mode>` flag per mode, `--io` validation), the exporter's
dispatch (a format's `module` exposes `convert()` and `inspect()`) and the README's table.
Standard library only: `edge-effnet export --help` reads it without TensorFlow.

To add a format: a Format row plus a `settings[format]` entry in each Mode it supports.
To add a mode: a Mode row (its flag appears on `edge-effnet export` by itself).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserError
from ..model.spec import PREPROCESSING


@dataclass(frozen=True)
class Format:
    name: str
    suffix: str          # file name: <model>_<mode><suffix>
    module: str          # import path of the converter: convert(model, mode, io, calibration) -> bytes
    description: str
    io: tuple[str, ...] | None = None   # fixed input/output dtypes of its files; None: the mode's --io
    options: tuple[str, ...] = ()       # extra keyword arguments convert() takes (see api.export)


@dataclass(frozen=True)
class Mode:
    name: str
    description: str
    io: tuple[str, ...]              # allowed input/output dtypes; the first is the default
    calibration: bool                # needs a representative data set
    settings: dict = field(default_factory=dict)   # format name -> converter settings (data)
    # Self-check floor: mean cosine similarity to the Keras float model below which the export
    # fails (a converter bug, not quantization noise). None: reported, never fatal.
    min_cosine: float | None = None
    # "module:function" run on each exported file: f(path, bundle_folder, echo) -> dict kept in the
    # file's manifest record as "report" (its "summary" is printed, its "warning" joins the warnings).
    report: str | None = None
    # export/fold.py: the stem reads raw pixels padded with the mean (a constant CONCATENATION)
    # instead of two per-channel normalization ops; same function, ~1 ms less for B0 on one core.
    fold_normalization: bool = True
    # `export --model FILE.onnx`: the file onnx2tf writes for this mode, by the file's input/output
    # dtype (its -oiqt names); None: the mode is not available for ONNX -> TFLite
    onnx2tf: dict | None = None
    # Self-check floor of a quantized file when the reference is informative (weights known to be
    # trained, and the reference's top-1 leads by more than the output's step on most images; a
    # random or data-initialized net is chaotic): top-1 agreement and the worst image's cosine. Below it the export fails (a broken
    # quantization, e.g. the 16-60-point PTQ drops reported for B0), unless --accept-low-fidelity.
    fidelity_floor: dict | None = None
    # export/quant_report.py on each exported .tflite file: per-layer error against the float file of
    # the same graph, written to the bundle (quant_report.json) and summarised in the manifest
    quant_report: bool = False
    # export --target-agreement (export/mixed.py) may keep the most harmful ops in float
    mixed_precision: bool = False

    @property
    def flag(self) -> str:
        return f"--{self.name}"


FORMATS: dict[str, Format] = {
    "tflite": Format("tflite", ".tflite", "edge_effnet.export.tflite",
                     "TensorFlow Lite flatbuffer: ai-edge-litert, tflite-runtime, Android, Raspberry Pi"),
    "onnx": Format("onnx", ".onnx", "edge_effnet.export.onnx",
                   "ONNX (opset 18, tf2onnx) for onnxruntime; int8 as QDQ (uint8 activations), float32 pixels "
                   "in and scores out",
                   io=("float32",), options=("layout", "metadata")),
}

# TFLite settings map onto tf.lite.TFLiteConverter attributes: optimizations, supported_ops
# (tf.lite.OpsSet names), supported_types (dtype names); "attributes" are set as they are.
# ONNX settings: quantize (static QDQ with onnxruntime's quantizer, export/onnx.py), per_channel weights,
# activations (uint8 | int8), calibration (onnxruntime CalibrationMethod name), float_ops (kept float:
# "stem" = the first conv and its preprocessing, "swish" = x*sigmoid(x) as com.microsoft QuickGelu,
# "output_softmax"), corrected_weights (quantize the GPTQ-rounded copy, as TFLite does: --weight-correction).
# max_abs_diff (any format): self-check limit on the probabilities' largest difference from Keras.
INT8_TFLITE = {"optimizations": ["DEFAULT"], "supported_ops": ["TFLITE_BUILTINS_INT8"]}  # no float fallback ops
QUANTIZED_FLOOR = {"top1_agreement": 0.6, "cosine_min": 0.5}  # catches broken files, not noise
# int8 ONNX, chosen by measurement in onnxruntime 1.31 on one x86 thread (benchmarks/results/onnx_int8.md):
# - uint8 activations: the QDQ fusions then give QLinearConv/QLinearSigmoid/...; with int8 activations
#   most convolutions stayed float between Q/DQ pairs (B0 2.9-3.5x slower than float, Lite0 ~1.0x).
# - swish in float (QuickGelu between DQ and Q) beat QLinearSigmoid + QLinearMul (B0 ~0.85 of float
#   against ~0.96); the stem (a 3-channel conv and the preprocessing) is faster in float too.
# - GPTQ-rounded weights: Lite0 ImageNet top-1 agreement with float 90.0% -> 98.0% on 300 held-out
#   photo crops (the TFLite int8 file: 97.0%; Lite1 97.7% vs 96.3%); MinMax calibration matched
#   Entropy and beat Percentile.
ONNX_INT8 = {"quantize": True, "per_channel": True, "activations": "uint8", "calibration": "MinMax",
             "float_ops": ("stem", "swish", "output_softmax"), "corrected_weights": True}

MODES: dict[str, Mode] = {
    "fp32": Mode("fp32", "float32 weights and activations (reference)", ("float32",), False,
                 {"tflite": {}, "onnx": {"quantize": False, "max_abs_diff": 1e-4}}, min_cosine=0.999,
                 onnx2tf={"float32": "float32"}),
    "fp16": Mode("fp16", "float16 weights, float32 compute (half the size, GPU delegates)", ("float32",), False,
                 {"tflite": {"optimizations": ["DEFAULT"], "supported_types": ["float16"]}}, min_cosine=0.99,
                 onnx2tf={"float32": "float16"}),
    "dynamic": Mode("dynamic", "int8 weights, float activations quantized on the fly (no calibration)",
                    ("float32",), False,
                    # per-channel dynamic FULLY_CONNECTED is op version 12, which tflite-runtime 2.14
                    # cannot load; per-tensor weights for the one classifier layer keep the file portable
                    {"tflite": {"optimizations": ["DEFAULT"], "attributes": {
                        "_experimental_disable_per_channel_quantization_for_dense_layers": True}}},
                    onnx2tf={"float32": "dynamic_range_quant"},
                    fidelity_floor=QUANTIZED_FLOOR),
    "int8": Mode("int8", "full integer: int8 weights and activations, uint8 pixels in, uint8 scores out",
                 ("uint8", "int8", "float32"), True,
                 {"tflite": INT8_TFLITE, "onnx": ONNX_INT8},
                 onnx2tf={"uint8": "full_integer_quant", "int8": "full_integer_quant", "float32": "integer_quant"},
                 fidelity_floor=QUANTIZED_FLOOR, quant_report=True, mixed_precision=True),
    "int16x8": Mode("int16x8", "int16 activations, int8 weights (closer to float than int8; slower)",
                    ("float32", "int16"), True,
                    {"tflite": {"optimizations": ["DEFAULT"],
                                "supported_ops": ["EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8"]}},
                    onnx2tf={"float32": "integer_quant_with_int16_act", "int16": "full_integer_quant_with_int16_act"},
                    fidelity_floor=QUANTIZED_FLOOR, quant_report=True),
    # The TF 2.21 converter's full-int8 ops (CONV_2D v3, DEPTHWISE_CONV_2D v3, FULLY_CONNECTED v4, ...) are
    # all versions Edge TPU compiler 16 parses; the pre-flight checks every file anyway.
    "edgetpu": Mode("edgetpu", "Coral Edge TPU: full integer as --int8 (uint8 in/out, batch 1) + the Edge TPU "
                               "pre-flight report; compiled too when edgetpu_compiler is on PATH",
                    ("uint8", "int8"), True, {"tflite": INT8_TFLITE},
                    report="edge_effnet.export.edgetpu:bundle_report",
                    # the compiler maps a CONCATENATION with a constant input only if it is all zeros:
                    # the folded stem would send every op to the CPU; SUB and MUL map
                    fold_normalization=False,
                    onnx2tf={"uint8": "full_integer_quant", "int8": "full_integer_quant"},
                    # report only: the Edge TPU runs full int8 and nothing else (no mixed precision)
                    fidelity_floor=QUANTIZED_FLOOR, quant_report=True),
}
ONNX2TF_MODES = tuple(m.name for m in MODES.values() if m.onnx2tf)
DEFAULT_MODE = "fp32"
DEFAULT_FORMATS = ("tflite",)
IO_CHOICES = ("uint8", "int8", "int16", "float32")
# int8 weight rounding before conversion (export/quantize.py), for modes with int8 weights and real images
WEIGHT_CORRECTIONS = {
    "gptq": "GPTQ rounding, then bias correction",
    "bias": "nearest rounding (as the converter rounds), then bias correction",
    "none": "the converter's own nearest rounding only",
}
LAYOUTS = ("nhwc", "nchw")  # ONNX input layout (TFLite files are NHWC)

# `export --model FILE.onnx`: what the ONNX model's input expects, as (mean, std) applied to
# pixels / 255; edge_effnet writes it into the graph so the TFLite file takes raw pixels. imagenet
# (torchvision, timm) and lite ((x - 127) / 128, EfficientNet-Lite) are the builder's own.
NORMALIZATIONS = {
    "raw": ((0.0, 0.0, 0.0), (1 / 255,) * 3),        # 0..255 pixels, normalization inside (ours, keras.applications)
    "unit": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),       # 0..1
    "symmetric": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),   # -1..1 (TF-slim, Inception)
    **{kind: (tuple(v / 255 for v in p["mean"]), tuple(v / 255 for v in p["std"])) for kind, p in PREPROCESSING.items()},
}


def get_mode(name: str) -> Mode:
    if name not in MODES:
        raise UserError(f"unknown mode {name!r} (choose from {', '.join(MODES)})")
    return MODES[name]


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise UserError(f"unknown format {name!r} (choose from {', '.join(FORMATS)})")
    return FORMATS[name]


def check_combination(mode: Mode, formats: tuple[str, ...], io: str | None) -> str:
    """Validate mode x formats x io cheaply; return the io dtype to use."""
    for name in formats:
        get_format(name)
        if name not in mode.settings:
            raise UserError(f"mode {mode.name} is not available for format {name} "
                            f"(it is for {', '.join(mode.settings)})")
    if io is None:
        return mode.io[0]
    fixed = [FORMATS[name] for name in formats if FORMATS[name].io is not None and io not in FORMATS[name].io]
    if fixed and len(fixed) == len(formats):
        raise UserError(f"--io {io} does not apply to {fixed[0].name} files (they take {fixed[0].io[0]})")
    if io not in mode.io:
        raise UserError(f"--io {io} does not apply to {mode.flag} (choose from {', '.join(mode.io)})")
    return io


def markdown_table() -> str:
    """The modes table for the README (kept in sync by a test)."""
    rows = ["| flag | formats | input/output (default first) | calibration | what |", "|---|---|---|---|---|"]
    for m in MODES.values():
        rows.append(f"| `{m.flag}` | {', '.join(m.settings)} | {', '.join(m.io)} | "
                    f"{'yes' if m.calibration else 'no'} | {m.description} |")
    return "\n".join(rows)
