"""`mmelectra import-hf`: a Hugging Face LXMERT directory -> a new mmelectra run (its
config and a step-0 checkpoint) that `train`, `evaluate` and `export` take like any other."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import ml_collections

from mmelectra import checkpoint
from mmelectra import errors
from mmelectra import hf_params
from mmelectra import model as model_lib
from mmelectra import setup as setup_lib
from mmelectra import workdir as workdir_lib

IMPORT_INFO_FILE = "import_hf.json"


def import_config(hf_config, base_config) -> ml_collections.ConfigDict:
  """`base_config` (a run config) with the model sizes of `hf_config`; locked.

  The data fields are kept as they are; `visual_feat_dim` comes from the weights, so a run
  whose data gives another feature width fails `config_lib.finalize` with a clear message.
  """
  from mmelectra.data import datasets
  from mmelectra.data import regions as regions_lib

  config = ml_collections.ConfigDict(base_config.to_dict())
  config.model.update(hf_params.model_fields_from_hf(hf_config))
  if config.model.num_regions == -1:
    config.model.num_regions = regions_lib.num_regions(config.data)
  if config.model.num_object_classes == -1:
    config.model.num_object_classes = datasets.num_object_classes(config.data)
  if config.data.max_text_len > config.model.max_position:
    config.data.max_text_len = config.model.max_position
  config.lock()
  return config


def _special_ids_of(hf_dir: str) -> dict:
  from mmelectra.data import tokenizer as tokenizer_lib

  try:
    return tokenizer_lib.special_token_ids(tokenizer_lib.load(hf_dir))
  except (FileNotFoundError, KeyError):
    return {k: i for i, k in enumerate(("pad", "unk", "cls", "sep", "mask"))}


def _read_hf(hf_dir: str):
  """(the HF config, its float32 state dict without the keys it lacked or could not load)."""
  import transformers

  with hf_params.quiet_transformers():
    hf_model, info = transformers.LxmertForPreTraining.from_pretrained(hf_dir, output_loading_info=True)
  absent = set(info["missing_keys"]) | set(info["mismatched_keys"])
  sd = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items() if k not in absent}
  return hf_model.config, sd


def _entries_present(cfg: model_lib.ModelConfig, sd: dict) -> list:
  """The backbone's map entries, and the heads' (ITM; MLM for the mlm objective) where the
  HF weights have every tensor of them."""
  entries = [dataclasses.replace(e, hf_keys=tuple(hf_params.BACKBONE + k for k in e.hf_keys))
             for e in hf_params.backbone_param_map(cfg.encoder)]
  for heads in [hf_params.itm_param_map()] + ([hf_params.mlm_param_map()] if cfg.generator is None else []):
    if all(k in sd for e in heads for k in e.hf_keys):
      entries += heads
  return entries


def _state_with(setup: setup_lib.Setup, sd: dict, entries: list, seed: int) -> tuple[dict, list[str]]:
  """A fresh train state from `seed` with the HF weights in place of `entries`; returns it
  and the names of the parameters left as initialised."""
  cfg = setup.model.cfg
  loaded = hf_params.params_from_hf(sd, entries)
  state = setup_lib.init_state(setup, seed)
  params = model_lib.unscan_params(state["params"])
  for e in entries:
    old = hf_params.get_path(params, e.path)
    new = hf_params.get_path(loaded, e.path)
    if old.shape != new.shape:
      raise errors.InvalidInput(f"{'/'.join(e.path)}: HF gives shape {new.shape}, mmelectra expects {old.shape}")
    hf_params.set_path(params, e.path, jax.device_put(new.astype(old.dtype), old.sharding))
  state["params"] = (jax.device_put(model_lib.scan_params(params), setup.state_shardings["params"])
                     if cfg.encoder.scan_layers else params)
  loaded_paths = {"/".join(e.path) for e in entries}
  names = ["/".join(str(getattr(k, "key", k)) for k in path)
           for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  return state, sorted(n for n in names if n not in loaded_paths)


def _write_run(workdir: str, hf_dir: str, config, state: dict) -> None:
  """config.json, the step-0 checkpoint and a copy of the HF tokenizer files."""
  os.makedirs(workdir, exist_ok=True)
  workdir_lib.save_config(config, workdir)
  manager = workdir_lib.training_manager(workdir)
  checkpoint.save(manager, 0, state, force=True, config=config)
  manager.wait_until_finished()
  manager.close()
  tok_dir = os.path.join(workdir, "tokenizer")
  for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    if os.path.exists(os.path.join(hf_dir, name)):
      os.makedirs(tok_dir, exist_ok=True)
      shutil.copy(os.path.join(hf_dir, name), tok_dir)


def import_hf(hf_dir: str, workdir: str, base_config, seed: int = 0) -> dict:
  """`mmelectra import-hf`: a Hugging Face LXMERT directory -> an mmelectra workdir.

  Writes `config.json` (`base_config`, e.g. `configs/pretrain.py`'s, with the model sizes
  of the HF weights) and a step-0 checkpoint of a full train state: embeddings, encoder and
  pooler from HF; the ITM head from `cls.seq_relationship` and (objective "mlm") the MLM
  head from `cls.predictions` where the HF weights have them; everything else (generator,
  RTD/R2D/MOC heads) freshly initialised from `seed`; optimizer state fresh. Returns (and
  writes to `import_hf.json`) what was loaded and what was initialised.
  """
  if workdir_lib.kind(workdir) is not None or os.path.isdir(workdir_lib.checkpoint_dir(workdir)):
    raise errors.InvalidInput(f"--workdir={workdir} already holds a run; import-hf starts a new "
                              "one: choose an empty or new --workdir")
  hf_config, sd = _read_hf(hf_dir)
  config = import_config(hf_config, base_config)
  setup = setup_lib.build(config, _special_ids_of(hf_dir), setup_lib.flat_mask_salience(config))
  entries = _entries_present(setup.model.cfg, sd)
  state, fresh = _state_with(setup, sd, entries, seed)
  _write_run(workdir, hf_dir, config, state)
  used = {k for e in entries for k in e.hf_keys}
  summary = {"hf_dir": os.path.abspath(hf_dir), "step": 0, "objective": config.objective,
             "loaded": sorted({"/".join(e.path) for e in entries}), "initialised": fresh,
             "hf_keys_not_used": sorted(k for k in sd if k not in used and k != hf_params.TIED_DECODER)}
  with open(os.path.join(workdir, IMPORT_INFO_FILE), "w") as f:
    json.dump(summary, f, indent=2)
  return summary
