"""A run directory (`--workdir`): what is in it, where, and how to read it back.

    WORKDIR/config.json          the run's config (pretraining: has `objective`;
                                 fine-tuning: has `task`)
    WORKDIR/checkpoints/<step>/  orbax checkpoints (`checkpoint.py`: state, data, config)
    WORKDIR/checkpoints/unreadable.<step>/  a checkpoint that did not read, set aside
    WORKDIR/metrics.jsonl        one row per logged step (`metric_writer.py`)
    WORKDIR/tensorboard/{,eval}  TensorBoard events of training and of evaluation
    WORKDIR/eval/step_<N>.json   the metrics of checkpoint N (`evaluate`, `finetune`)
    WORKDIR/init_from.json       which parameters `init_from` loaded (pretraining and
                                 fine-tuning alike)
    WORKDIR/bad_records.json     records skipped under `on_bad_record=skip`

A workdir may be local or a bucket (`gs://...`). Evaluate and export read a run without
writing into it, and restore its parameters only.
"""

from __future__ import annotations

import io
import json
import os

from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from mmelectra import checkpoint
from mmelectra import config_lib
from mmelectra import errors

CONFIG_JSON = "config.json"
CHECKPOINTS = "checkpoints"
MASK_SALIENCE = "mask_salience.npy"
INIT_REPORT = "init_from.json"

# What a workdir's config.json says it holds: the key only that kind's config has.
_KIND_KEYS = {"pretrain": "objective", "finetune": "task"}


def path(workdir: str) -> epath.Path:
  """A workdir (or a file in one) as a path: local paths absolute, `gs://...` as given."""
  workdir = os.fspath(workdir)
  return epath.Path(workdir if "://" in workdir else os.path.abspath(workdir))


def checkpoint_dir(workdir: str) -> str:
  return os.fspath(path(workdir) / CHECKPOINTS)


def mask_salience_path(workdir: str) -> epath.Path:
  """The run's per-token mask salience (`setup.mask_salience`), a float32 `.npy`."""
  return path(workdir) / MASK_SALIENCE


def load_mask_salience(workdir: str, vocab_size: int):
  """The mask-salience table a run saved (`[vocab_size]`), or None where it saved none."""
  target = mask_salience_path(workdir)
  if not target.exists():
    return None
  with target.open("rb") as f:
    table = np.load(f)
  if table.shape != (vocab_size,):
    raise errors.InvalidInput(f"{target} has shape {table.shape}; expected ({vocab_size},) "
                              "(model.vocab_size): it was written for another vocabulary")
  return table


def save_mask_salience(table, workdir: str) -> None:
  """Saves the table as `WORKDIR/mask_salience.npy`, whole or not at all."""
  buffer = io.BytesIO()
  np.save(buffer, table)
  _write_whole(mask_salience_path(workdir), buffer.getvalue())


def _write_whole(target: epath.Path, content: str | bytes) -> None:
  """Writes `target` whole or not at all: aside, then renamed over it, so a reader (or a
  run killed mid-write) never sees half a file."""
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.parent / (target.name + ".tmp")
  if isinstance(content, bytes):
    tmp.write_bytes(content)
  else:
    tmp.write_text(content)
  tmp.replace(target)


