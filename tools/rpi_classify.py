#!/usr/bin/env python3
"""Classify images (or camera frames) with an edge-effnet export bundle, on a Raspberry Pi.

Standalone: copy this file and the bundle folder to the device; it needs only numpy, pillow
and one runtime:  pip install numpy pillow ai-edge-litert   (or onnxruntime for a bundle's .onnx
file; or the legacy tflite-runtime, which needs numpy<2). It never imports edge_effnet or TensorFlow.

    python3 rpi_classify.py b1-int8/ cat.jpg dog.png            # top-5 per image
    python3 rpi_classify.py b1-int8/ photos/*.jpg --json         # machine-readable
    python3 rpi_classify.py b1-int8/ --camera --frames 50        # picamera2, else OpenCV

A bundle folder may hold a .tflite and an .onnx file (`edge-effnet export --format tflite,onnx`):
the first one an installed runtime runs is used (.tflite in ai-edge-litert or tflite-runtime, else
.onnx in onnxruntime), and stderr says which. The preprocessing comes from the bundle's
manifest.json: a square center crop of `crop_fraction` x the short side, bicubic resize to
`resolution`, RGB pixels 0..255 (the model's normalization is inside its graph). Quantized .tflite
inputs/outputs use the scale and zero point the interpreter reports (uint8 int8 models: scale 1,
zero point 0, raw bytes in); .onnx files take float32 pixels, NHWC or NCHW (`--layout nchw`
exports), as their manifest record and input shape say.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import sys
import time
from typing import NamedTuple

import numpy as np


class Runtime(NamedTuple):
    suffix: str    # the model files it runs
    module: str    # what to import
    package: str   # what to pip install


# In the order --runtime auto tries them (edge_effnet.runtime.backends keeps the same facts; a test compares).
RUNTIMES = {"litert": Runtime(".tflite", "ai_edge_litert.interpreter", "ai-edge-litert"),
            "tflite-runtime": Runtime(".tflite", "tflite_runtime.interpreter", "tflite-runtime"),
            "onnxruntime": Runtime(".onnx", "onnxruntime", "onnxruntime")}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class Error(Exception):
    """Reported as one line, exit code 2."""


def installed(name: str) -> bool:
    top = RUNTIMES[name].module.split(".")[0]
    return importlib.util.find_spec(top) is not None


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _either(names: list[str]) -> str:
    if len(names) == 1:
        return f"{names[0]} is not installed"
    return f"neither {', '.join(names[:-1])} nor {names[-1]} is installed"


def choose(folder: str, files: list[str], runtime: str = "auto", found=installed) -> tuple[str, str, str]:
    """(model file name, runtime, one line saying which and why) among a bundle's `files`."""
    names = list(RUNTIMES) if runtime == "auto" else [runtime]
    suffixes = list(dict.fromkeys(row.suffix for row in RUNTIMES.values()))  # .tflite first
    runnable = sorted((f for f in files if f.lower().endswith(tuple(suffixes))),
                      key=lambda f: next(i for i, x in enumerate(suffixes) if f.lower().endswith(x)))
    where = folder.rstrip(os.sep) + os.sep
    if not runnable:
        raise Error(f"{where} holds no .tflite or .onnx model")
    skipped = []
    for name in names:
        mine = [f for f in runnable if f.lower().endswith(RUNTIMES[name].suffix)]
        if not mine:
            continue
        if runtime != "auto" or found(name):
            why = f" ({_either(skipped)})" if skipped else ""
            return mine[0], name, f"{where}: {mine[0]} in {RUNTIMES[name].package}{why}"
        skipped.append(RUNTIMES[name].package)
    if runtime != "auto":
        raise Error(f"{where} holds no {RUNTIMES[runtime].suffix} model for --runtime {runtime} "
                    f"(it holds {_and(runnable)})")
    wanted = [n for n in RUNTIMES if any(f.lower().endswith(RUNTIMES[n].suffix) for f in runnable)]
    raise Error(f"{where} holds {_and(runnable)}, but {_either([RUNTIMES[n].package for n in wanted])}: "
                f"pip install {RUNTIMES[wanted[0]].package}")


