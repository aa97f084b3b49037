"""Safe output: check before heavy work, write to a temporary name, rename at the end."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from .errors import UserError


def check_output(path: str, force: bool = False) -> None:
    """Fail early if `path` exists (without force) or its folder is not writable."""
    if os.path.exists(path) and not force:
        raise UserError(f"{path} exists; pass --force to overwrite it")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UserError(f"cannot write {path}: folder {parent} does not exist")
    try:  # a real probe: os.access says yes to root even on read-only file systems
        fd, probe = tempfile.mkstemp(prefix=".edge-effnet-probe-", dir=parent)
        os.close(fd)
        os.remove(probe)
    except OSError:
        raise UserError(f"cannot write {path}: folder {parent} is not writable") from None


@contextlib.contextmanager
def atomic_file(path: str):
    """Yield a temporary path next to `path` (same suffix); rename to `path` on success."""
    parent, base = os.path.split(os.path.abspath(path))
    stem, dot, suffix = base.partition(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.partial-", suffix=f"{dot}{suffix}", dir=parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_dir(path: str, force: bool = False):
    """Yield a temporary folder next to `path`; it replaces `path` only when the block succeeds."""
    check_output(path, force)
    parent, base = os.path.split(os.path.abspath(path))
    tmp = tempfile.mkdtemp(prefix=f".{base}.partial-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a bundle is an ordinary folder
    try:
        yield tmp
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
            os.replace(path, os.path.join(old, "x"))
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
