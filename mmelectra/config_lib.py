"""Run-config helpers: derived fields, and the copy of the config kept in a workdir."""

from __future__ import annotations

import json
import os

from etils import epath
import ml_collections

from mmelectra.data import regions
from mmelectra.data import datasets


def finalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Fills the model fields that follow from the data (those left at -1) and checks them.

  Returns a locked copy; the argument is not changed.
  """
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
      raise ValueError(f"config.model.{key}={m[key]} but config.data gives {value}; "
                       f"leave model.{key}=-1 to derive it")
  if d.max_text_len > m.max_position:
    raise ValueError(f"config.data.max_text_len={d.max_text_len} exceeds "
                     f"config.model.max_position={m.max_position}")
  if config.batch_size % config.grad_accum_steps:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by "
                     f"config.grad_accum_steps={config.grad_accum_steps}")
  config.lock()
  return config


def save(config: ml_collections.ConfigDict, workdir: str) -> str:
  path = epath.Path(workdir) / "config.json"
  path.write_text(config.to_json(indent=2))
  return os.fspath(path)


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
  """
  model = raw.get("model", {})
  if "generator" not in model:
    model["generator"] = "tied" if model.pop("generator_tied", False) else "crossmodal"
  model.setdefault("contrastive_dim", 128)
  raw.setdefault("discriminator_mask_fraction", 0.0)
  raw.setdefault("discriminator_mask_decay_steps", 0)
  raw.setdefault("discriminator_mask_hold_steps", 0)
  for name in ("clm", "cmoc", "itc"):
    raw.get("loss_weights", {}).setdefault(name, 0.0)
  return raw


def load(workdir: str) -> ml_collections.ConfigDict:
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: is {workdir!r} a mmelectra workdir?")
  config = ml_collections.ConfigDict(upgrade(json.loads(path.read_text())))
  config.logical_axis_rules = tuple(
      (name, tuple(ax) if isinstance(ax, list) else ax) for name, ax in config.logical_axis_rules)
  config.lock()
  return config
