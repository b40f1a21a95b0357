"""`finetune(config, workdir)`: VQA or retrieval fine-tuning of a pretrained encoder.

config -> the pretraining run's model, data and tokenizer (`config.init_from`) -> the
deployed parameters (docs/method.md §11: embeddings, encoder, pooler, ITM head; generator
and RTD/R2D heads dropped) loaded by name, plus a task head -> one jitted step -> the loop
pretraining uses (`loop.py`: checkpoints, resume, preemption, the non-finite guard) ->
test metrics in `WORKDIR/eval/step_<N>.json`.

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

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmelectra import config_lib
from mmelectra import errors
from mmelectra import evaluate
from mmelectra import loop
from mmelectra import metrics as metrics_lib
from mmelectra import model as model_lib
from mmelectra import optim
from mmelectra import setup as setup_lib
from mmelectra import sharding
from mmelectra import workdir as workdir_lib
from mmelectra.data import bad_records
from mmelectra.data import batch as batch_lib
from mmelectra.data import synthetic_vqa
from mmelectra.data import vqa as vqa_data
from mmelectra.model import MMElectra

TASKS = ("vqa", "retrieval")
TASK_HEAD = {"vqa": "vqa_head", "retrieval": "itm_head"}


# --- the task head ------------------------------------------------------------------------
class VQAHead(nn.Module):
  """LXMERT's answer classifier: dense(2h) + GELU + LayerNorm + dense(answers), with the
  encoder's initializers (model.dense, model.layer_norm)."""

  enc: model_lib.EncoderConfig
  num_answers: int

  @nn.compact
  def __call__(self, pooled):
    h = model_lib.dense(2 * self.enc.hidden_size, "hidden", "mlp", self.enc.dtype, "dense")(pooled)
    h = model_lib.layer_norm(self.enc, "layer_norm")(model_lib.gelu(h))
    out = model_lib.dense(self.num_answers, "mlp", "classes", self.enc.dtype, "logits")(h)
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
  data: setup_lib.DataContext  # the pretraining run's finalized config, data and tokenizer
  model: MMElectra  # deployed model: no generator, no pretraining heads
  head: VQAHead | None
  answers: list[str]
  mesh: jax.sharding.Mesh
  rules: tuple

  @property
  def pre_config(self):
    return self.data.config

  def answer_ids(self) -> dict[str, int]:
    return {a: i for i, a in enumerate(self.answers)}


def pooled_output(task: Task, params, batch, deterministic: bool, rng=None, index=None):
  """Pooled output of the pairs (text index[0], image index[1]) (default: the batch as is)."""
  t, i = (slice(None), slice(None)) if index is None else index
  rngs = {} if rng is None else {"dropout": rng}
  text = {k: batch[k][t] for k in batch_lib.TEXT_KEYS}
  image = {k: batch[k][i] for k in batch_lib.IMAGE_KEYS}
  _, _, pooled = task.model.apply(
      {"params": model_lib.deployed_params(params)}, *batch_lib.model_inputs({**text, **image}),
      deterministic, method=MMElectra.encode, rngs=rngs)
  return pooled


def itm_logits(task: Task, params, pooled):
  return task.model.apply({"params": model_lib.deployed_params(params)}, pooled,
                          method=MMElectra.itm_logits)


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
  ce = metrics_lib.cross_entropy(logits, labels, w)
  loss = metrics_lib.mean(ce)
  sums = {"loss": ce, "itm_acc": metrics_lib.accuracy_sums(jnp.argmax(logits, -1), labels, w)}
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
  pre = setup_lib.prepare_data(workdir_lib.load_config(workdir_lib.run_dir(config.init_from)))
  mcfg = model_lib.model_config_from(pre.config)
  enc = mcfg.encoder
  if config.dropout_rate >= 0:
    enc = dataclasses.replace(enc, dropout_rate=config.dropout_rate,
                              attention_dropout_rate=config.dropout_rate)
  if config.scan_layers >= 0:
    enc = dataclasses.replace(enc, scan_layers=bool(config.scan_layers))
  model = MMElectra(dataclasses.replace(mcfg, encoder=enc, generator=None))
  data = {}
  answers, head = [], None
  if config.task == "vqa":
    for split in (config.vqa.train_split, config.vqa.test_split):
      data[split] = vqa_data.load_examples(config.vqa, pre.config.data, split, tally)
    answers = vqa_data.answer_vocabulary(data[config.vqa.train_split][0], config.vqa.num_answers)
    head = VQAHead(enc, len(answers))
  task = Task(config, pre, model, head, answers, sharding.make_mesh(config),
              sharding.axis_rules(pre.config))
  return task, data


