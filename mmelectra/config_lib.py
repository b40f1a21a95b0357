"""The run config's schema: derived fields (`finalize`), validation (`validate`), and a
config saved by an earlier version brought to today's schema (`from_saved`). Where the
config lies in a run directory is `workdir.py`'s business."""

from __future__ import annotations

import math

import ml_collections

from mmelectra import errors
from mmelectra.data import bad_records
from mmelectra.data import datasets
from mmelectra.data import regions

# The discriminator with no clean hold: every example corrupted from the first step. What
# a run saved before the clean share existed trained (`upgrade`), and the per-modality
# default until 2026-12-04.
NO_CLEAN_HOLD = {"discriminator_clean_fraction": 0.0, "discriminator_clean_uniform_masking": False,
                 "discriminator_mask_hold_steps": 0, "discriminator_mask_decay_steps": 0,
                 "discriminator_clean_floor": 0.0, "discriminator_scores_clean": True}


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


def upgrade(raw: dict) -> dict:
  """A pretraining config saved by an earlier version, its changed fields in today's terms
  (fields that are only new get today's defaults in `from_saved`):

  - `model.generator_tied` (bool) became `model.generator`: `tied`, or `crossmodal`, the
    only other generator there was then (today's default is `per_modality`).
  - `discriminator_region_mask_fraction` split off `discriminator_mask_fraction`, which
    served both words and regions before: an older run's regions keep its value.
  - Before `text_mask_weighting` and `model.rtd_reads_clm` every masked word was drawn
    uniformly and RTD read its own head only: an older run keeps both.
  - A loss weight a config lacks is a loss its version did not have: 0 (the corrective
    LM and MOC, contrastive alignment; today's per-modality default turns some on).
  - Before `generator_trains_embeddings` the generator always trained the shared
    embeddings (ELECTRA's sharing): an older run keeps True.
  - Before the clean share and its schedule every example was corrupted from the first
    step: an older run keeps no clean examples and no hold (today's per-modality default
    holds the baseline's task for the first 3/8 of the run), and so no clean floor either.
  - Before `discriminator_scores_clean` RTD/R2D scored every example: an older run keeps
    True.
  - Before `itm_intact_fraction` the discriminator read no example intact and ITM learnt
    from every example: an older run keeps 0.
  """
  model = raw.get("model", {})
  if "generator" not in model:
    model["generator"] = "tied" if model.pop("generator_tied", False) else "crossmodal"
  raw.setdefault("discriminator_region_mask_fraction", raw.get("discriminator_mask_fraction", 0.0))
  raw.setdefault("text_mask_weighting", "uniform")
  for name in ("clm", "cmoc", "itc"):
    raw.setdefault("loss_weights", {}).setdefault(name, 0.0)
  model.setdefault("rtd_reads_clm", False)
  raw.setdefault("generator_trains_embeddings", True)
  raw.setdefault("cmoc_corrupted_weight", -1.0)
  raw.setdefault("itm_intact_fraction", 0.0)
  raw.setdefault("itm_same_count_fraction", 0.0)
  for name, value in NO_CLEAN_HOLD.items():
    raw.setdefault(name, value)
  return raw


def defaults_for(raw: dict) -> ml_collections.ConfigDict:
  """Today's default config of the kind `raw` is: pretraining, or fine-tuning for its task."""
  from mmelectra_configs import finetune_retrieval, finetune_vqa, pretrain

  if "task" in raw:
    return {"vqa": finetune_vqa, "retrieval": finetune_retrieval}.get(
        raw["task"], finetune_vqa).get_config()
  return pretrain.get_config()


def _fill_missing(raw: dict, defaults: dict) -> dict:
  for key, value in defaults.items():
    if key not in raw:
      raw[key] = value
    elif isinstance(value, dict) and isinstance(raw[key], dict):
      _fill_missing(raw[key], value)
  return raw


def from_saved(raw: dict) -> ml_collections.ConfigDict:
  """A config as a run saved it (JSON), in today's schema, locked: renamed fields
  `upgrade`d, and every field added since filled with today's default, so the rest of
  the code reads fields directly."""
  if "task" not in raw:
    raw = upgrade(raw)
  config = ml_collections.ConfigDict(_fill_missing(raw, defaults_for(raw).to_dict()))
  if "logical_axis_rules" in config:
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

def _keys(rule, *keys):
  """One rule for several keys: ((key, check, what it allows), ...)."""
  return tuple((key, *rule) for key in keys)


_SHARED_RULES = (
    *_keys(_count(0), "seed", "eval_every", "keep_checkpoint_every", "max_nonfinite_steps",
           "optimizer.warmup_steps"),
    *_keys(_count(1), "batch_size", "total_steps", "log_every", "checkpoint_every",
           "eval.batch_size"),
    ("max_checkpoints_to_keep", *_either(_count(1), _one_of(None))),  # None: keep all
    *_keys(_POSITIVE, "optimizer.learning_rate", "optimizer.eps"),
    *_keys(_NON_NEGATIVE, "optimizer.head_learning_rate", "optimizer.weight_decay",
           "optimizer.grad_clip_norm"),
    ("optimizer.schedule", *_one_of("linear", "cosine", "wsd")),
    ("optimizer.decay_fraction", *_number(0, 1, lo_open=True)),
    ("optimizer.end_learning_rate_fraction", *_number(0, 1)),
    *_keys(_RATE, "optimizer.b1", "optimizer.b2"),
    ("optimizer.layer_decay", *_number(0, 1, lo_open=True)),
    *_keys(_MESH_AXIS, "mesh.data", "mesh.fsdp", "mesh.model"),
)