# --- the config ---------------------------------------------------------------------------
def save_config(config: ml_collections.ConfigDict, workdir: str) -> str:
  target = epath.Path(workdir) / CONFIG_JSON
  target.write_text(config.to_json(indent=2))
  return os.fspath(target)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's config in today's schema (`config_lib.from_saved`), locked."""
  source = epath.Path(workdir) / CONFIG_JSON
  if not source.exists():
    raise errors.NotFound(f"{source} not found: is {workdir!r} a mmelectra workdir?")
  return config_lib.from_saved(json.loads(source.read_text()))


def kind(workdir: str) -> str | None:
  """"pretrain", "finetune", "other" (e.g. a Hugging Face export's config.json), or None
  where the workdir has no config.json yet."""
  source = epath.Path(workdir) / CONFIG_JSON
  if not source.exists():
    return None
  try:
    raw = json.loads(source.read_text())
  except (OSError, ValueError):
    return "other"
  for name, key in _KIND_KEYS.items():
    if isinstance(raw, dict) and key in raw:
      return name
  return "other"


def check_kind(workdir: str, wanted: str) -> None:
  """Refuses (before anything is written) a workdir that holds another kind of run, or
  a directory such as a Hugging Face export, whose config.json a run would overwrite."""
  found = kind(workdir)
  if found not in (None, wanted):
    what = {"pretrain": "a pretraining run", "finetune": "a fine-tuning run"}.get(
        found, "a config.json that is not a mmelectra run's (an export?)")
    raise errors.InvalidInput(f"--workdir={workdir} holds {what}; a {wanted} run there would "
                              "overwrite it: choose another --workdir")


def run_dir(location: str) -> str:
  """The workdir of `location`: a workdir itself, its `checkpoints/` directory, or a step
  directory `WORKDIR/checkpoints/<step>` (whose run config is the workdir's)."""
  p = os.fspath(location)
  p = p.rstrip("/") if "://" in p else os.path.normpath(p)  # normpath would eat gs://'s "//"
  candidates = [p]
  if os.path.basename(p) == CHECKPOINTS:
    candidates.append(os.path.dirname(p))
  if os.path.basename(os.path.dirname(p)) == CHECKPOINTS:
    candidates.append(os.path.dirname(os.path.dirname(p)))
  for candidate in candidates:
    if (epath.Path(candidate) / CONFIG_JSON).exists():
      return candidate
  return os.fspath(location)  # `load_config` names what is missing


# --- evaluation results ---------------------------------------------------------------------
def eval_json_path(workdir: str, step: int) -> str:
  return os.fspath(epath.Path(workdir) / "eval" / f"step_{step}.json")


def write_eval_results(workdir: str, step: int, metrics: dict) -> None:
  """`eval/step_<N>.json` (whole or not at all) and the numbers as TensorBoard events."""
  from tensorboardX import SummaryWriter

  target = epath.Path(eval_json_path(workdir, step))
  _write_whole(target, json.dumps(metrics, indent=2, sort_keys=True))  # evaluating again overwrites
  tb = SummaryWriter(os.fspath(epath.Path(workdir) / "tensorboard" / "eval"))
  for key, value in sorted(metrics.items()):
    if isinstance(value, (int, float)) and key != "step":
      tb.add_scalar(key, value, step)
  tb.close()
  logging.info("wrote %s", target)


def already_evaluated(workdir: str, step: int, split: str) -> bool:
  try:
    return json.loads(epath.Path(eval_json_path(workdir, step)).read_text()).get("split") == split
  except (OSError, ValueError):
    return False


# --- checkpoints ------------------------------------------------------------------------------
def training_manager(workdir: str, max_to_keep: int | None = 3,
                     keep_every: int | None = None) -> ocp.CheckpointManager:
  """The trainer's manager of `WORKDIR/checkpoints` (made if missing)."""
  path(workdir).mkdir(parents=True, exist_ok=True)  # a local dir or gs://...
  return checkpoint.make_manager(checkpoint_dir(workdir), max_to_keep, keep_every)


def read_only_manager(workdir: str) -> ocp.CheckpointManager:
  """A reader's manager: an evaluator must never make or delete anything in a run."""
  directory = checkpoint_dir(workdir)
  if not epath.Path(directory).is_dir():
    raise errors.NotFound(f"no checkpoint directory {directory}")
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
  return ocp.CheckpointManager(directory, options=options)


def checkpoint_steps(manager: ocp.CheckpointManager) -> list[int]:
  """The complete checkpoints' steps, oldest first; an error naming the directory if none."""
  steps = sorted(manager.all_steps())
  if not steps:
    raise errors.NotFound(f"no checkpoint in {manager.directory}")
  return steps


def restore_params(manager: ocp.CheckpointManager, abstract_params: dict, step: int | None = None,
                   strict: bool = False) -> tuple[int, dict]:
  """(step, {"params": ...}) of a checkpoint: `step`, or the newest that reads (an
  unreadable newest one is skipped with a warning; with `strict` it is an error). Only the
  parameters are read, not the optimizer state."""
  available = checkpoint_steps(manager)
  if step is None:
    return checkpoint.restore_newest_readable(manager, abstract_params, strict=strict)
  if step not in available:
    raise errors.NotFound(f"no checkpoint for step {step} in {manager.directory}; "
                          f"available: {available}")
  return step, checkpoint.restore(manager, step, abstract_params)


# --- init_from: another run's parameters ----------------------------------------------------
def resolve_state_dir(location: str) -> epath.Path:
  """The `state` item directory of `location`: a run's workdir or its `checkpoints/` dir
  (the newest complete checkpoint), a step directory `.../checkpoints/<step>`, or a state
  directory itself."""
  p = path(location)
  if not p.exists():
    raise errors.NotFound(f"init_from: {p} does not exist")
  if (p / CHECKPOINTS).is_dir():
    p = p / CHECKPOINTS
  if (p / checkpoint.STATE).is_dir():
    return p / checkpoint.STATE
  if (p / "_METADATA").exists() or (p / "_sharding").exists():
    return p
  steps = ocp.path.step.checkpoint_steps(p)  # complete (committed) steps only
  if not steps:
    raise errors.NotFound(f"init_from: no complete checkpoint in {p}")
  return p / str(max(steps)) / checkpoint.STATE


def load_pretrained_params(init_from: str, target_params, **kwargs):
  """`checkpoint.load_params_by_name` from the run (or checkpoint) `init_from` names."""
  return checkpoint.load_params_by_name(resolve_state_dir(init_from), target_params, **kwargs)


def write_init_report(report: checkpoint.InitReport, workdir: str) -> None:
  """Logs what `init_from` loaded and writes it to `WORKDIR/init_from.json`."""
  report.log()
  if jax.process_index() == 0:
    target = path(workdir) / INIT_REPORT
    target.write_text(json.dumps(report.to_dict(), indent=2))
    logging.info("wrote %s", target)
