"""The `edge-effnet` command line. Each command parses, validates and calls one library function.

Heavy imports (tensorflow, keras, onnx) live inside command bodies so `--help`
and `variants` stay instant and TensorFlow-free.
"""
from __future__ import annotations

import json
import os
import sys

import click

from . import __version__
from .backends import BACKENDS as BENCH_BACKENDS
from .bench import BenchOptions
from .errors import UserError
from .search import SearchConfig

SEARCH_DEFAULTS = SearchConfig()

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ start-up chatter


class Group(click.Group):
    """Reports every user error as one line on stderr with a non-zero exit code."""

    def main(self, *args, **kwargs):
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("edge-effnet: aborted", err=True)
            sys.exit(130)
        except click.ClickException as exc:
            click.echo(f"edge-effnet: error: {exc.format_message()}", err=True)
            sys.exit(2 if isinstance(exc, click.UsageError) else exc.exit_code)
        except UserError as exc:
            click.echo(f"edge-effnet: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("edge-effnet: interrupted", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edge-effnet")
def main():
    """EfficientNet from the paper to the device: build, export, benchmark."""


def model_options(f):
    """--variant | --phi [--alpha --beta --gamma] | --width --depth --resolution."""
    opts = [
        click.option("--variant", help="b0..b7, b8, l2, lite0..lite4, edgetpu-s/m/l (see `edge-effnet variants`)."),
        click.option("--phi", type=float, help="Compound coefficient: depth=alpha^phi, width=beta^phi, "
                                              "resolution=224*gamma^phi."),
        click.option("--alpha", type=float, help="Depth base for --phi (default 1.2)."),
        click.option("--beta", type=float, help="Width base for --phi (default 1.1)."),
        click.option("--gamma", type=float, help="Resolution base for --phi (default 1.15)."),
        click.option("--width", type=float, help="Explicit width multiplier."),
        click.option("--depth", type=float, help="Explicit depth multiplier."),
        click.option("--resolution", type=int, help="Input resolution (overrides the variant's)."),
        click.option("--family", type=click.Choice(["efficientnet", "lite", "edgetpu"]),
                     help="Family for --phi or --width/--depth (default efficientnet)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def spec_from(opts: dict):
    from .variants import resolve_spec

    return resolve_spec(**{k: opts.pop(k) for k in
                           ("variant", "phi", "alpha", "beta", "gamma", "width", "depth", "resolution", "family")})


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def variants(as_json):
    """List the known variants with their exact parameter and MAC counts."""
    from .scaling import count_macs, count_params
    from .variants import all_variants

    rows = [dict(name=s.name, family=s.family, width=s.width, depth=s.depth, resolution=s.resolution,
                 dropout=s.dropout, num_classes=s.num_classes, params=count_params(s), macs=count_macs(s))
            for s in all_variants()]
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    click.echo(f"{'name':<10} {'family':<12} {'width':>5} {'depth':>5} {'res':>4} {'dropout':>7} "
               f"{'classes':>7} {'params':>12} {'MACs':>8}")
    for r in rows:
        click.echo(f"{r['name']:<10} {r['family']:<12} {r['width']:>5g} {r['depth']:>5g} {r['resolution']:>4} "
                   f"{r['dropout']:>7g} {r['num_classes']:>7} {r['params']:>12,} {r['macs'] / 1e9:>7.3f}B")


@main.command()
@model_options
@click.option("--num-classes", type=click.IntRange(min=1), help="Classifier size (default: the family's).")
@click.option("--no-top", is_flag=True, help="Leave out pooling + classifier (feature extractor).")
@click.option("--batch-size", type=click.IntRange(min=1), help="Fix the batch dimension (exports use 1).")
@click.option("--weights", default="none", show_default=True,
              help="none | imagenet | PATH (.h5 / .weights.h5) | torch:PATH.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="OUT.keras")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
def build(num_classes, no_top, batch_size, weights, output, force, **opts):
    """Build a model and save it as a .keras file; prints params, MACs, resolution."""
    from .fsutil import check_output
    from .scaling import count_macs, count_params
    from .weights import check_weights_arg

    spec = spec_from(opts)
    if not output.endswith(".keras"):
        raise UserError(f"output must end in .keras (got {output})")
    check_output(output, force)
    check_weights_arg(weights, spec)
    from .models import build_and_save

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
@click.option("--force", is_flag=True, help="Overwrite the --json file if it exists.")
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
@click.option("--runs", type=int, default=BenchOptions.runs, show_default=True,
              help="Timed runs per model (exactly this many).")
@click.option("--warmup", type=int, default=BenchOptions.warmup, show_default=True,
              help="Untimed runs after the first run (whose time is recorded apart).")
@click.option("--threads", type=int, default=BenchOptions.threads, show_default=True,
              help="Interpreter / TensorFlow intra-op threads.")
@click.option("--cpu", type=int, help="Pin the process to this CPU (os.sched_setaffinity); e.g. 0.")
@click.option("--backend", type=click.Choice(BENCH_BACKENDS), default=BenchOptions.backend, show_default=True,
              help="Runtime; auto = ai-edge-litert, else tflite-runtime, else tf.lite for .tflite files.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the full record (every run) as JSON.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Write one CSV row per model.")
@click.option("--force", is_flag=True, help="Overwrite --json/--csv files that exist.")
@click.option("--compare", nargs=2, type=click.Path(dir_okay=False), metavar="A.json B.json",
              help="Compare two --json records (e.g. this machine and the device) instead of timing.")
def bench(models, variant_names, runs, warmup, threads, cpu, backend, json_path, csv_path, force, compare):
    """Time models at batch 1: .tflite / .onnx / .keras files or variant names (b1 = TensorFlow, 1 thread).

    Several models are timed interleaved (A B A B ...) and each is shown as a ratio to the first.
    """
    from .bench import compare as compare_records, load_record, resolve_targets

    if compare:
        if models or variant_names or json_path or csv_path:
            raise click.UsageError("--compare takes two JSON records and nothing to time")
        click.echo(compare_records(load_record(compare[0]), load_record(compare[1]), compare[0], compare[1]))
        return
    options = BenchOptions(runs=runs, warmup=warmup, threads=threads, cpu=cpu, backend=backend)
    options.validate()
    targets = resolve_targets(list(models) + list(variant_names), backend)
    from .fsutil import check_output

    for path in (json_path, csv_path):
        if path:
            check_output(path, force)
    import contextlib

    from .bench import benchmark, format_table, write_csv, write_json
    from .data import progress

    with contextlib.ExitStack() as stack:
        bars = []

        def on_round(done, total):  # the bar starts once every model has loaded, so errors stay one line
            if not bars:
                label = f"timing {len(targets)} model(s): {warmup} warm-up + {runs} timed rounds"
                bars.append(stack.enter_context(progress(None, label, total=total)))
            if bars[0] is not None:  # None: stderr is not a terminal
                bars[0].update(done - bars[0].pos)

        record = benchmark(targets, options, on_round=on_round)
    click.echo(format_table(record))
    if json_path:
        write_json(record, json_path)
        click.echo(f"wrote {json_path}")
    if csv_path:
        write_csv(record, csv_path)
        click.echo(f"wrote {csv_path}")


@main.command()
@click.argument("model")
@click.argument("images", nargs=-1, required=True)
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True, help="How many classes to show.")
@click.option("--weights", default="imagenet", show_default=True,
              help="For a variant name: none | imagenet | PATH | torch:PATH (files carry their weights).")
@click.option("--backend", default="auto", show_default=True, help="auto | litert | tflite-runtime | tf-lite | "
                                                                   "onnxruntime | keras")
def predict(model, images, top, weights, backend):
    """Classify IMAGES with MODEL (.tflite, .onnx, .keras file, or a variant name).

    Uses the export's preprocessing (square center crop, bicubic resize, raw RGB pixels).
    Unreadable images are reported and skipped.
    """
    from .classify import PredictOptions, predict as run_predict, resolve_model

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
@click.option("--backend", default="auto", show_default=True, help="Runtime for MODEL's file (as in `predict`).")
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N images.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write the result as JSON here.")
@click.option("--force", is_flag=True, help="Overwrite the --json file if it exists.")
def eval_(model, data, reference, weights, backend, limit, json_out, force):
    """Top-1/top-5 accuracy of MODEL on labeled images, and its agreement with --reference."""
    from .classify import resolve_model
    from .evaluate import EvalOptions, evaluate, format_result, read_dataset
    from .fsutil import atomic_file, check_output

    for m in [model] + ([reference] if reference else []):
        resolve_model(m, weights)
    if json_out:
        check_output(json_out, force)
    read_dataset(data)
    result = evaluate(model, data, reference, EvalOptions(weights=weights, backend=backend, limit=limit))
    click.echo(format_result(result))
    if json_out:
        with atomic_file(json_out) as tmp, open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        click.echo(f"wrote {json_out}")


def export_options(f):
    """Every `edge-effnet export` option but the model ones; mode flags come from the formats table."""
    from .export.api import NUM_CALIB, ExportOptions
    from .export.formats import DEFAULT_FORMATS, FORMATS, IO_CHOICES, LAYOUTS, MODES, NORMALIZATIONS
    from .quantize import CORRECTIONS

    opts = [click.option("--model", "model_path", type=click.Path(dir_okay=False),
                         help="Export this .keras file instead of building --variant/--phi/--width; "
                              "or convert this .onnx file to --format tflite (onnx2tf, offline)."),
            click.option("--weights", default="none", show_default=True,
                         help="none | imagenet | PATH (.h5 / .weights.h5) | torch:PATH.")]
    opts += [click.option(m.flag, f"mode_{m.name}", is_flag=True, help=m.description) for m in MODES.values()]
    opts += [
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
                     help="Calibration images: a folder (searched recursively) or an (N,H,W,3) .npy. "
                          "Without it: synthetic images, accuracy unknown."),
        click.option("--num-calib", type=click.IntRange(min=1), default=NUM_CALIB, show_default=True,
                     help="How many calibration images to use."),
        click.option("--weight-correction", type=click.Choice(tuple(CORRECTIONS)), default="gptq", show_default=True,
                     help="int8 weights (TFLite, real calibration images): GPTQ rounding + bias correction, "
                          "bias correction only, or none (see edge_effnet.quantize)."),
        click.option("--labels", type=click.Path(dir_okay=False),
                     help="Class names, one per line -> labels.txt (ImageNet models get ImageNet's)."),
        click.option("-o", "--output", metavar="OUTDIR", help="Bundle folder (default: <model>-<mode>)."),
        click.option("--force", is_flag=True, help="Replace OUTDIR if it exists."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


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
    if model_path:
        extra = [k for k, v in opts.items() if v is not None and k in
                 ("alpha", "beta", "gamma", "resolution", "family") and not (onnx_model and k == "resolution")]
        if extra:
            raise click.UsageError(f"--{extra[0]} does not apply to --model")
        spec = None
        resolution = opts.get("resolution")
        for k in ("variant", "phi", "alpha", "beta", "gamma", "width", "depth", "resolution", "family"):
            opts.pop(k)
        opts["resolution"] = resolution
    else:
        spec = spec_from(opts)
    return ExportOptions(spec=spec, model_path=model_path, mode=chosen[0] if chosen else DEFAULT_MODE,
                         formats=formats, **opts)


@main.command()
@model_options
@export_options
def export(**opts):
    """Export a model to TFLite and/or ONNX as a checked deployment bundle (model files, manifest.json,
    labels.txt); or convert an ONNX model (--model FILE.onnx) to TFLite."""
    from .export.api import export as run_export, summary, validate, warning_lines

    options = export_options_from(opts)
    validate(options)
    result = run_export(options, echo=lambda line: click.echo(line, err=True))
    for line in summary(result):
        click.echo(line)
    for line in warning_lines(result):
        click.echo(line, err=True)


def recipe_options(f):
    """Training options shared by `train` and `search`; defaults come from recipe.TrainConfig."""
    from .recipe import STRATEGIES, TrainConfig

    d = TrainConfig()
    opts = [
        click.option("--epochs", type=click.IntRange(min=1), default=d.epochs, show_default=True),
        click.option("--batch-size", type=click.IntRange(min=1), default=d.batch_size, show_default=True,
                     help="Global batch (split over the replicas of --strategy)."),
        click.option("--learning-rate", type=float, help="Peak learning rate (default 0.016 x batch / 256)."),
        click.option("--validation-split", type=float, default=d.validation_split, show_default=True,
                     help="Fraction of every class held out for evaluation."),
        click.option("--no-augment", is_flag=True, help="Train without the shift/zoom/rotation augmentation."),
        click.option("--seed", type=int, default=d.seed, show_default=True),
        click.option("--strategy", type=click.Choice(STRATEGIES), default=d.strategy, show_default=True,
                     help="tf.distribute strategy: mirrored = all GPUs of this host, multi-worker = the hosts "
                          "in TF_CONFIG."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def config_from(opts: dict, **extra):
    from .recipe import TrainConfig

    config = TrainConfig(epochs=opts.pop("epochs"), batch_size=opts.pop("batch_size"),
                         learning_rate=opts.pop("learning_rate"), validation_split=opts.pop("validation_split"),
                         augment=not opts.pop("no_augment"), seed=opts.pop("seed"), strategy=opts.pop("strategy"),
                         **extra)
    config.check()
    return config


@main.command()
@model_options
@click.option("--data", required=True, type=click.Path(file_okay=False), help="Folder with one subfolder per class.")
@recipe_options
@click.option("--weights", default="none", show_default=True,
              help="Start from: none | imagenet | PATH (.h5 / .weights.h5) | torch:PATH | MODEL.keras.")
@click.option("--freeze-backbone", is_flag=True, help="Train only the classifier (transfer learning).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="OUT.keras")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its checkpoint (OUT.ckpt).")
@click.option("--force", is_flag=True, help="Overwrite OUT and discard an old checkpoint.")
def train(data, weights, freeze_backbone, output, resume, force, **opts):
    """Train a model on a folder of images with the paper's recipe; writes OUT.keras + OUT.history.json."""
    from .data import class_folders
    from .fsutil import check_output
    from .weights import check_weights_arg

    spec = spec_from(opts)
    config = config_from(opts, freeze_backbone=freeze_backbone)
    if not output.endswith(".keras"):
        raise UserError(f"output must end in .keras (got {output})")
    check_output(output, force)
    if resume and force:
        raise click.UsageError("--resume and --force contradict each other")
    if freeze_backbone and weights == "none":
        raise UserError("--freeze-backbone needs --weights (a frozen random backbone learns nothing)")
    if not weights.endswith(".keras"):
        check_weights_arg(weights, spec)
    elif not os.path.isfile(weights):
        raise UserError(f"weights file not found: {weights}")
    classes = class_folders(data)
    click.echo(f"training {spec.name} at {spec.resolution} px on {len(classes)} classes "
               f"({sum(len(p) for _, p in classes)} images) for {config.epochs} epoch(s)", err=True)
    from .train import history_path_for, train as run_training

    result = run_training(spec, data, output, config, weights=weights, resume=resume, force=force)
    click.echo(f"wrote {output} and {history_path_for(output)}: held-out accuracy {result.val_accuracy:.4f} "
               f"on {result.num_val} images ({result.num_train} trained), {result.seconds:.0f} s")


@main.command()
@click.option("--data", required=True, type=click.Path(file_okay=False), help="Folder with one subfolder per class.")
@click.option("--grid-step", type=float, default=SEARCH_DEFAULTS.grid_step, show_default=True,
              help="Grid spacing of alpha, beta and gamma (each >= 1).")
@click.option("--tolerance", type=float, default=SEARCH_DEFAULTS.tolerance, show_default=True,
              help="Keep candidates with |alpha*beta^2*gamma^2 - 2| <= this.")
@click.option("--objective", type=click.Choice(["macs", "latency"]), default=SEARCH_DEFAULTS.objective,
              show_default=True, help="Cost in ACC*(cost/T)^-0.07: analytic MACs, or single-core TFLite latency.")
@click.option("--target-macs", type=float, help="T and a hard cap on MACs (default T: 400M x (base res / 224)^2).")
@click.option("--target-ms", type=float, help="With --objective latency: T and a hard cap in ms.")
@click.option("--base-resolution", type=click.IntRange(min=32), default=SEARCH_DEFAULTS.base_resolution,
              show_default=True, help="Resolution at phi = 0; a candidate's is gamma x this.")
@click.option("--family", type=click.Choice(["efficientnet", "lite", "edgetpu"]), default=SEARCH_DEFAULTS.family,
              show_default=True, help="Base network to scale.")
@click.option("--max-candidates", type=click.IntRange(min=1), help="Stop after this many (in grid order).")
@recipe_options
@click.option("-o", "--output", required=True, type=click.Path(), help="RUN_DIR: results, checkpoints of the trials.")
@click.option("--resume", is_flag=True, help="Continue a stopped search in RUN_DIR; finished candidates are kept.")
def search(data, grid_step, tolerance, objective, target_macs, target_ms, base_resolution, family, max_candidates,
           output, resume, **opts):
    """Grid-search alpha, beta, gamma at phi = 1 (paper step 1) and rank by ACC*(cost/T)^-0.07."""
    from .data import class_folders
    from .search import SearchConfig, plan_candidates

    train_config = config_from(opts)
    config = SearchConfig(grid_step=grid_step, tolerance=tolerance, objective=objective, target_macs=target_macs,
                          target_ms=target_ms, base_resolution=base_resolution, family=family,
                          max_candidates=max_candidates)
    num_classes = len(class_folders(data))
    todo, over = plan_candidates(config, num_classes)
    click.echo(f"searching {len(todo)} candidate(s) at phi = 1 on {num_classes} classes"
               f"{f' ({len(over)} over the MAC target left out)' if over else ''}; results in {output}", err=True)
    from .search import run_search

    report = run_search(data, output, config, train_config, resume=resume)
    if report is None:
        click.echo("worker finished: the chief writes the report", err=True)
        return
    click.echo(open(os.path.join(output, "results.md")).read())
