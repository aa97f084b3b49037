"""The Raspberry Pi path on aarch64 (Debian bookworm, Python 3.11) under user-mode emulation.

Models are converted here on x86 and run on an emulated aarch64 python3.11 with only the light
runtime (ai-edge-litert 1.4.0 / tflite-runtime 2.14.0 aarch64 wheels, numpy, pillow, click and
edge_effnet): outputs must match x86 and no TensorFlow may be imported (none is installed there).
The sysroot is built once by tools/pi_sysroot.py and cached. Emulated times are not latencies:
nothing here looks at them.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import time

import numpy as np
import pytest

from conftest import ROOT, photo_path

pytestmark = pytest.mark.slow
RUNTIMES = ("litert", "tflite-runtime")
HEAVY = ("tensorflow", "keras", "tf_keras", "onnx", "onnxruntime", "torch", "jax")

# Runs a module (-m style) or a script in the emulated interpreter, then records what was imported.
WRAPPER = r"""
import atexit, importlib.util, json, platform, runpy, sys
report, target, args = sys.argv[1], sys.argv[2], sys.argv[3:]
def dump():
    with open(report, "w") as f:
        json.dump({"machine": platform.machine(), "modules": sorted(sys.modules),
                   "tensorflow_installed": importlib.util.find_spec("tensorflow") is not None}, f)
atexit.register(dump)
sys.argv = [target] + args
if target.endswith(".py"):
    runpy.run_path(target, run_name="__main__")
else:
    runpy.run_module(target, run_name="__main__", alter_sys=True)
"""

# Classifies pixels saved as .npy with edge_effnet.runtime (the library path an app uses).
CLASSIFY = r"""
import json, sys
import numpy as np
from edge_effnet.errors import UserError
from edge_effnet.runtime import open_model
model, backend, pixels = sys.argv[1:4]
try:
    runner = open_model(model, backend)
except UserError as exc:
    sys.exit(f"error: {exc}")
print(json.dumps({"backend": runner.backend, "version": runner.version,
                  "scores": runner.classify(np.load(pixels)).tolist()}))
"""


def load_tool():
    spec = importlib.util.spec_from_file_location("pi_sysroot", os.path.join(ROOT, "tools", "pi_sysroot.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


class EmulatedPi:
    def __init__(self, sysroot, workdir: str):
        self.sysroot, self.workdir = sysroot, workdir
        self.project = load_tool().project_copy(os.path.join(workdir, "project"))
        self.wrapper = os.path.join(workdir, "wrapper.py")
        self.classify_script = os.path.join(workdir, "classify.py")
        for path, text in ((self.wrapper, WRAPPER), (self.classify_script, CLASSIFY)):
            with open(path, "w") as f:
                f.write(text)

    def python(self, runtime: str, *argv, arch: str = "aarch64", timeout: float = 900) -> subprocess.CompletedProcess:
        """python3.11 ARGV with only `runtime`'s wheels and edge_effnet (aarch64: emulated; x86_64: the
        host's Python with the same wheel versions, as the reference)."""
        cmd, env = self.sysroot.command(runtime, [str(a) for a in argv], (self.project,), arch)
        return subprocess.run(cmd, env=env, cwd=self.workdir, capture_output=True, text=True, timeout=timeout)

    def traced(self, runtime: str, target: str, *args, arch: str = "aarch64",
               timeout: float = 900) -> tuple[subprocess.CompletedProcess, dict]:
        """Run `target` (module name or .py path) with ARGS; also return what it imported."""
        report = os.path.join(self.workdir, f"modules-{time.monotonic_ns()}.json")
        done = self.python(runtime, self.wrapper, report, target, *args, arch=arch, timeout=timeout)
        with open(report) as f:
            return done, json.load(f)

    def classify(self, runtime: str, model: str, pixels: str, arch: str = "aarch64") -> tuple[dict, dict]:
        """edge_effnet.runtime on `model` with the pixels saved in `pixels` (.npy): (result, imports)."""
        done, modules = self.traced(runtime, self.classify_script, model, runtime, pixels, arch=arch)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1]), modules


@pytest.fixture(scope="module")
def pi(tmp_path_factory):
    tool = load_tool()
    start = time.monotonic()
    try:
        sysroot = tool.ensure()
    except tool.SysrootError as exc:  # CI installs debootstrap + qemu-user-static (.ci/run): never skip there
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"no emulated Raspberry Pi: {exc}")
    print(f"\npi sysroot ready in {time.monotonic() - start:.0f} s: {sysroot.root}")
    return EmulatedPi(sysroot, str(tmp_path_factory.mktemp("pi")))


def assert_light(modules: dict) -> None:
    assert modules["machine"] == "aarch64"
    assert not modules["tensorflow_installed"]
    assert not [m for m in modules["modules"] if m.split(".")[0] in HEAVY]


def assert_same_prediction(scores, reference, atol: float) -> None:
    scores, reference = np.asarray(scores), np.asarray(reference)
    assert scores.shape == reference.shape
    assert int(scores.argmax()) == int(reference.argmax())
    np.testing.assert_allclose(scores, reference, rtol=0, atol=atol)


