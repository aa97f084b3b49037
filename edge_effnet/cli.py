"""The `edge-effnet` command line. Each command parses, validates and calls one library function.

Heavy imports (tensorflow, keras, onnx) live inside command bodies so `--help`
and `variants` stay instant and TensorFlow-free. Every number is checked against
limits.RANGES by its option type; every output by fsutil.check_output before any work.
"""
from __future__ import annotations

import json
import os
import signal

import click

from . import __version__
from .runtime.backends import BACKENDS
from .bench import BenchOptions
from .console import status
from .errors import Interrupted, UserError
from .limits import option_type as N
from .model.variants import FAMILIES
from .train.recipe import click_options as recipe_options, config_from  # shared by train and search
from .train.search import OBJECTIVES, SearchConfig

SEARCH_DEFAULTS = SearchConfig()

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ start-up chatter


class Group(click.Group):
    """Reports every error as one line on stderr with a non-zero exit code (console.one_line_errors):
    an unexpected one also writes its full traceback to a log file and names it."""

    def main(self, *args, **kwargs):
        from .console import one_line_errors

        one_line_errors(lambda: super(Group, self).main(*args, standalone_mode=False, **kwargs))

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:  # before click turns it into Abort (and prints an empty line)
            raise Interrupted(signal.SIGINT) from None


def options(*opts):
    """Apply click options in the order listed (the --help order)."""
    def apply(f):
        for opt in reversed(opts):
            f = opt(f)
        return f
    return apply


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edge-effnet")
def main():
    """EfficientNet from the paper to the device: build, export, benchmark."""


model_options = options(  # --variant | --phi [--alpha --beta --gamma] | --width --depth --resolution
    click.option("--variant", help="b0..b7, b8, l2, lite0..lite4, edgetpu-s/m/l (see `edge-effnet variants`)."),
    click.option("--phi", type=N("phi"), help="Compound coefficient: depth=alpha^phi, width=beta^phi, "
                                              "resolution=224*gamma^phi."),
    click.option("--alpha", type=N("alpha"), help="Depth base for --phi (default 1.2)."),
    click.option("--beta", type=N("beta"), help="Width base for --phi (default 1.1)."),
    click.option("--gamma", type=N("gamma"), help="Resolution base for --phi (default 1.15)."),
    click.option("--width", type=N("width"), help="Explicit width multiplier."),
    click.option("--depth", type=N("depth"), help="Explicit depth multiplier."),
    click.option("--resolution", type=N("resolution"), help="Input resolution (overrides the variant's)."),
    click.option("--family", type=click.Choice(FAMILIES), help="Family for --phi or --width/--depth (default efficientnet)."))


def spec_from(opts: dict):
    from .model.variants import resolve_spec

    return resolve_spec(**{k: opts.pop(k) for k in
                           ("variant", "phi", "alpha", "beta", "gamma", "width", "depth", "resolution", "family")})


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def variants(as_json):
    """List the known variants with their exact parameter and MAC counts."""
    from .model.variants import variant_rows, variants_table

    click.echo(json.dumps(variant_rows(), indent=1) if as_json else variants_table(variant_rows()))


def force_option(what: str):
    return click.option("--force", is_flag=True, help=f"Overwrite {what} if it exists (only a file or folder "
                                                       "edge-effnet writes; see README: errors and safety).")


