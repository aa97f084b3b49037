"""Write scikit-learn's digits (8x8 grayscale, 1797 images, 10 classes) as an image folder.

One subfolder per class (0..9), PNG files upsampled to SIZE x SIZE RGB: the labeled set the
search benchmark and the training tests use. Needs scikit-learn and pillow.

    python tools/digits_folder.py OUT_DIR [--size 32] [--per-class N]
"""
from __future__ import annotations

import argparse
import os


def write_digits(out_dir: str, size: int = 32, per_class: int | None = None) -> int:
    """Write the digits as OUT_DIR/<label>/<index>.png; returns the number of images written."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    counts: dict[int, int] = {}
    written = 0
    for index, (image, label) in enumerate(zip(digits.images, digits.target)):
        label = int(label)
        if per_class is not None and counts.get(label, 0) >= per_class:
            continue
        counts[label] = counts.get(label, 0) + 1
        pixels = (np.asarray(image) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # values are 0..16
        img = Image.fromarray(pixels, "L").resize((size, size), Image.BICUBIC).convert("RGB")
        folder = os.path.join(out_dir, str(label))
        os.makedirs(folder, exist_ok=True)
        img.save(os.path.join(folder, f"{index:04d}.png"))
        written += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--per-class", type=int, default=None)
    args = parser.parse_args()
    count = write_digits(args.out_dir, args.size, args.per_class)
    print(f"wrote {count} images to {args.out_dir}")


if __name__ == "__main__":
    main()
