"""Images in, model-ready pixels out: folders, .npy arrays, calibration sets.

numpy + pillow only (no TensorFlow): the Raspberry Pi classifier uses the same
preprocessing as the exporter. Every model here takes raw RGB pixels 0..255;
normalization lives inside the exported graph.
"""
from __future__ import annotations

import os
import sys

import numpy as np

from .console import progress
from .errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
CROP_PADDING = 32  # official eval: center crop of res / (res + 32) of the short side, bicubic


def find_images(folder: str) -> list[str]:
    """Image files under `folder`, searched recursively, in a stable order."""
    if not os.path.isdir(folder):
        raise UserError(f"not a folder: {folder}")
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found.extend(os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS))
    return found


def center_crop_resize(img, resolution: int, crop_fraction: float | None = None) -> np.ndarray:
    """PIL image -> uint8 (resolution, resolution, 3): square center crop, bicubic resize."""
    from PIL import Image

    img = img.convert("RGB")  # grayscale, palette and RGBA all become RGB
    if crop_fraction is None:
        crop_fraction = resolution / (resolution + CROP_PADDING)
    w, h = img.size
    side = max(1, int(round(min(w, h) * crop_fraction)))
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def load_image(path: str, resolution: int, crop_fraction: float | None = None) -> np.ndarray:
    """One image file as model input pixels; UserError "PATH unreadable: REASON" if it cannot be.

    Whatever Pillow raises for a file (truncated, not an image, a decompression bomb, a mode it
    cannot convert, out of memory) makes the file unreadable, never the command's end.
    """
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # a reason, not a stderr line
            with Image.open(path) as img:
                img.load()
                return center_crop_resize(img, resolution, crop_fraction)
    except IsADirectoryError:
        raise UserError(f"{path} unreadable: it is a folder") from None
    except Exception as exc:  # noqa: BLE001 -- any decoder failure is this one file's problem
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} unreadable: {reason}") from None


def load_images(paths: list[str], resolution: int, label: str = "reading images",
                crop_fraction: float | None = None) -> tuple[np.ndarray, list[str], list[str]]:
    """Read `paths`; unreadable files are skipped: the third element holds why, one message each."""
    arrays, used, skipped = [], [], []
    with progress(paths, label) as bar:
        for path in bar:
            try:
                arrays.append(load_image(path, resolution, crop_fraction))
                used.append(path)
            except UserError as exc:
                skipped.append(str(exc))
    batch = np.stack(arrays) if arrays else np.zeros((0, resolution, resolution, 3), np.uint8)
    return batch, used, skipped


def skipped_note(skipped: list[str], where: str) -> str:
    """The warning (or, when nothing was readable, the error) about unreadable files: `skipped`
    holds load_image's messages."""
    return f"{len(skipped)} unreadable image(s) in {where} skipped, e.g. {skipped[0]}"


def expand_images(items: list[str]) -> list[str]:
    """Image arguments: files as given, folders replaced by the images in them (searched recursively)."""
    out = []
    for item in items:
        if os.path.isdir(item):
            found = find_images(item)
            if not found:
                raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in folder {item}")
            out += found
        else:
            out.append(item)
    return out


def resize_batch(array: np.ndarray, resolution: int) -> np.ndarray:
    """(N, H, W, 3) pixels of any size -> (N, resolution, resolution, 3) uint8, center-cropped."""
    from PIL import Image

    if array.shape[1:3] == (resolution, resolution):
        return np.clip(array, 0, 255).astype(np.uint8)
    return np.stack([center_crop_resize(Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)), resolution, 1.0)
                     for a in array])


def load_npy(path: str, resolution: int | None) -> np.ndarray:
    """An (N, H, W, 3) or (H, W, 3) array of RGB pixels: integers 0..255 or floats 0..255 / 0..1."""
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 -- truncated, pickled, not an .npy at all
        raise UserError(f"{path} unreadable: not a plain .npy array ({str(exc).splitlines()[0] if str(exc) else exc!r})"
                        ) from None
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3:
        raise UserError(f"{path} unreadable: expected RGB images (N, H, W, 3), got shape {array.shape}")
    if array.dtype == np.bool_ or not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise UserError(f"{path} unreadable: pixels must be integers or floats, not {array.dtype}")
    if array.size == 0:
        raise UserError(f"{path} holds no images (shape {array.shape})")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise UserError(f"{path} unreadable: it holds NaN or infinite values")
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > 255:
        raise UserError(f"{path} unreadable: pixels must be in 0..255 (or 0..1 floats), got {low:g}..{high:g}")
    if np.issubdtype(array.dtype, np.floating) and high <= 1.0:
        array = array * 255.0  # 0..1 floats -> pixels
    if resolution is None:
        return array
    try:
        return resize_batch(array, resolution)
    except Exception as exc:  # noqa: BLE001 -- e.g. out of memory for a huge array
        raise UserError(f"{path} unreadable: {exc}") from None


