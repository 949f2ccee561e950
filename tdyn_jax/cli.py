"""What the command-line entry points share: a user mistake or a full disk is one line on stderr and
exit code 2, Ctrl-C one line and exit code 130, and the libraries' log lines stay out of the terminal."""

from __future__ import annotations

import errno
import json
import logging as std_logging
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from absl import app, flags, logging

INTERRUPTED = 130  # the shell's code for a process ended by Ctrl-C


def fail(message: str) -> NoReturn:
    """Prints 'error: <message>' to stderr and exits with code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def refuse_extra_args(argv: list[str]) -> None:
    """Fails on positional arguments left over after the flags (argv[0] is the program)."""
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing whose errors (a bad or missing flag, an unknown config field, a config file
    that does not load) are one line and exit 2."""
    try:
        rest = flags.FLAGS(argv)
        if "config" in flags.FLAGS and flags.FLAGS.config is not None:
            _ = flags.FLAGS.config.name  # loads the config file now, so its errors surface here
    except flags.Error as e:
        fail(f"{e}")
    except (AttributeError, KeyError) as e:
        field = str(e).strip("\"'")
        culprit = next((a for a in argv if a.startswith("--config.") and f".{field}" in a), field)
        fail(f"unknown config field in {culprit}: configs/base.py lists the fields")
    except OSError as e:
        path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
        fail(f"cannot load the config file {path} ({type(e).__name__}): check the path")
    return rest


NO_SPACE = "No space left on device"  # strerror(ENOSPC), also in the messages of tensorstore's errors


def no_space(error: BaseException) -> str | None:
    """The file that a full disk kept `error` (or an error it was raised from) from writing: its path,
    '' when the error names none, or None when the error is not that."""
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return error.filename or ""
        if NO_SPACE in str(error):  # tensorstore (Orbax): 'Failed writing: "<path>": ... No space ...'
            found = re.search(r'Failed writing: "([^"]+)"', str(error))
            return found.group(1) if found else ""
        error = error.__cause__ or error.__context__
    return None


def full_disk(path: str) -> str:
    """What an entry point says when the disk filled up writing `path` ('' if unknown)."""
    where = f" writing {path}" if path else ""
    return (
        f"no space left on the device{where}: free space there and run the same command again (a "
        "training run resumes from its newest complete checkpoint)"
    )


def _quiet_libraries(record: std_logging.LogRecord) -> bool:
    """Keeps the log to this package's lines, plus errors from libraries (all of theirs with
    --verbosity=1 or more) except those of a full disk, which the entry point reports in one line."""
    if flags.FLAGS.verbosity > 0:
        return True
    error = record.exc_info[1] if record.exc_info else None
    if NO_SPACE in record.getMessage() or (error is not None and no_space(error) is not None):
        return False
    return record.levelno >= std_logging.ERROR or "/tdyn_jax/" in record.pathname


def user_errors() -> tuple[type[Exception], ...]:
    """The exception types that mean a user mistake (their message names it and the fix)."""
    from tdyn_jax.analysis.load import CapturesError
    from tdyn_jax.checkpoint import CheckpointError
    from tdyn_jax.config import ConfigError
    from tdyn_jax.data import DataError

    return ConfigError, DataError, CheckpointError, CapturesError


def run_directory(path: str) -> Path:
    """`path` as a run directory (one holding config.json), or one line and exit 2."""
    workdir = Path(path)
    if not (workdir / "config.json").is_file():
        fail(f"{workdir} is not a run directory (no config.json): pass the --workdir of a run")
    return workdir


def refuse_other_run(workdir: Path, name: str) -> None:
    """Exit 2 with one line if `workdir` holds a run of another config than `name` (a study script
    pointed at someone else's run)."""
    path = workdir / "config.json"
    try:
        saved = json.loads(path.read_text()).get("name") if path.is_file() else name
    except (OSError, ValueError, AttributeError) as e:
        fail(f"cannot read {path} ({type(e).__name__}): restore it or pass another --workdir")
    if saved != name:
        fail(f"{workdir} holds the run {saved!r}, not {name!r}: pass another --workdir")


def quit_on_interrupt(
    message: str = "interrupted (Ctrl-C): stopped; the newest checkpoint, if any, is intact",
) -> None:
    """Makes Ctrl-C print `message` and exit 130 at once. The handler raises nothing (library code
    may swallow an exception raised in a signal handler, e.g. in a garbage-collection callback) and
    leaves no compilation running past the interpreter (os._exit)."""

    def handler(signum: int, frame: Any) -> None:
        print(message, file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(INTERRUPTED)

    signal.signal(signal.SIGINT, handler)


def drop_closed_loop_callbacks() -> None:
    """Makes the interpreter drop the "Event loop is closed" errors of Orbax reads abandoned by a
    failed restore (a damaged checkpoint or probe chunk): Orbax closes its event loop as soon as one
    read fails, and the reads still in flight then finish into the closed loop, each printing a
    traceback after the one line that said what happened. Every other unraisable error still goes
    to the default hook."""
    default = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        error, trace = unraisable.exc_value, unraisable.exc_traceback
        frames = []
        while trace is not None:
            frames.append(trace.tb_frame.f_code.co_name)
            trace = trace.tb_next
        closed = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
        if not (closed and "call_soon_threadsafe" in frames):
            default(unraisable)

    sys.unraisablehook = hook


def run(main: Callable[[list[str]], int | None], flags_parser: Callable = parse_flags) -> None:
    """`app.run(main)` for an entry point: flag errors, the project's user errors and a full disk as
    one line (exit 2), library log lines left out, extra arguments refused, Ctrl-C as one line with exit
    code 130, no traceback (`quit_on_interrupt`; the train loop handles it itself), and no stray
    tracebacks after a damaged file (`drop_closed_loop_callbacks`)."""
    quit_on_interrupt()
    drop_closed_loop_callbacks()

    def entry(argv: list[str]) -> int | None:
        refuse_extra_args(argv)
        logging.get_absl_handler().addFilter(_quiet_libraries)
        try:
            return main(argv)
        except Exception as e:
            if isinstance(e, user_errors()):
                fail(str(e))
            path = no_space(e)
            if path is not None:
                fail(full_disk(path))
            raise

    app.run(entry, flags_parser=flags_parser)