PRETRAIN_RULES = _SHARED_RULES + (
    ("init_seed", *_either(_count(0), _one_of(-1))),  # -1: the parameters follow `seed`
    ("objective", *_one_of("electra", "mlm")),
    ("mask_count", *_one_of("ceil", "stochastic")),
    ("text_mask_weighting", *_one_of("uniform", "salience")),
    ("itm_input", *_one_of("corrupted", "masked")),
    *_keys(_count(0), "discriminator_mask_decay_steps", "discriminator_mask_hold_steps",
           "model.r_layers", "data.num_workers", "eval.retrieval_pool"),
    *_keys(_count(1), "grad_accum_steps", "model.hidden_size", "model.num_heads", "model.mlp_dim",
           "model.l_layers", "model.x_layers", "model.contrastive_dim", "model.type_vocab_size",
           "data.image_size", "data.num_train", "data.num_validation", "data.num_test",
           "data.patch_size", "data.crop_size", "data.max_regions", "data.feature_dim",
           "data.mask_salience_examples", "eval.retrieval_pairs_per_call"),
    *_keys(_count(3), "model.max_position", "data.max_text_len"),
    *_keys(_count(8), "model.vocab_size", "data.vocab_size"),
    *_keys(_RATE, "text_mask_rate", "region_mask_rate", "itm_negative_fraction",
           "model.dropout_rate", "model.attention_dropout_rate"),
    *_keys(_number(0, 1), "discriminator_mask_fraction", "discriminator_region_mask_fraction",
           "discriminator_clean_fraction", "discriminator_clean_floor",
           "discriminator_witness_fraction", "itm_intact_fraction", "itm_same_count_fraction"),
    *_keys(_NON_NEGATIVE, "text_temperature", "region_temperature",
           *(f"loss_weights.{name}" for name in ("moc", "mlm", "r2d", "rtd", "itm", "clm", "cmoc", "itc"))),
    *_keys(_POSITIVE, "model.layer_norm_eps", "text_mask_salience_floor"),
    ("model.rtd_reads_clm", *_one_of(True, False)),
    ("generator_trains_embeddings", *_one_of(True, False)),
    ("discriminator_clean_uniform_masking", *_one_of(True, False)),
    ("discriminator_scores_clean", *_one_of(True, False)),
    ("discriminator_witness_on_clean", *_one_of(True, False)),
    ("cmoc_corrupted_weight", *_either(_NON_NEGATIVE, _one_of(-1, -1.0))),
    ("model.dtype", *_one_of("float32", "bfloat16")),
    ("model.generator", *_one_of("per_modality", "crossmodal", "tied")),
    ("model.generator_width_ratio", *_number(0, 1, lo_open=True)),
    ("model.moc_mode", *_one_of("sample", "regress", "classify")),
    ("data.regions", *_one_of("patches", "crops", "features")),
    ("data.on_bad_record", *_one_of(*bad_records.POLICIES)),
    ("eval.num_batches", *_either(_count(1), _one_of(-1))),
)

FINETUNE_RULES = _SHARED_RULES + (
    ("task", *_one_of("vqa", "retrieval")),
    ("init_mode", *_one_of("pretrained", "random")),
    ("dropout_rate", *_either(_RATE, _one_of(-1, -1.0))),
    ("scan_layers", *_one_of(-1, 0, 1)),
    *_keys(_count(1), "vqa.num_answers", "vqa.questions_per_image"),
    ("vqa.loss", *_one_of("bce", "ce")),
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
  floor = config.get("discriminator_clean_floor", 0.0)
  if floor and floor > config.get("discriminator_clean_fraction", 1.0):
    problems.append(f"config.discriminator_clean_floor={floor} is where the clean share falls to; "
                    "it cannot be above where it starts, config.discriminator_clean_fraction="
                    f"{config.get('discriminator_clean_fraction')}")
  if floor and not config.get("discriminator_mask_decay_steps", 0):
    problems.append(f"config.discriminator_clean_floor={floor} ends the clean share's schedule, "
                    "but config.discriminator_mask_decay_steps=0 gives it none (the share stays "
                    "at config.discriminator_clean_fraction)")
  if not config.get("discriminator_clean_fraction", 1.0):
    if config.get("discriminator_clean_uniform_masking"):
      problems.append("config.discriminator_clean_uniform_masking=True masks the clean examples' "
                      "words, but config.discriminator_clean_fraction=0 makes none")
    if config.get("discriminator_scores_clean") is False:
      problems.append("config.discriminator_scores_clean=False leaves the clean examples out of "
                      "RTD/R2D, but config.discriminator_clean_fraction=0 makes none")
  cmoc_corrupted = config.get("cmoc_corrupted_weight", -1.0)
  if cmoc_corrupted >= 0 and not (config.get("objective") == "electra"
                                  and config.get("loss_weights", {}).get("cmoc", 0.0) > 0):
    problems.append(f"config.cmoc_corrupted_weight={cmoc_corrupted} weighs the corrective MOC on the "
                    "corrupted examples, but there is none: it needs config.objective='electra' "
                    "and config.loss_weights.cmoc > 0")
  if config.get("itm_intact_fraction", 0.0) > 0 and config.get("objective") != "electra":
    problems.append(f"config.itm_intact_fraction={config.get('itm_intact_fraction')} reads some "
                    "examples intact for ITM, a setting of objective='electra': the baseline's "
                    "ITM reads its masked pair")
  return problems
