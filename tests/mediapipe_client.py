"""Open a .tflite file as an Android app does today, with MediaPipe Tasks' ImageClassifier (the
Python package runs the same C++ task), and with LiteRT on the same pixels; print JSON.

    python tests/mediapipe_client.py MODEL.tflite IMAGE

The image is made RGB at the model's resolution once (whole image, bilinear), so both runtimes
get exactly the same pixels. Run in its own process: MediaPipe's and TensorFlow's native
libraries are kept apart. Also prints what MediaPipe's MetadataDisplayer reads from the file.
"""
from __future__ import annotations

import json
import sys
import types

import numpy as np
from PIL import Image


def litert_scores(path: str, pixels: np.ndarray) -> tuple[np.ndarray, float]:
    """Dequantized scores and the output's quantization step (0 for float outputs)."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=path, num_threads=1)
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    interp.set_tensor(inp["index"], pixels[None].astype(inp["dtype"]))
    interp.invoke()
    y = interp.get_tensor(out["index"])[0].astype(np.float64)
    scale, zero = out["quantization"]
    if out["dtype"] != np.float32 and scale:
        return (y - zero) * scale, float(scale)
    return y, 0.0


def displayed(path: str) -> dict:
    """What MediaPipe's MetadataDisplayer reads back. mediapipe 1.2.2's metadata module imports an
    extension it does not ship (used only to write metadata): a stand-in lets it import."""
    package = "mediapipe.tasks.cc.metadata.python"
    try:
        __import__(package + "._pywrap_metadata_version")
    except ImportError:
        stub = types.ModuleType(package + "._pywrap_metadata_version")
        stub.GetMinimumMetadataParserVersion = lambda *a: "1.0.0"
        sys.modules.setdefault(package, types.ModuleType(package))._pywrap_metadata_version = stub
        sys.modules[stub.__name__] = stub
    from mediapipe.tasks.python.metadata import metadata

    displayer = metadata.MetadataDisplayer.with_model_file(path)
    md = json.loads(displayer.get_metadata_json())
    tensor_in = md["subgraph_metadata"][0]["input_tensor_metadata"][0]
    files = displayer.get_packed_associated_file_list()
    labels = displayer.get_associated_file_buffer(files[0]).decode().splitlines() if files else []
    units = tensor_in.get("process_units") or [{}]
    options = units[0].get("options", {})
    return {"name": md.get("name"), "min_parser_version": md.get("min_parser_version"),
            "mean": options.get("mean"), "std": options.get("std"), "stats": tensor_in.get("stats"),
            "color_space": tensor_in.get("content", {}).get("content_properties", {}).get("color_space"),
            "packed_files": files, "labels": labels,
            "output_files": md["subgraph_metadata"][0]["output_tensor_metadata"][0].get("associated_files")}


def main(path: str, image: str) -> dict:
    import mediapipe as mp
    from mediapipe.tasks.python import BaseOptions, vision

    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=path)
    _, height, width, _ = interp.get_input_details()[0]["shape"]
    with Image.open(image) as img:
        pixels = np.ascontiguousarray(np.asarray(img.convert("RGB").resize((int(width), int(height)), Image.BILINEAR)))
    options = vision.ImageClassifierOptions(base_options=BaseOptions(model_asset_path=path), max_results=5)
    with vision.ImageClassifier.create_from_options(options) as classifier:
        result = classifier.classify(mp.Image(image_format=mp.ImageFormat.SRGB, data=pixels))
    top = [{"index": c.index, "name": c.category_name, "score": float(c.score)}
           for c in result.classifications[0].categories]
    scores, step = litert_scores(path, pixels)
    return {"mediapipe_top": top, "litert_top1": int(np.argmax(scores)), "litert_top1_score": float(scores.max()),
            "output_step": step,
            "max_score_diff": max(abs(c["score"] - scores[c["index"]]) for c in top) if top else None,
            "metadata": displayed(path)}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