@main.command()
@model_options
@click.option("--num-classes", type=N("num_classes"), help="Classifier size (default: the family's).")
@click.option("--no-top", is_flag=True, help="Leave out pooling + classifier (feature extractor).")
@click.option("--batch-size", type=N("batch_size"), help="Fix the batch dimension (exports use 1).")
@click.option("--weights", default="none", show_default=True,
              help="none | imagenet | PATH (.h5 / .weights.h5) | torch:PATH.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="OUT.keras")
@force_option("OUT")
def build(num_classes, no_top, batch_size, weights, output, force, **opts):
    """Build a model and save it as a .keras file; prints params, MACs, resolution."""
    from .fsutil import check_output
    from .model.scaling import count_macs, count_params
    from .model.weights import check_weights_arg

    spec = spec_from(opts)
    check_output(output, force, ".keras")
    check_weights_arg(weights, spec)
    from .model.keras_io import build_and_save

    build_and_save(spec, output, weights=weights, num_classes=num_classes, include_top=not no_top,
                   batch_size=batch_size)
    classes = spec.num_classes if num_classes is None else num_classes
    click.echo(f"wrote {output}: {spec.name} ({spec.family}), resolution {spec.resolution}, "
               f"params {count_params(spec, not no_top, classes):,}, "
               f"MACs {count_macs(spec, not no_top, classes) / 1e9:.3f}B, weights {weights}")


@main.command("edgetpu-check")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--strict", is_flag=True, help="Exit with code 1 unless every op maps to the Edge TPU.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write the report as JSON to OUT.")
@force_option("the --json file")
def edgetpu_check(file, strict, json_out, force):
    """Pre-flight a .tflite file for the Coral Edge TPU: every op, whether it maps and why not.

    Prints one line per op (version, device, MACs, reason), the first op that would fall back
    to the CPU and the share of multiply-adds before it. Runs edgetpu_compiler too when it is on PATH.
    """
    from .errors import CheckFailed
    from .export.edgetpu import check, format_report, fully_mapped

    report = check(file, json_out=json_out, force=force)
    click.echo(format_report(report))
    if json_out:
        click.echo(f"wrote {json_out}")
    if strict and not fully_mapped(report):
        raise CheckFailed(f"{file} does not map fully to the Edge TPU: {report['verdict']}")


@main.command()
@click.argument("models", nargs=-1, metavar="MODEL_OR_VARIANT...")
@click.option("--variant", "variant_names", multiple=True,
              help="A variant to build (batch 1) and time in TensorFlow (the paper's setting: batch 1, "
                   "one core); repeatable. Timed after the positional models.")
@click.option("--runs", type=N("runs"), default=BenchOptions.runs, show_default=True,
              help="Timed runs per model (exactly this many).")
@click.option("--warmup", type=N("warmup"), default=BenchOptions.warmup, show_default=True,
              help="Untimed runs after the first run (whose time is recorded apart).")
@click.option("--threads", type=N("threads"), default=BenchOptions.threads, show_default=True,
              help="Interpreter / TensorFlow intra-op threads.")
@click.option("--cpu", type=N("cpu"), help="Pin the process to this CPU (os.sched_setaffinity); e.g. 0.")
@click.option("--backend", type=click.Choice(BACKENDS), default=BenchOptions.backend, show_default=True,
              help="Runtime; auto = ai-edge-litert, else tflite-runtime, else tf.lite for .tflite files; "
                   "for a bundle folder, the first installed runtime that runs one of its files.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the full record (every run) as JSON.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Write one CSV row per model.")
@force_option("--json/--csv files")
@click.option("--compare", nargs=2, type=click.Path(dir_okay=False), metavar="A.json B.json",
              help="Compare two --json records (e.g. this machine and the device) instead of timing.")
def bench(models, variant_names, runs, warmup, threads, cpu, backend, json_path, csv_path, force, compare):
    """Time models at batch 1: .tflite / .onnx / .keras files or variant names (b1 = TensorFlow, 1 thread).

    Several models are timed interleaved (A B A B ...) and each is shown as a ratio to the first.
    """
    from .bench import resolve_targets
    from .bench.report import compare as compare_records, load_record

    if compare:
        if models or variant_names or json_path or csv_path:
            raise click.UsageError("--compare takes two JSON records and nothing to time")
        click.echo(compare_records(load_record(compare[0]), load_record(compare[1]), compare[0], compare[1]))
        return
    options = BenchOptions(runs=runs, warmup=warmup, threads=threads, cpu=cpu, backend=backend)
    options.validate()
    targets = resolve_targets(list(models) + list(variant_names), backend,
                              echo=lambda line: click.echo(f"bench: {line}", err=True))
    from .fsutil import check_output, distinct_outputs

    distinct_outputs(**{"--json": json_path, "--csv": csv_path})
    for path, kind in ((json_path, ".json"), (csv_path, ".csv")):
        if path:
            check_output(path, force, kind)
    from .bench.harness import benchmark_with_progress
    from .bench.report import format_table, write_csv
    from .fsutil import write_json

    record = benchmark_with_progress(targets, options)
    click.echo(format_table(record))
    for path, write in ((json_path, write_json), (csv_path, lambda p, r: write_csv(r, p))):
        if path:
            write(path, record)
            click.echo(f"wrote {path}")


@main.command()
@click.argument("model")
@click.argument("images", nargs=-1, required=True)
@click.option("--top", type=N("top"), default=5, show_default=True, help="How many classes to show.")
@click.option("--weights", default="imagenet", show_default=True,
              help="For a variant name: none | imagenet | PATH | torch:PATH (files carry their weights).")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="Runtime for MODEL's file (auto: the first installed that runs it).")
