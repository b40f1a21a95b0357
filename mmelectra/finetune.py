"""`finetune(config, workdir)`: VQA or retrieval fine-tuning of a pretrained encoder.

config -> the pretraining run's model, data and tokenizer (`config.init_from`) -> the
deployed parameters (docs/method.md §11: embeddings, encoder, pooler, ITM head; generator
and RTD/R2D heads dropped) loaded by name, plus a task head -> one jitted step -> loop
-> test metrics in `WORKDIR/eval/step_<N>.json`.

Tasks:
  vqa        `VQAHead` on the pooled output; VQA soft-score BCE (or cross-entropy on the
             most frequent answer); reports `vqa_acc` (and per question type).
  retrieval  the ITM head itself; each positive pair is trained with the hardest
             in-batch negative image of its text and the hardest negative text of its
             image, mined by the current model; reports t2i/i2t R@1/5/10.

Options: layer-wise learning-rate decay (`optimizer.layer_decay`: layer d of N gets
`lr * decay ** (N + 1 - d)`, embeddings d = 0, as ELECTRA fine-tunes) and a separate
learning rate for the task head (`optimizer.head_learning_rate`).
`config.init_mode = "random"` keeps the architecture and data but loads no weights: the
baseline that shows what pretraining buys.
"""

from __future__ import annotations

import dataclasses
import functools
import json
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
from mmelectra import evaluate
from mmelectra import model as model_lib
from mmelectra import optim
from mmelectra import sharding
from mmelectra import train
from mmelectra.data import bad_records
from mmelectra.data import pipeline
from mmelectra.data import synthetic_vqa
from mmelectra.data import vqa as vqa_data
from mmelectra.metric_writer import MetricWriter
from mmelectra.model import MMElectra

TASKS = ("vqa", "retrieval")
TASK_HEAD = {"vqa": "vqa_head", "retrieval": "itm_head"}


# --- the task head ------------------------------------------------------------------------
class VQAHead(nn.Module):
  """LXMERT's answer classifier: dense(2h) + GELU + LayerNorm + dense(answers)."""

  hidden_size: int
  num_answers: int
  layer_norm_eps: float = 1e-12
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, pooled):
    init = lambda names: nn.with_logical_partitioning(nn.initializers.normal(0.02), names)
    zeros = lambda names: nn.with_logical_partitioning(nn.initializers.zeros_init(), names)
    h = nn.Dense(2 * self.hidden_size, dtype=self.dtype, name="dense",
                 kernel_init=init(("hidden", "mlp")), bias_init=zeros(("mlp",)))(pooled)
    h = model_lib.gelu(h)
    h = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="layer_norm",
                     scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                     bias_init=zeros(("norm",)))(h)
    out = nn.Dense(self.num_answers, dtype=self.dtype, name="logits",
                   kernel_init=init(("mlp", "classes")), bias_init=zeros(("classes",)))(h)
    return out.astype(jnp.float32)


# --- optimizer: layer-wise learning-rate decay and a head learning rate ------------------
def layer_depths(params, enc: model_lib.EncoderConfig) -> dict:
  """Depth of each parameter: embeddings 0, L/R layer i at i + 1, X layer i after the
  deeper single-modality stack, pooler and heads on top (N + 1 for N layers).
  `params` in the unrolled layout (`model.unscan_params`)."""
  single = max(enc.l_layers, enc.r_layers)
  top = single + enc.x_layers + 1

  def depth(path, _):
    names = [getattr(k, "key", str(k)) for k in path]
    if names[0] in ("embeddings", "visual_embeddings"):
      return 0
    if names[0] == "encoder":
      kind, index = names[1].rsplit("_", 1)
      return int(index) + 1 + (single if kind == "x_layer" else 0)
    return top
  return jax.tree_util.tree_map_with_path(depth, params)


def lr_multipliers(params, enc: model_lib.EncoderConfig, layer_decay: float, head: str,
                   head_multiplier: float) -> dict:
  """Per-parameter learning-rate factor: `layer_decay ** (top - depth)`, the head's own.

  In the layout of `params`: with `enc.scan_layers`, a stacked parameter's factor is a
  vector, one per layer (`scale_by_tree` broadcasts it over the leading axis).
  """
  depths = layer_depths(model_lib.unscan_params(params), enc)
  top = max(enc.l_layers, enc.r_layers) + enc.x_layers + 1
  mult = jax.tree.map(lambda d: float(layer_decay) ** (top - d), depths)
  if head in mult:
    mult[head] = jax.tree.map(lambda _: float(head_multiplier), mult[head])
  return model_lib.scan_params(mult) if enc.scan_layers else mult


