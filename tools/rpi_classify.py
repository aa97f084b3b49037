#!/usr/bin/env python3
"""Classify images (or camera frames) with an edge-effnet export bundle, on a Raspberry Pi.

Standalone: copy this file and the bundle folder to the device; it needs only numpy, pillow
and one interpreter:  pip install numpy pillow ai-edge-litert   (or the legacy tflite-runtime,
which needs numpy<2). It never imports edge_effnet or TensorFlow.

    python3 rpi_classify.py b1-int8/ cat.jpg dog.png            # top-5 per image
    python3 rpi_classify.py b1-int8/ photos/*.jpg --json         # machine-readable
    python3 rpi_classify.py b1-int8/ --camera --frames 50        # picamera2, else OpenCV

The preprocessing comes from the bundle's manifest.json: a square center crop of
`crop_fraction` x the short side, bicubic resize to `resolution`, RGB pixels 0..255 (the
model's normalization is inside its graph). Quantized inputs/outputs use the scale and zero
point the interpreter reports (uint8 int8 models: scale 1, zero point 0, raw bytes in).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import numpy as np

RUNTIMES = {"litert": "ai_edge_litert.interpreter", "tflite-runtime": "tflite_runtime.interpreter"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class Error(Exception):
    """Reported as one line, exit code 2."""


def load_bundle(path: str) -> tuple[str, dict, list[str] | None]:
    """(model file, manifest, labels) for a bundle folder or a model file inside one."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    manifest_path = os.path.join(folder, "manifest.json")
    if not os.path.isfile(manifest_path):
        raise Error(f"{folder} has no manifest.json (pass a folder written by `edge-effnet export`)")
    with open(manifest_path) as f:
        manifest = json.load(f)
    if os.path.isdir(path):
        tflite = [r["file"] for r in manifest["files"] if r["file"].endswith(".tflite")]
        if not tflite:
            raise Error(f"{folder} holds no .tflite model")
        model = os.path.join(folder, tflite[0])
    else:
        model = path
    labels = None
    if manifest.get("labels") and os.path.isfile(os.path.join(folder, manifest["labels"])):
        with open(os.path.join(folder, manifest["labels"]), encoding="utf-8") as f:
            labels = [line.strip() for line in f.read().splitlines() if line.strip()]
    return model, manifest, labels


def make_interpreter(model: str, runtime: str = "auto", threads: int = 1):
    """An allocated interpreter and the name + version of the runtime that runs it."""
    names = list(RUNTIMES) if runtime == "auto" else [runtime]
    for name in names:
        try:
            module = __import__(RUNTIMES[name], fromlist=["Interpreter"])
        except ImportError:
            continue
        package = sys.modules[RUNTIMES[name].split(".")[0]]
        try:
            interpreter = module.Interpreter(model_path=model, num_threads=threads)
            interpreter.allocate_tensors()
        except Exception as exc:  # C++ errors arrive as RuntimeError/ValueError
            raise Error(f"{name} cannot open {model}: {str(exc).strip().splitlines()[0]}") from None
        return interpreter, f"{name} {getattr(package, '__version__', '?')}"
    raise Error("no TFLite interpreter: pip install ai-edge-litert (or tflite-runtime with numpy<2)")


def preprocess(image, resolution: int, crop_fraction: float) -> np.ndarray:
    """PIL image -> (resolution, resolution, 3) uint8: the export's center crop and bicubic resize."""
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    side = max(1, int(round(min(w, h) * crop_fraction)))
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


