"""The bad-input catalog (issue 16): every command, real runs in a fresh interpreter.

Each case runs `edge-effnet ARGS` in a folder holding a copy of the user's files (a tiny trained-
shape model, its bundle, images good and bad, arrays, notes, a folder of their own) and checks:
the exit code; exactly the expected stderr lines (one for an error: no traceback, no progress
chatter); no temporary `.NAME.partial-*` / `.NAME.old-*` left anywhere; every file the user had is
byte-for-byte as before (only the command's own outputs may appear). Interrupt cases send SIGINT /
SIGTERM / SIGKILL at several points of `export` and `train` and check what is left.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from typing import Callable, NamedTuple

import numpy as np
import pytest

from conftest import cli_env, run_cli

TINY = ["--width", "0.25", "--depth", "0.25", "--resolution", "32"]
TFLITE = "bundle/m_fp32.tflite"


class Case(NamedTuple):
    argv: list
    code: int = 2
    message: str | None = None          # expected in the one stderr line
    lines: int = 1                      # stderr lines expected
    setup: Callable | None = None       # setup(folder) before the run
    new: tuple = ()                     # outputs the command may create or replace (relative paths)
    signal: tuple | None = None         # (signum, when): when = seconds "@1.5" or a glob that appears
    after: Callable | None = None       # after(folder, result) for checks of its own
    umask: int | None = None
    fsize: int | None = None            # RLIMIT_FSIZE in bytes (a full disk, as writes see it)


def _labels5(d):
    (d / "bundle" / "labels.txt").write_text("a\nb\nc\nd\ne\n")


def _all_bad(d):
    for c in ("0", "1", "2"):
        (d / "allbad" / c).mkdir(parents=True)
        (d / "allbad" / c / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")


def _locked(d):
    (d / "locked").mkdir()
    (d / "locked").chmod(0o500)


def _user_history(d):
    (d / "t.history.json").write_text('{"mine": true}\n')


def _user_ckpt(d):
    (d / "t.ckpt").mkdir()
    (d / "t.ckpt" / "diary.txt").write_text("not a checkpoint\n")


READ_ONLY = "/sys/x.keras" if os.geteuid() == 0 else "locked/x.keras"  # root ignores permission bits


def _export_killed(d, result):
    assert result.returncode == -signal.SIGKILL
    left = glob.glob(str(d / ".bundle.partial-*"))
    assert left, "the kill came too late to leave a temporary folder"
    rerun = _run(d, ["export", "--model", "m.keras", "-o", "bundle", "--force"], umask=0o027)
    assert rerun.returncode == 0 and rerun.stderr == "", rerun.stderr
    assert not glob.glob(str(d / ".bundle.*")), "the rerun did not clean up after the killed run"
    manifest = json.loads((d / "bundle" / "manifest.json").read_text())
    assert manifest["files"][0]["file"] == "m_fp32.tflite"
    for name in os.listdir(d / "bundle"):  # rule 7: the user's umask, like any program's files
        assert os.stat(d / "bundle" / name).st_mode & 0o777 == 0o640, name
    assert os.stat(d / "bundle").st_mode & 0o777 == 0o750


def _train_after_epoch(d, result):
    history = json.loads((d / "t.ckpt" / "history.json").read_text())
    done = max(r["epoch"] for r in history)
    assert sorted(os.listdir(d / "t.ckpt")) == sorted(["history.json", "run.json", f"epoch-{done:05d}.weights.h5"])
    resumed = _run(d, ["train", *TINY, "--data", "imgs", "--epochs", "3", "--batch-size", "4", "-o", "t.keras",
                       "--resume"])
    assert resumed.returncode == 0 and resumed.stderr == "", resumed.stderr
    epochs = [r["epoch"] for r in json.loads((d / "t.history.json").read_text())["history"]]
    assert epochs == [1, 2, 3] and not (d / "t.ckpt").exists()


def _train_before_epoch(d, result):
    names = sorted(os.listdir(d / "t.ckpt")) if (d / "t.ckpt").exists() else []
    assert names in ([], ["run.json"]), names  # nothing half-written; --resume starts at epoch 1


B = ["build", "--variant", "b0"]
T = ["train", *TINY, "--data", "imgs", "-o", "t.keras"]
S = ["search", "--data", "imgs", "--epochs", "1", "-o", "run"]
X = ["export", "--model", "m.keras"]
P = ["predict", TFLITE]
E = ["eval", TFLITE, "--data", "imgs"]

CASES = {
    # variants
    "variants-unknown-option": Case(["variants", "--bogus"], message="No such option"),
    "variants-extra-argument": Case(["variants", "b0"], message="unexpected extra argument"),
    # build: numbers (rule 3)
    "build-classes-huge": Case(["build", *TINY, "--num-classes", "2000000000", "-o", "n.keras"],
                               message="num classes must be in [1, 100,000]"),
    "build-width-nan": Case(["build", "--width", "nan", "--depth", "1", "-o", "n.keras"], message="finite"),
    "build-width-inf": Case(["build", "--width", "inf", "--depth", "1", "-o", "n.keras"], message="finite"),
    "build-width-huge": Case(["build", "--width", "1e6", "--depth", "1", "-o", "n.keras"], message="(0, 8]"),
    "build-depth-huge": Case(["build", "--width", "1", "--depth", "1e9", "-o", "n.keras"], message="(0, 20]"),
    "build-phi-huge": Case(["build", "--phi", "1e9", "-o", "n.keras"], message="phi must be in [0, 16]"),
    "build-resolution-huge": Case([*B, "--resolution", "100000", "-o", "n.keras"], message="[32, 4,096]"),
    "build-batch-zero": Case([*B, "--batch-size", "0", "-o", "n.keras"], message="batch size must be in"),
    # build: outputs (rules 1, 5)
    "build-exists": Case([*B, "-o", "m.keras"], message="pass --force"),
    "build-force-on-notes": Case([*B, "-o", "notes.txt", "--force"], message="must end in .keras"),
    "build-force-on-folder": Case([*B, "-o", "dir.keras", "--force"], message="is a directory"),
    "build-parent-is-file": Case([*B, "-o", "notes.txt/x.keras"], message="notes.txt is a file, not a folder"),
    "build-parent-missing": Case([*B, "-o", "nope/x.keras"], message="does not exist"),
    "build-read-only": Case([*B, "-o", READ_ONLY], message="not writable", setup=_locked),
    "build-disk-full": Case(["build", *TINY, "-o", "n.keras"], message="cannot write n.keras: File too large",
                            fsize=200_000),
    # edgetpu-check
    "edgetpu-truncated": Case(["edgetpu-check", "trunc.tflite"], message="trunc.tflite"),
    "edgetpu-not-tflite": Case(["edgetpu-check", "m.keras"], message="not a TensorFlow Lite model"),
    "edgetpu-folder": Case(["edgetpu-check", "mydata"], message="mydata"),
    "edgetpu-json-on-photo": Case(["edgetpu-check", TFLITE, "--json", "good.png", "--force"],
                                  message="must end in .json"),
    "edgetpu-json-exists": Case(["edgetpu-check", TFLITE, "--json", "report.json"], message="pass --force"),
    # bench
    "bench-runs-huge": Case(["bench", TFLITE, "--runs", "100000000000"], message="runs must be in [1, 100,000]"),
    "bench-runs-nan": Case(["bench", TFLITE, "--runs", "nan"], message="not a whole number"),
    "bench-threads-huge": Case(["bench", TFLITE, "--threads", "100000"], message="threads must be in [1, 256]"),
    "bench-warmup-negative": Case(["bench", TFLITE, "--warmup", "-1"], message="warmup must be in [0, 10,000]"),
    "bench-json-csv-same-file": Case(["bench", TFLITE, "--json", "o.json", "--csv", "o.json"],
                                     message="name the same file"),
    "bench-csv-on-notes": Case(["bench", TFLITE, "--csv", "notes.txt", "--force"], message="must end in .csv"),
    "bench-truncated-model": Case(["bench", "trunc.tflite"], message="trunc.tflite"),
    "bench-compare-not-record": Case(["bench", "--compare", "report.json", "report.json"],
                                     message="not an `edge-effnet bench --json` record"),
    "bench-writes-with-umask": Case(["bench", TFLITE, "--runs", "2", "--warmup", "0", "--json", "r.json",
                                     "--csv", "r.csv"], code=0, lines=0, new=("r.json", "r.csv"), umask=0o027,
                                    after=lambda d, r: [(os.stat(d / f).st_mode & 0o777 == 0o640) or
                                                        pytest.fail(f"{f} mode") for f in ("r.json", "r.csv")]),
    # predict (rule 4)
    "predict-truncated": Case([*P, "trunc.png"], message="trunc.png unreadable: image file is truncated"),
    "predict-bomb": Case([*P, "bomb.png"], message="decompression bomb"),
    "predict-not-images": Case([*P, "empty.png", "notes.txt"], message="none of the 2 image(s) could be read"),
    "predict-bad-mode-and-good": Case([*P, "bomb.png", "i32.tif", "good.png"], code=0,
                                      message="warning: bomb.png unreadable"),
    "predict-empty-folder": Case([*P, "emptydir"], message="no images"),
    "predict-top-zero": Case([*P, "good.png", "--top", "0"], message="top must be in [1, 1,000]"),
    "predict-not-keras": Case(["predict", "fake.keras", "good.png"], message="not a readable Keras model archive"),
    "predict-labels-mismatch": Case([*P, "good.png"], code=0, message="has 5 names but the model has 3 classes",
                                    setup=_labels5),
    # eval
    "eval-limit-zero": Case([*E, "--limit", "0"], message="limit must be in"),
    "eval-all-unreadable": Case(["eval", TFLITE, "--data", "allbad"], message="none of the 3 image(s) could be read",
                                setup=_all_bad),
    "eval-json-on-photo": Case([*E, "--json", "good.png", "--force"], message="must end in .json"),
    "eval-data-is-notes": Case(["eval", TFLITE, "--data", "notes.txt"], message="must be a folder or a .csv"),
    # export: outputs (rule 1)
    "export-force-on-cwd": Case([*X, "-o", ".", "--force"], message="the working folder"),
    "export-force-on-user-folder": Case([*X, "-o", "mydata", "--force"], message="not a bundle folder"),
    "export-force-on-file": Case([*X, "-o", "notes.txt", "--force"], message="it is a file, not a bundle folder"),
    "export-bundle-exists": Case([*X, "-o", "bundle"], message="pass --force"),
    "export-not-keras": Case(["export", "--model", "fake.keras", "-o", "x"], message="not a readable Keras model"),
    # export: calibration data (rule 4)
    "export-calib-nan": Case(["export", *TINY, "--int8", "--calib", "nan.npy", "-o", "x"], message="NaN"),
    "export-calib-strings": Case(["export", *TINY, "--int8", "--calib", "str.npy", "-o", "x"],
                                 message="pixels must be integers or floats"),
    "export-calib-out-of-range": Case(["export", *TINY, "--int8", "--calib", "big.npy", "-o", "x"],
                                      message="pixels must be in 0..255"),
    "export-calib-pickle": Case(["export", *TINY, "--int8", "--calib", "obj.npy", "-o", "x"],
                                message="not a plain .npy array"),
    "export-calib-all-unreadable": Case(["export", *TINY, "--int8", "--calib", "allbad", "-o", "x"],
                                        message="none of the 3 images in allbad could be read", setup=_all_bad),
    "export-num-calib-zero": Case(["export", *TINY, "--int8", "--num-calib", "0"], message="num calib must be in"),
    "export-two-modes": Case(["export", *TINY, "--int8", "--fp16"], message="conflict"),
    # export: interrupts (rule 6)
    "export-sigint-early": Case([*X, "-o", "bundle", "--force"], code=130, message="interrupted",
                                signal=(signal.SIGINT, "@1.5")),
    "export-sigint-converting": Case([*X, "-o", "bundle", "--force"], code=130, message="interrupted",
                                     signal=(signal.SIGINT, ".bundle.partial-*")),
    "export-sigterm-early": Case([*X, "-o", "bundle", "--force"], code=143, message="stopped by SIGTERM",
                                 signal=(signal.SIGTERM, "@1.5")),
    "export-sigkill-then-rerun": Case([*X, "-o", "bundle", "--force"], code=-9, lines=0, new=("bundle",),
                                      signal=(signal.SIGKILL, ".bundle.partial-*"), after=_export_killed),
    # train
    "train-epochs-huge": Case([*T, "--epochs", "1000000000"], message="epochs must be in [1, 10,000]"),
    "train-learning-rate-nan": Case([*T, "--learning-rate", "nan"], message="finite"),
    "train-validation-split-one": Case([*T, "--validation-split", "1"], message="validation split must be in (0, 1)"),
    "train-output-exists": Case([*T[:-1], "m.keras"], message="pass --force"),
    "train-history-exists": Case(T, message="t.history.json exists", setup=_user_history),
    "train-force-on-user-ckpt": Case([*T, "--force"], message="not a checkpoint folder", setup=_user_ckpt),
    "train-resume-nothing": Case([*T, "--resume"], message="nothing to resume"),
    "train-resume-and-force": Case([*T, "--resume", "--force"], message="contradict"),
    "train-all-unreadable": Case(["train", *TINY, "--data", "allbad", "-o", "t.keras"],
                                 message="none of the 3 images in allbad could be read", setup=_all_bad),
    "train-sigint-early": Case([*T, "--epochs", "8"], code=130, message="interrupted", signal=(signal.SIGINT, "@1.5"),
                               new=("t.ckpt", "t.ckpt/run.json"), after=_train_before_epoch),
    "train-sigint-first-epoch": Case([*T, "--epochs", "8", "--batch-size", "4"], code=130, message="interrupted",
                                     signal=(signal.SIGINT, "t.ckpt/run.json"), new=("t.ckpt", "t.ckpt/run.json"),
                                     after=_train_before_epoch),
    "train-sigint-after-epoch-then-resume": Case(
        [*T, "--epochs", "3", "--batch-size", "4"], code=130, message="interrupted",
        signal=(signal.SIGINT, "t.ckpt/history.json"), new=("t.keras", "t.history.json"), after=_train_after_epoch),
    # search
    "search-grid-step-tiny": Case([*S, "--grid-step", "0.0000001"], message="grid step must be in [0.01, 1]"),
    "search-grid-too-large": Case([*S, "--grid-step", "0.01"], message="more than the 500 a search may plan"),
    "search-tolerance-inf": Case([*S, "--tolerance", "inf"], message="finite"),
    "search-target-nan": Case([*S, "--target-macs", "nan"], message="finite"),
    "search-base-resolution-huge": Case([*S, "--base-resolution", "100000"], message="[32, 4,096]"),
    "search-output-is-file": Case([*S[:-1], "notes.txt"], message="exists"),
    "search-resume-nothing": Case([*S, "--resume"], message="nothing to resume"),
    # quant-report
    "quant-report-float-bundle": Case(["quant-report", "bundle"], message="no quantization report in bundle"),
    "quant-report-not-a-report": Case(["quant-report", "report.json"], message="is not a quantization report"),
    "quant-report-not-a-model": Case(["quant-report", "notes.txt"], message="not a bundle folder, report JSON"),
    "quant-report-no-reference": Case(["quant-report", TFLITE], message="pass --reference FLOAT.tflite"),
    "quant-report-reference-missing": Case(["quant-report", TFLITE, "--reference", "nope.tflite", "--calib", "imgs"],
                                           message="not found: nope.tflite"),
    "quant-report-json-exists": Case(["quant-report", "bundle", "--json", "report.json"], message="pass --force"),
    "quant-report-json-on-notes": Case(["quant-report", "bundle", "--json", "notes.txt", "--force"],
                                       message="must end in .json"),
}


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    """What a user has in the folder: a tiny 3-class model and its bundle (two real CLI runs), images
    good and bad, pixel arrays good and bad, notes, a report, a folder of their own."""
    from PIL import Image

    d = tmp_path_factory.mktemp("user")
    built = run_cli("build", *TINY, "--num-classes", "3", "-o", d / "m.keras")
    assert built.returncode == 0, built.stderr
    exported = run_cli("export", "--model", d / "m.keras", "-o", d / "bundle")
    assert exported.returncode == 0, exported.stderr
    rng = np.random.default_rng(0)
    for c in ("0", "1", "2"):
        (d / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(d / "imgs" / c / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(d / "good.png")
    good = (d / "good.png").read_bytes()
    (d / "trunc.png").write_bytes(good[:len(good) // 2])
    (d / "empty.png").write_bytes(b"")
    Image.new("L", (20000, 20000)).save(d / "bomb.png")  # 4e8 pixels: over Pillow's bomb limit
    Image.fromarray(np.zeros((40, 40), np.int32)).save(d / "i32.tif")  # mode I
    tflite = (d / "bundle" / "m_fp32.tflite").read_bytes()
    (d / "trunc.tflite").write_bytes(tflite[:1000])
    (d / "fake.keras").write_text("not a zip\n")
    np.save(d / "nan.npy", np.full((2, 32, 32, 3), np.nan, np.float32))
    np.save(d / "str.npy", np.full((2, 32, 32, 3), "a"))
    np.save(d / "big.npy", np.full((2, 32, 32, 3), 1e30, np.float32))
    np.save(d / "obj.npy", np.array([1, None], dtype=object), allow_pickle=True)
    (d / "notes.txt").write_text("my notes\n")
    (d / "report.json").write_text('{"mine": true}\n')
    (d / "mydata").mkdir()
    (d / "mydata" / "thesis.txt").write_text("years of work\n")
    (d / "dir.keras").mkdir()
    (d / "dir.keras" / "keep.txt").write_text("keep\n")
    (d / "emptydir").mkdir()
    with zipfile.ZipFile(d / "m.keras") as z:
        assert "config.json" in z.namelist()
    return d


def snapshot(folder) -> dict[str, str]:
    """relative path -> sha256 (files) or "dir", for everything under `folder`."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            out[os.path.relpath(os.path.join(root, name), folder)] = "dir"
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _preexec(case: Case):
    def run():
        if case.umask is not None:
            os.umask(case.umask)
        if case.fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (case.fsize, case.fsize))
    return run


