"""Errors the CLI reports as one line with a non-zero exit code, and the log of unexpected ones."""
from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback


class UserError(Exception):
    """Bad input or an unmet precondition: reported as one line, exit code 2."""

    exit_code = 2


class CheckFailed(UserError):
    """An exported artifact failed its self-check: exit code 1."""

    exit_code = 1


class Interrupted(BaseException):
    """The process was asked to stop (Ctrl-C, SIGTERM, SIGHUP): it unwinds like KeyboardInterrupt,
    so every temporary file is removed on the way out; the CLI exits with 128 + the signal."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def log_dir() -> str:
    """Where full tracebacks go: $EDGE_EFFNET_LOG_DIR, else $XDG_CACHE_HOME (~/.cache)/edge-effnet/logs."""
    if os.environ.get("EDGE_EFFNET_LOG_DIR"):
        return os.environ["EDGE_EFFNET_LOG_DIR"]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "edge-effnet", "logs")


def log_exception(exc: BaseException) -> str | None:
    """Write the full traceback of `exc` (with the command line) to a new file in log_dir(), else
    in the temporary folder; returns its path (None if nothing could be written)."""
    text = (f"edge-effnet {' '.join(sys.argv[1:])}\n{time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}\n\n"
            + "".join(traceback.format_exception(exc)))
    name = f"edge-effnet-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    for folder in (log_dir(), tempfile.gettempdir()):
        try:
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, name)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            return path
        except OSError:
            continue
    return None
