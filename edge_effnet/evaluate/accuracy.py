"""Accuracy on labeled images and agreement between two models (e.g. int8 against float): `eval`.

Labeled data: a folder with one subfolder per class (the subfolder is the class: an index,
a class name from the model's labels, or an ImageNet synset id such as n02123159), or a CSV
file of `path,label` rows (paths relative to the CSV). Images without labels (a flat folder)
can still be used to compare a model with a reference.

Agreement of a model with a reference, on the same images: top-1 agreement, top-5 overlap
(|top5 & top5_ref| / 5), mean KL(reference || model), and top-1 agreement per bin of the
reference's top-1 probability (quantization flips happen on the ambiguous images).
"""
from __future__ import annotations

import csv
import difflib
import os
from dataclasses import dataclass

import numpy as np

from ..runtime.classify import class_names, open_classifier, resolution_of, warn_skipped
from ..errors import UserError
from ..limits import check_all
from .metrics import accuracy, agreement, to_probabilities

CSV_HEADER = ("path", "file", "filename", "image")


@dataclass
class EvalOptions:
    top: int = 5
    weights: str = "imagenet"  # for variant names
    backend: str = "auto"
    num_threads: int = 1
    limit: int | None = None  # evaluate only the first N images


def _class_lookup(names: list[str], source: str) -> dict[str, int]:
    lookup = {}
    offset = len(names) - 1000 if source == "imagenet" else 0
    if source == "imagenet":
        from ..model.labels import imagenet_classes

        for i, (synset, lemmas) in enumerate(imagenet_classes()):
            for key in [synset, lemmas, *lemmas.split(",")]:
                lookup.setdefault(key.strip().lower(), i + offset)
    for i, name in enumerate(names):
        lookup.setdefault(name.strip().lower(), i)
    return lookup


def class_index(label: str, lookup: dict[str, int], count: int) -> int:
    text = label.strip()
    if text.isdigit():
        if int(text) >= count:
            raise UserError(f"class {text} is out of range: the model has {count} classes")
        return int(text)
    if text.lower() in lookup:
        return lookup[text.lower()]
    close = difflib.get_close_matches(text.lower(), list(lookup), n=3)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise UserError(f"label {label!r} matches no class of the model (an index, a class name or a synset id){hint}")


def read_dataset(data: str) -> tuple[list[str], list[str] | None]:
    """Image paths and their labels (None when the images are unlabeled)."""
    from ..data import IMAGE_EXTENSIONS, find_images

    if os.path.isfile(data) and data.lower().endswith(".csv"):
        base, paths, labels = os.path.dirname(os.path.abspath(data)), [], []
        try:
            with open(data, newline="", encoding="utf-8") as f:
                rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise UserError(f"cannot read {data}: {exc}") from None
        if rows and rows[0][0].strip().lower() in CSV_HEADER:
            rows = rows[1:]
        for n, row in enumerate(rows, 1):
            if len(row) < 2:
                raise UserError(f"{data}: row {n} needs two columns, path and label (got {row})")
            paths.append(os.path.join(base, row[0].strip()))
            labels.append(row[1])
        if not paths:
            raise UserError(f"{data} lists no images")
        return paths, labels
    if not os.path.isdir(data):
        raise UserError(f"--data must be a folder or a .csv file: {data}")
    paths = find_images(data)
    if not paths:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {data}")
    parts = [os.path.relpath(p, data).split(os.sep) for p in paths]
    if all(len(p) > 1 for p in parts):
        return paths, [p[0] for p in parts]
    return paths, None


def _score(runners: list, paths: list[str]) -> tuple[list[np.ndarray], list[int], list[str]]:
    """Each runner's probabilities on each readable image."""
    from ..data import load_image
    from ..console import progress

    scores, kept, skipped, errors = [[] for _ in runners], [], [], []
    resolutions = [resolution_of(r) for r in runners]
    with progress(list(enumerate(paths)), "evaluating") as bar:
        for i, path in bar:
            try:
                pixels = {res: load_image(path, res) for res in set(resolutions)}
            except UserError as exc:
                skipped.append(path)
                errors.append(str(exc))
                continue
            for out, runner, res in zip(scores, runners, resolutions):
                out.append(to_probabilities(runner.classify(pixels[res]))[0])
            kept.append(i)
    warn_skipped(errors, len(paths))
    return [np.array(s) for s in scores], kept, skipped


def evaluate(model: str, data: str, reference: str | None = None, options: EvalOptions = EvalOptions()) -> dict:
    """Accuracy of `model` (and `reference`) on labeled data, and their agreement; see module doc."""
    paths, labels = read_dataset(data)
    if labels is None and reference is None:
        raise UserError(f"the images in {data} have no labels (use one subfolder per class or a CSV); "
                        "pass --reference MODEL to compare two models on them")
    check_all(top=options.top, threads=options.num_threads, limit=options.limit)
    if options.limit:
        paths, labels = paths[:options.limit], labels and labels[:options.limit]
    runners = [open_classifier(m, options.weights, options.backend, options.num_threads)
               for m in ([model] + ([reference] if reference else []))]
    targets = None
    if labels is not None:
        names, source = class_names(runners[0])
        lookup = _class_lookup(names, source)
        targets = np.array([class_index(label, lookup, len(names)) for label in labels])
    scores, kept, skipped = _score(runners, paths)
    result = {"model": model, "reference": reference, "data": data, "images": len(kept),
              "skipped": skipped, "backend": runners[0].backend}
    if targets is not None:
        result["accuracy"] = accuracy(scores[0], targets[kept], options.top)
        if reference and scores[1].shape[1] == scores[0].shape[1]:  # labels index the model's classes
            result["reference_accuracy"] = accuracy(scores[1], targets[kept], options.top)
    if reference:
        result["agreement"] = agreement(scores[0], scores[1], options.top)
    return result


def format_result(result: dict) -> str:
    """The console table for `evaluate`'s result."""
    lines = [f"{result['images']} images from {result['data']}" +
             (f" ({len(result['skipped'])} unreadable, skipped)" if result["skipped"] else "")]
    rows = []
    if "accuracy" in result:
        rows.append(("model", result["model"], result["accuracy"]))
        if result.get("reference_accuracy"):
            rows.append(("reference", result["reference"], result["reference_accuracy"]))
        keys = list(result["accuracy"])
        lines.append(f"{'':<10} {'top-1':>7} {'top-' + keys[1][3:]:>7}  file")
        for role, name, acc in rows:
            lines.append(f"{role:<10} {acc[keys[0]]:>7.2%} {acc[keys[1]]:>7.2%}  {name}")
    if "agreement" in result:
        a = result["agreement"]
        overlap = next(k for k in a if k.endswith("_overlap"))
        lines.append(f"agreement of {result['model']} with {result['reference']}:")
        lines.append(f"  top-1 agreement {a['top1_agreement']:.2%} ({a['disagreements']} of {a['count']} differ), "
                     f"{overlap.replace('_', ' ')} {a[overlap]:.2%}, mean KL {a['mean_kl']:.4f}")
        lines.append("  reference top-1 probability   images   top-1 agreement")
        for b in a["by_reference_confidence"]:
            agree = "-" if b["top1_agreement"] is None else f"{b['top1_agreement']:.2%}"
            lines.append(f"  {b['min']:.1f} - {b['max']:.1f}{'':<19} {b['count']:>6}   {agree:>15}")
    return "\n".join(lines)