def predict(model, images, top, weights, backend):
    """Classify IMAGES (files, or folders searched recursively) with MODEL (.tflite, .onnx, .keras file,
    or a variant name).

    Uses the export's preprocessing (square center crop, bicubic resize, raw RGB pixels).
    Unreadable images are reported and skipped.
    """
    from .runtime.classify import PredictOptions, predict as run_predict, resolve_model

    resolve_model(model, weights)
    for result in run_predict(model, list(images), PredictOptions(top=top, weights=weights, backend=backend)):
        click.echo(result.image)
        for rank, (index, name, score) in enumerate(result.top, 1):
            click.echo(f"  {rank}. {score:6.3f}  {index:>4}  {name}")


@main.command(name="eval")
@click.argument("model")
@click.option("--data", required=True, type=click.Path(exists=True),
              help="A folder with one subfolder per class, a CSV of path,label rows, or (with --reference) "
                   "any folder of images.")
@click.option("--reference", help="A second model (file or variant) to compare with on the same images.")
@click.option("--weights", default="imagenet", show_default=True, help="For variant names: as in `predict`.")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="Runtime for MODEL's file (as in `predict`).")
@click.option("--limit", type=N("limit"), help="Only the first N images.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write the result as JSON here.")
@force_option("the --json file")
def eval_(model, data, reference, weights, backend, limit, json_out, force):
    """Top-1/top-5 accuracy of MODEL on labeled images, and its agreement with --reference."""
    from .runtime.classify import resolve_model
    from .evaluate.accuracy import EvalOptions, evaluate, format_result, read_dataset
    from .fsutil import check_output, write_json

    for m in [model] + ([reference] if reference else []):
        resolve_model(m, weights)
    if json_out:
        check_output(json_out, force, ".json")
    read_dataset(data)
    result = evaluate(model, data, reference, EvalOptions(weights=weights, backend=backend, limit=limit))
    click.echo(format_result(result))
    if json_out:
        write_json(json_out, result)
        click.echo(f"wrote {json_out}")


def export_options(f):
    """Every `edge-effnet export` option but the model ones; mode flags come from the formats table."""
    from .export.api import NUM_CALIB, ExportOptions
    from .export.formats import DEFAULT_FORMATS, FORMATS, IO_CHOICES, LAYOUTS, MODES, NORMALIZATIONS, WEIGHT_CORRECTIONS

    return options(
        click.option("--model", "model_path", type=click.Path(dir_okay=False),
                     help="Export this .keras file instead of building --variant/--phi/--width; "
                          "or convert this .onnx file to --format tflite (onnx2tf, offline)."),
        click.option("--weights", default="auto", show_default=True,
                     help="auto (ImageNet when it can be had: keras' cache, an installed package, or "
                          "online; else random, said loudly) | none | imagenet | PATH | torch:PATH."),
        *[click.option(m.flag, f"mode_{m.name}", is_flag=True, help=m.description) for m in MODES.values()],
        click.option("--format", "formats", default=",".join(DEFAULT_FORMATS), show_default=True,
                     help=f"Comma-separated formats, all in one bundle: {', '.join(FORMATS)}."),
        click.option("--layout", type=click.Choice(LAYOUTS), default=ExportOptions.layout, show_default=True,
                     help="ONNX input layout; nchw puts a transpose at the input (TFLite is NHWC)."),
        click.option("--normalization", type=click.Choice(tuple(NORMALIZATIONS)),
                     help="--model FILE.onnx: the input it expects (default: from the file's metadata, "
                          "else imagenet); written into the TFLite graph, which takes raw pixels."),
        click.option("--io", type=click.Choice(IO_CHOICES),
                     help="Input/output dtype (int8 default: uint8; int16x8: float32 or int16)."),
        click.option("--calib", metavar="DIR_OR_NPY",
                     help="Calibration images: a folder (searched recursively), an (N,H,W,3) .npy, or "
                          "'synthetic'. Without it: crops of scikit-image's photos when installed, else synthetic."),
        click.option("--num-calib", type=N("num_calib"), default=NUM_CALIB, show_default=True,
                     help="How many calibration images to use."),
        click.option("--accept-low-fidelity", is_flag=True,
                     help="Keep a quantized file that falls below its mode's self-check floor (then a warning)."),
        click.option("--weight-correction", type=click.Choice(tuple(WEIGHT_CORRECTIONS)), default="gptq", show_default=True,
                     help="int8 weights (TFLite, real calibration images): GPTQ rounding + bias correction, "
                          "bias correction only, or none (see edge_effnet.quantize)."),
        click.option("--target-agreement", type=N("target_agreement"), help="--int8 mixed precision: keep the ops that hurt the "
                     "output most in float until top-1 agreement with the float file reaches this (e.g. 0.99)."),
        click.option("--max-slowdown", type=N("max_slowdown"), default=ExportOptions.max_slowdown, show_default=True,
                     help="...within this latency of the full-int8 file (one core; with --target-agreement)."),
        click.option("--labels", type=click.Path(dir_okay=False),
                     help="Class names, one per line -> labels.txt (ImageNet models get ImageNet's)."),
        click.option("-o", "--output", metavar="OUTDIR", help="Bundle folder (default: <model>-<mode>)."),
        force_option("OUTDIR (an earlier bundle: a folder holding manifest.json)"))(f)


