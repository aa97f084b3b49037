#!/usr/bin/env python3
"""An emulated Raspberry Pi (64-bit Raspberry Pi OS = Debian bookworm, aarch64, Python 3.11) on x86.

Assembles an arm64 Debian bookworm root from Debian's packages (debootstrap --foreign, then
the downloaded .debs unpacked with dpkg-deb -x: nothing is executed inside it, so binfmt_misc
is not needed), adds the aarch64 wheels of edge-effnet's light runtime (one site folder per
interpreter: ai-edge-litert with numpy 2, tflite-runtime 2.14 with numpy < 2), and runs
`qemu-aarch64-static -cpu cortex-a72 -L ROOT ROOT/usr/bin/python3.11` (a Raspberry Pi 4's
instruction set) on it with the project's own package. The same wheel versions are fetched for
x86_64 as well, run by the host's Python 3.11: the reference to compare the Pi's outputs with.

    python tools/pi_sysroot.py                       # build once (cached), print what is there
    python tools/pi_sysroot.py run [--runtime litert|tflite-runtime] -- -m edge_effnet bench m.tflite
    python tools/pi_sysroot.py run --arch x86_64 -- tools/rpi_classify.py bundle/ cat.jpg

Needs root, network access to Debian and PyPI on the first run, and
`apt-get install debootstrap qemu-user-static`. The result is cached in
$EDGE_EFFNET_CACHE/pi-sysroot (default ~/.cache/edge-effnet/pi-sysroot), keyed by the versions
below. Emulated run times are not latencies: never report them as such.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import fcntl
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "edge_effnet"
SUITE = "bookworm"           # Raspberry Pi OS 64-bit is Debian bookworm, Python 3.11
PYTHON = "usr/bin/python3.11"
QEMU = "qemu-aarch64-static"
# The emulated CPU's instruction set. Raspberry Pi 4 = Cortex-A72 (ARMv8.0, like the Pi 3's A53:
# no dot-product or fp16 arithmetic), the common denominator of 64-bit Pis; Pi 5 = cortex-a76.
# qemu's default ("max") has features no Pi has, and the runtimes would pick kernels for them.
CPUS = ("cortex-a72", "cortex-a76", "cortex-a53")
APT_HINT = "apt-get install debootstrap qemu-user-static"
# debootstrap lives in /usr/sbin, which a non-login shell's PATH may lack
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin", "/bin"])

# One site folder per interpreter; the two cannot share one (tflite-runtime 2.14 needs numpy < 2).
# ai-edge-litert 1.4.0 is the newest release with a cp311 aarch64 wheel; tflite-runtime 2.14.0's
# aarch64 wheel is tagged manylinux_2_34 (bookworm has glibc 2.36). The same pins are fetched for
# x86_64 too, so a test can compare the same runtime version on both architectures.
RUNTIMES = {
    "litert": {
        "module": "ai_edge_litert",
        "requirements": ["ai-edge-litert==1.4.0", "numpy==2.2.6", "pillow==12.2.0", "click==8.3.1"],
    },
    "tflite-runtime": {
        "module": "tflite_runtime",
        "requirements": ["tflite-runtime==2.14.0", "numpy==1.26.4", "pillow==12.2.0", "click==8.3.1"],
    },
}
ARCHES = ("aarch64", "x86_64")
PLATFORMS = ["manylinux_2_34_{arch}", "manylinux_2_17_{arch}", "manylinux2014_{arch}"]
LAYOUT_VERSION = 1  # bump when the folder layout below changes

SMOKE = """
import importlib, json, platform, sys
import numpy
mod = importlib.import_module(sys.argv[1])
print(json.dumps({"machine": platform.machine(), "python": platform.python_version(),
                  "numpy": numpy.__version__, "runtime": getattr(mod, "__version__", "unknown")}))