class Classifier:
    def __init__(self, bundle: str, runtime: str = "auto", threads: int = 1):
        self.model, self.manifest, self.labels = load_bundle(bundle)
        self.interpreter, self.runtime = make_interpreter(self.model, runtime, threads)
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        pre = self.manifest["preprocessing"]
        self.resolution, self.crop_fraction = int(pre["resolution"]), float(pre["crop_fraction"])

    def scores(self, pixels: np.ndarray) -> np.ndarray:
        """Float scores for (H, W, 3) RGB pixels 0..255."""
        x = pixels.astype(np.float32)[None]
        dtype = self.input["dtype"]
        scale, zero = self.input["quantization"]
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            x = np.clip(np.round(x / (scale or 1.0) + zero), info.min, info.max)
        self.interpreter.set_tensor(self.input["index"], x.astype(dtype))
        self.interpreter.invoke()
        y = self.interpreter.get_tensor(self.output["index"]).reshape(-1).astype(np.float32)
        scale, zero = self.output["quantization"]
        return (y - zero) * scale if scale else y

    def classify(self, image, top: int = 5) -> dict:
        pixels = preprocess(image, self.resolution, self.crop_fraction)
        start = time.perf_counter()
        scores = self.scores(pixels)
        ms = (time.perf_counter() - start) * 1e3
        order = np.argsort(-scores, kind="stable")[:top]
        return {"top": [{"index": int(i), "label": self.labels[i] if self.labels else str(int(i)),
                         "score": round(float(scores[i]), 6)} for i in order], "ms": round(ms, 3)}


def image_paths(items: list[str]) -> list[str]:
    paths = []
    for item in items:
        if os.path.isdir(item):
            paths += sorted(p for p in glob.glob(os.path.join(item, "**", "*"), recursive=True)
                            if p.lower().endswith(IMAGE_EXTENSIONS))
        else:
            paths.append(item)
    return paths


def camera_frames(count: int):
    """RGB frames as PIL images: picamera2 when installed, else OpenCV's first camera."""
    from PIL import Image

    try:
        from picamera2 import Picamera2
    except ImportError:
        Picamera2 = None
    if Picamera2 is not None:
        camera = Picamera2()
        camera.configure(camera.create_still_configuration(main={"format": "RGB888", "size": (640, 480)}))
        camera.start()
        try:
            for _ in range(count):
                yield Image.fromarray(camera.capture_array()[..., :3])
        finally:
            camera.stop()
        return
    try:
        import cv2
    except ImportError:
        raise Error("--camera needs picamera2 (Raspberry Pi camera) or opencv-python (USB camera)") from None
    capture = cv2.VideoCapture(0)
    if not capture.isOpened():
        raise Error("OpenCV found no camera at index 0")
    try:
        for _ in range(count):
            ok, frame = capture.read()
            if not ok:
                raise Error("the camera stopped delivering frames")
            yield Image.fromarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    finally:
        capture.release()


def run(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", help="bundle folder from `edge-effnet export` (or a .tflite inside one)")
    parser.add_argument("images", nargs="*", help="image files or folders")
    parser.add_argument("--camera", action="store_true", help="classify camera frames instead of files")
    parser.add_argument("--frames", type=int, default=10, help="camera frames to classify (default 10)")
    parser.add_argument("--top", type=int, default=5, help="classes to show per image (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="interpreter threads (default 1)")
    parser.add_argument("--runtime", choices=["auto", *RUNTIMES], default="auto")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    from PIL import Image

    try:
        if not args.images and not args.camera:
            raise Error("give image files/folders or --camera")
        classifier = Classifier(args.bundle, args.runtime, args.threads)
        results, skipped = [], []
        if args.camera:
            sources = ((f"frame {i}", frame) for i, frame in enumerate(camera_frames(args.frames)))
        else:
            paths = image_paths(args.images)
            if not paths:
                raise Error("no images found")
            sources = ((p, p) for p in paths)
        for name, source in sources:
            try:
                image = source if not isinstance(source, str) else Image.open(source)
                result = {"image": name, **classifier.classify(image, args.top)}
            except (OSError, ValueError) as exc:
                skipped.append({"image": name, "error": str(exc).splitlines()[0]})
                continue
            results.append(result)
            if not args.json:
                print(f"{name} ({result['ms']:.1f} ms): " +
                      ", ".join(f"{t['label']} {t['score']:.3f}" for t in result["top"]))
        if args.json:
            print(json.dumps({"model": os.path.basename(classifier.model), "runtime": classifier.runtime,
                              "input": {"dtype": np.dtype(classifier.input["dtype"]).name,
                                        "shape": [int(d) for d in classifier.input["shape"]],
                                        "quantization": list(classifier.input["quantization"])},
                              "results": results, "skipped": skipped}, indent=1))
        for item in skipped if not args.json else ():
            print(f"warning: skipped {item['image']}: {item['error']}", file=sys.stderr)
        if not results:
            raise Error("none of the images could be read")
    except Error as exc:
        print(f"rpi_classify: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run())
