"""Safe output: check before heavy work, write to a temporary name, rename at the end.

The rules, applied here for every command:
- check_output: an existing output is replaced only with --force, and only if this tool could
  have written it (a bundle folder holding manifest.json, a checkpoint folder holding run.json,
  a file with the suffix the command writes); never the working folder or one of its parents.
- atomic_file / atomic_dir: the output is built under `.NAME.partial-PID-XXXX` beside it and
  renamed over it at the end (a folder is swapped in with one atomic rename where the kernel
  can); an interrupted or failed run leaves the old output as it was. Temporary names left by
  a killed run (its PID gone) are removed by the next run into the same output.
- OS errors (permission denied, read-only, disk full, a file where a folder should be) become
  one UserError naming the path and the cause.
- Files get the user's umask, as any program's (mkstemp/mkdtemp would make them 0600/0700).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import tempfile
import time

from .errors import UserError

# The folders edge-effnet writes, how it knows one of its own, and what it says when it is not.
FOLDER_KINDS = {
    "bundle": (lambda path, entries: "manifest.json" in entries, "no manifest.json in it"),
    "checkpoint": (lambda path, entries: "run.json" in entries, "no run.json in it"),
    "photoset": (lambda path, entries: all(e.endswith(".png") for e in entries), "not only .png files"),
}
_TEMP = re.compile(r"^\.(?P<base>.+)\.(?:partial|old)-(?:(?P<pid>\d+)-)?[^.]*")
LEGACY_STALE_S = 3600  # a temporary name without a PID (older versions) is stale after this


def os_error(path: str, exc: OSError, verb: str = "write") -> UserError:
    """One line naming the path and the cause of an OSError met while writing/reading `path`."""
    cause = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        cause += " (disk full or file size limit)"
    elif exc.errno == errno.EROFS:
        cause = "read-only file system"
    return UserError(f"cannot {verb} {path}: {cause}")


def distinct_outputs(**outputs: str | None) -> None:
    """Refuse two outputs of one command on one path (e.g. --json and --csv the same file)."""
    seen: dict[str, str] = {}
    for option, path in outputs.items():
        if not path:
            continue
        real = os.path.realpath(path)
        if real in seen:
            raise UserError(f"{seen[real]} and {option} name the same file {path}: give each its own")
        seen[real] = option


def _inside_cwd(path: str) -> bool:
    """True if `path` is the working folder or one of the folders holding it."""
    try:
        cwd = os.path.realpath(os.getcwd())
    except OSError:
        return False
    target = os.path.realpath(path)
    return cwd == target or cwd.startswith(target.rstrip(os.sep) + os.sep)


def _ours(path: str, kind: str) -> str | None:
    """Why an existing `path` may not be replaced as a `kind` output (None if it may)."""
    if kind in FOLDER_KINDS:
        if _inside_cwd(path):
            return "it is the working folder or holds it"
        if not os.path.isdir(path):
            return f"it is a file, not a {kind} folder"
        entries = os.listdir(path)
        if entries and not FOLDER_KINDS[kind][0](path, entries):  # an empty folder holds nothing to lose
            return f"it is not a {kind} folder written by edge-effnet ({FOLDER_KINDS[kind][1]})"
        return None
    if os.path.isdir(path):
        return "it is a folder"
    if not os.path.isfile(path):
        return "it is not a regular file"
    if kind != "file" and not path.lower().endswith(kind):
        return f"it is not a {kind} file"
    return None


def check_output(path: str, force: bool = False, kind: str | None = None) -> None:
    """Fail early unless `path` can be written: new, or (with force) replaceable; its folder writable.

    kind: a FOLDER_KINDS key ("bundle": a folder holding manifest.json, "checkpoint": one holding
    run.json, "photoset": PNG files; an empty folder always qualifies), or the suffix of the file
    the command writes (".keras", ".json", ...); None: the path's own suffix.
    Also removes temporary files and folders a killed run left for this output.
    """
    if not path or not os.path.basename(os.path.abspath(path)):
        raise UserError(f"cannot write {path!r}: not a file or folder name")
    kind = kind or os.path.splitext(path)[1].lower() or "file"
    if kind.startswith(".") and not path.lower().endswith(kind):
        raise UserError(f"{path}: the output must end in {kind}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        missing = parent
        while not os.path.exists(missing) and os.path.dirname(missing) != missing:
            missing = os.path.dirname(missing)
        if os.path.exists(missing) and not os.path.isdir(missing):
            raise UserError(f"cannot write {path}: {missing} is a file, not a folder")
        raise UserError(f"cannot write {path}: folder {parent} does not exist")
    if os.path.lexists(path):
        why = _ours(path, kind)
        if why:
            raise UserError(f"{path} exists and {why}: edge-effnet replaces only what it wrote "
                            "(even with --force); choose another output")
        if not force:
            raise UserError(f"{path} exists; pass --force to overwrite it")
    try:  # a real probe: os.access says yes to root even on read-only file systems
        fd, probe = tempfile.mkstemp(prefix=".edge-effnet-probe-", dir=parent)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise UserError(f"cannot write {path}: folder {parent} is not writable ({exc.strerror})") from None
    clean_stale(path)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def clean_stale(path: str) -> list[str]:
    """Remove `.NAME.partial-*` / `.NAME.old-*` beside `path` whose process is gone; returns them.

    A folder swapped out by a run killed mid-replacement (`.NAME.old-*/x`) is put back when
    `path` itself is missing, so an interrupted replacement never loses the old output.
    """
    parent, base = os.path.split(os.path.abspath(path))
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        m = _TEMP.match(name)
        if not m or m.group("base") != base:
            continue
        full = os.path.join(parent, name)
        if m.group("pid"):
            if _alive(int(m.group("pid"))):
                continue
        else:
            try:
                if time.time() - os.lstat(full).st_mtime < LEGACY_STALE_S:
                    continue
            except OSError:
                continue
        kept = os.path.join(full, "x")
        if ".old-" in name and os.path.isdir(kept) and not os.path.lexists(path):
            os.replace(kept, path)
        _remove(full)
        removed.append(full)
    return removed


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.remove(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_prefix(path: str, what: str = "partial") -> tuple[str, str]:
    parent, base = os.path.split(os.path.abspath(path))
    return parent, f".{base}.{what}-{os.getpid()}-"


@contextlib.contextmanager
def atomic_file(path: str):
    """Yield a temporary path next to `path` (same suffix); rename to `path` on success.

    An OSError inside the block or on the rename becomes one UserError naming `path`.
    """
    parent, prefix = _temp_prefix(path)
    suffix = "".join(f".{s}" for s in os.path.basename(path).split(".")[1:])
    try:
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; an output file gets the user's umask
    except OSError as exc:
        raise os_error(path, exc) from None
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        if exc.filename not in (None, tmp, path) and not str(exc.filename).startswith(parent):
            raise
        raise os_error(path, exc) from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


@contextlib.contextmanager
def atomic_dir(path: str, force: bool = False, kind: str = "bundle"):
    """Yield a temporary folder next to `path`; it replaces `path` only when the block succeeds."""
    check_output(path, force, kind)
    parent, prefix = _temp_prefix(path)
    try:
        tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a bundle is an ordinary folder
    except OSError as exc:
        raise os_error(path, exc) from None
    try:
        yield tmp
        if not os.path.lexists(path):
            os.rename(tmp, path)
        elif not _exchange(tmp, path):  # old kernels/file systems: two renames, undone by clean_stale
            old = tempfile.mkdtemp(prefix=_temp_prefix(path, "old")[1], dir=parent)
            os.replace(path, os.path.join(old, "x"))
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        if exc.filename is not None and not str(exc.filename).startswith(parent):
            raise
        raise os_error(path, exc) from None
    finally:
        _remove(tmp)  # after an exchange: the old output


def write_json(path: str, data) -> None:
    """`data` as indented JSON at `path`, written atomically."""
    write_text(path, json.dumps(data, indent=1) + "\n")


def write_text(path: str, text: str) -> None:
    """`text` at `path` (UTF-8), written atomically."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