def synthetic_images(count: int, resolution: int, seed: int = 0) -> np.ndarray:
    """Smooth random colour fields: a stand-in when the user gives no calibration images."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(count, 8, 8, 3), dtype=np.uint8)
    return np.stack([np.asarray(Image.fromarray(s).resize((resolution, resolution), Image.BICUBIC)) for s in small])


def check_calibration_source(source: str | None) -> None:
    """Cheap check before any model is loaded: a folder with images, or a valid .npy of pixels."""
    if source in (None, "synthetic"):
        return
    if os.path.isfile(source) and source.lower().endswith(".npy"):
        load_npy(source, None)
    elif not os.path.exists(source):
        raise UserError(f"calibration source not found: {source}")
    elif not os.path.isdir(source):
        raise UserError(f"calibration source {source} is neither a folder nor a .npy file")
    elif not find_images(source):
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {source}")


def calibration_set(source: str | None, resolution: int, count: int = 100, seed: int = 0) -> tuple[np.ndarray, dict]:
    """Images for quantization calibration / self-checks, and a record of where they came from.

    `source` is a folder (searched recursively) or a .npy array; None means synthetic images,
    recorded as such so callers can say that accuracy is then unknown.
    """
    if count < 1:
        raise UserError(f"the number of calibration images must be >= 1 (got {count})")
    if source is None:
        return synthetic_images(count, resolution, seed), {"source": "synthetic", "count": count, "skipped": 0,
                                                           "synthetic": True}
    if os.path.isfile(source) and source.lower().endswith(".npy"):
        array = load_npy(source, resolution)
        if len(array) == 0:
            raise UserError(f"{source} holds no images")
        return array[:count], {"source": os.path.abspath(source), "count": min(count, len(array)), "skipped": 0,
                               "synthetic": False}
    if not os.path.isdir(source):
        raise UserError(f"calibration source {source} is neither a folder nor a .npy file")
    paths = find_images(source)
    if not paths:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {source}")
    if len(paths) > count:  # an even spread over the folder, not just its first subfolder
        paths = [paths[i] for i in np.linspace(0, len(paths) - 1, count).round().astype(int)]
    array, used, skipped = load_images(paths, resolution, "reading calibration images")
    if not used:
        raise UserError(f"none of the {len(paths)} images in {source} could be read, e.g. {skipped[0]}")
    if skipped:
        print(f"warning: {skipped_note(skipped, source)}", file=sys.stderr)
    return array, {"source": os.path.abspath(source), "count": len(used), "skipped": len(skipped),
                   "synthetic": False}


def class_folders(folder: str) -> list[tuple[str, list[str]]]:
    """(class name, image paths) for each subfolder of `folder` that holds images, sorted by name.

    Cheap (no pixels read), so commands can reject a bad data folder before any heavy import.
    """
    if not os.path.isdir(folder):
        raise UserError(f"not a folder: {folder}")
    classes = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not name.startswith("."):
            images = find_images(path)
            if images:
                classes.append((name, images))
    if len(classes) < 2:
        found = f"found {len(classes)}" + (f" ({classes[0][0]})" if classes else "")
        raise UserError(f"{folder} needs one subfolder of images per class and at least two classes; {found}")
    return classes


def labeled_images(folder: str, resolution: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Pixels (N, R, R, 3) uint8, integer labels (N,) and class names from a folder of class subfolders."""
    classes = class_folders(folder)
    paths = [p for _, images in classes for p in images]
    label_of = {p: i for i, (_, images) in enumerate(classes) for p in images}
    pixels, used, skipped = load_images(paths, resolution, "reading images")
    if not used:
        raise UserError(f"none of the {len(paths)} images in {folder} could be read, e.g. {skipped[0]}")
    labels = np.array([label_of[p] for p in used], dtype=np.int64)
    if len(np.unique(labels)) < 2:
        raise UserError(f"{folder}: fewer than two classes have readable images"
                        + (f" ({skipped_note(skipped, folder)})" if skipped else ""))
    if skipped:
        print(f"warning: {skipped_note(skipped, folder)}", file=sys.stderr)
    return pixels, labels, [name for name, _ in classes]
