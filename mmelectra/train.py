"""`train_and_evaluate(config, workdir)`: one linear loop, top to bottom.

config -> mesh -> data -> model + sharded state -> one jitted step -> loop (log,
checkpoint) -> final checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from mmelectra import checkpoint
from mmelectra import config_lib
from mmelectra import electra
from mmelectra import errors
from mmelectra import flops
from mmelectra import objectives
from mmelectra import optim
from mmelectra import preemption
from mmelectra import sharding
from mmelectra.data import bad_records
from mmelectra.data import datasets
from mmelectra.data import pipeline
from mmelectra.data import tokenizer as tokenizer_lib
from mmelectra.metric_writer import MetricWriter
from mmelectra.model import MMElectra, model_config_from


def dummy_batch(config, batch_size: int) -> dict:
  """A zero batch with the pipeline's shapes and dtypes (for init and compile)."""
  m, d = config.model, config.data
  return {
      "text_ids": np.zeros((batch_size, d.max_text_len), np.int32),
      "text_mask": np.ones((batch_size, d.max_text_len), bool),
      "region_feats": np.zeros((batch_size, m.num_regions, m.visual_feat_dim), np.float32),
      "region_boxes": np.zeros((batch_size, m.num_regions, 4), np.float32),
      "region_mask": np.ones((batch_size, m.num_regions), bool),
      "region_labels": np.full((batch_size, m.num_regions), -1, np.int32),
      "image_id": np.zeros((batch_size,), np.int32),
      "example_mask": np.ones((batch_size,), bool),
  }


@dataclasses.dataclass
class Setup:
  """What every entry point (train, evaluate, export) builds from a config."""

  config: object
  model: MMElectra
  ocfg: objectives.ObjectiveConfig
  mesh: jax.sharding.Mesh
  rules: tuple
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  state_shardings: dict
  abstract_state: dict


def build(config, special_token_ids: dict) -> Setup:
  """Model, objective, mesh and the (abstract) sharded train state for a finalized config."""
  model = MMElectra(model_config_from(config))
  ocfg = objectives.objective_config_from(config, special_token_ids)
  mesh = sharding.make_mesh(config)
  rules = sharding.axis_rules(config)
  dp = sharding.data_parallel_size(mesh)
  if config.batch_size % (dp * config.grad_accum_steps):
    raise errors.InvalidInput(f"config.batch_size={config.batch_size} must be divisible by the data-parallel "
                              f"size {dp} x grad_accum_steps {config.grad_accum_steps}")
  tx, schedule = optim.make_optimizer(config)
  init_fn = functools.partial(_init_state, model=model, tx=tx, config=config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(init_fn, jax.random.key(0))
    shardings = sharding.logical_shardings(boxed, mesh, rules)
  abstract = checkpoint.abstract_with_shardings(nn.unbox(boxed), shardings)
  return Setup(config, model, ocfg, mesh, rules, tx, schedule, shardings, abstract)


def _init_state(rng, *, model, tx, config):
  # Two examples are enough to fix every parameter shape.
  b = dummy_batch(config, 2)
  t_pos = jnp.zeros((2, electra.max_masked(config.data.max_text_len, config.text_mask_rate)), jnp.int32)
  r_pos = jnp.zeros((2, electra.max_masked(config.model.num_regions, config.region_mask_rate)), jnp.int32)
  variables = model.init(rng, b["text_ids"], b["text_mask"], b["region_feats"], b["region_boxes"],
                         b["region_mask"], t_pos, r_pos, True)
  params = variables["params"]
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt": tx.init(params)}


def init_state(setup: Setup, seed: int) -> dict:
  """Initialises parameters directly into their shards (no full copy on one device)."""
  init_fn = functools.partial(_init_state, model=setup.model, tx=setup.tx, config=setup.config)
  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
    return jax.jit(lambda r: nn.unbox(init_fn(r)), out_shardings=setup.state_shardings)(
        jax.random.key(seed))


# Per-step flag in the step's metric sums: 1 if its loss or gradients were not finite.
NONFINITE = "nonfinite_step"


def make_train_step(setup: Setup):
  """The one jitted step: generator, sampling, replacement, discriminator, five losses,
  gradients of every parameter and the optimizer update (with optional micro-batching)."""
  config, model, ocfg, tx = setup.config, setup.model, setup.ocfg, setup.tx
  accum = config.grad_accum_steps
  base_rng = jax.random.key(config.seed)

  def loss_fn(params, batch, rng, step):
    return objectives.compute_losses(model, params, batch, rng, ocfg, deterministic=False, step=step)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state, batch):
    rng = jax.random.fold_in(base_rng, state["step"])
    params = state["params"]
    if accum == 1:
      (_, sums), grads = grad_fn(params, batch, rng, state["step"])
    else:
      micro = jax.tree.map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)

      def body(carry, inputs):
        i, mb = inputs
        (_, s), g = grad_fn(params, mb, jax.random.fold_in(rng, i), state["step"])
        acc_g, acc_s = carry
        return (jax.tree.map(jnp.add, acc_g, g), electra.add_metric_sums(acc_s, s)), None

      zero_g = jax.tree.map(jnp.zeros_like, params)
      shapes = jax.eval_shape(
          lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro), rng, state["step"])[0][1])
      zero_s = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
      (grads, sums), _ = jax.lax.scan(body, (zero_g, zero_s), (jnp.arange(accum), micro))
      grads = jax.tree.map(lambda g: g / accum, grads)
    if config.debug_nan_steps:
      # Test switch: poison the gradients of the listed (0-based) steps.
      nan_steps = [int(s) for s in str(config.debug_nan_steps).split(",") if s.strip()]
      poison = jnp.isin(state["step"], jnp.asarray(nan_steps, jnp.int32))
      grads = jax.tree.map(lambda g: jnp.where(poison, jnp.nan, g), grads)
    sums = dict(sums)
    grad_norm = optax.tree.norm(grads)
    sums["grad_norm"] = (grad_norm, jnp.ones((), jnp.float32))
    sums["learning_rate"] = (setup.schedule(state["step"]), jnp.ones((), jnp.float32))
    # A non-finite loss or gradient must not reach the parameters or the Adam moments:
    # keep the old ones (the step counter still advances, as does the data), and leave
    # the step out of the logged averages. The loop counts these steps and stops a run
    # that produces `max_nonfinite_steps` of them in a row.
    finite = jnp.isfinite(grad_norm)
    if "loss" in sums:
      finite &= jnp.isfinite(sums["loss"][0])

    def apply_update(grads, opt_state, params):
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    # A branch, not `where(finite, new, old)` on every leaf: the select keeps the old Adam
    # moments alive next to the in-place update, and XLA copied all of them every step.
    new_params, opt = jax.lax.cond(finite, apply_update, lambda g, o, p: (p, o),
                                   grads, state["opt"], params)
    sums = jax.tree.map(lambda x: jnp.where(finite, x, jnp.zeros_like(x)), sums)
    sums[NONFINITE] = (jnp.logical_not(finite).astype(jnp.float32), jnp.ones((), jnp.float32))
    return {"step": state["step"] + 1, "params": new_params, "opt": opt}, sums

  batch_sh = sharding.batch_sharding(setup.mesh)
  return jax.jit(train_step, in_shardings=(setup.state_shardings, batch_sh),
                 out_shardings=(setup.state_shardings, None), donate_argnums=0)