def scale_by_tree(multipliers) -> optax.GradientTransformation:
  """Multiplies each update by its own constant (after AdamW: the learning rate's factor);
  a constant of lower rank applies along the update's leading axes (scanned layers)."""
  def scale(u, m):
    if np.ndim(m):  # one factor per layer of a stacked parameter
      m = np.asarray(m, np.float32).reshape(np.shape(m) + (1,) * (u.ndim - np.ndim(m)))
    return u * m

  def update(updates, state, params=None):
    del params
    return jax.tree.map(scale, updates, multipliers), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(config, params, enc: model_lib.EncoderConfig):
  opt = config.optimizer
  schedule = optim.learning_rate_schedule(opt, config.total_steps)
  head_mult = opt.head_learning_rate / opt.learning_rate if opt.head_learning_rate > 0 else 1.0
  mult = lr_multipliers(params, enc, opt.layer_decay, TASK_HEAD[config.task], head_mult)
  tx = optax.chain(
      optax.clip_by_global_norm(opt.grad_clip_norm) if opt.grad_clip_norm > 0 else optax.identity(),
      optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                  mask=optim.weight_decay_mask),
      scale_by_tree(mult),
  )
  return tx, schedule


# --- model pieces as functions of params --------------------------------------------------
@dataclasses.dataclass
class Task:
  """Everything the step and the evaluation need, built from the configs."""

  config: object  # the fine-tuning config
  pre_config: object  # the pretraining run's finalized config (model, data)
  model: MMElectra  # deployed model: no generator, no pretraining heads
  head: VQAHead | None
  answers: list[str]
  mesh: jax.sharding.Mesh
  rules: tuple


def _backbone(params):
  return {k: v for k, v in params.items() if k in model_lib.DEPLOYED_PARAM_PREFIXES}


def pooled_output(task: Task, params, batch, deterministic: bool, rng=None, index=None):
  """Pooled output of the pairs (text index[0], image index[1]) (default: the batch as is)."""
  t, i = (slice(None), slice(None)) if index is None else index
  rngs = {} if rng is None else {"dropout": rng}
  _, _, pooled = task.model.apply(
      {"params": _backbone(params)}, batch["text_ids"][t], batch["text_mask"][t],
      batch["region_feats"][i], batch["region_boxes"][i], batch["region_mask"][i], deterministic,
      method=MMElectra.encode, rngs=rngs)
  return pooled


def itm_logits(task: Task, params, pooled):
  return task.model.apply({"params": _backbone(params)}, pooled, method=MMElectra.itm_logits)


def vqa_logits(task: Task, params, batch, deterministic: bool, rng=None):
  return task.head.apply({"params": params["vqa_head"]}, pooled_output(task, params, batch, deterministic, rng))


def vqa_losses(task: Task, params, batch, rng, deterministic: bool = False):
  logits = vqa_logits(task, params, batch, deterministic, rng)
  w = batch["example_mask"].astype(jnp.float32)
  if task.config.vqa.loss == "bce":
    # Summed over answers (LXMERT, and VQA practice): each answer's score is its own target.
    per_example = optax.sigmoid_binary_cross_entropy(logits, batch["answer_scores"]).sum(-1)
  elif task.config.vqa.loss == "ce":
    w = w * (batch["answer_target"] >= 0)
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(batch["answer_target"], 0))
  else:
    raise errors.InvalidInput(f"config.vqa.loss must be 'bce' or 'ce', got {task.config.vqa.loss!r}")
  loss = (per_example * w).sum() / jnp.maximum(w.sum(), 1.0)
  pred = jnp.argmax(logits, -1)
  score = jnp.take_along_axis(batch["answer_scores"], pred[:, None], 1)[:, 0]
  real = batch["example_mask"].astype(jnp.float32)
  sums = {"loss": (loss * w.sum(), w.sum()), "vqa_acc": ((score * real).sum(), real.sum())}
  return loss, sums


