"""Class names: ImageNet's (shipped as data) and labels.txt files (one name per line).

edge_effnet/data/imagenet_classes.tsv holds the 1000 ImageNet-1k classes in the usual index order:
WordNet synset id, tab, its lemmas ("n02123159<TAB>tiger cat"). Source: the synset list and
lemma table that timm ships (timm/data/_info); names are facts. Official Edge TPU checkpoints
have 1001 outputs with a background class at index 0.
"""
from __future__ import annotations

import os

from ..errors import UserError

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")  # edge_effnet/data
IMAGENET_FILE = os.path.join(DATA_DIR, "imagenet_classes.tsv")
BACKGROUND = "background"
LABELS_FILE = "labels.txt"  # the name inside deployment bundles


def imagenet_classes() -> list[tuple[str, str]]:
    """(synset id, all lemmas) for the 1000 ImageNet classes, in index order."""
    with open(IMAGENET_FILE, encoding="utf-8") as f:
        return [tuple(line.rstrip("\n").split("\t", 1)) for line in f if line.strip()]


def imagenet_labels(num_classes: int = 1000) -> list[str]:
    """Short ImageNet class names (first lemma); 1001 classes = background first (Edge TPU)."""
    if num_classes not in (1000, 1001):
        raise ValueError(f"ImageNet has 1000 classes (1001 with background), not {num_classes}")
    names = [lemmas.split(",")[0].strip() for _, lemmas in imagenet_classes()]
    return [BACKGROUND] + names if num_classes == 1001 else names


def read_labels(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f.read().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read labels file {path}: {exc}") from None


def write_labels(path: str, labels: list[str]) -> None:
    """One name per line (the format TFLite Task Library and the Raspberry Pi classifier read)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(f"{name}\n" for name in labels))


def labels_for(num_classes: int, model_path: str | None = None) -> tuple[list[str], str]:
    """Names for a model's outputs and where they came from.

    A labels.txt beside the model file (a bundle) wins when its length fits; 1000 or 1001 outputs
    are taken to be ImageNet's; otherwise the classes are numbered.
    """
    if model_path:
        beside = os.path.join(os.path.dirname(os.path.abspath(model_path)), LABELS_FILE)
        if os.path.isfile(beside):
            names = read_labels(beside)
            if len(names) == num_classes:
                return names, beside
            import sys

            print(f"warning: {beside} has {len(names)} names but the model has {num_classes} classes: "
                  "not used", file=sys.stderr)
    if num_classes in (1000, 1001):
        return imagenet_labels(num_classes), "imagenet"
    return [f"class {i}" for i in range(num_classes)], "numbered"
