"""Pretraining: `train_and_evaluate(config, workdir)`, the `mmelectra train` command.

config -> data context (`setup.prepare_data`) -> model, mesh and sharded state
(`setup.build`) -> the one jitted step (`train_step.make_train_step`) -> the shared loop
(`loop.run_loop`: logging, checkpoints, resume, preemption, the non-finite guard, and
the evaluators every `config.eval_every` steps).
"""

from __future__ import annotations

import jax
from absl import logging

from mmelectra import evaluate
from mmelectra import flops
from mmelectra import loop
from mmelectra import setup as setup_lib
from mmelectra import train_step
from mmelectra import workdir as workdir_lib
from mmelectra.data import bad_records
from mmelectra.data import pipeline


def train_and_evaluate(config, workdir: str, strict: bool = False) -> dict:
  """Trains `config.total_steps` steps in `workdir`, resuming from its newest readable
  checkpoint (`strict`: the newest, or fail), and evaluates every `config.eval_every`
  steps (> 0) as `mmelectra evaluate` would. Returns the last logged metrics.

  Nothing is written into the workdir until the config is validated, the mesh built and
  a checkpoint to resume from found to fit: a refused start leaves the run as it was.
  """
  workdir_lib.check_kind(workdir, "pretrain")
  data = setup_lib.prepare_data(config)
  config = data.config
  salience = setup_lib.mask_salience(data, workdir)
  setup = setup_lib.build(config, data.special_ids, salience)
  data_iter = data.iterator("train", batch_size=config.batch_size // jax.process_count(),
                            seed=config.seed, shuffle=True, process_index=jax.process_index(),
                            process_count=jax.process_count())
  # Under on_bad_record="skip": counts of dropped records, logged and in the metrics.
  skips = bad_records.SkipCounter(pipeline.build_report(config.data)["counts"])
  evaluator = None
  if config.eval_every > 0:
    evaluator = evaluate.CheckpointEvaluator(setup, data, workdir)
  run = loop.Run(
      workdir=workdir, config=config, mesh=setup.mesh, rules=setup.rules,
      step_fn=train_step.make_train_step(setup), data_iter=data_iter,
      to_device=lambda b: setup_lib.to_global(skips.take(b), setup.mesh),
      # MFU: the analytic FLOPs of a step over the measured step rate (mmelectra/flops.py).
      step_flops=flops.train_step_flops(config, setup.model.cfg), extra_metrics=skips.metrics,
      evaluate=None if evaluator is None else
      (lambda step, params: evaluator.evaluate(step, config.eval.split, params)))
  manager = loop.open_manager(run)

  def init():
    state = setup_lib.init_state(setup, setup_lib.parameter_seed(config))
    if config.init_from:
      state["params"], report = workdir_lib.load_pretrained_params(config.init_from, state["params"])
      workdir_lib.write_init_report(report, workdir)
    return state

  state, resumed = loop.restore_or_init(run, manager, setup.abstract_state, init, strict)
  if resumed is not None and config.init_from:
    logging.warning("resuming from step %d of this workdir; init_from=%s is not used",
                    resumed, config.init_from)
  if jax.process_index() == 0:
    workdir_lib.save_config(config, workdir)
    if salience is not None:
      workdir_lib.save_mask_salience(salience, workdir)
  _, last, _ = loop.run_loop(run, manager, state)
  return last
