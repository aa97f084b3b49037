"""The images an export uses: calibration images (quantized modes) and self-check images held out
from them, with a record of where they came from.

--calib DIR_OR_NPY: the user's images; the self-check takes images the calibration did not see
(in-sample only when there are too few to hold any out, and the record says so).
--calib synthetic: synthetic colour fields (accuracy unknown, said loudly).
No --calib: crops of the real photos that ship with scikit-image (evaluate/photoset.py; the
self-check crops are disjoint from the calibration crops) when it is installed, else synthetic
colour fields (then accuracy is unknown, and the manifest says so).
"""
from __future__ import annotations

import importlib.util

import numpy as np

PHOTOS = "photos"        # kinds of calibration source
SYNTHETIC = "synthetic"
USER = "user"


def photos_available() -> bool:
    return importlib.util.find_spec("skimage") is not None


def _even(n: int, k: int) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, k).round().astype(int)) if k > 0 else np.zeros(0, int)


def export_images(source: str | None, resolution: int, num_calib: int, num_check: int, calibrated: bool,
                  num_tune: int = 0) -> tuple[np.ndarray | None, np.ndarray, dict, dict, tuple | None]:
    """(calibration images or None, check images, calibration record, check record, tuning set or None).

    num_tune > 0: also (images, record) for choices made during the export (export/mixed.py), held out
    from the calibration and the check images: crops of their own for the photo set, part of the
    held-out images of a --calib source (the check images stay the first num_check of them)."""
    if num_tune <= 0:
        return (*_export_images(source, resolution, num_calib, num_check, calibrated), None)
    if source in (None, SYNTHETIC):
        calib, check, calib_info, check_info = _export_images(source, resolution, num_calib, num_check, calibrated)
        if calib_info["kind"] == PHOTOS:
            from ..evaluate.photoset import render, tuning_crops

            tune = render(tuning_crops(num_tune), resolution)
            return calib, check, calib_info, check_info, (tune, {"source": calib_info["source"] + ", crops of their "
                                                                 "own (tuning_crops)", "count": len(tune)})
        from ..data import synthetic_images

        tune = synthetic_images(num_tune, resolution, seed=2)
        return calib, check, calib_info, check_info, (tune, {"source": SYNTHETIC, "count": num_tune})
    calib, held, calib_info, check_info = _export_images(source, resolution, num_calib, num_check + num_tune, calibrated)
    check, tune = held[:num_check], held[num_check:]
    check_info["count"] = len(check)
    tune_info = {"source": check_info["source"] + ", held out from calibration", "count": len(tune)}
    if len(tune) < num_tune // 2 or not check_info["held_out"]:  # too few images to hold enough out
        tune, tune_info = calib, {"source": calib_info["source"] + ": the calibration images (too few images to "
                                            "hold any out)", "count": len(calib), "in_sample": True}
    return calib, check, calib_info, check_info, (tune, tune_info)


def _export_images(source: str | None, resolution: int, num_calib: int, num_check: int, calibrated: bool
                   ) -> tuple[np.ndarray | None, np.ndarray, dict, dict]:
    from ..data import calibration_set, synthetic_images

    if source == SYNTHETIC:
        source = None
    elif source is None and photos_available():
        from ..evaluate.photoset import calibration_crops, evaluation_crops, render

        calib = render(calibration_crops(num_calib), resolution) if calibrated else None
        check = render(evaluation_crops(num_check), resolution)
        where = "scikit-image's sample photos (random crops, edge_effnet.evaluate.photoset)"
        return calib, check, {"kind": PHOTOS, "source": where, "count": num_calib, "skipped": 0, "synthetic": False}, \
            {"source": where + ", other crops", "count": len(check), "held_out": True}
    if source is None:  # asked for, or no photos installed
        calib = synthetic_images(num_calib, resolution, seed=0) if calibrated else None
        check = synthetic_images(num_check, resolution, seed=1)
        return calib, check, {"kind": SYNTHETIC, "source": SYNTHETIC, "count": num_calib, "skipped": 0,
                              "synthetic": True}, {"source": SYNTHETIC, "count": num_check, "held_out": True}
    images, info = calibration_set(source, resolution, (num_calib if calibrated else 0) + num_check)
    info = {"kind": USER, **info}
    if not calibrated:
        return None, images[:num_check], info, {"source": info["source"], "count": min(num_check, len(images)),
                                                "held_out": True}
    spare = len(images) - min(num_calib, len(images))
    held = _even(len(images), min(num_check, spare))
    if len(held):
        rest = np.setdiff1d(np.arange(len(images)), held)
        calib, check = images[rest][:num_calib], images[held]
    else:  # too few images to hold any out
        calib, check = images[:num_calib], images[:num_check]
    info["count"] = len(calib)
    return calib, check, info, {"source": info["source"], "count": len(check), "held_out": bool(len(held))}
