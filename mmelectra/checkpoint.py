"""Orbax checkpoints of the train state under `WORKDIR/checkpoints/<step>`."""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, max_to_keep: int | None = 3) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, step: int, state, force: bool = False) -> bool:
  return manager.save(step, args=ocp.args.StandardSave(state), force=force)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state):
  """Restores into arrays with the shardings of `abstract_state` (ShapeDtypeStructs)."""
  return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))


def abstract_with_shardings(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
