"""Evaluation of checkpoints: the pretraining metrics of docs/method.md and zero-shot retrieval.

`evaluate_params` runs the training objective deterministically (no dropout, a fixed rng
per batch, so every checkpoint sees the same masks and ITM negatives) over the split and
aggregates exact sums; `zero_shot_retrieval` ranks the first `config.eval.retrieval_pool`
images and captions of the split against each other with the ITM head.
`evaluate_workdir` (one step or all) and `watch_workdir` (the sidecar job) are what
`mmelectra evaluate` calls; both write `eval/step_<N>.json` and TensorBoard events under
`tensorboard/eval` (next to the training run's own events).
"""

from __future__ import annotations

import dataclasses
import time

import flax.linen as nn
import jax
from etils import epath
import numpy as np
from absl import logging

from mmelectra import errors
from mmelectra import metrics as metrics_lib
from mmelectra import model as model_lib
from mmelectra import objectives
from mmelectra import retrieval
from mmelectra import setup as setup_lib
from mmelectra import sharding
from mmelectra import workdir as workdir_lib


def make_eval_step(setup: setup_lib.Setup):
  """jit(params, batch, rng) -> metric sums of the objective, without dropout."""

  # Evaluation reads uniform ITM negatives, whatever training drew.
  ocfg = dataclasses.replace(setup.ocfg, itm_same_count_fraction=0.0)

  def eval_step(params, batch, rng):
    _, sums = objectives.compute_losses(setup.model, params, batch, rng, ocfg, deterministic=True)
    return sums

  return jax.jit(eval_step)


def evaluate_params(setup: setup_lib.Setup, data: setup_lib.DataContext, params, split: str,
                    num_batches: int = -1, eval_step=None) -> dict:
  config = setup.config
  batch_size = config.eval.batch_size
  if batch_size % (jax.process_count() * sharding.data_parallel_size(setup.mesh)):
    raise errors.InvalidInput(f"config.eval.batch_size={batch_size} must be divisible by the data-parallel size")
  eval_step = eval_step or make_eval_step(setup)
  batches = data.iterator(split, batch_size=batch_size // jax.process_count(), seed=config.seed,
                          shuffle=False, num_epochs=1, drop_remainder=False,
                          process_index=jax.process_index(), process_count=jax.process_count())
  base = jax.random.key(config.seed + 1)
  total = None
  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
    for i, batch in enumerate(batches):
      if 0 <= num_batches <= i:
        break
      sums = eval_step(params, setup_lib.to_global(batch, setup.mesh), jax.random.fold_in(base, i))
      total = metrics_lib.add_metric_sums(total, sums)
  if total is None:
    raise errors.InvalidInput(f"split {split!r} of {config.data.name} yielded no batch")
  metrics = metrics_lib.finalize_metrics(jax.device_get(total))
  metrics["num_examples"] = float(jax.device_get(total["itm_acc"][1]))
  return metrics


def read_pool(data: setup_lib.DataContext, split: str, size: int) -> tuple[dict, dict, np.ndarray]:
  """(texts, images, text_to_image) of the split's first `size` distinct images, in order.

  Every caption of those images is a text (corpora with several captions per image give
  several examples with one image_id); `text_to_image[t]` is text t's row in `images`.
  Every process reads the same pool: scoring shards the pairs, not the pool.
  """
  chunks = []
  seen: dict[int, int] = {}
  batches = data.iterator(split, batch_size=min(size, 256), seed=0, shuffle=False, num_epochs=1,
                          drop_remainder=False)
  for batch in batches:
    keep = batch["example_mask"].astype(bool)
    chunks.append({k: v[keep] for k, v in batch.items()})
    for image_id in batch["image_id"][keep]:
      if int(image_id) not in seen and len(seen) < size:
        seen[int(image_id)] = len(seen)
    if len(seen) >= size and int(batch["image_id"][keep][-1]) not in seen:
      break  # past the pool's last image (captions of one image are consecutive)
  if not chunks:
    raise errors.InvalidInput(f"split {split!r} of {data.config.data.name} yielded no example")
  examples = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
  in_pool = np.array([int(i) in seen for i in examples["image_id"]])
  texts = {k: v[in_pool] for k, v in examples.items()}
  text_to_image = np.array([seen[int(i)] for i in texts["image_id"]], np.int64)
  first = np.array([np.flatnonzero(text_to_image == j)[0] for j in range(len(seen))])
  images = {k: v[first] for k, v in texts.items()}
  return texts, images, text_to_image


