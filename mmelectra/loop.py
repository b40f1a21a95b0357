"""The training loop that pretraining (`train.py`) and fine-tuning (`finetune.py`) share.

A run is a jitted `step_fn(state, batch) -> (state, metric sums)` over a state
`{"step", "params", "opt"}` and a grain iterator. Around it, the loop:

- resumes from the workdir's newest readable checkpoint: the state into the mesh's
  shardings and the iterator where it stood, so a resumed run reads what an
  uninterrupted one would (the step's rng is `fold_in(seed, step)`: nothing else to
  restore); a checkpoint that does not read is set aside (`checkpoint.restore_newest_readable`);
- keeps a window of metric sums and logs their averages every `log_every` steps with
  examples/s and, given the step's FLOPs, TFLOP/s and MFU;
- saves every `checkpoint_every` steps and at the end (asynchronously; a failed save
  stops the run at the next step in one line), and at the step boundary after a SIGTERM;
- runs `evaluate(step, params)` every `eval_every` steps (> 0);
- skips a step whose loss or gradients are not finite (`guarded_update`) and stops after
  `max_nonfinite_steps` of them in a row.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from absl import logging

from mmelectra import checkpoint
from mmelectra import errors
from mmelectra import flops
from mmelectra import metrics as metrics_lib
from mmelectra import preemption
from mmelectra import workdir as workdir_lib
from mmelectra.metric_writer import MetricWriter

# Per-step flag in the step's metric sums: 1 if its loss or gradients were not finite.
NONFINITE = "nonfinite_step"


def guarded_update(tx: optax.GradientTransformation, schedule, state: dict, grads, sums: dict):
  """The optimizer update of a step, unless its loss or gradients are not finite.

  A non-finite step leaves the parameters and the optimizer state as they were (the step
  counter still advances, as does the data) and zeroes its metric sums, so it is left out
  of the logged averages; `sums[NONFINITE]` says which steps they were. Adds the gradient
  norm and the learning rate to the sums. Returns (new state, sums).
  """
  one = jnp.ones((), jnp.float32)
  sums = dict(sums)
  grad_norm = optax.tree.norm(grads)
  sums["grad_norm"] = (grad_norm, one)
  sums["learning_rate"] = (schedule(state["step"]), one)
  finite = jnp.isfinite(grad_norm)
  if "loss" in sums:
    finite &= jnp.isfinite(sums["loss"][0])

  def apply_update(grads, opt_state, params):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  # A branch, not `where(finite, new, old)` on every leaf: the select keeps the old Adam
  # moments alive next to the in-place update, and XLA copied all of them every step.
  params, opt = jax.lax.cond(finite, apply_update, lambda g, o, p: (p, o),
                             grads, state["opt"], state["params"])
  sums = jax.tree.map(lambda x: jnp.where(finite, x, jnp.zeros_like(x)), sums)
  sums[NONFINITE] = (jnp.logical_not(finite).astype(jnp.float32), one)
  return {"step": state["step"] + 1, "params": params, "opt": opt}, sums


@dataclasses.dataclass
class Run:
  """One run of the loop. `config` needs `total_steps`, `batch_size`, `log_every`,
  `checkpoint_every`, `max_checkpoints_to_keep`, `keep_checkpoint_every`,
  `max_nonfinite_steps` and `eval_every`; it is saved with every checkpoint."""

  workdir: str
  config: object
  mesh: jax.sharding.Mesh
  rules: tuple
  step_fn: Callable
  data_iter: object
  to_device: Callable[[dict], dict]  # a host batch from `data_iter` -> the step's input
  step_flops: float = 0.0  # analytic FLOPs of one step (0: no TFLOP/s and MFU)
  extra_metrics: Callable[[], dict] | None = None  # logged with each row
  evaluate: Callable[[int, dict], dict] | None = None  # (step, params) every eval_every steps


def open_manager(run: Run):
  c = run.config
  return workdir_lib.training_manager(run.workdir, c.max_checkpoints_to_keep,
                                      c.keep_checkpoint_every or None)


def restore_or_init(run: Run, manager, abstract_state, init: Callable[[], dict],
                    strict: bool = False) -> tuple[dict, int | None]:
  """(state, step) of the workdir's newest readable checkpoint (with the iterator moved
  to where it stood), else (`init()`, None)."""
  latest = manager.latest_step()
  if latest is not None:
    try:
      checkpoint.warn_config_changes(checkpoint.restore_config(manager, latest), run.config)
    except Exception:  # noqa: BLE001 - an unreadable checkpoint is reported by the restore below
      pass
  step, state = checkpoint.restore_newest_readable(manager, abstract_state, data_iter=run.data_iter,
                                                   strict=strict, set_aside=True)
  if step is None:
    return init(), None
  logging.info("resuming from %s step %d", manager.directory, step)
  return state, step


class _Window:
  """Metric sums since the last logged step, and the time they took."""

  def __init__(self):
    self.sums, self.t0, self.steps = [], None, 0

  def add(self, sums, state):
    self.sums.append(sums)
    if self.t0 is None:
      # The first step includes compilation: time throughput from its end.
      jax.block_until_ready(state["step"])
      self.t0 = time.perf_counter()
    else:
      self.steps += 1

  def close(self, run: Run, peak_flops: float | None) -> dict:
    total = metrics_lib.sum_all(jax.device_get(self.sums))
    nonfinite = float(total.pop(NONFINITE)[0])  # every step's sums have it (guarded_update)
    metrics = metrics_lib.finalize_metrics(total)
    metrics["nonfinite_steps"] = nonfinite  # in this logging window
    elapsed = time.perf_counter() - self.t0
    if self.steps > 0:
      metrics["examples_per_sec"] = self.steps * run.config.batch_size / elapsed
      if run.step_flops:
        metrics.update(flops.throughput_metrics(run.step_flops, self.steps / elapsed,
                                                jax.device_count(), peak_flops))
    if run.extra_metrics is not None:
      metrics.update(run.extra_metrics())
    self.sums, self.t0, self.steps = [], time.perf_counter(), 0
    return metrics


def _check_saves(manager, writer, wait: bool = False) -> None:
  # An asynchronous save that failed (a full disk, a lost bucket) is reported here, at
  # the step after it, in one line; the checkpoints committed before it are intact.
  try:
    manager.wait_until_finished() if wait else manager.check_for_errors()
  except Exception as e:  # noqa: BLE001 - whatever the writer raised
    writer.close()
    try:
      manager.close()  # joins the writer threads, so none outlives the error
    except Exception:  # noqa: BLE001 - the failed save again
      pass
    raise errors.StorageError(f"saving a checkpoint in {manager.directory} failed "
                              f"({checkpoint.one_line_reason(e)}); the newest complete "
                              f"checkpoint is step {manager.latest_step()}. Free space or fix "
                              "the path, then rerun to resume") from e


def run_loop(run: Run, manager, state: dict) -> tuple[dict, dict, bool]:
  """Trains from `state["step"]` to `config.total_steps`; closes `manager`.

  Returns (final state, last logged metrics, whether the run was preempted: saved at a
  SIGTERM's step boundary before `total_steps`).
  """
  c = run.config
  step = int(jax.device_get(state["step"]))
  writer = MetricWriter(run.workdir, total_steps=c.total_steps, initial_step=step)
  window, last = _Window(), {}
  peak_flops = flops.peak_flops_per_device() if run.step_flops else None
  in_a_row, total_bad, pending_flag = 0, 0, None

  def save():
    checkpoint.save(manager, step, state, data_iter=run.data_iter, config=c)

  def finish():
    _check_saves(manager, writer, wait=True)
    manager.close()
    writer.close()

  with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules), \
      preemption.PreemptionWatcher() as preempt:
    while step < c.total_steps:
      batch = run.to_device(next(run.data_iter))
      _check_saves(manager, writer)
      state, sums = run.step_fn(state, batch)
      step += 1
      window.add(sums, state)
      # The previous step's non-finite flag: reading it now keeps one step in flight.
      if pending_flag is not None and float(jax.device_get(pending_flag)) > 0:
        in_a_row, total_bad = in_a_row + 1, total_bad + 1
        logging.warning("step %d: non-finite loss or gradients; parameters left unchanged "
                        "(%d in a row, %d in this run)", step - 1, in_a_row, total_bad)
        if in_a_row >= c.max_nonfinite_steps > 0:
          finish()
          raise errors.TrainingDiverged(
              f"stopping: {in_a_row} training steps in a row (up to step {step - 1}) had a "
              f"non-finite loss or gradients (config.max_nonfinite_steps={c.max_nonfinite_steps}). "
              f"The parameters are those of the last finite step; the last checkpoint is "
              f"{manager.latest_step()} in {manager.directory}. Lower the learning rate or check "
              "the data, then rerun to resume.")
      elif pending_flag is not None:
        in_a_row = 0
      pending_flag = sums[NONFINITE][0]
      if step % c.log_every == 0 or step == c.total_steps:
        last = window.close(run, peak_flops)
        writer.write(step, last)
      writer.advance(step, last)
      if preempt.reached(step, manager):
        save()
        finish()
        logging.warning("preempted: saved step %d in %s; rerun the same command to resume",
                        step, manager.directory)
        return state, last, True
      if step % c.checkpoint_every == 0 or step == c.total_steps:
        save()
      if run.evaluate is not None and c.eval_every > 0 and (
          step % c.eval_every == 0 or step == c.total_steps):
        run.evaluate(step, state["params"])
  finish()
  return state, last, False