def _run(folder, argv, case: Case = Case([]), umask=None) -> subprocess.CompletedProcess:
    case = case._replace(umask=umask if umask is not None else case.umask)
    cmd = [sys.executable, "-m", "edge_effnet", *map(str, argv)]
    env = dict(cli_env(), EDGE_EFFNET_LOG_DIR=str(folder / ".." / "logs"))
    if case.signal is None:
        return subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=600,
                              preexec_fn=_preexec(case))
    signum, when = case.signal
    proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_preexec(case))
    start = time.monotonic()
    while proc.poll() is None and time.monotonic() - start < 300:
        if when.startswith("@") and time.monotonic() - start >= float(when[1:]):
            break
        if not when.startswith("@") and glob.glob(str(folder / when), include_hidden=True):
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"finished before the signal: {proc.communicate()}"
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_catalog(name, user_files, tmp_path):
    case = CASES[name]
    folder = tmp_path / "work"
    shutil.copytree(user_files, folder)
    if case.setup:
        case.setup(folder)
    before = snapshot(folder)
    try:
        result = _run(folder, case.argv, case)
        lines = result.stderr.splitlines()
        assert result.returncode == case.code, result.stderr
        assert "Traceback" not in result.stderr and len(lines) == case.lines, result.stderr
        if case.message:
            assert case.message in lines[0], lines[0]
        if case.after:
            case.after(folder, result)
        after = snapshot(folder)
    finally:
        if (folder / "locked").exists():
            (folder / "locked").chmod(0o700)
    temporary = [p for p in after if ".partial-" in p or ".old-" in p or ".edge-effnet-probe-" in p]
    assert not temporary, temporary
    def output(p):
        return any(p == n or p.startswith(n + "/") for n in case.new)

    changed = [p for p in before if not output(p) and after.get(p) != before[p]]
    assert not changed, f"user files lost or changed: {changed}"
    added = [p for p in after if p not in before and not output(p)]
    assert not added, f"unexpected new files: {added}"


