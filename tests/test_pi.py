"""The Raspberry Pi path on aarch64 under user-mode emulation: Debian bookworm (Python 3.11) and
trixie (Python 3.13), both on Debian 13's qemu 10 (tools/pi_sysroot.py builds and caches them).

Bundles are exported here on x86 (`edge-effnet export`): lite0 fp32 and int8 with its ImageNet
weights as .tflite + .onnx (`--format tflite,onnx`: the bundle the README tells Pi users to make),
and b0 int8 (.tflite). Each emulated Pi (a Raspberry Pi 4's Cortex-A72) has one runtime extra of
setup.cfg as pip resolves it for the Pi, and nothing else but edge_effnet:
  bookworm  litert (`runtime`: ai-edge-litert) and tflite-runtime (`runtime-legacy`: 2.14, numpy < 2)
  trixie    litert (`runtime`) and onnxruntime (`runtime-onnx`: no LiteRT, so the .onnx files run)
There `edge-effnet bench BUNDLE...` and tools/rpi_classify.py BUNDLE must pick the file that
runtime runs, give the x86 top-1 class on a real photo with close probabilities, and import no
TensorFlow (none is installed there); a bundle no installed runtime opens is one line naming
what to install.

Emulated times are not latencies: nothing here reads or reports them.
"""
from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, photo_path, run_cli
from edge_effnet.runtime import onnx_int8_exact

pytestmark = pytest.mark.emulated  # in the default run and CI (a few minutes)
RELEASES = ("bookworm", "trixie")
SITES = [("bookworm", "litert"), ("bookworm", "tflite-runtime"), ("trixie", "litert"), ("trixie", "onnxruntime")]
SUFFIX = {"litert": ".tflite", "tflite-runtime": ".tflite", "onnxruntime": ".onnx"}
MODULE = {"litert": "ai_edge_litert", "tflite-runtime": "tflite_runtime", "onnxruntime": "onnxruntime"}
DIST = {"litert": "ai-edge-litert", "tflite-runtime": "tflite-runtime", "onnxruntime": "onnxruntime"}
HEAVY = ("tensorflow", "keras", "tf_keras", "onnx", "onnxruntime", "torch", "jax")
CLASSIFIER = os.path.join(ROOT, "tools", "rpi_classify.py")
BUNDLES = {"bookworm": ("lite0-fp32", "lite0-int8", "b0-int8"), "trixie": ("lite0-fp32", "lite0-int8")}
CATS = (281, 282, 283, 284, 285)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat
NUM_CALIB = 32

# Runs a module (-m style) or a script, then records what it imported (also when it exits with an error).
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


