"""The run directory's config.json and the Orbax manager of train state, data state and config."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from tdyn_jax.config import ConfigError, resume_conflicts


def prepare_workdir(workdir: Path, config: dict[str, Any]) -> None:
    """Writes WORKDIR/config.json for a new run; refuses to resume a run saved with a clashing one."""
    path = workdir / "config.json"
    if path.exists():
        saved = json.loads(path.read_text())
        conflicts = resume_conflicts(saved, config)
        if conflicts:
            raise ConfigError(
                f"cannot resume {workdir}: its config differs in {'; '.join(conflicts[:3])}"
                f"{' ...' if len(conflicts) > 3 else ''}; use the saved values or another --workdir"
            )
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)


class Checkpoints:
    """Train-state checkpoints under WORKDIR/checkpoints: state, data iterator state and config."""

    def __init__(self, workdir: Path, cfg: ml_collections.ConfigDict):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep,
            enable_async_checkpointing=cfg.async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            Path(workdir).absolute() / "checkpoints",
            item_names=("state", "data", "config"),
            options=options,
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step; partial (crashed) saves are not counted."""
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, config: dict) -> None:
        """Saves (asynchronously if configured) the train state after `step` steps."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config),
        )
        self.manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """(train state, data state) of `step`, laid out as `abstract_state` (shapes + shardings)."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        return restored["state"], restored["data"]

    def reached_preemption(self, step: int) -> bool:
        """True when the cluster's preemption sync point is reached (multi-host TPU)."""
        return self.manager.reached_preemption(step)

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
