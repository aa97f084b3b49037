"""The console: progress bars, C++ chatter kept off the screen, TensorFlow's quiet import, one-line errors.

Standard library (+ click for the bar and the errors; errors.UserError): every part of the tool uses these.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile


@contextlib.contextmanager
def quiet_output(fds=(2,)):
    """Keep C++ chatter written straight to these file descriptors (TensorFlow's start-up lines,
    the TFLite converter's log) off the console. If the block fails unexpectedly, the chatter is
    attached to the exception as a note (it lands in the crash log, not on the console, so an
    error stays one line); after bad input (UserError) or an interrupt it is dropped.

    Python's own sys.stderr keeps pointing at the console, so progress bars still show.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in fds]
    python_stderr = sys.stderr
    with tempfile.TemporaryFile() as log:
        for fd in fds:
            os.dup2(log.fileno(), fd)
        if 2 in fds:
            sys.stderr = os.fdopen(os.dup(saved[fds.index(2)]), "w", buffering=1)
        try:
            yield
        except Exception as exc:
            from .errors import UserError

            log.seek(0)
            chatter = log.read().decode(errors="replace").strip()
            if chatter and not isinstance(exc, UserError):
                exc.add_note(f"native output before the error:\n{chatter[-20000:]}")
            raise
        finally:
            sys.stdout.flush()
            if sys.stderr is not python_stderr:
                sys.stderr.close()
                sys.stderr = python_stderr
            for fd, keep in zip(fds, saved):
                os.dup2(keep, fd)
                os.close(keep)


def import_keras():
    """Import keras (and TensorFlow) with TensorFlow's C++ start-up log lines kept off the console.

    Those lines are written to fd 2 before TF_CPP_MIN_LOG_LEVEL takes effect; they are replayed
    only if the import fails.
    """
    if "keras" in sys.modules:
        return sys.modules["keras"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")  # CPU toolkit: skip the CUDA probe
    with quiet_output():
        import keras
        import tensorflow  # noqa: F401
    return keras


def status(line: str) -> None:
    """A progress line ("loading m.keras", "converting ...") on stderr, only when stderr is a
    terminal, like the progress bars: in logs and scripts an error stays the one line on stderr."""
    if sys.stderr.isatty():
        print(line, file=sys.stderr, flush=True)


def progress(items, label: str, total: int | None = None):
    """A progress bar on stderr (click's) for long loops; silent when stderr is not a terminal
    (click would print the bare label there, and an error must stay one line)."""
    import click

    if not sys.stderr.isatty():
        return _SilentBar(items)
    return click.progressbar(items, label=label, length=total, file=sys.stderr, show_pos=True)


class _SilentBar:
    """What progress() gives off a terminal: iterates `items` and takes update() calls like click's bar."""

    def __init__(self, items):
        self.items, self.pos = items, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __iter__(self):
        return iter(self.items)

    def update(self, steps: int, current_item=None) -> None:
        self.pos += steps


def _stop(signum, frame):
    from .errors import Interrupted

    raise Interrupted(signum)  # unwinds like Ctrl-C: temporary files are removed on the way out


def one_line_errors(run, prog: str = "edge-effnet") -> None:
    """Call `run` (a click command's main, standalone_mode=False) and exit: every error is one line
    on stderr with a non-zero exit code, never a traceback.

    Bad input (click's errors, errors.UserError): exit 2 (CheckFailed: 1). Ctrl-C: "interrupted",
    130; SIGTERM / SIGHUP unwind the same way (temporary files removed), 128 + the signal. Anything
    else is a bug: one line naming the exception and the log file holding its full traceback
    (errors.log_exception), exit 1.
    """
    import signal

    import click

    from .errors import Interrupted, UserError, log_exception

    def fail(message: str, code: int):
        click.echo(f"{prog}: {message}", err=True)
        sys.exit(code)

    def stop(message: str, code: int):
        # After an interrupt that passed through C code running Python (PyRun_String: pybind11,
        # TensorFlow's import), CPython under `python -m` ignores sys.exit's code and kills itself
        # with the signal (exit -2, not 130). Temporary files are already removed by the unwinding:
        # run the exit handlers, flush, and leave with the code this function promises.
        click.echo(f"{prog}: {message}", err=True)
        import atexit

        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _stop)
    try:
        rv = run()
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        stop("aborted", 130)
    except click.ClickException as exc:
        fail(f"error: {exc.format_message()}", 2 if isinstance(exc, click.UsageError) else exc.exit_code)
    except UserError as exc:
        fail(f"error: {exc}", exc.exit_code)
    except (Interrupted, KeyboardInterrupt) as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        stop("interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}", 128 + signum)
    except Exception as exc:  # the last resort: one line, the full traceback in a log file
        log = log_exception(exc)
        where = f"; full traceback in {log}" if log else ""
        if isinstance(exc, MemoryError):
            fail(f"error: out of memory{where}", 1)
        if isinstance(exc, OSError) and exc.strerror:
            fail(f"error: {exc.filename or 'a file'}: {exc.strerror}{where}", 1)
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        fail(f"internal error: {type(exc).__name__}: {first}{where}", 1)
    sys.exit(rv if isinstance(rv, int) else 0)