def to_global(batch: dict, mesh) -> dict:
  """Process-local numpy batch -> global jax arrays sharded over (data, fsdp)."""
  sh = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sh, np.asarray(v)) for k, v in batch.items()}


def prepare_data_and_config(config):
  """Builds the dataset if missing, derives model fields, returns (config, special ids)."""
  datasets.prepare(config.data)
  config = config_lib.finalize(config)
  tok = pipeline.load_tokenizer(config.data)
  if tok.get_vocab_size() > config.model.vocab_size:
    raise errors.InvalidInput(f"the tokenizer has {tok.get_vocab_size()} tokens but config.model.vocab_size="
                              f"{config.model.vocab_size}; raise model.vocab_size")
  return config, tokenizer_lib.special_token_ids(tok)


def train_and_evaluate(config, workdir: str, strict: bool = False) -> dict:
  """Trains `config.total_steps` steps in `workdir`; resumes from its newest readable
  checkpoint (`strict`: the newest, or fail).

  Nothing is written into the workdir until the config is validated, the mesh built and
  a checkpoint to resume from found to fit: a refused start leaves the run as it was.
  Returns the last logged metrics.
  """
  config_lib.check_workdir_kind(workdir, "pretrain")
  config, special_ids = prepare_data_and_config(config)
  setup = build(config, special_ids)
  mesh = setup.mesh

  train_step = make_train_step(setup)
  # MFU: the analytic FLOPs of a step over the measured step rate (mmelectra/flops.py).
  step_flops, peak_flops = flops.train_step_flops(config), flops.peak_flops_per_device()
  local_batch = config.batch_size // jax.process_count()
  data_iter = pipeline.make_iterator(
      config.data, "train", batch_size=local_batch, seed=config.seed, shuffle=True,
      process_index=jax.process_index(), process_count=jax.process_count())

  # Resume from the workdir's newest readable checkpoint: state straight into this mesh's
  # shardings (the shapes are checked against the config first, before any compile), and
  # the input iterator where it stood, so the run reads what an uninterrupted one would.
  # The step's rng is fold_in(seed, step): nothing else to restore.
  checkpoint.run_path(workdir).mkdir(parents=True, exist_ok=True)  # a local dir or gs://...
  manager = checkpoint.make_manager(workdir, config.max_checkpoints_to_keep,
                                    config.keep_checkpoint_every or None)
  if manager.latest_step() is not None:
    try:
      checkpoint.warn_config_changes(checkpoint.restore_config(manager, manager.latest_step()), config)
    except Exception:  # noqa: BLE001 - an unreadable checkpoint is reported by the restore below
      pass
  latest, state = checkpoint.restore_newest_readable(manager, setup.abstract_state,
                                                     data_iter=data_iter, strict=strict,
                                                     set_aside=True)
  if latest is not None:
    logging.info("resuming from %s step %d", checkpoint.checkpoint_dir(workdir), latest)
    if config.init_from:
      logging.warning("resuming from step %d of this workdir; init_from=%s is not used",
                      latest, config.init_from)
  else:
    state = init_state(setup, config.seed)
    if config.init_from:
      params, report = checkpoint.load_pretrained_params(config.init_from, state["params"])
      state["params"] = params
      checkpoint.log_init_report(report, workdir)
  if jax.process_index() == 0:
    config_lib.save(config, workdir)
  start_step = int(jax.device_get(state["step"]))
  # Under on_bad_record="skip": counts of dropped records, logged and in the metrics.
  skips = bad_records.SkipCounter(pipeline.build_report(config.data)["counts"])

  writer = MetricWriter(workdir, total_steps=config.total_steps, initial_step=start_step)
  window, last = [], {}
  t_window, n_window = None, 0
  nonfinite_in_a_row, nonfinite_total, pending_flag = 0, 0, None
  step = start_step

  def save(step):
    checkpoint.save(manager, step, state, data_iter=data_iter, config=config)

  def check_saves(wait: bool = False):
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
      raise errors.StorageError(f"saving a checkpoint in {checkpoint.checkpoint_dir(workdir)} "
                                f"failed ({checkpoint.one_line_reason(e)}); the newest complete "
                                f"checkpoint is step {manager.latest_step()}. Free space or fix "
                                "the path, then rerun to resume") from e

  def finish():
    check_saves(wait=True)
    manager.close()
    writer.close()

  with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules), \
      preemption.PreemptionWatcher() as preempt:
    while step < config.total_steps:
      batch = to_global(skips.take(next(data_iter)), mesh)
      check_saves()
      state, sums = train_step(state, batch)
      step += 1
      window.append(sums)
      # The previous step's non-finite flag: reading it now keeps one step in flight.
      if pending_flag is not None and float(jax.device_get(pending_flag)) > 0:
        nonfinite_in_a_row += 1
        nonfinite_total += 1
        logging.warning("step %d: non-finite loss or gradients; parameters left unchanged "
                        "(%d in a row, %d in this run)", step - 1, nonfinite_in_a_row,
                        nonfinite_total)
        if nonfinite_in_a_row >= config.max_nonfinite_steps > 0:
          finish()
          raise errors.TrainingDiverged(
                                        f"stopping: {nonfinite_in_a_row} training steps in a row (up to step {step - 1}) had "
                                        f"a non-finite loss or gradients (config.max_nonfinite_steps="
                                        f"{config.max_nonfinite_steps}). The parameters are those of the last finite step; "
                                        f"the last checkpoint is {manager.latest_step()} in {checkpoint.checkpoint_dir(workdir)}. "
                                        "Lower the learning rate or check the data, then rerun to resume.")
      elif pending_flag is not None:
        nonfinite_in_a_row = 0
      pending_flag = sums[NONFINITE][0]
      if t_window is None:
        # The first step includes compilation: time throughput from its end.
        jax.block_until_ready(state["step"])
        t_window, n_window = time.perf_counter(), 0
      else:
        n_window += 1
      if step % config.log_every == 0 or step == config.total_steps:
        host = jax.device_get(window)
        total = None
        for s in host:
          total = electra.add_metric_sums(total, s)
        nonfinite = float(total.pop(NONFINITE)[0])
        metrics = electra.finalize_metrics(total)
        metrics["nonfinite_steps"] = nonfinite  # in this logging window
        elapsed = time.perf_counter() - t_window
        if n_window > 0:
          metrics["examples_per_sec"] = n_window * config.batch_size / elapsed
          metrics.update(flops.throughput_metrics(step_flops, n_window / elapsed,
                                                  jax.device_count(), peak_flops))
        metrics.update(skips.metrics())
        writer.write(step, metrics)
        last = metrics
        window, t_window, n_window = [], time.perf_counter(), 0
      writer.advance(step, last)
      if preempt.reached(step, manager):
        save(step)
        finish()
        logging.warning("preempted: saved step %d in %s; rerun the same command to resume",
                        step, checkpoint.checkpoint_dir(workdir))
        return last
      if step % config.checkpoint_every == 0 or step == config.total_steps:
        save(step)
  finish()
  return last