def mine_hard_negatives(task: Task, params, batch, rng, num_candidates: int):
  """(hardest negative image of each text, of each image the hardest negative text,
  whether each has one), among `num_candidates` in-batch candidates, by the current
  ITM scores (no gradient). A text identical to the positive's, or a caption of the same
  image (corpora with several captions per image), is no negative."""
  b = batch["text_ids"].shape[0]
  k = min(num_candidates, b - 1)
  shifts = 1 + jax.random.permutation(rng, b - 1)[:k]
  rows = jnp.arange(b)
  cand_img = (rows[:, None] + shifts[None, :]) % b  # [B, k]: text i vs image (i + s) % B
  pooled = pooled_output(task, params, batch, True,
                         index=(jnp.repeat(rows, k), cand_img.reshape(-1)))
  logits = itm_logits(task, params, pooled)
  scores = jax.lax.stop_gradient(logits[:, 1] - logits[:, 0]).reshape(b, k)
  valid = batch["example_mask"].astype(bool)
  same_text = jnp.all(batch["text_ids"][:, None, :] == batch["text_ids"][cand_img], axis=-1)
  ok = valid[:, None] & valid[cand_img] & ~same_text
  if "image_id" in batch:
    ok &= batch["image_id"][:, None] != batch["image_id"][cand_img]
  scores = jnp.where(ok, scores, -jnp.inf)
  hard_img = jnp.take_along_axis(cand_img, jnp.argmax(scores, 1)[:, None], 1)[:, 0]
  # The same scores seen from the image side: image m met text (m - s) % B.
  cand_txt = (rows[:, None] - shifts[None, :]) % b
  img_scores = scores[cand_txt, jnp.arange(k)[None, :]]
  hard_txt = jnp.take_along_axis(cand_txt, jnp.argmax(img_scores, 1)[:, None], 1)[:, 0]
  return hard_img, hard_txt, ok.any(1), jnp.isfinite(img_scores).any(1)


def retrieval_losses(task: Task, params, batch, rng, deterministic: bool = False):
  rng_mine, rng_drop = jax.random.split(rng)
  hard_img, hard_txt, has_img, has_txt = mine_hard_negatives(
      task, params, batch, rng_mine, task.config.retrieval.num_candidates)
  b = batch["text_ids"].shape[0]
  rows = jnp.arange(b)
  texts = jnp.concatenate([rows, rows, hard_txt])
  images = jnp.concatenate([rows, hard_img, rows])
  labels = jnp.concatenate([jnp.ones(b, jnp.int32), jnp.zeros(2 * b, jnp.int32)])
  valid = batch["example_mask"].astype(jnp.float32)
  w = jnp.concatenate([valid, valid * has_img, valid * has_txt])
  pooled = pooled_output(task, params, batch, deterministic, rng_drop, index=(texts, images))
  logits = itm_logits(task, params, pooled)
  ce = electra.cross_entropy(logits, labels, w)
  loss = electra.mean(ce)
  sums = {"loss": ce, "itm_acc": electra.accuracy_sums(jnp.argmax(logits, -1), labels, w)}
  return loss, sums


# --- build --------------------------------------------------------------------------------
def build_task(config, tally=None) -> tuple[Task, dict]:
  """The task and the fine-tuning data (VQA examples per split) from a config; bad VQA
  JSONL lines go through `tally` (a `bad_records.Tally`; default: the config's policy)."""
  if config.task not in TASKS:
    raise errors.InvalidInput(f"config.task must be one of {TASKS}, got {config.task!r}")
  if not config.init_from:
    raise errors.InvalidInput("config.init_from must name a pretraining workdir (its model, data and "
                              "tokenizer); with config.init_mode='random' only its architecture is used")
  # init_from may name one checkpoint (`WORKDIR/checkpoints/<step>`): the run's config is
  # its workdir's; `init_params` loads that step's parameters.
  pre_config, _ = train.prepare_data_and_config(config_lib.load(config_lib.run_dir(config.init_from)))
  mcfg = model_lib.model_config_from(pre_config)
  enc = mcfg.encoder
  if config.dropout_rate >= 0:
    enc = dataclasses.replace(enc, dropout_rate=config.dropout_rate,
                              attention_dropout_rate=config.dropout_rate)
  # .get: fine-tuning configs saved before the option existed lack the field.
  if config.get("scan_layers", -1) >= 0:
    enc = dataclasses.replace(enc, scan_layers=bool(config.scan_layers))
  model = MMElectra(dataclasses.replace(mcfg, encoder=enc, generator=None))
  data = {}
  answers, head = [], None
  if config.task == "vqa":
    for split in (config.vqa.train_split, config.vqa.test_split):
      data[split] = vqa_data.load_examples(config.vqa, pre_config.data, split, tally)
    answers = vqa_data.answer_vocabulary(data[config.vqa.train_split][0], config.vqa.num_answers)
    head = VQAHead(enc.hidden_size, len(answers), enc.layer_norm_eps, enc.dtype)
  task = Task(config, pre_config, model, head, answers, sharding.make_mesh(config),
              sharding.axis_rules(pre_config))
  return task, data


