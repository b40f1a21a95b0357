"""SIGTERM -> "save at the next step boundary and exit 0".

Schedulers (Kubernetes, Slurm, Cloud TPU maintenance, spot VMs) send SIGTERM some seconds
before they kill a job. One process: a Python handler sets a flag that the loop reads
between steps. Several processes: the hosts must agree on the step to save, or each would
write a different one; JAX's preemption sync manager (started by
`jax.distributed.initialize`, it listens for SIGTERM itself) picks the step, and
`reached_preemption(step)`, called on every host at every step, is True on all of them at
that same step. No Python handler is installed then, as it would replace JAX's.
"""

from __future__ import annotations

import signal

import jax
from absl import logging


class PreemptionWatcher:
  """Use as a context manager around the train loop; call `reached(step, manager)` after
  every step."""

  def __init__(self):
    self._flag = False
    self._previous = None
    self._installed = False

  def __enter__(self) -> "PreemptionWatcher":
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
      self._installed = True
    return self

  def __exit__(self, *exc) -> None:
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous)
      self._installed = False

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    # Only a flag: the step in flight finishes, the loop saves at its boundary.
    self._flag = True

  def reached(self, step: int, manager) -> bool:
    """True when the run should save `step` and stop (the same step on every host)."""
    if jax.process_count() > 1:
      # orbax asks multihost_utils.reached_preemption_sync_point.
      reached = manager.reached_preemption(step)
    else:
      reached = self._flag
    if reached:
      logging.warning("preemption notice (SIGTERM): saving step %d and exiting", step)
    return reached