def tolerance(mode: str, runtime: str, output_scale: float) -> float:
    """Largest probability difference allowed between aarch64 and x86_64 for the same file and runtime.

    Measured here: fp32 agrees to ~1e-6; ai-edge-litert's int8 (XNNPACK) within one output step;
    tflite-runtime 2.14's int8 kernels differ between the architectures by up to ~8 steps of
    1/256 on the tiny model (different rounding in its x86 and NEON paths), top-1 unchanged.
    """
    if mode != "int8":
        return 1e-5
    return 1.01 * output_scale if runtime == "litert" else 0.05


def patch_op_version(src: str, dst: str, op: str = "CONV_2D", version: int = 99) -> None:
    """Copy a .tflite file with `op`'s version set to one no runtime knows."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    code = getattr(schema.BuiltinOperator, op)
    model = flatbuffer_utils.read_model(src)
    patched = [c for c in model.operatorCodes if max(c.builtinCode, c.deprecatedBuiltinCode) == code]
    assert patched, f"{src} has no {op}"
    for c in patched:
        c.version = version
    flatbuffer_utils.write_model(model, dst)


# --- a tiny model converted here with tf.lite: fp32 and full-integer int8 ------------------------------------

PHOTOS = ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "motorcycle_left.png", "retina.jpg")


def photo_classifier(spec, batch_size: int | None = 1, margin: float = 4.0, seed: int = 0):
    """`spec`'s network, random weights made to act like a trained one on scikit-image's photos.

    No trained weights can be downloaded here, and a randomly initialised EfficientNet gives a
    near-uniform softmax (top-1 would be noise). So: batch-norm statistics are taken from the
    photos (one training-mode pass with momentum 0), then a least-squares linear head maps photo i
    to class i with a logit margin of `margin` (the other classes keep visible probabilities).
    """
    from edge_effnet.builder import build_model
    from edge_effnet.data import load_image
    from edge_effnet.models import import_keras

    keras = import_keras()
    keras.utils.set_random_seed(seed)
    x = np.stack([load_image(photo_path(p), spec.resolution) for p in PHOTOS]).astype(np.float32)
    model = build_model(spec, batch_size=None, num_classes=len(PHOTOS), dropout=0.0, drop_connect=0.0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    model(np.concatenate([x, x[:, :, ::-1]]), training=True)
    features = keras.Model(model.inputs, model.get_layer("avg_pool").output)(x).numpy()
    centred = features - features.mean(0)
    target = margin * (np.eye(len(PHOTOS)) - 1.0 / len(PHOTOS))  # photo i: logit margin on class i
    kernel = np.linalg.pinv(centred) @ target
    model.get_layer("predictions").set_weights([kernel, -features.mean(0) @ kernel])
    if batch_size is None:
        return model
    static = build_model(spec, batch_size=batch_size, num_classes=len(PHOTOS), dropout=0.0)
    static.set_weights(model.get_weights())
    return static


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small EfficientNet (width/depth 0.25, 64 px, batch 1) as fp32 and full-integer int8 .tflite."""
    from edge_effnet.data import load_image
    from edge_effnet.models import import_keras
    from edge_effnet.variants import from_scaling

    import_keras()
    import tensorflow as tf

    out = tmp_path_factory.mktemp("tiny")
    spec = from_scaling(0.25, 0.25, 64)
    model = photo_classifier(spec)
    calib = np.stack([load_image(photo_path(p), 64) for p in PHOTOS]).astype(np.float32)
    np.save(out / "chelsea.npy", calib[0].astype(np.uint8))
    files = {}
    for mode in ("fp32", "int8"):
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
        if mode == "int8":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = lambda: ([x[None]] for x in calib)
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = converter.inference_output_type = tf.uint8
        path = out / f"tiny-{mode}.tflite"
        path.write_bytes(converter.convert())
        files[mode] = str(path)
    return {"files": files, "pixels": str(out / "chelsea.npy"), "dir": out}


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("mode", ["fp32", "int8"])
def test_tiny_model_matches_x86_on_aarch64(pi, tiny, runtime, mode):
    from edge_effnet.runtime import open_model

    path = tiny["files"][mode]
    x86, x86_modules = pi.classify(runtime, path, tiny["pixels"], arch="x86_64")
    arm, arm_modules = pi.classify(runtime, path, tiny["pixels"])
    assert arm["backend"] == x86["backend"] == runtime
    assert arm["version"] == x86["version"] == {"litert": "1.4.0", "tflite-runtime": "2.14.0"}[runtime]
    assert x86_modules["machine"] == "x86_64"
    assert_light(arm_modules)
    scale = open_model(path, "litert").outputs[0]["scale"]
    # the same runtime version on both architectures
    assert_same_prediction(arm["scores"], x86["scores"], tolerance(mode, runtime, scale))
    # and the class the project's own x86 runtime (ai-edge-litert 2.3, the export's self-check) gives
    reference = open_model(path, "litert").classify(np.load(tiny["pixels"]))
    assert reference.argmax() == 0 and reference.max() > 0.5  # chelsea is class 0, decisively
    assert_same_prediction(arm["scores"], reference, 1e-5 if mode == "fp32" else 0.05)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_unknown_op_version_names_the_op(pi, tiny, runtime):
    bad = str(tiny["dir"] / "tiny-int8-conv99.tflite")
    patch_op_version(tiny["files"]["int8"], bad, "CONV_2D", 99)
    done = pi.python(runtime, pi.classify_script, bad, runtime, tiny["pixels"])
    assert done.returncode != 0
    assert "op CONV_2D version 99" in done.stderr and "Traceback" not in done.stderr, done.stderr