def _init_params(rng, task: Task):
  b = setup_lib.dummy_batch(task.pre_config, 2)

  def backbone(m, *inputs):
    return m.itm_logits(m.encode(*inputs, True)[2])

  rng_b, rng_h = jax.random.split(rng)
  params = dict(task.model.init(rng_b, *batch_lib.model_inputs(b), method=backbone)["params"])
  if task.head is not None:
    params["vqa_head"] = task.head.init(rng_h, jnp.zeros((2, task.model.cfg.encoder.hidden_size)))["params"]
  return params


def fresh_params(task: Task, seed: int):
  """(params in their shards, their shardings): freshly initialised weights."""
  init_fn = functools.partial(_init_params, task=task)
  with jax.set_mesh(task.mesh), nn.logical_axis_rules(task.rules):
    boxed = jax.eval_shape(init_fn, jax.random.key(seed))
    shardings = sharding.logical_shardings(boxed, task.mesh, task.rules)
    params = jax.jit(lambda r: nn.unbox(init_fn(r)), out_shardings=shardings)(jax.random.key(seed))
  return params, shardings


def load_init_from(task: Task, params):
  """(params, InitReport or None): `init_from`'s parameters by name into `params`
  (`init_mode=pretrained`), or `params` as they are (`random`)."""
  if task.config.init_mode == "pretrained":
    return workdir_lib.load_pretrained_params(task.config.init_from, params)
  if task.config.init_mode != "random":
    raise errors.InvalidInput(f"config.init_mode must be 'pretrained' or 'random', got {task.config.init_mode!r}")
  return params, None


def init_params(task: Task, seed: int):
  """(params in their shards, their shardings, InitReport or None): fresh weights, then
  `init_from`'s by name."""
  params, shardings = fresh_params(task, seed)
  params, report = load_init_from(task, params)
  return params, shardings, report


# --- evaluation ---------------------------------------------------------------------------
def evaluate_vqa(task: Task, params, examples, source, split: str) -> dict:
  config = task.config
  read = vqa_data.ReadVQAExample(examples, source, task.data.tokenizer, task.pre_config.data,
                                 task.answer_ids())
  data = vqa_data.make_iterator(read, batch_size=config.eval.batch_size, seed=0, shuffle=False,
                                num_epochs=1, drop_remainder=False)
  predict = jax.jit(lambda p, b: jnp.argmax(vqa_logits(task, p, b, True), -1))
  preds = []
  with jax.set_mesh(task.mesh), nn.logical_axis_rules(task.rules):
    for batch in data:
      keep = batch["example_mask"]
      preds.append(np.asarray(predict(params, setup_lib.to_global(batch, task.mesh)))[keep])
  preds = np.concatenate(preds)
  acc = np.array([vqa_data.vqa_accuracy(e["answers"], task.answers[p]) for e, p in zip(examples, preds)])
  metrics = {"vqa_acc": float(acc.mean()), "num_examples": len(acc)}
  for qtype in synthetic_vqa.QUESTION_TYPES:
    sel = np.array([e.get("type") == qtype for e in examples])
    if sel.any():
      metrics[f"vqa_acc_{qtype}"] = float(acc[sel].mean())
  return metrics


def evaluate_retrieval(task: Task, params, split: str) -> dict:
  return evaluate.pool_retrieval(task.model, task.mesh, task.rules, params, task.data, split, task.config.eval.retrieval_pool,
                                 task.config.eval.retrieval_pairs_per_call)


def evaluate_task(task: Task, params, data: dict, split: str, step: int) -> dict:
  """The task's test metrics of `params` at `step`, as written to `eval/step_<N>.json`."""
  config = task.config
  if config.task == "vqa":
    examples, source = (data[split] if split in data
                        else vqa_data.load_examples(config.vqa, task.pre_config.data, split))
    results = evaluate_vqa(task, params, examples, source, split)
  else:
    results = evaluate_retrieval(task, params, split)
  return {"step": step, "split": split, "task": config.task, "init_mode": config.init_mode, **results}