def pool_retrieval(model, mesh, rules, params, data: setup_lib.DataContext, split: str,
                   pool_size: int, pairs_per_call: int, scorer=None) -> dict:
  """t2i/i2t R@1/5/10 of `params` (any tree holding the deployed parameters) over the
  split's first `pool_size` images and their captions."""
  texts, images, text_to_image = read_pool(data, split, pool_size)
  scorer = scorer or retrieval.make_block_scorer(model, mesh, rules)
  scores = retrieval.score_all_pairs(scorer, model_lib.deployed_params(params), texts, images,
                                     pairs_per_call, dp=sharding.data_parallel_size(mesh))
  metrics = retrieval.retrieval_metrics(scores, text_to_image)
  metrics["retrieval_pool"] = len(images["image_id"])
  metrics["retrieval_texts"] = len(text_to_image)
  return metrics


class CheckpointEvaluator:
  """Every metric of a checkpoint; compiles its functions once for all checkpoints."""

  def __init__(self, setup: setup_lib.Setup, data: setup_lib.DataContext, workdir: str):
    self.setup, self.data, self.workdir = setup, data, workdir
    self.eval_step = make_eval_step(setup)
    self.scorer = retrieval.make_block_scorer(setup.model, setup.mesh, setup.rules)

  def __call__(self, manager, step: int, split: str) -> dict:
    """Restores the parameters of `step` and evaluates them (`evaluate`)."""
    _, restored = workdir_lib.restore_params(manager, self.setup.abstract_params, step)
    return self.evaluate(step, split, restored["params"])

  def evaluate(self, step: int, split: str, params: dict) -> dict:
    """The metrics of `params` (the model's parameter tree) on `split`; writes
    `eval/step_<N>.json` and TensorBoard events."""
    config = self.setup.config
    metrics = evaluate_params(self.setup, self.data, params, split, config.eval.num_batches,
                              self.eval_step)
    if config.eval.retrieval_pool > 0:
      metrics.update(pool_retrieval(self.setup.model, self.setup.mesh, self.setup.rules, params,
                                    self.data, split, config.eval.retrieval_pool,
                                    config.eval.retrieval_pairs_per_call, self.scorer))
    metrics = {"step": step, "split": split, **metrics}
    if jax.process_index() == 0:
      workdir_lib.write_eval_results(self.workdir, step, metrics)
    return metrics


def open_run(workdir: str) -> tuple[setup_lib.Setup, setup_lib.DataContext]:
  """The setup and data context of a trained run (its data set built if missing)."""
  data = setup_lib.prepare_data(workdir_lib.load_config(workdir))
  return setup_lib.build_for_run(data, workdir), data


def restore_workdir(workdir: str, step: int | None = None, strict: bool = False
                    ) -> tuple[setup_lib.Setup, setup_lib.DataContext, int, dict]:
  """(setup, data, step, {"params": ...}) of a checkpoint of `workdir` (by default the
  newest that reads: an unreadable newest one is skipped with a warning, or an error if
  `strict`). Only the parameters are restored; every command that reads a trained run
  (evaluate, export) comes here."""
  setup, data = open_run(workdir)
  manager = workdir_lib.read_only_manager(workdir)
  step, params = workdir_lib.restore_params(manager, setup.abstract_params, step, strict)
  manager.close()
  return setup, data, step, params


def evaluate_workdir(workdir: str, step: int | None = None, split: str | None = None,
                     strict: bool = False) -> tuple[int, dict]:
  """Evaluates a checkpoint of `workdir` (the newest readable by default, see
  `restore_workdir`) and writes `eval/step_<N>.json`."""
  setup, data, step, restored = restore_workdir(workdir, step, strict)
  evaluator = CheckpointEvaluator(setup, data, workdir)
  return step, evaluator.evaluate(step, split or setup.config.eval.split, restored["params"])