def _init_params(rng, task: Task):
  b = train.dummy_batch(task.pre_config, 2)

  def backbone(m, *inputs):
    return m.itm_logits(m.encode(*inputs, True)[2])

  rng_b, rng_h = jax.random.split(rng)
  params = dict(task.model.init(rng_b, b["text_ids"], b["text_mask"], b["region_feats"],
                                b["region_boxes"], b["region_mask"], method=backbone)["params"])
  if task.head is not None:
    params["vqa_head"] = task.head.init(rng_h, jnp.zeros((2, task.model.cfg.encoder.hidden_size)))["params"]
  return params


def init_params(task: Task, seed: int):
  """(params in their shards, their shardings): fresh weights, then `init_from`'s by name."""
  init_fn = functools.partial(_init_params, task=task)
  with jax.set_mesh(task.mesh), nn.logical_axis_rules(task.rules):
    boxed = jax.eval_shape(init_fn, jax.random.key(seed))
    shardings = sharding.logical_shardings(boxed, task.mesh, task.rules)
    params = jax.jit(lambda r: nn.unbox(init_fn(r)), out_shardings=shardings)(jax.random.key(seed))
  report = None
  if task.config.init_mode == "pretrained":
    params, report = checkpoint.load_pretrained_params(task.config.init_from, params)
  elif task.config.init_mode != "random":
    raise errors.InvalidInput(f"config.init_mode must be 'pretrained' or 'random', got {task.config.init_mode!r}")
  return params, shardings, report


# --- evaluation ---------------------------------------------------------------------------
def evaluate_vqa(task: Task, params, examples, source, split: str) -> dict:
  config = task.config
  tok = pipeline.load_tokenizer(task.pre_config.data)
  read = vqa_data.ReadVQAExample(examples, source, tok, task.pre_config.data,
                                 {a: i for i, a in enumerate(task.answers)})
  data = vqa_data.make_iterator(read, batch_size=config.eval.batch_size, seed=0, shuffle=False,
                                num_epochs=1, drop_remainder=False)
  predict = jax.jit(lambda p, b: jnp.argmax(vqa_logits(task, p, b, True), -1))
  preds = []
  with jax.set_mesh(task.mesh), nn.logical_axis_rules(task.rules):
    for batch in data:
      keep = batch["example_mask"]
      preds.append(np.asarray(predict(params, train.to_global(batch, task.mesh)))[keep])
  preds = np.concatenate(preds)
  acc = np.array([vqa_data.vqa_accuracy(e["answers"], task.answers[p]) for e, p in zip(examples, preds)])
  metrics = {"vqa_acc": float(acc.mean()), "num_examples": len(acc)}
  for qtype in synthetic_vqa.QUESTION_TYPES:
    sel = np.array([e.get("type") == qtype for e in examples])
    if sel.any():
      metrics[f"vqa_acc_{qtype}"] = float(acc[sel].mean())
  return metrics


def evaluate_retrieval(task: Task, params, split: str) -> dict:
  return evaluate.pool_retrieval(task.model, task.mesh, task.rules, params, task.pre_config.data,
                                 split, task.config.eval.retrieval_pool,
                                 task.config.eval.retrieval_pairs_per_call)