"""


class SysrootError(Exception):
    """Reported as one line (exit code 2)."""


def say(message: str) -> None:
    print(f"pi-sysroot: {message}", file=sys.stderr, flush=True)


def cache_root() -> str:
    base = os.environ.get("EDGE_EFFNET_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "edge-effnet")
    return os.path.join(base, "pi-sysroot")


def _key(recipe) -> str:
    return hashlib.sha256(json.dumps([recipe, LAYOUT_VERSION], sort_keys=True).encode()).hexdigest()[:12]


def check_host() -> None:
    missing = [tool for tool in ("debootstrap", QEMU, "dpkg-deb") if not shutil.which(tool, path=SEARCH_PATH)]
    if missing:
        raise SysrootError(f"{', '.join(missing)} not found: {APT_HINT}")
    if sys.version_info[:2] != (3, 11):
        raise SysrootError(f"run this with Python 3.11 (the x86_64 reference wheels are cp311; "
                           f"this is {sys.version.split()[0]})")


def _run(cmd: list[str], what: str, log: str) -> None:
    with open(log, "ab") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              env={**os.environ, "PATH": SEARCH_PATH})
    if done.returncode != 0:
        with open(log, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
        last = lines[-1] if lines else "no output"
        raise SysrootError(f"{what} failed (exit {done.returncode}; the first run needs network): {last} "
                           f"[full log: {log}]")


@contextlib.contextmanager
def _cached(cache: str, name: str, rebuild: bool):
    """Yield a work folder to build `name` in (None if already built); publish it atomically."""
    final = os.path.join(cache, name)
    os.makedirs(cache, exist_ok=True)
    with open(final + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isfile(os.path.join(final, "done.json")) and not rebuild:
            yield None
            return
        for stale in glob.glob(final + ".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        work = f"{final}.tmp-{os.getpid()}"
        os.makedirs(work)
        start = time.monotonic()
        try:
            yield work
            with open(os.path.join(work, "done.json"), "w") as f:
                json.dump({"name": name, "build_s": round(time.monotonic() - start, 1)}, f)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.rename(work, final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        say(f"built {name} in {time.monotonic() - start:.0f} s")


def _debootstrap(root: str, log: str) -> None:
    if os.geteuid() != 0:
        raise SysrootError("building the Debian root needs root (debootstrap); run this once as root, "
                           "later runs reuse the cache")
    say(f"downloading and unpacking Debian {SUITE} arm64 (minbase + python3) with debootstrap --foreign ...")
    cmd = ["debootstrap", "--foreign", "--arch=arm64", "--variant=minbase", "--include=python3", SUITE, root]
    mirror = os.environ.get("EDGE_EFFNET_DEBIAN_MIRROR")
    _run(cmd + ([mirror] if mirror else []), "debootstrap", log)
    # --foreign unpacks only the 'required' set; the rest (python3 and its libraries) is only
    # downloaded. Unpack every downloaded package: nothing is configured or executed.
    debs = sorted(glob.glob(os.path.join(root, "var/cache/apt/archives/*.deb")))
    say(f"unpacking {len(debs)} .deb files with dpkg-deb -x ...")
    for deb in debs:
        _run(["dpkg-deb", "-x", deb, root], f"dpkg-deb -x {os.path.basename(deb)}", log)
        os.remove(deb)
    if not os.path.isfile(os.path.join(root, PYTHON)):
        raise SysrootError(f"the {SUITE} arm64 packages gave no /{PYTHON} [log: {log}]")
    _precompile(os.path.join(root, "usr/lib/python3.11"), log)


def _wheels(runtime: str, arch: str, site: str, log: str) -> None:
    requirements = RUNTIMES[runtime]["requirements"]
    wheels = site + "-wheels"
    say(f"pip download {arch} cp311 wheels for {runtime}: {' '.join(requirements)} ...")
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
           "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp", "-d", wheels]
    for platform in PLATFORMS:
        cmd += ["--platform", platform.format(arch=arch)]
    _run(cmd + requirements, f"pip download ({runtime}, {arch})", log)
    for wheel in sorted(glob.glob(os.path.join(wheels, "*.whl"))):
        with zipfile.ZipFile(wheel) as z:
            z.extractall(site)
    for path in glob.glob(os.path.join(site, "**", "*.so*"), recursive=True):
        os.chmod(path, 0o755)  # zipfile drops the mode bits
    shutil.rmtree(wheels)
    _precompile(site, log)


def _precompile(path: str, log: str) -> None:
    """Byte-compile with the host's Python 3.11 (the same bytecode): saves minutes of emulated compiling."""
    with open(log, "ab") as out:  # a few test-suite files do not compile: not needed
        subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", path], stdout=out,
                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


class Sysroot:
    """The emulated Pi: `command(runtime, argv)` gives `python3.11 ARGV` on aarch64 (or, with
    arch="x86_64", the host's Python 3.11 with the same runtime versions) and its environment."""

    def __init__(self, root: str, sites: dict[tuple[str, str], str]):
        self.root, self.sites = root, sites
        self.versions: dict = {}

    def command(self, runtime: str, argv: list[str], extra_paths: tuple[str, ...] = (),
                arch: str = "aarch64", cpu: str = CPUS[0]) -> tuple[list[str], dict]:
        """(cmd, env): only the interpreter's standard library, `extra_paths` and the runtime's
        site folder are importable (a clean environment: nothing of the host's packages)."""
        if runtime not in RUNTIMES:
            raise SysrootError(f"unknown runtime {runtime!r}: one of {', '.join(RUNTIMES)}")
        env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8",
               "PYTHONPATH": os.pathsep.join([*extra_paths, self.sites[arch, runtime]])}
        if arch == "x86_64":  # -S: without the host's site-packages (a venv's TensorFlow stays out)
            return [sys.executable, "-S", *argv], env
        qemu = shutil.which(QEMU, path=SEARCH_PATH) or QEMU
        return [qemu, "-cpu", cpu, "-L", self.root, os.path.join(self.root, PYTHON), *argv], env

    def check(self, runtime: str, arch: str = "aarch64") -> dict:
        """Import numpy and the runtime there; return the versions found."""
        cmd, env = self.command(runtime, ["-c", SMOKE, RUNTIMES[runtime]["module"]], arch=arch)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise SysrootError(f"{arch} python3.11 cannot import {RUNTIMES[runtime]['module']}: {last}")
        found = json.loads(done.stdout.strip().splitlines()[-1])
        if found["machine"] != arch:
            raise SysrootError(f"{arch} python reports machine {found['machine']!r}")
        return found


