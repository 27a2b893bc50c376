"""Sharded checkpoints with orbax: asynchronous saves, validated restores, resharding.

A checkpoint step folder holds four orbax items: `params` and `opt_state` (sharded arrays,
written by every process), `meta` (the step, the data iterator state and the RNG, as JSON)
and `config` (the run's TrainConfig, as JSON). Nothing is pickled, so loading a checkpoint
never runs code.

Restores go straight into the target shardings: the abstract arrays handed to orbax carry
the new mesh's shardings, so each device reads only its own slices, whatever mesh wrote them.

Orbax lists any step folder, even an empty or half-written one, as a step, and a truncated
data file only shows when it is read. So every step is checked before it is trusted, and a
restore that finds the step corrupt falls back to the previous step with one warning line.
A failure that says nothing against the step's bytes (out of memory, no permission, a
filesystem hiccup) stops instead and leaves every step folder as it was: `spmd.checkpoint.faults`
tells the two apart. In a multi-process job, process 0 chooses the step and every process
restores exactly that one; if any process cannot, the whole job stops.

Modules: `steps` (what is on disk, and whether a step folder is whole), `save` (the
Checkpointer), `restore` (fallback, agreement across processes, resharding), `verify`
(reading every byte), `faults` (corruption or not) and `quiet` (orbax's noise).
"""

from spmd.checkpoint.restore import (
    restore_params,
    restore_train_state,
    restore_with_fallback,
    set_aside_newer,
)
from spmd.checkpoint.save import Checkpointer
from spmd.checkpoint.steps import (
    ARRAY_ITEMS,
    ITEMS,
    JSON_ITEMS,
    all_steps,
    disk_bytes,
    latest_valid_step,
    load_run_config,
    read_json_item,
    step_problem,
    warn,
)
from spmd.checkpoint.verify import CouldNotVerify, verify_step

__all__ = [
    "ARRAY_ITEMS",
    "ITEMS",
    "JSON_ITEMS",
    "Checkpointer",
    "CouldNotVerify",
    "all_steps",
    "disk_bytes",
    "latest_valid_step",
    "load_run_config",
    "read_json_item",
    "restore_params",
    "restore_train_state",
    "restore_with_fallback",
    "set_aside_newer",
    "step_problem",
    "verify_step",
    "warn",
]