def load_bundle(path: str, runtime: str = "auto") -> tuple[str, str, dict, dict, list[str] | None]:
    """(model file, runtime, manifest, the file's manifest record, labels) for a bundle folder or a
    model file inside one."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    manifest_path = os.path.join(folder, "manifest.json")
    if not os.path.isfile(manifest_path):
        raise Error(f"{folder} has no manifest.json (pass a folder written by `edge-effnet export`)")
    with open(manifest_path) as f:
        manifest = json.load(f)
    if os.path.isdir(path):
        present = [r["file"] for r in manifest["files"] if os.path.isfile(os.path.join(folder, r["file"]))]
        name, runtime, note = choose(path, present, runtime)
        print(f"rpi_classify: {note}", file=sys.stderr)
        model = os.path.join(folder, name)
    else:
        model = path
        name, runtime, _ = choose(folder, [os.path.basename(path)], runtime)
    record = next((r for r in manifest["files"] if r["file"] == os.path.basename(model)), {})
    labels = None
    if manifest.get("labels") and os.path.isfile(os.path.join(folder, manifest["labels"])):
        with open(os.path.join(folder, manifest["labels"]), encoding="utf-8") as f:
            labels = [line.strip() for line in f.read().splitlines() if line.strip()]
    return model, runtime, manifest, record, labels


def _version(module: str) -> str:
    return getattr(sys.modules[module.split(".")[0]], "__version__", "?")


class TFLiteModel:
    """A .tflite file in ai-edge-litert or tflite-runtime: raw pixels in, float scores out."""

    def __init__(self, model: str, name: str, threads: int):
        try:
            module = __import__(RUNTIMES[name].module, fromlist=["Interpreter"])
        except ImportError as exc:
            raise Error(f"{name} does not import ({exc}): pip install {RUNTIMES[name].package}") from None
        try:
            self.interpreter = module.Interpreter(model_path=model, num_threads=threads)
            self.interpreter.allocate_tensors()
        except Exception as exc:  # C++ errors arrive as RuntimeError/ValueError
            raise Error(f"{name} cannot open {model}: {str(exc).strip().splitlines()[0]}") from None
        self.runtime = f"{name} {_version(RUNTIMES[name].module)}"
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]

    def describe(self) -> dict:
        return {"dtype": np.dtype(self.input["dtype"]).name, "shape": [int(d) for d in self.input["shape"]],
                "quantization": list(self.input["quantization"])}

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


ONNX_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(uint8)": "uint8",
              "tensor(int8)": "int8"}


class OnnxModel:
    """An .onnx file in onnxruntime (one thread, sequential): float32 pixels 0..255, NHWC or NCHW."""

    def __init__(self, model: str, threads: int, record: dict):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise Error(f"onnxruntime does not import ({exc}): pip install onnxruntime") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise Error(f"onnxruntime cannot open {model}: {str(exc).strip().splitlines()[0]}") from None
        self.runtime = f"onnxruntime {ort.__version__}"
        self.input, self.output = self.session.get_inputs()[0], self.session.get_outputs()[0]
        self.shape = [d if isinstance(d, int) else 1 for d in self.input.shape]
        self.dtype = np.dtype(ONNX_TYPES.get(self.input.type, "float32"))
        # the manifest says the layout; else the shape: (1, 3, H, W) with W != 3 is NCHW
        layout = (record.get("input") or {}).get("layout")
        self.nchw = layout == "nchw" if layout else (len(self.shape) == 4 and self.shape[1] == 3 != self.shape[3])

    def describe(self) -> dict:
        return {"dtype": self.dtype.name, "shape": self.shape, "quantization": [0.0, 0]}

    def scores(self, pixels: np.ndarray) -> np.ndarray:
        x = pixels.astype(np.float32)[None]
        if self.nchw:
            x = x.transpose(0, 3, 1, 2)
        if self.dtype == np.int8:  # an int8 pixel input is pixel - 128 (as the .tflite files' int8 io)
            x = x - 128.0
        y = self.session.run([self.output.name], {self.input.name: x.astype(self.dtype)})[0]
        return np.asarray(y, dtype=np.float32).reshape(-1)


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
        self.model, name, self.manifest, record, self.labels = load_bundle(bundle, runtime)
        if RUNTIMES[name].suffix == ".onnx":
            self.net = OnnxModel(self.model, threads, record)
        else:
            self.net = TFLiteModel(self.model, name, threads)
        self.runtime = self.net.runtime
        pre = self.manifest["preprocessing"]
        self.resolution, self.crop_fraction = int(pre["resolution"]), float(pre["crop_fraction"])

    def scores(self, pixels: np.ndarray) -> np.ndarray:
        """Float scores for (H, W, 3) RGB pixels 0..255."""
        return self.net.scores(pixels)

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
    parser.add_argument("bundle", help="bundle folder from `edge-effnet export` (or a .tflite/.onnx inside one)")
    parser.add_argument("images", nargs="*", help="image files or folders")
    parser.add_argument("--camera", action="store_true", help="classify camera frames instead of files")
    parser.add_argument("--frames", type=int, default=10, help="camera frames to classify (default 10)")
    parser.add_argument("--top", type=int, default=5, help="classes to show per image (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="interpreter threads (default 1)")
    parser.add_argument("--runtime", choices=["auto", *RUNTIMES], default="auto",
                        help="auto (default): the first installed of " + ", ".join(RUNTIMES) +
                             " that runs a file of the bundle")
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
                              "input": classifier.net.describe(), "results": results, "skipped": skipped}, indent=1))
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
