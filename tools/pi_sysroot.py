#!/usr/bin/env python3
"""An emulated Raspberry Pi (64-bit Raspberry Pi OS = Debian bookworm or trixie, aarch64) on x86.

Assembles an arm64 Debian root from Debian's packages (debootstrap --foreign, then the
downloaded .debs unpacked with dpkg-deb -x: nothing is executed inside it, so binfmt_misc is not
needed), adds edge-effnet's light runtime as pip resolves it for the Pi (one site folder per
runtime extra of setup.cfg), and runs `qemu-aarch64 -cpu cortex-a72 -L ROOT ROOT/usr/bin/python3.X`
(a Raspberry Pi 4's instruction set) on it with the project's own package. The same runtime
versions are fetched for x86_64 as well, run by the host's Python 3.11: the reference to compare
the Pi's outputs with.

Two releases (--release), each with two runtimes (--runtime), each a runtime extra of setup.cfg:
  bookworm  Raspberry Pi OS 12, Python 3.11, glibc 2.36. litert = the `runtime` extra,
            tflite-runtime = `runtime-legacy` (numpy < 2). Resolved by the host's pip for the Pi
            (pip install --target --platform manylinux_2_17..2_36_aarch64 --python-version 3.11:
            the same Python as the host's, so only the platform differs).
  trixie    Raspberry Pi OS 13, Python 3.13, glibc 2.41. litert = `runtime`, onnxruntime =
            `runtime-onnx`. Resolved and installed by pip RUNNING ON THE EMULATED python3.13, so
            environment markers and wheel tags are the Pi's own.
Both run on Debian 13's qemu-aarch64 (qemu-user 10.0, static), which this tool downloads with
apt-get from Debian 13 into the cache: Debian 12's qemu-user-static (7.2) dies with SIGSEGV
importing ai-edge-litert 2.3.0 (what a Pi's pip installs) and onnxruntime's aarch64 wheel.

    python tools/pi_sysroot.py [--release trixie]    # build once (cached), print what is there
    python tools/pi_sysroot.py run [--runtime litert|tflite-runtime] -- -m edge_effnet bench bundle/
    python tools/pi_sysroot.py run --arch x86_64 -- tools/rpi_classify.py bundle/ cat.jpg
    python tools/pi_sysroot.py --release trixie run --runtime onnxruntime -- tools/rpi_classify.py bundle/ cat.jpg

Needs root, network access to Debian and PyPI on the first run, and `apt-get install debootstrap`.
The result is cached in $EDGE_EFFNET_CACHE/pi-sysroot (default ~/.cache/edge-effnet/pi-sysroot),
keyed by what goes in. Emulated run times are not latencies: never report them as such.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import configparser
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import NamedTuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pi_debian as debian  # noqa: E402  (the Debian root, qemu-user, wheels, cached builds)
from pi_debian import SysrootError, say  # noqa: E402,F401  (SysrootError: callers catch tool.SysrootError)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "edge_effnet"
# The emulated CPU's instruction set. Raspberry Pi 4 = Cortex-A72 (ARMv8.0, like the Pi 3's A53:
# no dot-product or fp16 arithmetic), the common denominator of 64-bit Pis; Pi 5 = cortex-a76.
# qemu's default ("max") has features no Pi has, and the runtimes would pick kernels for them.
CPUS = ("cortex-a72", "cortex-a76", "cortex-a53")
APT_HINT = "apt-get install debootstrap (Debian 13's qemu-user is fetched by this tool with apt-get)"
QEMU_SUITE = "trixie"  # whose qemu-user runs both releases (10.0; Debian 12's 7.2 crashes, see above)
SEARCH_PATH = debian.SEARCH_PATH  # where check_host looks (a test points it at an empty folder)
ARCHES = ("aarch64", "x86_64")
LAYOUT_VERSION = 2  # bump when the folder layout below changes
# pip that resolves on the emulated Pi: the version Debian 13's python3-pip ships (a Pi's venv pip)
TARGET_PIP = "pip==25.1.1"


def platforms(glibc_minor: int) -> list[str]:
    """Every manylinux tag a glibc 2.`glibc_minor` system takes, newest first (as pip lists them)."""
    return [f"manylinux_2_{minor}_{{arch}}" for minor in range(glibc_minor, 16, -1)] + ["manylinux2014_{arch}"]


# x86_64 reference wheels (host Python 3.11, Debian 12: glibc 2.36)
HOST_PLATFORMS = platforms(36)


class Runtime(NamedTuple):
    module: str      # imported to check it
    extra: str       # setup.cfg's extra that installs it (with install_requires)
    dist: str        # its distribution name in pip's report


LITERT = Runtime("ai_edge_litert", "runtime", "ai-edge-litert")


class Release(NamedTuple):  # not a dataclass: tests load this file without registering it in sys.modules
    """One Raspberry Pi OS release: its Debian suite, its Python, the runtimes it gets and how."""

    suite: str
    python: str                 # the interpreter inside the root
    runtimes: dict              # name -> Runtime
    resolve: str                # "host": host pip for the Pi's tags (same Python); "target": pip on the emulated Pi
    glibc_minor: int            # the manylinux tags the Pi takes


RELEASES = {
    # Raspberry Pi OS 12 (2023-2025): Python 3.11.2, glibc 2.36. Its pip takes ai-edge-litert 2.3.0
    # (manylinux_2_27); tflite-runtime 2.14.0's aarch64 wheel is manylinux_2_34.
    "bookworm": Release("bookworm", "usr/bin/python3.11",
                        {"litert": LITERT,
                         "tflite-runtime": Runtime("tflite_runtime", "runtime-legacy", "tflite-runtime")},
                        "host", 36),
    # Raspberry Pi OS 13 (2025-): Python 3.13.5, glibc 2.41.
    "trixie": Release("trixie", "usr/bin/python3.13",
                      {"litert": LITERT, "onnxruntime": Runtime("onnxruntime", "runtime-onnx", "onnxruntime")},
                      "target", 41),
}
RUNTIME_NAMES = sorted({name for release in RELEASES.values() for name in release.runtimes})


class ProductError(SysrootError):
    """The Pi was built but what users would install fails there (a runtime that does not import,
    an extra that installs no runtime): a test fails on it, never skips."""

SMOKE = """
import importlib, json, platform, sys
import numpy
mod = importlib.import_module(sys.argv[1])
print(json.dumps({"machine": platform.machine(), "python": platform.python_version(),
                  "numpy": numpy.__version__, "runtime": getattr(mod, "__version__", "unknown")}))