# --- the loop -----------------------------------------------------------------------------
def finetune(config, workdir: str) -> dict:
  """Fine-tunes for `config.total_steps` steps; returns the test metrics.

  The config and the data (every line of VQA JSONL files, train and test) are checked
  before anything is written into `workdir`.
  """
  config_lib.validate(config, config_lib.FINETUNE_RULES)
  config_lib.check_workdir_kind(workdir, "finetune")
  tally = bad_records.Tally(config.vqa.on_bad_record) if config.task == "vqa" else None
  task, data = build_task(config, tally)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    config_lib.save(config, workdir)
    if tally is not None:
      bad_records.write_report(tally, workdir)
  params, shardings, report = init_params(task, config.seed)
  if report is not None and jax.process_index() == 0:
    with open(os.path.join(workdir, "init_report.json"), "w") as f:
      json.dump(report.to_dict(), f, indent=2)
    logging.info("%s", report.summary())
  tx, schedule = make_optimizer(config, params, task.model.cfg.encoder)
  opt_state = jax.jit(tx.init)(params)

  loss_fn = vqa_losses if config.task == "vqa" else retrieval_losses
  grad_fn = jax.value_and_grad(functools.partial(loss_fn, task), has_aux=True)
  base_rng = jax.random.key(config.seed)

  def step_fn(state, batch):
    (_, sums), grads = grad_fn(state["params"], batch, jax.random.fold_in(base_rng, state["step"]))
    updates, opt = tx.update(grads, state["opt"], state["params"])
    sums = dict(sums)
    sums["grad_norm"] = (optax.tree.norm(grads), jnp.ones((), jnp.float32))
    sums["learning_rate"] = (schedule(state["step"]), jnp.ones((), jnp.float32))
    return {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
            "opt": opt}, sums

  step_fn = jax.jit(step_fn, donate_argnums=0)
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt": opt_state}

  local_batch = config.batch_size // jax.process_count()
  shard = dict(process_index=jax.process_index(), process_count=jax.process_count())
  if config.task == "vqa":
    train_examples, train_source = data[config.vqa.train_split]
    read = vqa_data.ReadVQAExample(train_examples, train_source, pipeline.load_tokenizer(task.pre_config.data),
                                   task.pre_config.data, {a: i for i, a in enumerate(task.answers)})
    data_iter = vqa_data.make_iterator(read, batch_size=local_batch, seed=config.seed, shuffle=True,
                                       num_epochs=None, drop_remainder=True, **shard)
    if jax.process_index() == 0:
      with open(os.path.join(workdir, "answers.json"), "w") as f:
        json.dump(task.answers, f)
  else:
    data_iter = pipeline.make_iterator(task.pre_config.data, config.retrieval.train_split,
                                       batch_size=local_batch, seed=config.seed, shuffle=True, **shard)

  writer = MetricWriter(workdir, total_steps=config.total_steps)
  window, t0, last = [], None, {}
  with jax.set_mesh(task.mesh), nn.logical_axis_rules(task.rules):
    for step in range(1, config.total_steps + 1):
      batch = next(data_iter)
      batch = train.to_global({k: batch[k] for k in _TRAIN_KEYS[config.task] if k in batch}, task.mesh)
      state, sums = step_fn(state, batch)
      window.append(sums)
      if t0 is None:
        jax.block_until_ready(state["step"])
        t0, n0 = time.perf_counter(), step
      if step % config.log_every == 0 or step == config.total_steps:
        total = None
        for s in jax.device_get(window):
          total = electra.add_metric_sums(total, s)
        metrics = electra.finalize_metrics(total)
        if step > n0:
          metrics["examples_per_sec"] = (step - n0) * config.batch_size / (time.perf_counter() - t0)
        writer.write(step, metrics)
        last = metrics
        window = []
      writer.advance(step, last)
  writer.close()

  manager = checkpoint.make_manager(workdir, max_to_keep=1)
  checkpoint.save(manager, config.total_steps, state)
  manager.wait_until_finished()
  manager.close()

  split = config.eval.split
  if config.task == "vqa":
    examples, source = data[split] if split in data else vqa_data.load_examples(config.vqa, task.pre_config.data, split)
    results = evaluate_vqa(task, state["params"], examples, source, split)
  else:
    results = evaluate_retrieval(task, state["params"], split)
  results = {"step": config.total_steps, "split": split, "task": config.task,
             "init_mode": config.init_mode, **results}
  if jax.process_index() == 0:
    evaluate.write_results(workdir, config.total_steps, results)
  return results


_TRAIN_KEYS = {
    "vqa": vqa_data.VQA_KEYS,
    "retrieval": ("text_ids", "text_mask", "region_feats", "region_boxes", "region_mask", "image_id",
                  "example_mask"),
}
