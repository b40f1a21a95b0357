"""Evaluation of checkpoints: the pretraining metrics of METHOD.md on a held-out split.

`evaluate_params` runs the training objective deterministically (no dropout, a fixed rng
per batch, so every checkpoint sees the same masks and ITM negatives) over the split and
aggregates exact sums; `evaluate_workdir` is what `mmelectra evaluate` calls.
"""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
from absl import logging

from mmelectra import checkpoint
from mmelectra import config_lib
from mmelectra import electra
from mmelectra import objectives
from mmelectra import sharding
from mmelectra import train
from mmelectra.data import pipeline


def evaluate_params(setup: train.Setup, params, split: str, num_batches: int = -1) -> dict:
  config = setup.config
  batch_size = config.eval.batch_size
  if batch_size % (jax.process_count() * sharding.data_parallel_size(setup.mesh)):
    raise ValueError(f"config.eval.batch_size={batch_size} must be divisible by the data-parallel size")

  @jax.jit
  def eval_step(params, batch, rng):
    _, sums = objectives.compute_losses(setup.model, params, batch, rng, setup.ocfg, deterministic=True)
    return sums

  data = pipeline.make_iterator(
      config.data, split, batch_size=batch_size // jax.process_count(), seed=config.seed,
      shuffle=False, num_epochs=1, drop_remainder=False,
      process_index=jax.process_index(), process_count=jax.process_count())
  base = jax.random.key(config.seed + 1)
  total = None
  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
    for i, batch in enumerate(data):
      if 0 <= num_batches <= i:
        break
      sums = eval_step(params, train.to_global(batch, setup.mesh), jax.random.fold_in(base, i))
      total = electra.add_metric_sums(total, sums)
  if total is None:
    raise ValueError(f"split {split!r} of {config.data.name} yielded no batch")
  metrics = electra.finalize_metrics(jax.device_get(total))
  metrics["num_examples"] = float(jax.device_get(total["itm_acc"][1]))
  return metrics


def restore_workdir(workdir: str, step: int | None = None) -> tuple[train.Setup, int, dict]:
  """(setup, step, train state) of a checkpoint of `workdir` (latest by default).

  Builds the workdir's data set if missing (the config needs it); shared by every command
  that reads a trained run (evaluate, export).
  """
  config, special_ids = train.prepare_data_and_config(config_lib.load(workdir))
  setup = train.build(config, special_ids)
  manager = checkpoint.make_manager(workdir, max_to_keep=None)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {checkpoint.checkpoint_dir(workdir)}")
  if step not in manager.all_steps():
    raise FileNotFoundError(f"no checkpoint for step {step} in {checkpoint.checkpoint_dir(workdir)}; "
                            f"available: {sorted(manager.all_steps())}")
  state = checkpoint.restore(manager, step, setup.abstract_state)
  manager.close()
  return setup, step, state


def evaluate_workdir(workdir: str, step: int | None = None, split: str | None = None) -> tuple[int, dict]:
  """Evaluates a checkpoint of `workdir` (latest by default) and writes `eval/step_<N>.json`."""
  setup, step, state = restore_workdir(workdir, step)
  config = setup.config
  split = split or config.eval.split
  metrics = evaluate_params(setup, state["params"], split, config.eval.num_batches)
  metrics = {"step": step, "split": split, **metrics}
  if jax.process_index() == 0:
    out_dir = os.path.join(workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"step_{step}.json")
    with open(path, "w") as f:
      json.dump(metrics, f, indent=2, sort_keys=True)
    logging.info("wrote %s", path)
  return step, metrics


def format_table(metrics: dict) -> str:
  rows = [(k, v) for k, v in sorted(metrics.items()) if isinstance(v, (int, float))]
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}"
                   for k, v in rows)