"""


def cache_root() -> str:
    base = os.environ.get("EDGE_EFFNET_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "edge-effnet")
    return os.path.join(base, "pi-sysroot")


def _key(recipe) -> str:
    return hashlib.sha256(json.dumps([recipe, LAYOUT_VERSION], sort_keys=True).encode()).hexdigest()[:12]


def check_host() -> None:
    missing = [tool for tool in ("debootstrap", "dpkg-deb", "apt-get") if not shutil.which(tool, path=SEARCH_PATH)]
    if missing:
        raise SysrootError(f"{', '.join(missing)} not found: {APT_HINT}")
    if sys.version_info[:2] != (3, 11):
        raise SysrootError(f"run this with Python 3.11 (the x86_64 reference wheels are cp311; "
                           f"this is {sys.version.split()[0]})")


def _requirements(release: Release, runtime: str) -> list[str]:
    """install_requires + the runtime's extra from setup.cfg (markers kept: pip evaluates them)."""
    config = configparser.ConfigParser()
    config.read(os.path.join(ROOT, "setup.cfg"))
    lines = config["options"]["install_requires"].splitlines()
    lines += config["options.extras_require"][release.runtimes[runtime].extra].splitlines()
    found = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    return list(dict.fromkeys(found))  # numpy is in both install_requires and the extra


