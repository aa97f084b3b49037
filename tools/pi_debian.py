"""Debian pieces of tools/pi_sysroot.py: an arm64 root from Debian's packages, Debian 13's qemu-user,
pip's wheels unpacked into a site folder, byte-compiling; cached builds under a lock.

Nothing here knows which release or runtime is wanted: pi_sysroot.py decides that. Standard library only.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile

# debootstrap lives in /usr/sbin, which a non-login shell's PATH may lack
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin", "/bin"])


class SysrootError(Exception):
    """Reported as one line (exit code 2)."""


def say(message: str) -> None:
    print(f"pi-sysroot: {message}", file=sys.stderr, flush=True)


def run(cmd: list[str], what: str, log: str, env: dict | None = None) -> None:
    with open(log, "ab") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              env=env or {**os.environ, "PATH": SEARCH_PATH})
    if done.returncode != 0:
        with open(log, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
        last = lines[-1] if lines else "no output"
        raise SysrootError(f"{what} failed (exit {done.returncode}; the first run needs network): {last} "
                           f"[full log: {log}]")


@contextlib.contextmanager
def cached(cache: str, name: str, rebuild: bool):
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


def debian_mirror() -> str | None:
    return os.environ.get("EDGE_EFFNET_DEBIAN_MIRROR")


def debootstrap(root: str, log: str, release, host_compile: bool) -> None:
    """Debian `release.suite` arm64 (minbase + python3) unpacked into `root`. host_compile: its
    Python is the host's version, so the host byte-compiles its standard library; else the emulated
    Python compiles what it imports when it first does (compiling all of it under qemu costs more)."""
    if os.geteuid() != 0:
        raise SysrootError("building the Debian root needs root (debootstrap); run this once as root, "
                           "later runs reuse the cache")
    suite = release.suite
    say(f"downloading and unpacking Debian {suite} arm64 (minbase + python3) with debootstrap --foreign ...")
    cmd = ["debootstrap", "--foreign", "--arch=arm64", "--variant=minbase", "--include=python3", suite, root]
    mirror = debian_mirror()
    run(cmd + ([mirror] if mirror else []), "debootstrap", log)
    # --foreign unpacks only the 'required' set; the rest (python3 and its libraries) is only
    # downloaded. Unpack every downloaded package: nothing is configured or executed.
    debs = sorted(glob.glob(os.path.join(root, "var/cache/apt/archives/*.deb")))
    say(f"unpacking {len(debs)} .deb files with dpkg-deb -x ...")
    for deb in debs:
        run(["dpkg-deb", "-x", deb, root], f"dpkg-deb -x {os.path.basename(deb)}", log)
        os.remove(deb)
    if not os.path.isfile(os.path.join(root, release.python)):
        raise SysrootError(f"the {suite} arm64 packages gave no /{release.python} [log: {log}]")
    if host_compile:
        precompile(os.path.join(root, "usr/lib", os.path.basename(release.python)), log)


def download_unpack(requirements: list[str], arch: str, platforms: list[str], site: str, log: str,
                     what: str) -> dict:
    """Host pip downloads cp311 wheels for `arch` (the reference); unpack them into `site`. Return {wheel: bytes}."""
    wheels = site + "-wheels"
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
           "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp", "-d", wheels]
    for platform in platforms:
        cmd += ["--platform", platform.format(arch=arch)]
    run(cmd + requirements, what, log)
    sizes = {}
    for wheel in sorted(glob.glob(os.path.join(wheels, "*.whl"))):
        sizes[os.path.basename(wheel)] = os.path.getsize(wheel)
        with zipfile.ZipFile(wheel) as z:
            z.extractall(site)
    for path in glob.glob(os.path.join(site, "**", "*.so*"), recursive=True):
        os.chmod(path, 0o755)  # zipfile drops the mode bits
    shutil.rmtree(wheels)
    return sizes


def precompile(path: str, log: str) -> None:
    """Byte-compile with the host's Python 3.11 (the same bytecode): saves minutes of emulated compiling."""
    with open(log, "ab") as out:  # a few test-suite files do not compile: not needed
        subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", path], stdout=out,
                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def emulated_env() -> dict:
    """The host's environment (proxies, pip's index and certificate settings) without its Python's."""
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}


def apt_download(package: str, suite: str, dest: str, log: str) -> str:
    """apt-get download `package` (host architecture) from Debian `suite` with a private apt state
    in `dest` (the host's sources and package lists are not touched); return the .deb's path."""
    state = os.path.join(dest, "apt")
    for sub in ("etc/apt.conf.d", "etc/preferences.d", "etc/sources.list.d", "etc/trusted.gpg.d",
                "lists/partial", "archives/partial"):
        os.makedirs(os.path.join(state, sub), exist_ok=True)
    open(os.path.join(state, "status"), "w").close()
    mirror = debian_mirror() or "http://deb.debian.org/debian"
    with open(os.path.join(state, "etc/sources.list"), "w") as f:
        f.write(f"deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {mirror} {suite} main\n")
    options = []
    for name, value in [("Dir::Etc", "etc"), ("Dir::State::Lists", "lists"), ("Dir::State::status", "status"),
                        ("Dir::Cache", "."), ("Dir::Cache::archives", "archives")]:
        options += ["-o", f"{name}={os.path.join(state, value)}"]
    options += ["-o", "APT::Sandbox::User=root", "-o", "Debug::NoLocking=1", "-o", "Acquire::Languages=none"]
    run(["apt-get", *options, "update"], f"apt-get update ({suite})", log)
    env = {**os.environ, "PATH": SEARCH_PATH}
    with open(log, "ab") as out:
        done = subprocess.run(["apt-get", *options, "download", package], cwd=dest, stdout=out,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    debs = glob.glob(os.path.join(dest, f"{package}_*.deb"))
    if done.returncode != 0 or len(debs) != 1:
        raise SysrootError(f"apt-get download {package} from Debian {suite} failed (exit {done.returncode}; "
                           f"the first run needs network) [full log: {log}]")
    shutil.rmtree(state)
    return debs[0]


def debian_qemu(work: str, suite: str, log: str) -> None:
    """Debian `suite`'s qemu-user (static binaries since Debian 13) unpacked into work/qemu."""
    say(f"downloading Debian {suite}'s qemu-user with apt-get ...")
    deb = apt_download("qemu-user", suite, work, log)
    unpacked = os.path.join(work, "unpacked")
    run(["dpkg-deb", "-x", deb, unpacked], f"dpkg-deb -x {os.path.basename(deb)}", log)
    os.remove(deb)
    qemu = os.path.join(work, "qemu/usr/bin/qemu-aarch64")
    os.makedirs(os.path.dirname(qemu))
    os.rename(os.path.join(unpacked, "usr/bin/qemu-aarch64"), qemu)  # keep one of its ~40 emulators (450 MB)
    shutil.rmtree(unpacked)
    done = subprocess.run([qemu, "--version"], capture_output=True, text=True)
    if done.returncode != 0:
        raise SysrootError(f"Debian {suite}'s qemu-aarch64 does not run here: {done.stderr.strip()}")
    with open(os.path.join(work, "version.txt"), "w") as f:
        f.write(done.stdout.splitlines()[0] + "\n")