def project_copy(dest: str) -> str:
    """Copy the project's pure-Python package into `dest` (as `pip install` would put it); return dest."""
    shutil.copytree(os.path.join(ROOT, PACKAGE), os.path.join(dest, PACKAGE), dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def ensure(cache: str | None = None, rebuild: bool = False) -> Sysroot:
    """The cached Debian root and wheel folders, built first where missing (cold: about 4 minutes
    on 2 busy cores, ~700 MB), each checked by importing the runtime there."""
    check_host()
    cache = cache or cache_root()
    root_name = f"root-{SUITE}-arm64-{_key(SUITE)}"
    sites = {(arch, runtime): f"site-{arch}-{runtime}-{_key([RUNTIMES[runtime], PLATFORMS, arch])}"
             for runtime in RUNTIMES for arch in ARCHES}

    def build(name: str, make) -> None:
        with _cached(cache, name, rebuild) as work:
            if work:
                make(work)

    jobs = [(root_name, lambda w: _debootstrap(os.path.join(w, "root"), os.path.join(w, "build.log")))]
    jobs += [(name, lambda w, r=runtime, a=arch: _wheels(r, a, os.path.join(w, "site"), os.path.join(w, "build.log")))
             for (arch, runtime), name in sites.items()]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:  # downloads overlap: mostly network
        for future in [pool.submit(build, name, make) for name, make in jobs]:
            future.result()
    sites = {key: os.path.join(cache, name, "site") for key, name in sites.items()}
    sysroot = Sysroot(os.path.join(cache, root_name, "root"), sites)
    stamp = os.path.join(cache, f"checked-{_key([root_name, sorted(sites.values())])}.json")
    if os.path.isfile(stamp) and not rebuild:
        with open(stamp) as f:
            sysroot.versions = json.load(f)
        return sysroot
    say("checking that each runtime imports on aarch64 (emulated) and x86_64 ...")
    with concurrent.futures.ThreadPoolExecutor(len(sites)) as pool:
        checks = {f"{a}/{r}": pool.submit(sysroot.check, r, a) for a, r in sites}
        sysroot.versions = {name: future.result() for name, future in checks.items()}
    with open(stamp + ".tmp", "w") as f:
        json.dump(sysroot.versions, f, indent=2)
    os.replace(stamp + ".tmp", stamp)
    return sysroot


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", help="cache folder (default: $EDGE_EFFNET_CACHE/pi-sysroot or "
                                        "~/.cache/edge-effnet/pi-sysroot)")
    parser.add_argument("--rebuild", action="store_true", help="build again even if cached")
    sub = parser.add_subparsers(dest="action")
    run = sub.add_parser("run", help="run the emulated aarch64 python3.11 with ARGS (after --)")
    run.add_argument("--runtime", choices=list(RUNTIMES), default="litert")
    run.add_argument("--arch", choices=ARCHES, default="aarch64",
                     help="x86_64: the host's Python 3.11 with the same runtime versions (a reference)")
    run.add_argument("--cpu", choices=CPUS, default=CPUS[0],
                     help="emulated CPU: cortex-a72 = Raspberry Pi 4 (default), cortex-a76 = Pi 5, cortex-a53 = Pi 3")
    run.add_argument("args", nargs=argparse.REMAINDER)
    opts = parser.parse_args(argv)
    try:
        sysroot = ensure(opts.cache, opts.rebuild)
        if opts.action != "run":
            print(json.dumps({"root": sysroot.root, "sites": {f"{a}/{r}": p for (a, r), p in sysroot.sites.items()},
                              "versions": sysroot.versions}, indent=2))
            return 0
        args = opts.args[1:] if opts.args[:1] == ["--"] else opts.args
        say(f"emulated aarch64 ({QEMU} -cpu {opts.cpu}): run times here are not latencies")
        with tempfile.TemporaryDirectory(prefix="pi-project-") as project:
            cmd, env = sysroot.command(opts.runtime, args, (project_copy(project),), opts.arch, opts.cpu)
            return subprocess.run(cmd, env=env).returncode
    except SysrootError as exc:
        print(f"pi-sysroot: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