def _target_site(sysroot: "Sysroot", requirements: list[str], pip_wheel: str, site: str, log: str) -> None:
    """pip install --target on the emulated Pi: its own markers, tags and Requires-Python decide
    what resolves. Writes SITE/../resolved.json (pip's report: environment, what was installed)."""
    report = os.path.join(os.path.dirname(site), "resolved.json")
    say(f"pip install on the emulated {sysroot.release.suite} python: {' '.join(requirements)} ...")
    cmd = [sysroot.qemu, "-L", sysroot.root, os.path.join(sysroot.root, sysroot.release.python),
           os.path.join(pip_wheel, "pip"), "install", "--quiet", "--disable-pip-version-check", "--no-cache-dir",
           "--no-compile", "--only-binary=:all:", "--target", site, "--report", report, *requirements]
    debian.run(cmd, f"pip install on the emulated Pi ({' '.join(requirements)})", log, env=debian.emulated_env())
    for folder in glob.glob(os.path.join(site, "bin")):
        shutil.rmtree(folder)  # console scripts with a shebang for the root's python: not used
    # not byte-compiled here: the emulated Python compiles what it imports on first use (writing
    # __pycache__), cheaper than compiling all of numpy, pillow and the runtime under qemu


def _host_site(release: Release, requirements: list[str], site: str, log: str) -> None:
    """pip install --target on the host for the Pi's wheel tags (same Python version as the host's:
    only the platform differs), byte-compiled by the host's Python. Writes SITE/../resolved.json."""
    report = os.path.join(os.path.dirname(site), "resolved.json")
    say(f"pip install for {release.suite} aarch64 (cp311, glibc 2.{release.glibc_minor}): {' '.join(requirements)} ...")
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile",
           "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp", "--target", site,
           "--report", report]
    for platform in platforms(release.glibc_minor):
        cmd += ["--platform", platform.format(arch="aarch64")]
    debian.run(cmd + requirements, f"pip install for the Pi ({' '.join(requirements)})", log)
    shutil.rmtree(os.path.join(site, "bin"), ignore_errors=True)
    debian.precompile(site, log)


def _installed(report: str) -> list[dict]:
    """name, version, wheel file name from pip's --report."""
    with open(report) as f:
        data = json.load(f)
    return [{"name": item["metadata"]["name"], "version": item["metadata"]["version"],
             "wheel": item["download_info"]["url"].rsplit("/", 1)[-1]} for item in data["install"]]


class Sysroot:
    """The emulated Pi: `command(runtime, argv)` gives `python3.X ARGV` on aarch64 (or, with
    arch="x86_64", the host's Python 3.11 with the same runtime versions) and its environment."""

    def __init__(self, root: str, sites: dict[tuple[str, str], str], release: str, qemu: str):
        self.root, self.sites, self.qemu = root, sites, qemu
        self.release_name, self.release = release, RELEASES[release]
        self.python = os.path.join(root, self.release.python)
        self.versions: dict = {}

    def command(self, runtime: str, argv: list[str], extra_paths: tuple[str, ...] = (),
                arch: str = "aarch64", cpu: str = CPUS[0]) -> tuple[list[str], dict]:
        """(cmd, env): only the interpreter's standard library, `extra_paths` and the runtime's
        site folder are importable (a clean environment: nothing of the host's packages)."""
        if runtime not in self.release.runtimes:
            raise SysrootError(f"unknown runtime {runtime!r} for {self.release_name}: "
                               f"one of {', '.join(self.release.runtimes)}")
        env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8",
               "PYTHONPATH": os.pathsep.join([*extra_paths, self.sites[arch, runtime]])}
        if arch == "x86_64":  # -S: without the host's site-packages (a venv's TensorFlow stays out)
            return [sys.executable, "-S", *argv], env
        return [self.qemu, "-cpu", cpu, "-L", self.root, self.python, *argv], env

    def check(self, runtime: str, arch: str = "aarch64") -> dict:
        """Import numpy and the runtime there; return the versions found."""
        module = self.release.runtimes[runtime].module
        cmd, env = self.command(runtime, ["-c", SMOKE, module], arch=arch)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}, no output"])[-1]
            python = "python3.11" if arch == "x86_64" else os.path.basename(self.release.python)
            raise ProductError(f"{arch} {python} cannot import {module}: {last}")
        found = json.loads(done.stdout.strip().splitlines()[-1])
        if found["machine"] != arch:
            raise SysrootError(f"{arch} python reports machine {found['machine']!r}")
        return found


