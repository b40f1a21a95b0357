"""Multi-process start-up: `jax.distributed` on pods, GPU clusters and localhost.

One process per host (TPU VM worker, GPU node) or, for tests, per group of simulated
CPU devices (`launch/local_multihost.sh`). Every process runs the same program; after
`initialize` `jax.devices()` lists all processes' devices, each process feeds its own
part of the batch (`train.to_global`), and process 0 alone writes metrics and the
config (orbax coordinates checkpoint writes across processes itself).
"""

from __future__ import annotations

import jax
from absl import logging

from mmelectra import errors


def _cluster_detected() -> bool:
  """Whether JAX's own auto-detection sees a cluster (Cloud TPU pod slice, SLURM, ...).

  Uses JAX's cluster registry (private): if it moves, fall back to explicit flags.
  """
  try:
    from jax._src.clusters import ClusterEnv
  except ImportError:
    return False
  for env in ClusterEnv._cluster_types:  # pylint: disable=protected-access
    try:
      if not getattr(env, "opt_in_only_method", False) and env.is_env_present():
        return True
    except Exception:  # pylint: disable=broad-except
      continue
  return False


def initialize(mode: str = "auto", coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> bool:
  """Starts `jax.distributed` when the run spans several processes; returns whether it did.

  mode: "off" never; "on" always (arguments or JAX's auto-detection fill the rest);
  "auto" when a coordinator address is given or JAX detects a cluster (on a Cloud TPU VM
  slice it does, so pod workers need no flags).
  CPU processes exchange collectives over gloo.
  """
  if mode not in ("auto", "on", "off"):
    raise errors.InvalidInput(f"--distributed must be auto, on or off, got {mode!r}")
  if mode == "off" or jax.distributed.is_initialized():
    return jax.distributed.is_initialized()
  explicit = coordinator_address is not None or (num_processes or 1) > 1
  if mode == "auto" and not explicit and not _cluster_detected():
    return False
  if explicit and (coordinator_address is None or num_processes is None or process_id is None):
    raise errors.InvalidInput("multi-process by flags needs all of --coordinator_address, --num_processes "
                              "and --process_id")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def is_lead() -> bool:
  """Process 0: the one that writes metrics, the run config and prints results."""
  return jax.process_index() == 0