def evaluate_all_steps(workdir: str, split: str | None = None) -> list[tuple[int, dict]]:
  """Evaluates every checkpoint of `workdir`, oldest first (`mmelectra evaluate --all`)."""
  setup, data = open_run(workdir)
  manager = workdir_lib.read_only_manager(workdir)
  split = split or setup.config.eval.split
  evaluator = CheckpointEvaluator(setup, data, workdir)
  results = [(s, evaluator(manager, s, split)) for s in workdir_lib.checkpoint_steps(manager)]
  manager.close()
  return results


def watch_workdir(workdir: str, split: str | None = None, poll_seconds: float = 30.0,
                  idle_timeout: float = 0.0, on_result=None, max_failures: int = 5) -> list[int]:
  """The sidecar job: evaluates each new checkpoint of `workdir` once, as it appears.

  Waits for the run's config, polls the checkpoint directory, and skips steps already
  evaluated on `split` (a restarted watcher resumes). A checkpoint that fails to restore
  (still being written, or deleted by keep-last-N under our feet) is retried at the next
  poll, `max_failures` times at most. Returns when the run's final step
  (`config.total_steps`) is evaluated, or after `idle_timeout` seconds (> 0) without a
  new checkpoint. `on_result(step, metrics)` is called after each evaluation.
  """
  last_news = time.monotonic()

  def idle() -> bool:
    return idle_timeout > 0 and time.monotonic() - last_news > idle_timeout

  while not (epath.Path(workdir) / workdir_lib.CONFIG_JSON).exists():
    if idle():
      return []
    time.sleep(poll_seconds)
  setup, data = open_run(workdir)
  split = split or setup.config.eval.split
  final_step = setup.config.total_steps
  evaluator = CheckpointEvaluator(setup, data, workdir)
  done, failures, evaluated = set(), {}, []
  manager = None
  while True:
    if manager is None and epath.Path(workdir_lib.checkpoint_dir(workdir)).is_dir():
      manager = workdir_lib.read_only_manager(workdir)
    steps = []
    if manager is not None:
      manager.reload()
      steps = sorted(s for s in manager.all_steps() if s not in done)
    for step in steps:
      if workdir_lib.already_evaluated(workdir, step, split):
        done.add(step)
        continue
      try:
        metrics = evaluator(manager, step, split)
      except Exception as e:  # noqa: BLE001 - any restore failure: partial or deleted files
        failures[step] = failures.get(step, 0) + 1
        logging.warning("step %d not readable yet (try %d of %d): %s", step, failures[step],
                        max_failures, e)
        if failures[step] >= max_failures:
          logging.error("giving up on step %d", step)
          done.add(step)
        continue
      done.add(step)
      evaluated.append(step)
      last_news = time.monotonic()
      if on_result is not None:
        on_result(step, metrics)
    if final_step in done or idle():
      break
    time.sleep(poll_seconds)
  if manager is not None:
    manager.close()
  return evaluated


def format_table(metrics: dict) -> str:
  rows = [(k, v) for k, v in sorted(metrics.items()) if isinstance(v, (int, float))]
  width = max(len(k) for k, _ in rows)
  table = "\n".join(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}"
                    for k, v in rows)
  return table + ("\n" + retrieval_summary(metrics) if "t2i_r1" in metrics else "")


def retrieval_summary(metrics: dict) -> str:
  """One line of zero-shot retrieval figures with the chance level for comparison."""
  def recalls(prefix):
    return "/".join(f"{metrics[f'{prefix}_r{k}']:.3f}" for k in retrieval.KS)
  pool = int(metrics["retrieval_pool"])
  return (f"zero-shot retrieval over {pool} images (ITM head): text->image R@1/5/10 "
          f"{recalls('t2i')}, image->text R@1/5/10 {recalls('i2t')} (chance R@1 {1 / pool:.3f}); "
          f"matching on the pool's intact pairs {metrics['pool_itm_acc']:.3f} (matched "
          f"{metrics['pool_itm_pos_acc']:.3f}, mismatched {metrics['pool_itm_neg_acc']:.3f})")