def export_options_from(opts: dict):
    """CLI keyword arguments -> ExportOptions (raises UsageError on conflicting flags)."""
    from .export.api import ExportOptions
    from .export.formats import DEFAULT_MODE, MODES

    chosen = [name for name in MODES if opts.pop(f"mode_{name}")]
    if len(chosen) > 1:
        raise click.UsageError(f"{' and '.join('--' + c for c in chosen)} conflict: pick one mode")
    model_path = opts.pop("model_path")
    naming = [k for k in ("variant", "phi", "width", "depth") if opts.get(k) is not None]
    if model_path and naming:
        raise click.UsageError(f"--model and --{naming[0]} were given together; name the model one way")
    formats = tuple(f.strip() for f in opts.pop("formats").split(",") if f.strip())
    if not formats:
        raise click.UsageError("--format names no format")
    onnx_model = bool(model_path) and model_path.lower().endswith(".onnx")
    if not model_path:
        return ExportOptions(spec=spec_from(opts), mode=chosen[0] if chosen else DEFAULT_MODE, formats=formats, **opts)
    extra = [k for k, v in opts.items() if v is not None and k in
             ("alpha", "beta", "gamma", "resolution", "family") and not (onnx_model and k == "resolution")]
    if extra:
        raise click.UsageError(f"--{extra[0]} does not apply to --model")
    resolution = opts.get("resolution")
    for k in ("variant", "phi", "alpha", "beta", "gamma", "width", "depth", "resolution", "family"):
        opts.pop(k)
    return ExportOptions(spec=None, model_path=model_path, mode=chosen[0] if chosen else DEFAULT_MODE,
                         formats=formats, resolution=resolution, **opts)


@main.command()
@model_options
@export_options
def export(**opts):
    """Export a model to TFLite and/or ONNX as a checked deployment bundle (model files, manifest.json,
    labels.txt); or convert an ONNX model (--model FILE.onnx) to TFLite."""
    from .export.api import export as run_export, summary, validate, warning_lines

    options = export_options_from(opts)
    validate(options)
    result = run_export(options, echo=lambda line: (click.echo(line, err=True) if line.startswith("!!")  # warnings
                                                    else status(line)))  # progress: on a terminal only
    for line in summary(result):
        click.echo(line)
    for line in warning_lines(result):
        click.echo(line, err=True)


@main.command("quant-report")
@click.argument("path", metavar="FILE_OR_BUNDLE")
@click.option("--reference", type=click.Path(dir_okay=False), help="A .tflite FILE: the float file of its graph.")
@click.option("--calib", metavar="DIR_OR_NPY", help="A .tflite FILE: calibration images to measure on.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write the report as JSON here.")
@force_option("the --json file")
def quant_report(path, reference, calib, json_out, force):
    """Per-layer quantization error of an int8 / int16x8 / Edge TPU export: a bundle's saved report,
    or computed for a quantized .tflite FILE with --reference and --calib."""
    from .export.quant_report import command

    click.echo(command(path, reference, calib, json_out, force))


@main.command()
@model_options
@click.option("--data", required=True, type=click.Path(file_okay=False), help="Folder with one subfolder per class.")
@recipe_options
@click.option("--weights", default="none", show_default=True,
              help="Start from: none | imagenet | PATH (.h5 / .weights.h5) | torch:PATH | MODEL.keras.")