def project_copy(dest: str) -> str:
    """Copy the project's pure-Python package into `dest` (as `pip install` would put it); return dest."""
    shutil.copytree(os.path.join(ROOT, PACKAGE), os.path.join(dest, PACKAGE), dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def ensure(cache: str | None = None, rebuild: bool = False, release: str = "bookworm") -> Sysroot:
    """The cached Debian root and site folders, built first where missing (cold, 2 cores shared
    with other jobs at load 3-7: bookworm 2 minutes, ~760 MB with the x86_64 references; trixie
    3.5-4.5 minutes, ~700 MB, most of it pip resolving and installing under emulation; the qemu they
    share ~20 s, 16 MB),
    each runtime checked by importing it there. Two releases may be ensured at once (threads or
    processes): shared parts are built once, under a lock."""
    if release not in RELEASES:
        raise SysrootError(f"unknown release {release!r}: one of {', '.join(RELEASES)}")
    check_host()
    cache = cache or cache_root()
    sysroot = _ensure_resolved(cache, rebuild, release)
    stamp = os.path.join(cache, f"checked-{_key([sysroot.qemu, sysroot.root, sorted(sysroot.sites.values())])}.json")
    if os.path.isfile(stamp) and not rebuild:
        with open(stamp) as f:
            sysroot.versions = json.load(f)
        return sysroot
    say(f"checking that each runtime imports on aarch64 (emulated, {release}) and x86_64 ...")
    with concurrent.futures.ThreadPoolExecutor(len(sysroot.sites)) as pool:
        checks = {f"{a}/{r}": pool.submit(sysroot.check, r, a) for a, r in sysroot.sites}
        sysroot.versions = {name: future.result() for name, future in checks.items()}
    with open(stamp + ".tmp", "w") as f:
        json.dump(sysroot.versions, f, indent=2)
    os.replace(stamp + ".tmp", stamp)
    return sysroot


def _build(cache: str, name: str, make, rebuild: bool) -> None:
    with debian.cached(cache, name, rebuild) as work:
        if work:
            make(work)


def _ensure_resolved(cache: str, rebuild: bool, release: str) -> Sysroot:
    """Debian 13's qemu-user, the release's root, then per runtime a site folder resolved by pip for
    the Pi (release.resolve), then x86_64 reference folders with the same runtime version (host cp311)."""
    spec = RELEASES[release]
    host_arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip()
    qemu_name = f"qemu-{QEMU_SUITE}-{host_arch}-{_key(['qemu-user', QEMU_SUITE, host_arch])}"
    root_name = f"root-{spec.suite}-arm64-{_key(spec.suite)}"
    pip_name = f"pip-{_key(TARGET_PIP)}"
    on_host = spec.resolve == "host"  # the root's Python is the host's 3.11: byte-compiled on the host

    def get_pip(work: str) -> None:
        debian.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
                    "--only-binary=:all:", "-d", work, TARGET_PIP], f"pip download {TARGET_PIP}",
                   os.path.join(work, "build.log"))

    qemu = os.path.join(cache, qemu_name, "qemu/usr/bin/qemu-aarch64")
    sysroot = Sysroot(os.path.join(cache, root_name, "root"), {}, release, qemu)
    jobs = [(qemu_name, lambda w: debian.debian_qemu(w, QEMU_SUITE, os.path.join(w, "build.log"))),
            (root_name, lambda w: debian.debootstrap(os.path.join(w, "root"), os.path.join(w, "build.log"), spec,
                                                     host_compile=on_host))]
    jobs += [] if on_host else [(pip_name, get_pip)]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:  # downloads overlap
        for future in [pool.submit(_build, cache, name, make, rebuild) for name, make in jobs]:
            future.result()
    pip_wheel = None if on_host else glob.glob(os.path.join(cache, pip_name, "pip-*.whl"))[0]
    names = {}
    for runtime, row in spec.runtimes.items():  # one at a time: emulated pip is CPU-bound
        requirements = _requirements(spec, runtime)
        if on_host:
            arm = f"site-aarch64-{spec.suite}-{runtime}-{_key([requirements, platforms(spec.glibc_minor), 'host'])}"
            make = lambda w, r=requirements: _host_site(spec, r, os.path.join(w, "site"), os.path.join(w, "build.log"))  # noqa: E731
        else:
            arm = f"site-aarch64-{spec.suite}-{runtime}-{_key([requirements, TARGET_PIP, root_name])}"
            make = lambda w, r=requirements: _target_site(sysroot, r, pip_wheel, os.path.join(w, "site"),  # noqa: E731
                                                          os.path.join(w, "build.log"))
        _build(cache, arm, make, rebuild)
        versions = [i["version"] for i in _installed(os.path.join(cache, arm, "resolved.json"))
                    if i["name"].lower() == row.dist]
        if not versions:
            raise ProductError(f"pip for the {spec.suite} Pi installed no {row.dist} for "
                               f"{' '.join(requirements)} [{os.path.join(cache, arm, 'resolved.json')}]")
        pinned = [r for r in requirements if not r.lower().startswith(row.dist)] + [f"{row.dist}=={versions[0]}"]
        x86 = f"site-x86_64-{runtime}-{_key([pinned, HOST_PLATFORMS])}"

        def reference(work: str, pinned=pinned, runtime=runtime) -> None:
            say(f"pip download x86_64 cp311 wheels for {runtime} ({release} reference): {' '.join(pinned)} ...")
            sizes = debian.download_unpack(pinned, "x86_64", HOST_PLATFORMS, os.path.join(work, "site"),
                                     os.path.join(work, "build.log"), f"pip download ({runtime}, x86_64)")
            with open(os.path.join(work, "wheels.json"), "w") as f:
                json.dump(sizes, f, indent=2)
            debian.precompile(os.path.join(work, "site"), os.path.join(work, "build.log"))

        _build(cache, x86, reference, rebuild)
        names["aarch64", runtime], names["x86_64", runtime] = arm, x86
    sysroot.sites = {key: os.path.join(cache, name, "site") for key, name in names.items()}
    return sysroot


