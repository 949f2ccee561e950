"""Entry-point scripts run as `python SCRIPT ARGS` runs them, but each in a process forked from a server
that has already imported the libraries they share (about 1.5 s of imports per script, paid once).

The child takes the given environment, working directory and argv, puts the script's directory first
on sys.path, runs the script as __main__ with its stdout and stderr in files, prints an uncaught
exception's traceback, runs the exit handlers and exits with the script's code, as the interpreter
does. The project's own modules are not preloaded: each script imports them itself.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import multiprocessing.forkserver
import os
import runpy
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path

PRELOAD = [
    "numpy", "jax", "flax.linen", "optax", "orbax.checkpoint", "ml_collections.config_flags",
    "absl.app", "tensorstore", "pandas", "scipy.stats", "matplotlib",
]  # fmt: skip


def _exit_code(code: object) -> int:
    """The process exit status of SystemExit(code), as the interpreter sets it."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _child(script: str, args: list[str], cwd: str, env: dict[str, str], out: str, err: str) -> None:
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(file, fd)
        os.close(file)
    sys.argv = [script, *args]
    sys.path.insert(0, str(Path(script).resolve().parent))
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:
        code = _exit_code(stop.code)
    except BaseException as error:  # as the interpreter does: its traceback from the script on, exit 1
        tb = error.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != script:
            tb = tb.tb_next
        traceback.print_exception(type(error), error, tb)
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@contextlib.contextmanager
def _environ(env: dict[str, str]):
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload(PRELOAD)
_starting = threading.Lock()


def _server(env: dict[str, str]) -> None:
    """Starts the fork server (once) in environment `env`, so that what the libraries read from it at
    import is what a script started in `env` reads."""
    with _starting, _environ(env):
        multiprocessing.forkserver.ensure_running()


def run_script(
    script: str, args: list[str], cwd: Path, env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess:
    """`python script *args` in `cwd` with environment `env`, as a CompletedProcess with text output.
    The first call starts the server in `env`; later calls should pass the same."""
    _server(env)
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
        process = _context.Process(target=_child, args=(script, args, str(cwd), env, out, err))
        process.start()
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired([script, *args], timeout)
        read = lambda path: Path(path).read_text() if os.path.exists(path) else ""
        return subprocess.CompletedProcess([script, *args], process.exitcode, read(out), read(err))