@click.option("--freeze-backbone", is_flag=True, help="Train only the classifier (transfer learning).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="OUT.keras")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its checkpoint (OUT.ckpt).")
@force_option("OUT and OUT.history.json, and discard an old checkpoint (OUT.ckpt),")
def train(data, weights, freeze_backbone, output, resume, force, **opts):
    """Train a model on a folder of images with the paper's recipe; writes OUT.keras + OUT.history.json."""
    from .data import class_folders
    from .model.weights import check_weights_arg
    from .train.recipe import check_outputs

    spec = spec_from(opts)
    config = config_from(opts, freeze_backbone=freeze_backbone)
    if resume and force:
        raise click.UsageError("--resume and --force contradict each other")
    check_outputs(output, resume, force)
    if freeze_backbone and weights == "none":
        raise UserError("--freeze-backbone needs --weights (a frozen random backbone learns nothing)")
    check_weights_arg(weights, spec, keras_file=True)
    classes = class_folders(data)
    status(f"training {spec.name} at {spec.resolution} px on {len(classes)} classes "
           f"({sum(len(p) for _, p in classes)} images) for {config.epochs} epoch(s)")
    from .train.train import history_path_for, train as run_training

    result = run_training(spec, data, output, config, weights=weights, resume=resume, force=force)
    click.echo(f"wrote {output} and {history_path_for(output)}: held-out accuracy {result.val_accuracy:.4f} "
               f"on {result.num_val} images ({result.num_train} trained), {result.seconds:.0f} s")


@main.command()
@click.option("--data", required=True, type=click.Path(file_okay=False), help="Folder with one subfolder per class.")
@click.option("--grid-step", type=N("grid_step"), default=SEARCH_DEFAULTS.grid_step, show_default=True,
              help="Grid spacing of alpha, beta and gamma (each >= 1).")
@click.option("--tolerance", type=N("tolerance"), default=SEARCH_DEFAULTS.tolerance, show_default=True,
              help="Keep candidates with |alpha*beta^2*gamma^2 - 2| <= this.")
@click.option("--objective", type=click.Choice(OBJECTIVES), default=SEARCH_DEFAULTS.objective,
              show_default=True, help="Cost in ACC*(cost/T)^-0.07: analytic MACs, or single-core TFLite latency.")
@click.option("--target-macs", type=N("target_macs"), help="T and a hard cap on MACs (default T: 400M x (base res / 224)^2).")
@click.option("--target-ms", type=N("target_ms"), help="With --objective latency: T and a hard cap in ms.")
@click.option("--base-resolution", type=N("base_resolution"), default=SEARCH_DEFAULTS.base_resolution,
              show_default=True, help="Resolution at phi = 0; a candidate's is gamma x this.")
@click.option("--family", type=click.Choice(FAMILIES), default=SEARCH_DEFAULTS.family,
              show_default=True, help="Base network to scale.")
@click.option("--max-candidates", type=N("max_candidates"), help="Stop after this many (in grid order).")
@recipe_options
@click.option("-o", "--output", required=True, type=click.Path(), help="RUN_DIR: results, checkpoints of the trials.")
@click.option("--resume", is_flag=True, help="Continue a stopped search in RUN_DIR; finished candidates are kept.")
def search(data, grid_step, tolerance, objective, target_macs, target_ms, base_resolution, family, max_candidates,
           output, resume, **opts):
    """Grid-search alpha, beta, gamma at phi = 1 (paper step 1) and rank by ACC*(cost/T)^-0.07."""
    from .data import class_folders
    from .train.search import SearchConfig, check_run_dir, plan_candidates

    train_config = config_from(opts)
    config = SearchConfig(grid_step=grid_step, tolerance=tolerance, objective=objective, target_macs=target_macs,
                          target_ms=target_ms, base_resolution=base_resolution, family=family,
                          max_candidates=max_candidates)
    num_classes = len(class_folders(data))
    todo, over = plan_candidates(config, num_classes)
    check_run_dir(output, resume)
    status(f"searching {len(todo)} candidate(s) at phi = 1 on {num_classes} classes"
           f"{f' ({len(over)} over the MAC target left out)' if over else ''}; results in {output}")
    from .train.tuning import run_search

    report = run_search(data, output, config, train_config, resume=resume)
    if report is None:
        click.echo("worker finished: the chief writes the report", err=True)
        return
    with open(os.path.join(output, "results.md"), encoding="utf-8") as f:
        click.echo(f.read())