def load_tool():
    spec = importlib.util.spec_from_file_location("pi_sysroot", os.path.join(ROOT, "tools", "pi_sysroot.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


class Run:
    """One finished run: exit code, output, and what the interpreter had imported at exit."""

    def __init__(self, what: str, done: subprocess.CompletedProcess, modules: dict):
        self.what, self.returncode, self.stdout, self.stderr = what, done.returncode, done.stdout, done.stderr
        self.modules = modules

    def check(self) -> "Run":
        """Fail the test with the tool's own one-line error (e.g. the op a runtime cannot open)."""
        if self.returncode != 0:
            lines = [line for line in self.stderr.strip().splitlines() if "INFO:" not in line]
            pytest.fail(f"{self.what} failed (exit {self.returncode}): {lines[-1] if lines else 'no output'}",
                        pytrace=False)
        return self

    def json(self):
        return json.loads(self.stdout[self.stdout.index("{"):])


class EmulatedPi:
    def __init__(self, sysroot, workdir: str):
        self.sysroot, self.workdir = sysroot, workdir
        self.project = load_tool().project_copy(os.path.join(workdir, "project"))
        self.wrapper = os.path.join(workdir, "wrapper.py")
        with open(self.wrapper, "w") as f:
            f.write(WRAPPER)

    def version(self, runtime: str, arch: str = "aarch64") -> str:
        return self.sysroot.versions[f"{arch}/{runtime}"]["runtime"]

    def run(self, runtime: str, target: str, *args, arch: str = "aarch64", timeout: float = 1200) -> Run:
        """python3.X TARGET ARGS (a module name or a .py path) with only `runtime`'s site folder and
        edge_effnet: emulated on aarch64, or natively on x86_64 with the same runtime version."""
        report = os.path.join(self.workdir, f"modules-{time.monotonic_ns()}.json")
        argv = [self.wrapper, report, target, *map(str, args)]
        cmd, env = self.sysroot.command(runtime, argv, (self.project,), arch)
        done = subprocess.run(cmd, env=env, cwd=self.workdir, capture_output=True, text=True, timeout=timeout)
        modules = {}
        if os.path.exists(report):
            with open(report) as f:
                modules = json.load(f)
        return Run(f"{os.path.basename(target)} ({self.sysroot.release_name} {runtime}, {arch})", done, modules)


@pytest.fixture(scope="module")
def building(tmp_path_factory):
    """Both emulated Pis, built (cold) in the background while the bundles are exported."""
    tool = load_tool()
    start = time.monotonic()
    workdirs = {release: str(tmp_path_factory.mktemp(f"pi-{release}")) for release in RELEASES}  # not in threads

    def build(release: str):
        try:
            sysroot = tool.ensure(release=release)
        except tool.ProductError as exc:  # the product fails there: a failure, in CI or not
            return f"FAIL the emulated Raspberry Pi ({release}): {exc}"
        except tool.SysrootError as exc:  # this machine cannot build it (no debootstrap, root, network)
            return f"no emulated Raspberry Pi ({release}): {exc}"
        print(f"\npi sysroot {release} ready after {time.monotonic() - start:.0f} s: {sysroot.root}")
        return EmulatedPi(sysroot, workdirs[release])

    pool = concurrent.futures.ThreadPoolExecutor(len(RELEASES))
    futures = {release: pool.submit(build, release) for release in RELEASES}
    yield futures
    pool.shutdown(wait=True)


def ready(pis: dict, release: str) -> EmulatedPi:
    """The release's emulated Pi, or this test failed / skipped in one line: failed when the product
    fails there (a runtime that does not import), and in CI (.ci/run installs debootstrap, so a Pi
    that cannot be built is a failure too); skipped outside CI when this machine cannot build it."""
    pi = pis[release]
    if isinstance(pi, str):
        (pytest.fail if pi.startswith("FAIL ") or os.environ.get("CI") else pytest.skip)(pi)
    return pi


# ------------------------------------------------------------------------------------------ x86 side

def photo_classifier(spec, path: str, margin: float = 4.0) -> str:
    """`spec`'s network as a .keras file that acts like a trained one on scikit-image's photos.

    No trained B-series weights can be downloaded here, and a random EfficientNet's scores are
    uniform (top-1 would be noise). models.data_init gives it the photos' batch-norm statistics;
    then a least-squares linear head maps photo i to class i with a logit margin of `margin`
    (chelsea = class 0 with about 0.92; the other classes keep visible probabilities).
    """
    from edge_effnet.data import load_image
    from edge_effnet.model.keras_io import create_model, data_init
    from edge_effnet.console import import_keras
    from edge_effnet.evaluate.photoset import PHOTOS

    keras = import_keras()
    keras.utils.set_random_seed(0)
    photos = PHOTOS[:6]
    assert photos[0] == "chelsea.png"
    x = np.stack([load_image(photo_path(p), spec.resolution) for p in photos]).astype(np.float32)
    model = create_model(spec, None, batch_size=1, num_classes=len(photos), dropout=0.0, drop_connect=0.0)
    data_init(model, x)
    head = model.get_layer("predictions")
    features = keras.Model(model.inputs, head.input)
    feats = np.concatenate([np.asarray(features(x[i:i + 1])) for i in range(len(x))])
    centred = feats - feats.mean(0)
    kernel = np.linalg.pinv(centred) @ (margin * (np.eye(len(photos)) - 1.0 / len(photos)))
    head.set_weights([kernel, -feats.mean(0) @ kernel])
    model.save(path)
    return path


def patch_op_version(src: str, dst: str, op: str = "CONV_2D", version: int = 99) -> None:
    """Copy a .tflite file with `op`'s version set to one no runtime knows."""
    from edge_effnet.console import import_keras

    import_keras()
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    code = getattr(schema.BuiltinOperator, op)
    model = flatbuffer_utils.read_model(src)
    patched = [c for c in model.operatorCodes if max(c.builtinCode, c.deprecatedBuiltinCode) == code]
    assert patched, f"{src} has no {op}"
    for c in patched:
        c.version = version
    flatbuffer_utils.write_model(model, dst)


def model_file(bundle: str, suffix: str = ".tflite") -> str:
    with open(os.path.join(bundle, "manifest.json")) as f:
        return os.path.join(bundle, next(r["file"] for r in json.load(f)["files"] if r["file"].endswith(suffix)))


@pytest.fixture(scope="module")
def bundles(building, tmp_path_factory):
    """Export on x86 (while `building` builds the Pis): lite0 fp32 and int8 as .tflite + .onnx
    (ImageNet weights, int8 calibrated on real photo crops) and b0 int8 (photo_classifier); plus a
    copy of the lite0 int8 bundle with CONV_2D at version 99 and one holding only its .onnx file."""
    from edge_effnet.evaluate.photoset import calibration_crops, write_photoset
    from edge_effnet.model.variants import get_variant

    out = tmp_path_factory.mktemp("bundles")
    calib = str(out / "calib")
    write_photoset(calib, calibration_crops(NUM_CALIB), 256)
    b0 = photo_classifier(get_variant("b0"), str(out / "b0-photos.keras"))
    both = ["--format", "tflite,onnx"]
    exports = {"lite0-fp32": ["--variant", "lite0", "--weights", "imagenet", "--fp32", *both],
               "lite0-int8": ["--variant", "lite0", "--weights", "imagenet", "--int8", *both],
               "b0-int8": ["--model", b0, "--int8"]}
    folders = {}
    for name, args in exports.items():
        calibration = ["--calib", calib, "--num-calib", NUM_CALIB] if "--int8" in args else []
        result = run_cli("export", *args, *calibration, "-o", out / name)
        assert result.returncode == 0, result.stderr
        folders[name] = str(out / name)
    bad = str(out / "lite0-int8-conv99")
    shutil.copytree(folders["lite0-int8"], bad)
    os.remove(model_file(bad, ".onnx"))
    patch_op_version(model_file(folders["lite0-int8"]), model_file(bad), "CONV_2D", 99)
    folders["bad"] = bad
    folders["onnx-only"] = str(out / "lite0-int8-onnx-only")
    shutil.copytree(folders["lite0-int8"], folders["onnx-only"])
    os.remove(model_file(folders["onnx-only"]))
    return folders


@pytest.fixture(scope="module")
def results(building, bundles):
    """Every run, two at a time (2 cores): per emulated Pi (release, runtime), `edge-effnet bench` on
    its bundle folders in one call and the classifier on each bundle (both choosing the file
    themselves), emulated; the classifier on x86 with the same runtime version; on bookworm the
    CONV_2D-99 bundle and, with LiteRT only, the .onnx-only bundle. Then the classifier on x86 with
    this environment's own runtimes (ai-edge-litert 2.3 for .tflite, onnxruntime for .onnx)."""
    pis = {release: future.result() for release, future in building.items()}
    chelsea = photo_path("chelsea.png")
    classify = ("--top", "1000", "--json")
    jobs = {}
    for release, runtime in SITES:
        pi = pis[release]
        if isinstance(pi, str):
            continue
        site = (release, runtime)
        record = os.path.join(pi.workdir, f"bench-{runtime}.json")
        jobs[site, "bench_record"] = lambda record=record: record
        folders = [bundles[b] for b in BUNDLES[release]]
        jobs[site, "bench"] = lambda pi=pi, r=runtime, record=record, folders=folders: pi.run(
            r, "edge_effnet", "bench", *folders, "--runs", 1, "--warmup", 0, "--json", record)
        for b in BUNDLES[release]:
            jobs[site, b] = lambda pi=pi, r=runtime, b=b: pi.run(r, CLASSIFIER, bundles[b], chelsea, *classify)
            jobs[site, "x86", b] = lambda pi=pi, r=runtime, b=b: pi.run(
                r, CLASSIFIER, bundles[b], chelsea, *classify, arch="x86_64")
        if release == "bookworm":
            jobs[site, "bad"] = lambda pi=pi, r=runtime: pi.run(r, CLASSIFIER, bundles["bad"], chelsea, *classify)
            jobs[site, "bad-bench"] = lambda pi=pi, r=runtime: pi.run(
                r, "edge_effnet", "bench", model_file(bundles["bad"]), "--runs", 1)
        if site == ("bookworm", "litert"):
            jobs[site, "onnx-only"] = lambda pi=pi: pi.run("litert", CLASSIFIER, bundles["onnx-only"], chelsea)
            jobs[site, "onnx-only-bench"] = lambda pi=pi: pi.run("litert", "edge_effnet", "bench",
                                                                 bundles["onnx-only"], "--runs", 1)
    for runtime, names in (("litert", BUNDLES["bookworm"]), ("onnxruntime", BUNDLES["trixie"])):
        for b in names:
            jobs["x86-own", runtime, b] = lambda b=b, r=runtime: subprocess.run(
                [sys.executable, CLASSIFIER, bundles[b], chelsea, *classify, "--runtime", r],
                capture_output=True, text=True, timeout=600)
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {key: pool.submit(job) for key, job in jobs.items()}
        done = {key: future.result() for key, future in futures.items()}
    print(f"\n{len(jobs)} runs done in {time.monotonic() - start:.0f} s (emulated: not latencies)")
    done["pis"] = pis
    for (release, runtime) in SITES:  # the measured differences, for the README's figures (not asserted here)
        for b in BUNDLES[release]:
            try:
                arm, x86 = (scores(done[(release, runtime), *key].json()) for key in ((b,), ("x86", b)))
                top, second = np.argsort(-arm)[:2]
                print(f"{release} {runtime} {b}: top-1 {top} {arm[top]:.3f}, runner-up {second} {arm[second]:.3f}, "
                      f"max |aarch64 - x86-64| = {np.abs(arm - x86).max():.5f}")
            except (KeyError, ValueError):
                print(f"{release} {runtime} {b}: no output")
    return done


def scores(result: dict) -> np.ndarray:
    (image,) = result["results"]
    top = image["top"]
    vector = np.zeros(len(top))
    for item in top:
        vector[item["index"]] = item["score"]
    return vector


# Largest probability difference allowed between aarch64 and x86-64 for the same file and runtime
# version. fp32 agrees. Full-integer int8 does not agree bit for bit: the runtimes' int8 kernels
# round differently per architecture. Measured (largest over runs): lite0 int8 (ImageNet weights)
# 0 on ai-edge-litert and onnxruntime, up to 0.016 on tflite-runtime 2.14; b0 int8 (random weights,
# a photo head: swish and squeeze-excite add int8 LOGISTIC/MUL that carry one rounding step far)
# up to 0.078 on ai-edge-litert and 0.176 on tflite-runtime. The top-1 class must not change
# (same_top1). README: Raspberry Pi.
TOLERANCE = {"lite0-fp32": 1e-5, "lite0-int8": 0.05, "b0-int8": 0.25}
# Against this project's own runtime on x86 when it is another one (tflite-runtime 2.14's built-in
# int8 kernels against LiteRT's XNNPACK ones: up to 0.16 measured on b0) or another version
# (onnxruntime 1.32 on the Pi, 1.31 here).
TOLERANCE_ACROSS_RUNTIMES = {"lite0-fp32": 1e-5, "lite0-int8": 0.25, "b0-int8": 0.3}


def tolerance(bundle: str, table: dict = TOLERANCE) -> float:
    return table[bundle]


def assert_light(run: Run, runtime: str) -> None:
    assert run.modules["machine"] == "aarch64"
    assert not run.modules["tensorflow_installed"]
    heavy = [m for m in run.modules["modules"] if m.split(".")[0] in HEAVY and m.split(".")[0] != MODULE[runtime]]
    assert not heavy, heavy[:5]


def site_of(results, release: str, runtime: str):
    pi = ready(results["pis"], release)
    return pi, (release, runtime)


# ------------------------------------------------------------------------------------------ the tests

@pytest.mark.parametrize("release, runtime, bundle", [(r, rt, b) for r, rt in SITES for b in BUNDLES[r]])
def test_classifier_on_aarch64_matches_x86(results, bundles, release, runtime, bundle):
    pi, site = site_of(results, release, runtime)
    arm_run = results[site, bundle].check()
    assert_light(arm_run, runtime)
    arm, x86 = arm_run.json(), results[site, "x86", bundle].check().json()
    assert arm["model"].endswith(SUFFIX[runtime]) and arm["model"] == x86["model"]  # the file it chose
    assert f"{arm['model']} in " in arm_run.stderr
    assert arm["runtime"] == x86["runtime"] == f"{runtime} {pi.version(runtime)}"
    kind = "onnxruntime" if runtime == "onnxruntime" else "litert"
    own = results["x86-own", kind, bundle]
    assert own.returncode == 0, own.stderr
    own = json.loads(own.stdout)
    assert own["runtime"].startswith(f"{kind} ") and own["model"] == arm["model"]
    arm_scores, x86_scores, own_scores = scores(arm), scores(x86), scores(own)
    if runtime == "onnxruntime" and bundle.endswith("int8") and not onnx_int8_exact():
        # this CPU's onnxruntime int8 kernels saturate (runtime.SATURATION_NOTE), the Pi's do not: the
        # Pi is compared with the file as it is defined, run here with onnxruntime's int8 fusions off
        x86_scores = own_scores = defined_scores(os.path.join(bundles[bundle], arm["model"]))
    top1 = int(np.argmax(own_scores))
    # the photo is recognised on x86: a cat for the ImageNet lite0, class 0 (chelsea) for b0's photo head
    expected = CATS if bundle.startswith("lite0") else (0,)
    assert top1 in expected, own["results"][0]["top"][:3]
    assert int(np.argmax(arm_scores)) in expected, arm["results"][0]["top"][:3]
    across = TOLERANCE if runtime == "litert" else TOLERANCE_ACROSS_RUNTIMES  # another version or kernel set
    print(f"\n{release} {runtime} {bundle}: max |aarch64 - x86-64 own {kind}| = "
          f"{np.abs(arm_scores - own_scores).max():.5f}")
    assert same_top1(arm_scores, x86_scores, tolerance(bundle))
    assert same_top1(arm_scores, own_scores, tolerance(bundle, across))
    np.testing.assert_allclose(arm_scores, x86_scores, rtol=0, atol=tolerance(bundle))
    np.testing.assert_allclose(arm_scores, own_scores, rtol=0, atol=tolerance(bundle, across))


def defined_scores(path: str) -> np.ndarray:
    """The chelsea scores of an int8 .onnx file in this environment's onnxruntime, int8 fusions off."""
    from edge_effnet.data import load_image
    from edge_effnet.runtime import open_model

    runner = open_model(path, reference_qdq=True)
    return runner.classify(load_image(photo_path("chelsea.png"), runner.input_shape[1])).ravel()


def same_top1(a: np.ndarray, b: np.ndarray, atol: float) -> bool:
    """a's top-1 class is b's, or int8 kernels that round differently swapped two classes b scores
    within atol of each other (chelsea in lite0 int8: tiger cat and Egyptian cat are close; with
    the measured calibration ranges, tflite-runtime 2.14 on aarch64 and on x86-64 picked different ones)."""
    i, j = int(np.argmax(a)), int(np.argmax(b))
    return i == j or b[j] - b[i] <= atol


@pytest.mark.parametrize("release, runtime", SITES)
def test_bench_on_aarch64_picks_the_file_its_runtime_runs(results, bundles, release, runtime):
    pi, site = site_of(results, release, runtime)
    run = results[site, "bench"].check()
    assert_light(run, runtime)
    with open(results[site, "bench_record"]) as f:
        record = json.load(f)
    assert record["machine"]["machine"] == "aarch64"
    expected = [model_file(bundles[b], SUFFIX[runtime]) for b in BUNDLES[release]]
    assert [m["path"] for m in record["models"]] == expected
    for entry in record["models"]:
        assert (entry["backend"], entry["backend_version"]) == (runtime, pi.version(runtime))
        assert entry["runs"] == 1 and len(entry["runs_ms"]) == 1  # a run happened; its time means nothing here
    for b, path in zip(BUNDLES[release], expected):  # one line per folder: which file, which runtime
        assert f"{os.path.basename(bundles[b])}/: {os.path.basename(path)} in " in run.stderr, run.stderr


@pytest.mark.parametrize("runtime", ["litert", "tflite-runtime"])
def test_unknown_op_version_fails_with_the_op_name(results, runtime):
    pi, site = site_of(results, "bookworm", runtime)
    for key in ("bad", "bad-bench"):
        run = results[site, key]
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
        with pytest.raises(pytest.fail.Exception, match="CONV_2D.*99"):
            run.check()  # how a bundle with too-new op versions fails this test: the op is named
    assert "op CONV_2D version 99" in results[site, "bad-bench"].stderr


def test_bundle_no_installed_runtime_opens_is_one_line(results):
    """bookworm with LiteRT only, a bundle with only an .onnx file: one line naming what to install."""
    pi, site = site_of(results, "bookworm", "litert")
    hints = {"onnx-only": "pip install onnxruntime", "onnx-only-bench": "pip install 'edge-effnet[runtime-onnx]'"}
    for key, hint in hints.items():
        run = results[site, key]
        lines = [line for line in run.stderr.strip().splitlines() if line]
        assert run.returncode == 2 and len(lines) == 1, run.stderr
        assert "lite0-int8-onnx-only/ holds lite0_int8.onnx, but onnxruntime is not installed" in lines[0]
        assert lines[0].endswith(hint), lines[0]


def test_bundle_manifest_names_the_runtime_each_file_was_checked_in(bundles):
    for b in ("lite0-fp32", "lite0-int8"):
        with open(os.path.join(bundles[b], "manifest.json")) as f:
            files = {os.path.splitext(r["file"])[1]: r for r in json.load(f)["files"]}
        assert set(files) == {".tflite", ".onnx"}
        assert [v.split()[0] for v in files[".tflite"]["verified_runtimes"]] == ["litert"]
        assert [v.split()[0] for v in files[".onnx"]["verified_runtimes"]] == ["onnxruntime"]


@pytest.mark.parametrize("release, runtime", SITES)
def test_runtime_extra_resolves_to_aarch64_wheels(building, release, runtime):
    """What pip installed for the Pi from setup.cfg's extra: aarch64 wheels for the Pi's Python.
    (After the tests that export: run first, it would hold the exports back until both Pis are built.)"""
    pi = ready({release: building[release].result()}, release)
    installed = load_tool().resolved(pi.sysroot, runtime)
    python = "cp311" if release == "bookworm" else "cp313"
    print(f"\n{release} {runtime}: " + ", ".join(f"{i['name']} {i['version']}" for i in installed))
    dist = DIST[runtime]
    (wheel,) = [i["wheel"] for i in installed if i["name"].lower() == dist]
    assert f"-{python}-" in wheel and wheel.endswith("_aarch64.whl"), wheel
    assert {"numpy", "pillow", "click"} <= {i["name"].lower() for i in installed}
    for i in installed:  # every compiled wheel is for the Pi: aarch64 and this Python (or the stable ABI)
        assert i["wheel"].endswith(("-any.whl", "_aarch64.whl")), i["wheel"]
    others = {DIST[o] for o in DIST if o != runtime}  # one runtime per site: each picks its own files
    assert not {i["name"].lower() for i in installed} & others
    assert pi.version(runtime) == [i["version"] for i in installed if i["name"].lower() == dist][0]
