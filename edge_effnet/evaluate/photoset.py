"""A real-photo image set from the photographs scikit-image ships (no downloads).

Random square crops of 35-100% of a photo's short side, every other one mirrored, resized
(bicubic) to the model's resolution. Deterministic: a crop list depends only on its seed and
count. The evaluation crops and the calibration crops come from different seeds, and
`evaluation_crops` drops any crop that is also a calibration crop, so a model is never judged on
the images it was calibrated on.

    from edge_effnet.photoset import evaluation_crops, calibration_crops, render
    pixels = render(evaluation_crops(400), 224)      # (400, 224, 224, 3) uint8
    write_photoset("photos/", calibration_crops(100), 224)  # PNG files for --calib DIR
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..errors import UserError

# Natural colour photographs in skimage/data, the kind of scene ImageNet models are made for.
PHOTOS = ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "motorcycle_left.png", "motorcycle_right.png")
# The other photographs there: grayscale scenes, astronomy, micrographs, text and textures. Few
# crops of these look like any ImageNet class, so a model's top-1 probability is low on them.
OTHER_PHOTOS = ("camera.png", "coins.png", "moon.png", "clock_motion.png", "hubble_deep_field.jpg", "ihc.png",
                "retina.jpg", "cell.png", "page.png", "text.png", "brick.png", "grass.png", "gravel.png")
ALL_PHOTOS = PHOTOS + OTHER_PHOTOS
EVAL_SEED = 20190528  # the EfficientNet paper's arXiv date: any fixed number works
CALIB_SEED = 7
TUNE_SEED = 1905  # crops for choices an export makes on held-out images (mixed precision)
MIN_FRACTION, MAX_FRACTION = 0.35, 1.0  # crop side as a fraction of the photo's short side


@dataclass(frozen=True)
class Crop:
    photo: str  # file name in skimage/data
    left: int
    top: int
    side: int
    flip: bool  # mirrored left-right


def photo_dir() -> str:
    try:
        import skimage
    except ImportError:
        raise UserError("the photo set needs scikit-image (its sample photos): pip install scikit-image") from None
    return os.path.join(os.path.dirname(skimage.__file__), "data")


def _open(photo: str):
    from PIL import Image

    with Image.open(os.path.join(photo_dir(), photo)) as img:
        return img.convert("RGB")


def photo_sizes(photos=PHOTOS) -> dict[str, tuple[int, int]]:
    from PIL import Image

    sizes = {}
    for photo in photos:
        with Image.open(os.path.join(photo_dir(), photo)) as img:
            sizes[photo] = img.size
    return sizes


def sample_crops(count: int, seed: int, photos=PHOTOS, min_fraction: float = MIN_FRACTION,
                 max_fraction: float = MAX_FRACTION) -> list[Crop]:
    """`count` random square crops over `photos` (photo chosen uniformly); odd ones mirrored."""
    rng = np.random.default_rng(seed)
    sizes = photo_sizes(photos)
    crops = []
    for i in range(count):
        photo = photos[int(rng.integers(len(photos)))]
        w, h = sizes[photo]
        side = max(1, int(round(min(w, h) * rng.uniform(min_fraction, max_fraction))))
        left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        crops.append(Crop(photo, left, top, side, flip=i % 2 == 1))
    return crops


def calibration_crops(count: int = 100, photos=PHOTOS) -> list[Crop]:
    return sample_crops(count, CALIB_SEED, photos)


def evaluation_crops(count: int = 400, photos=PHOTOS, calibration_count: int = 1000) -> list[Crop]:
    """`count` crops, none equal to any of the first `calibration_count` calibration crops."""
    taken = set(calibration_crops(calibration_count)) | set(calibration_crops(calibration_count, photos))
    crops = [c for c in sample_crops(count + 50, EVAL_SEED, photos) if c not in taken]
    return crops[:count]


def tuning_crops(count: int = 100, photos=PHOTOS) -> list[Crop]:
    """`count` crops that are neither calibration crops nor evaluation crops: an export tunes on
    these, so the evaluation crops stay unseen by every choice it made."""
    taken = set(calibration_crops(1000, photos)) | set(evaluation_crops(1000, photos))
    return [c for c in sample_crops(count + 50, TUNE_SEED, photos) if c not in taken][:count]


def render(crops: list[Crop], resolution: int) -> np.ndarray:
    """The crops as model input: (N, resolution, resolution, 3) uint8 RGB."""
    from PIL import Image

    cache, out = {}, np.zeros((len(crops), resolution, resolution, 3), np.uint8)
    for i, c in enumerate(crops):
        if c.photo not in cache:
            cache[c.photo] = _open(c.photo)
        img = cache[c.photo].crop((c.left, c.top, c.left + c.side, c.top + c.side))
        img = img.resize((resolution, resolution), Image.BICUBIC)
        out[i] = np.asarray(img.transpose(Image.FLIP_LEFT_RIGHT) if c.flip else img)
    return out


def crop_name(index: int, crop: Crop) -> str:
    stem = os.path.splitext(crop.photo)[0]
    return f"{index:04d}_{stem}_{crop.left}_{crop.top}_{crop.side}{'_flip' if crop.flip else ''}.png"


def write_photoset(folder: str, crops: list[Crop], resolution: int, force: bool = False) -> list[str]:
    """Write the crops as PNG files into a new `folder` (atomically); returns the file paths."""
    from PIL import Image

    from ..fsutil import atomic_dir

    pixels = render(crops, resolution)
    names = [crop_name(i, c) for i, c in enumerate(crops)]
    with atomic_dir(folder, force, "photoset") as tmp:
        for name, image in zip(names, pixels):
            Image.fromarray(image).save(os.path.join(tmp, name))
    return [os.path.join(folder, n) for n in names]