def test_catalog_covers_every_command():
    from test_cli import COMMANDS

    used = {case.argv[0] for case in CASES.values()}
    assert used == set(COMMANDS), set(COMMANDS) - used
    assert len(CASES) >= 40


def _crash(tmp_path, code: str, *argv):
    """Run the CLI in a fresh interpreter after `code` made one library function misbehave."""
    script = f"import sys\n{code}\nfrom edge_effnet.cli import main\nsys.argv = ['edge-effnet', *{list(argv)!r}]\nmain()"
    env = dict(cli_env(), EDGE_EFFNET_LOG_DIR=str(tmp_path / "logs"))
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)


def test_unexpected_exception_is_one_line_and_a_log(tmp_path):
    boom = ("import edge_effnet.model.variants as v\n"
            "def boom():\n    raise RuntimeError('boom: a bug, not bad input')\n"
            "v.variant_rows = boom")
    result = _crash(tmp_path, boom, "variants")
    lines = result.stderr.splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("edge-effnet: internal error: RuntimeError: boom: a bug, not bad input; full traceback in ")
    log = lines[0].rsplit(" ", 1)[1]
    assert log.startswith(str(tmp_path / "logs")) and os.path.isfile(log)
    text = open(log).read()
    assert "Traceback" in text and "RuntimeError: boom" in text and "edge-effnet variants" in text


def test_keyboard_interrupt_anywhere_is_one_line_exit_130(tmp_path):
    stop = ("import edge_effnet.model.variants as v\n"
            "def stop():\n    raise KeyboardInterrupt\n"
            "v.variant_rows = stop")
    result = _crash(tmp_path, stop, "variants", "--json")
    assert result.returncode == 130 and result.stderr == "edge-effnet: interrupted\n", result.stderr
    assert not (tmp_path / "logs").exists()


def test_stale_temporary_names_of_dead_processes_only_are_cleaned(tmp_path):
    from edge_effnet.fsutil import check_output

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".out.json.partial-{dead.pid}-abc.json").write_text("{")
    (tmp_path / f".out.json.partial-{os.getpid()}-def.json").write_text("{")  # a live writer's
    (tmp_path / f".other.json.partial-{dead.pid}-ghi.json").write_text("{")  # another output's
    check_output(str(tmp_path / "out.json"))
    assert sorted(os.listdir(tmp_path)) == sorted([f".out.json.partial-{os.getpid()}-def.json",
                                                   f".other.json.partial-{dead.pid}-ghi.json"])