# --- the run ------------------------------------------------------------------------------
def _make_step(task: Task, tx, schedule):
  loss_fn = vqa_losses if task.config.task == "vqa" else retrieval_losses
  grad_fn = jax.value_and_grad(functools.partial(loss_fn, task), has_aux=True)
  base_rng = jax.random.key(task.config.seed)

  def step_fn(state, batch):
    (_, sums), grads = grad_fn(state["params"], batch, jax.random.fold_in(base_rng, state["step"]))
    return loop.guarded_update(tx, schedule, state, grads, sums)

  return jax.jit(step_fn, donate_argnums=0)


def _train_iterator(task: Task, data: dict):
  config = task.config
  shard = dict(batch_size=config.batch_size // jax.process_count(), seed=config.seed,
               shuffle=True, process_index=jax.process_index(), process_count=jax.process_count())
  if config.task == "vqa":
    examples, source = data[config.vqa.train_split]
    read = vqa_data.ReadVQAExample(examples, source, task.data.tokenizer, task.pre_config.data,
                                   task.answer_ids())
    return vqa_data.make_iterator(read, num_epochs=None, drop_remainder=True, **shard)
  return task.data.iterator(config.retrieval.train_split, **shard)


def finetune(config, workdir: str) -> dict:
  """Fine-tunes for `config.total_steps` steps and returns the test metrics; resumes from
  the workdir's newest readable checkpoint. A run stopped by SIGTERM saves and returns
  `{"step": N, "preempted": True}`; rerun the same command to finish it.

  The config and the data (every line of VQA JSONL files, train and test) are checked
  before anything is written into `workdir`.
  """
  config_lib.validate(config, config_lib.FINETUNE_RULES)
  workdir_lib.check_kind(workdir, "finetune")
  tally = bad_records.Tally(config.vqa.on_bad_record) if config.task == "vqa" else None
  task, data = build_task(config, tally)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    workdir_lib.save_config(config, workdir)
    if tally is not None:
      bad_records.write_report(tally, workdir)
    if config.task == "vqa":
      with open(os.path.join(workdir, "answers.json"), "w") as f:
        json.dump(task.answers, f)
  # The optimizer and the state's layout follow from the parameters' structure; the
  # pretrained values are read only when the run does not resume (`init`, below).
  params, _ = fresh_params(task, config.seed)
  tx, schedule = make_optimizer(config, params, task.model.cfg.encoder)
  keys = batch_lib.VQA_KEYS if config.task == "vqa" else batch_lib.RETRIEVAL_KEYS
  latest = {}  # the newest evaluation's results (the loop's, every eval_every steps)
  run = loop.Run(
      workdir=workdir, config=config, mesh=task.mesh, rules=task.rules,
      step_fn=_make_step(task, tx, schedule), data_iter=_train_iterator(task, data),
      to_device=lambda b: setup_lib.to_global(batch_lib.select(b, keys), task.mesh),
      evaluate=lambda step, params: latest.update(_write_results(
          workdir, evaluate_task(task, params, data, config.eval.split, step))))
  fresh = {"step": jnp.zeros((), jnp.int32), "params": params, "opt": jax.jit(tx.init)(params)}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), fresh)

  def init():
    fresh["params"], report = load_init_from(task, fresh["params"])
    if report is not None:
      workdir_lib.write_init_report(report, workdir)
    return fresh

  manager = loop.open_manager(run)
  state, _ = loop.restore_or_init(run, manager, abstract, init)
  state, _, preempted = loop.run_loop(run, manager, state)
  step = int(jax.device_get(state["step"]))
  if preempted:
    return {"step": step, "preempted": True}
  if latest.get("step") == step:
    return latest
  return _write_results(workdir, evaluate_task(task, state["params"], data, config.eval.split, step))


def _write_results(workdir: str, results: dict) -> dict:
  if jax.process_index() == 0:
    workdir_lib.write_eval_results(workdir, results["step"], results)
  return results
