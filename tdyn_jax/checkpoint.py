"""The run directory's lock and config.json, and the Orbax manager of the train-state checkpoints."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from tdyn_jax.config import ConfigError, resume_conflicts


def unreadable_reason(e: Exception) -> str:
    """One short line for why a file did not read: the exception's type and first line."""
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first}"[:200]


class CheckpointError(Exception):
    """No checkpoint of a run restores; the message names the directory and what to do."""


def saved_config_path(workdir: Path) -> Path | None:
    """WORKDIR/config.json, or without it the config saved with the newest checkpoint, or None."""
    path = workdir / "config.json"
    if path.exists():
        return path
    saved = [p for p in (workdir / "checkpoints").glob("*") if p.name.isdigit() and (p / "config").is_dir()]
    newest = max(saved, key=lambda p: int(p.name), default=None)
    return newest / "config" / "metadata" if newest is not None else None


def check_resume(workdir: Path, config: dict[str, Any]) -> None:
    """Raises ConfigError if `workdir` holds a run saved with a config that forbids resuming it with
    `config`, or cannot be created or written where it would be (reads only: run before compiling
    anything). Without config.json, the config saved with the newest checkpoint decides."""
    existing = next(p for p in (workdir, *workdir.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"workdir {workdir}: {existing} is a file, not a directory; pass another --workdir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(_unwritable(workdir, f"{existing} is not writable"))
    path = saved_config_path(workdir)
    if path is None:
        return
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(
            f"cannot read {path} ({type(e).__name__}): restore it or move {workdir} aside"
        ) from e
    conflicts = resume_conflicts(saved, config) if isinstance(saved, dict) else ["config.json"]
    if conflicts:
        raise ConfigError(
            f"cannot resume {workdir}: its config differs in {'; '.join(conflicts[:3])}"
            f"{' ...' if len(conflicts) > 3 else ''}; use the saved values or another --workdir"
        )


LOCK = ".lock"  # WORKDIR/.lock: an empty file, flocked by the run that trains in the directory


def _unwritable(workdir: Path, reason: str) -> str:
    return f"cannot write the run directory {workdir} ({reason}): pass a --workdir you can write to"


def lock_workdir(workdir: Path) -> int:
    """Takes the run directory's lock: an exclusive, non-blocking flock on WORKDIR/.lock (created
    empty if missing), which goes with the process however it ends (kill -9 too): a crashed run
    leaves nothing to clean up. Returns its descriptor (close it to release). Raises ConfigError if
    another process holds it or the directory cannot be written."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(workdir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConfigError(_unwritable(workdir, unreadable_reason(e))) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(
            f"{workdir} is in use by another run (a process holds {workdir / LOCK}): "
            "wait for it to end or pass another --workdir"
        ) from None
    return fd


def write_config(workdir: Path, config: dict[str, Any]) -> None:
    """Writes WORKDIR/config.json (atomically; process 0)."""
    if jax.process_index() == 0:
        path = workdir / "config.json"
        workdir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)


class Checkpoints:
    """Train-state checkpoints under WORKDIR/checkpoints: state, data iterator state, config and the
    open log interval (what the next log line needs of the steps before the checkpoint).

    The writer (the run that trains) holds the run directory's lock (process 0, `lock_workdir`) until
    `close`, and deletes partial saves left by a crash: two runs in one directory would interleave
    their checkpoints, probe chunks and metrics, and each would delete the other's save in progress.
    A reader (`writer=False`: sampling text from a run that may still be training) takes no lock and
    touches nothing."""

    def __init__(self, workdir: Path, cfg: ml_collections.ConfigDict, writer: bool = True):
        self.lock = self._lock(Path(workdir)) if writer else None
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep,
            enable_async_checkpointing=cfg.async_save,
            cleanup_tmp_directories=writer,
            create=writer,
            read_only=not writer,
        )
        self.directory = Path(workdir).absolute() / "checkpoints"
        try:
            self.manager = ocp.CheckpointManager(
                self.directory, item_names=("state", "data", "config", "log"), options=options
            )
        except BaseException:
            self._unlock()
            raise

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step; partial (crashed) saves are not counted."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """The steps of the complete checkpoints, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    def save(self, step: int, state: Any, data_state: dict, config: dict, log: dict) -> None:
        """Saves (asynchronously if configured) the train state after `step` steps."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config),
            log=ocp.args.JsonSave(log),
        )
        self.manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """(train state, data state, log) of `step`, the state laid out as `abstract_state` (shapes +
        shardings); log is {} for a checkpoint written without one."""
        path = self.directory / str(step)
        missing = [name for name in ("_CHECKPOINT_METADATA", "state", "data") if not (path / name).exists()]
        if missing:
            raise FileNotFoundError(f"{path} has no {', '.join(missing)}")
        args = {"state": ocp.args.StandardRestore(abstract_state), "data": ocp.args.JsonRestore()}
        if (path / "log").exists():
            args["log"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        if int(restored["state"].step) != step:
            raise ValueError(f"its state is at step {int(restored['state'].step)}")
        return restored["state"], restored["data"], restored["log"] if "log" in args else {}

    def move_aside(self, step: int) -> Path:
        """Renames checkpoint `step` to <step>.corrupt (.corrupt-2, ... if taken); returns the new path."""
        target, n = self.directory / f"{step}.corrupt", 1
        while target.exists():
            n += 1
            target = self.directory / f"{step}.corrupt-{n}"
        if jax.process_index() == 0:
            os.replace(self.directory / str(step), target)
        multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
        self.manager.reload()
        return target

    def reached_preemption(self, step: int) -> bool:
        """True when the cluster's preemption sync point is reached (multi-host TPU)."""
        return self.manager.reached_preemption(step)

    def close(self) -> None:
        """Waits for pending saves and releases the manager and the run directory's lock."""
        try:
            self.manager.wait_until_finished()
            self.manager.close()
        finally:
            self._unlock()

    @staticmethod
    def _lock(workdir: Path) -> int | None:
        """`lock_workdir` on process 0, whose outcome every process learns: all of them raise if it
        failed (rather than the others going on to wait for process 0 at the next barrier)."""
        fd, error = None, None
        if jax.process_index() == 0:
            try:
                fd = lock_workdir(workdir)
            except ConfigError as e:
                error = e
        if jax.process_count() > 1:
            locked = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
            if not locked and error is None:
                error = ConfigError(f"process 0 could not lock the run directory {workdir}: see its error")
        if error is not None:
            raise error
        return fd

    def _unlock(self) -> None:
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None