def resolved(sysroot: Sysroot, runtime: str) -> list[dict]:
    """What pip installed for `runtime` on the emulated Pi: name, version, wheel file name."""
    return _installed(os.path.join(os.path.dirname(sysroot.sites["aarch64", runtime]), "resolved.json"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", help="cache folder (default: $EDGE_EFFNET_CACHE/pi-sysroot or "
                                        "~/.cache/edge-effnet/pi-sysroot)")
    parser.add_argument("--rebuild", action="store_true", help="build again even if cached")
    parser.add_argument("--release", choices=list(RELEASES), default="bookworm",
                        help="bookworm: Raspberry Pi OS 12, Python 3.11 (default); trixie: Raspberry Pi OS 13, "
                             "Python 3.13; each with setup.cfg's runtime extras as pip resolves them for the Pi")
    sub = parser.add_subparsers(dest="action")
    run = sub.add_parser("run", help="run the emulated aarch64 python3.X with ARGS (after --)")
    run.add_argument("--runtime", choices=RUNTIME_NAMES,
                     default="litert", help="bookworm: litert, tflite-runtime; trixie: litert, onnxruntime")
    run.add_argument("--arch", choices=ARCHES, default="aarch64",
                     help="x86_64: the host's Python 3.11 with the same runtime versions (a reference)")
    run.add_argument("--cpu", choices=CPUS, default=CPUS[0],
                     help="emulated CPU: cortex-a72 = Raspberry Pi 4 (default), cortex-a76 = Pi 5, cortex-a53 = Pi 3")
    run.add_argument("args", nargs=argparse.REMAINDER)
    opts = parser.parse_args(argv)
    try:
        sysroot = ensure(opts.cache, opts.rebuild, opts.release)
        if opts.action != "run":
            print(json.dumps({"release": opts.release, "root": sysroot.root, "qemu": sysroot.qemu,
                              "sites": {f"{a}/{r}": p for (a, r), p in sysroot.sites.items()},
                              "versions": sysroot.versions}, indent=2))
            return 0
        args = opts.args[1:] if opts.args[:1] == ["--"] else opts.args
        with tempfile.TemporaryDirectory(prefix="pi-project-") as project:
            cmd, env = sysroot.command(opts.runtime, args, (project_copy(project),), opts.arch, opts.cpu)
            say(f"emulated aarch64 ({os.path.basename(sysroot.qemu)} -cpu {opts.cpu}): "
                "run times here are not latencies")
            return subprocess.run(cmd, env=env).returncode
    except SysrootError as exc:
        print(f"pi-sysroot: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
