"""Run-config helpers: derived fields, and the copy of the config kept in a workdir."""

from __future__ import annotations

import json
import math
import os

from etils import epath
import ml_collections

from mmelectra import errors
from mmelectra.data import bad_records
from mmelectra.data import datasets
from mmelectra.data import regions


def finalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Validates the config (`validate`: ranges and the rules between fields), fills the
  model fields that follow from the data (those left at -1) and checks them.

  Returns a locked copy; the argument is not changed.
  """
  validate(config)
  config = ml_collections.ConfigDict(config.to_dict())
  m, d = config.model, config.data
  derived = {
      "visual_feat_dim": regions.feature_dim(d),
      "num_regions": regions.num_regions(d),
      "num_object_classes": datasets.num_object_classes(d),
  }
  for key, value in derived.items():
    if m[key] == -1:
      m[key] = value
    elif key != "num_object_classes" and m[key] != value:
      raise errors.InvalidInput(f"config.model.{key}={m[key]} but config.data gives {value}; "
                                f"leave model.{key}=-1 to derive it")
  config.lock()
  return config


def save(config: ml_collections.ConfigDict, workdir: str) -> str:
  path = epath.Path(workdir) / "config.json"
  path.write_text(config.to_json(indent=2))
  return os.fspath(path)


# What a workdir's config.json says it holds: the key only that kind's config has.
_KIND_KEYS = {"pretrain": "objective", "finetune": "task"}


def workdir_kind(workdir: str) -> str | None:
  """"pretrain", "finetune", "other" (e.g. a Hugging Face export's config.json), or None
  where the workdir has no config.json yet."""
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    return None
  try:
    raw = json.loads(path.read_text())
  except (OSError, ValueError):
    return "other"
  for kind, key in _KIND_KEYS.items():
    if isinstance(raw, dict) and key in raw:
      return kind
  return "other"


def check_workdir_kind(workdir: str, kind: str) -> None:
  """Refuses (before anything is written) a workdir that holds another kind of run, or
  a directory such as a Hugging Face export, whose config.json a run would overwrite."""
  found = workdir_kind(workdir)
  if found not in (None, kind):
    what = {"pretrain": "a pretraining run", "finetune": "a fine-tuning run"}.get(
        found, "a config.json that is not a mmelectra run's (an export?)")
    raise errors.InvalidInput(f"--workdir={workdir} holds {what}; a {kind} run there would "
                              "overwrite it: choose another --workdir")


def run_dir(path: str) -> str:
  """The workdir of `path`: a workdir itself, its `checkpoints/` directory, or a step
  directory `WORKDIR/checkpoints/<step>` (whose run config is the workdir's)."""
  p = os.fspath(path)
  p = p.rstrip("/") if "://" in p else os.path.normpath(p)  # normpath would eat gs://'s "//"
  candidates = [p]
  if os.path.basename(p) == "checkpoints":
    candidates.append(os.path.dirname(p))
  if os.path.basename(os.path.dirname(p)) == "checkpoints":
    candidates.append(os.path.dirname(os.path.dirname(p)))
  for candidate in candidates:
    if (epath.Path(candidate) / "config.json").exists():
      return candidate
  return os.fspath(path)  # `load` names what is missing


def upgrade(raw: dict) -> dict:
  """A run config saved by an earlier version, in today's schema.

  - `model.generator_tied` (bool) became `model.generator`: `tied`, or `crossmodal`, the
    only other generator there was then.
  - `loss_weights.clm`, `.cmoc` (corrective LM/MOC) and `.itc` (contrastive alignment) did
    not exist: 0, off (`model.contrastive_dim` then unused); nor did
    `discriminator_mask_fraction` (0: every masked slot replaced) and its hold/decay steps.
  - `discriminator_region_mask_fraction` split off `discriminator_mask_fraction`, which
    served both words and regions before: an older run's regions keep its value.
  """
  model = raw.get("model", {})
  if "generator" not in model:
    model["generator"] = "tied" if model.pop("generator_tied", False) else "crossmodal"
  model.setdefault("contrastive_dim", 128)
  raw.setdefault("discriminator_mask_fraction", 0.0)
  # One share served words and regions until they got one each.
  raw.setdefault("discriminator_region_mask_fraction", raw["discriminator_mask_fraction"])
  raw.setdefault("discriminator_mask_decay_steps", 0)
  raw.setdefault("discriminator_mask_hold_steps", 0)
  for name in ("clm", "cmoc", "itc"):
    raw.get("loss_weights", {}).setdefault(name, 0.0)
  return raw


def load(workdir: str) -> ml_collections.ConfigDict:
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise errors.NotFound(f"{path} not found: is {workdir!r} a mmelectra workdir?")
  config = ml_collections.ConfigDict(upgrade(json.loads(path.read_text())))
  config.logical_axis_rules = tuple(
      (name, tuple(ax) if isinstance(ax, list) else ax) for name, ax in config.logical_axis_rules)
  config.lock()
  return config


# --- validation -------------------------------------------------------------------------
# One pass over the values a user sets, before anything is written or compiled: each rule
# is (dotted key, predicate, what it allows). A key a config lacks is skipped (the
# fine-tuning and pretraining configs share the tables).
def _count(minimum: int):
  return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= minimum,
          f"an integer >= {minimum}")


def _number(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False):
  def check(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
      return False
    return (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
  span = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
  return check, f"a number in {span}"


def _one_of(*options):
  return (lambda v: v in options), f"one of {', '.join(map(repr, options))}"


def _either(rule_a, rule_b):
  return (lambda v: rule_a[0](v) or rule_b[0](v)), f"{rule_a[1]} or {rule_b[1]}"


_RATE = _number(0, 1, hi_open=True)
_POSITIVE = _number(0, math.inf, lo_open=True, hi_open=True)
_NON_NEGATIVE = _number(0, math.inf, hi_open=True)
_MESH_AXIS = _either(_count(1), _one_of(-1))

_SHARED_RULES = (
    ("seed", *_count(0)),
    ("batch_size", *_count(1)),
    ("total_steps", *_count(1)),
    ("log_every", *_count(1)),
    ("optimizer.learning_rate", *_POSITIVE),
    ("optimizer.head_learning_rate", *_NON_NEGATIVE),
    ("optimizer.warmup_steps", *_count(0)),
    ("optimizer.schedule", *_one_of("linear", "cosine")),
    ("optimizer.end_learning_rate_fraction", *_number(0, 1)),
    ("optimizer.b1", *_RATE),
    ("optimizer.b2", *_RATE),
    ("optimizer.eps", *_POSITIVE),
    ("optimizer.weight_decay", *_NON_NEGATIVE),
    ("optimizer.grad_clip_norm", *_NON_NEGATIVE),
    ("optimizer.layer_decay", *_number(0, 1, lo_open=True)),
    ("mesh.data", *_MESH_AXIS),
    ("mesh.fsdp", *_MESH_AXIS),
    ("mesh.model", *_MESH_AXIS),
    ("eval.batch_size", *_count(1)),
)

PRETRAIN_RULES = _SHARED_RULES + (
    ("objective", *_one_of("electra", "mlm")),
    ("checkpoint_every", *_count(1)),
    ("eval_every", *_count(0)),
    ("max_checkpoints_to_keep", *_either(_count(1), _one_of(None))),  # None: keep all
    ("keep_checkpoint_every", *_count(0)),
    ("max_nonfinite_steps", *_count(0)),
    ("grad_accum_steps", *_count(1)),
    ("text_mask_rate", *_RATE),
    ("region_mask_rate", *_RATE),
    ("mask_count", *_one_of("ceil", "stochastic")),
    ("itm_negative_fraction", *_RATE),
    ("itm_input", *_one_of("corrupted", "masked")),
    ("discriminator_mask_fraction", *_number(0, 1)),
    ("discriminator_region_mask_fraction", *_number(0, 1)),
    ("discriminator_mask_decay_steps", *_count(0)),
    ("discriminator_mask_hold_steps", *_count(0)),
    ("text_temperature", *_NON_NEGATIVE),
    ("region_temperature", *_NON_NEGATIVE),
    *((f"loss_weights.{name}", *_NON_NEGATIVE)
      for name in ("moc", "mlm", "r2d", "rtd", "itm", "clm", "cmoc", "itc")),
    ("model.hidden_size", *_count(1)),
    ("model.num_heads", *_count(1)),
    ("model.mlp_dim", *_count(1)),
    ("model.l_layers", *_count(1)),
    ("model.r_layers", *_count(0)),
    ("model.x_layers", *_count(1)),
    ("model.layer_norm_eps", *_POSITIVE),
    ("model.dropout_rate", *_RATE),
    ("model.attention_dropout_rate", *_RATE),
    ("model.dtype", *_one_of("float32", "bfloat16")),
    ("model.generator", *_one_of("per_modality", "crossmodal", "tied")),
    ("model.generator_width_ratio", *_number(0, 1, lo_open=True)),
    ("model.contrastive_dim", *_count(1)),
    ("model.moc_mode", *_one_of("sample", "regress", "classify")),
    ("model.vocab_size", *_count(8)),
    ("model.max_position", *_count(3)),
    ("model.type_vocab_size", *_count(1)),
    ("data.image_size", *_count(1)),
    ("data.num_train", *_count(1)),
    ("data.num_validation", *_count(1)),
    ("data.num_test", *_count(1)),
    ("data.regions", *_one_of("patches", "crops", "features")),
    ("data.patch_size", *_count(1)),
    ("data.crop_size", *_count(1)),
    ("data.max_regions", *_count(1)),
    ("data.max_text_len", *_count(3)),
    ("data.vocab_size", *_count(8)),
    ("data.num_workers", *_count(0)),
    ("data.feature_dim", *_count(1)),
    ("data.on_bad_record", *_one_of(*bad_records.POLICIES)),
    ("eval.num_batches", *_either(_count(1), _one_of(-1))),
    ("eval.retrieval_pool", *_count(0)),
    ("eval.retrieval_pairs_per_call", *_count(1)),
)

FINETUNE_RULES = _SHARED_RULES + (
    ("task", *_one_of("vqa", "retrieval")),
    ("init_mode", *_one_of("pretrained", "random")),
    ("dropout_rate", *_either(_RATE, _one_of(-1, -1.0))),
    ("scan_layers", *_one_of(-1, 0, 1)),
    ("vqa.num_answers", *_count(1)),
    ("vqa.loss", *_one_of("bce", "ce")),
    ("vqa.questions_per_image", *_count(1)),
    ("vqa.on_bad_record", *_one_of(*bad_records.POLICIES)),
)


_ABSENT = object()


def _lookup(config, dotted: str):
  node = config
  for part in dotted.split("."):
    if not hasattr(node, "keys") or part not in node:
      return _ABSENT
    node = node[part]
  return node


def validate(config, rules=PRETRAIN_RULES) -> None:
  """Raises errors.InvalidInput naming every `config.<key>` whose value is out of range
  (one line), before the run writes or compiles anything."""
  problems = []
  for key, check, allowed in rules:
    value = _lookup(config, key)
    if value is not _ABSENT and not check(value):
      problems.append(f"config.{key}={value!r} (allowed: {allowed})")
  if not problems:
    problems += _relations(config)
  if problems:
    raise errors.InvalidInput("; ".join(problems))


def _relations(config) -> list[str]:
  """Rules between fields (checked once each field is in range)."""
  problems = []
  model = config.get("model")
  if model is not None and "num_heads" in model and model.hidden_size % model.num_heads:
    problems.append(f"config.model.hidden_size={model.hidden_size} is not divisible by "
                    f"config.model.num_heads={model.num_heads}")
  if "grad_accum_steps" in config and config.batch_size % config.grad_accum_steps:
    problems.append(f"config.batch_size={config.batch_size} is not divisible by "
                    f"config.grad_accum_steps={config.grad_accum_steps}")
  mesh = config.get("mesh")
  if mesh is not None and sum(int(mesh[k] == -1) for k in mesh) > 1:
    problems.append(f"config.mesh={mesh.to_dict()}: at most one axis may be -1")
  data = config.get("data")
  if data is not None and "max_position" in config.get("model", {}) and \
      data.max_text_len > config.model.max_position:
    problems.append(f"config.data.max_text_len={data.max_text_len} exceeds "
                    f"config.model.max_position={config.model.max_position}")
  return problems
