"""Consoles, progress bars, JSON output, and the one mapping of errors to exit codes."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from collections.abc import Callable, Iterator

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tlcli import interrupts
from tlcli.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, TlcliError

err = Console(stderr=True, highlight=False, soft_wrap=True)


out = Console(highlight=False, soft_wrap=True)


def _fail(message: str, code: int) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False)
    raise typer.Exit(code)


def _interrupted() -> None:
    err.print("interrupted; files already written are complete, nothing half-written was left")
    raise typer.Exit(EXIT_INTERRUPTED) from None


def _stdout_gone() -> None:
    """The reader of stdout went away (``| head``): point stdout at /dev/null so nothing fails writing to it again."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def handles_errors(fn: Callable) -> Callable:
    """Turn library errors into one line on stderr and the documented exit code; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            result = fn(*args, **kwargs)
            interrupts.check()
            return result
        except typer.Exit:
            raise
        except BrokenPipeError:
            _stdout_gone()
            raise typer.Exit(EXIT_OK) from None
        except TlcliError as exc:
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            _interrupted()
        except MemoryError:
            _fail("out of memory; try a smaller --batch-size", EXIT_FAILURE)
        except OSError as exc:
            where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
            _fail(f"{exc.strerror or exc}{where}", EXIT_FAILURE)
        except Exception as exc:
            # pybind11 hands a Ctrl-C raised inside TensorFlow's C++ back as another error
            if interrupts.requested():
                _interrupted()
            if os.environ.get("TLCLI_DEBUG"):
                raise
            _fail(
                f"unexpected {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                "(set TLCLI_DEBUG=1 for a traceback)",
                EXIT_FAILURE,
            )

    return wrapper


def use_device(device: str, quiet: bool, strategy: str | None = None) -> dict:
    """Choose devices through TensorFlow device placement before any op runs; say when auto falls back.

    A tf.distribute ``strategy`` is created here too, as a multi-worker one must precede the first op.
    """
    from tlcli.models import devices
    from tlcli.train import distribute

    with native_stderr_silenced():
        info = devices.select(device)
        info["strategy"] = distribute.distribution(strategy) if strategy else None
        import tensorflow as tf

        tf.constant(0)
    if info["note"]:
        log(info["note"], quiet)
    return info


def deferred_device(device: str, quiet: bool) -> Callable[[], dict]:
    """``use_device`` put off until TensorFlow is first needed (an extract re-run may never import it); a GPU is
    chosen at once and a typo refused, so either is an error before any work."""
    from tlcli.models import devices

    choose = functools.cache(lambda: use_device(device, quiet))
    if devices.parse(device)[0] == "gpu":
        choose()
    return choose


@contextlib.contextmanager
def progress_bar(description: str, quiet: bool) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar on stderr, silent with --quiet or when stderr is not a terminal."""
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=quiet or not err.is_terminal,
        transient=False,
    )
    task = progress.add_task(description, total=None)

    def update(done: int, total: int, *_) -> None:
        interrupts.check()
        progress.update(task, completed=done, total=total)

    with progress:
        yield update


def log(message: str, quiet: bool) -> None:
    if not quiet:
        err.print(message)


def emit_json(doc, *, compact: bool = False) -> None:
    """One JSON document on stdout: indented, or ``compact`` on one line (for a log a cron job appends to)."""
    text = json.dumps(doc, default=str, separators=(",", ":")) if compact else json.dumps(doc, indent=2, default=str)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Hide everything written to stderr meanwhile, by Python and by TensorFlow's C++ (start-up, converter logs)."""
    if os.environ.get("TLCLI_DEBUG"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def keep_native_logs_off_terminal() -> None:
    """For the process's life, send file descriptor 2 to /dev/null and Python's stderr to the real one.

    TensorFlow's C++ code logs to descriptor 2 whenever it likes (absl lines such as 'E0000 ... NodeDef
    mentions attribute ...' ignore TF_CPP_MIN_LOG_LEVEL), so only Python's writes, tlcli's messages
    among them, reach the terminal. TLCLI_DEBUG=1 leaves descriptor 2 alone.
    """
    if os.environ.get("TLCLI_DEBUG") or sys.stderr is None:
        return
    sys.stderr.flush()
    try:
        terminal = os.dup(2)
    except OSError:  # stderr closed (2>&-): nothing to keep clean
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    sys.stderr = open(terminal, "w", buffering=1, encoding=sys.stderr.encoding, errors=sys.stderr.errors)
