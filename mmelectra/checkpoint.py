"""Orbax checkpoints of a run under `WORKDIR/checkpoints/<step>/`.

Each step directory holds three items, each readable by a plain orbax client:

  state/   the train state pytree {"step", "params", "opt"} (StandardSave; arrays are
           written per shard, and restore reshards onto any mesh)
  data/    the grain input iterator's state, one `process_<i>-of-<n>.json` per process,
           so a resumed run reads exactly the batches an uninterrupted one would
  config/  the run's config as JSON

Saves are asynchronous: `save` blocks only while arrays are copied to host memory; the
files are written in the background into a temporary directory that is renamed when
complete, so a run killed mid-save leaves no half checkpoint that a restart could pick.

`load_params_by_name` is the `init_from` path (`workdir.load_pretrained_params` finds the
state directory): another run's parameters (only) into a new model, by name, with a report
of what was loaded, newly initialised and dropped. Names are matched in the unrolled layer
layout, so either side may use `model.scan_layers` (see `model.unscan_params`).

Everything here takes a checkpoint directory or a manager; where those lie in a run
directory is `workdir.py`'s business.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from mmelectra import errors
from mmelectra import model as model_lib

STATE, DATA, CONFIG = "state", "data", "config"


# --- the CheckpointManager ---------------------------------------------------------------
def make_manager(directory: str, max_to_keep: int | None = 3, keep_every: int | None = None,
                 async_save: bool = True) -> ocp.CheckpointManager:
  """A writer's manager of `directory`: keeps the last `max_to_keep` checkpoints (None:
  all) and, when `keep_every` is set, every step divisible by it forever."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, keep_period=keep_every or None, create=True,
      enable_async_checkpointing=async_save,
      # A run killed mid-save leaves `<step>.orbax-checkpoint-tmp-*`: never listed as a
      # step, and removed when the next run opens the manager.
      cleanup_tmp_directories=True)
  return ocp.CheckpointManager(directory, options=options, item_handlers={
      STATE: ocp.StandardCheckpointHandler(),
      DATA: grain.checkpoint.CheckpointHandler(),
      CONFIG: ocp.JsonCheckpointHandler(),
  })


def save(manager: ocp.CheckpointManager, step: int, state, force: bool = False, *,
         data_iter=None, config=None) -> bool:
  """Starts an (async) save of the state, and of the iterator's state and config if given.

  Returns when the arrays are on host: the caller may then donate or overwrite `state`.
  The iterator's position is read now, so call this between steps.
  """
  items = {STATE: ocp.args.StandardSave(state)}
  if data_iter is not None:
    items[DATA] = grain.checkpoint.CheckpointSave(data_iter)
  if config is not None:
    items[CONFIG] = ocp.args.JsonSave(config.to_dict() if hasattr(config, "to_dict") else config)
  return manager.save(step, args=ocp.args.Composite(**items), force=force)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state):
  """Restores the state into arrays with the shardings of `abstract_state`
  (ShapeDtypeStructs; the mesh may differ from the one that saved it).

  `abstract_state` may hold a part of the state, e.g. `{"params": ...}`: only that part
  is read (evaluate and export read no optimizer state).
  """
  if set(abstract_state) != check_state_shapes(manager, step, abstract_state):
    return ocp.PyTreeCheckpointer().restore(_state_dir(manager, step), args=ocp.args.PyTreeRestore(
        item=abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
        partial_restore=True))
  restored = manager.restore(step, args=ocp.args.Composite(
      **{STATE: ocp.args.StandardRestore(abstract_state)}))
  return restored[STATE]


def _state_dir(manager: ocp.CheckpointManager, step: int) -> epath.Path:
  return epath.Path(manager.directory) / str(step) / STATE


def one_line_reason(error: BaseException) -> str:
  """One line on why a checkpoint did not read (TensorStore's messages run to pages)."""
  lines = [l.strip() for l in str(error).splitlines() if l.strip()]
  text = lines[0] if lines else ""
  return f"{type(error).__name__}: {text[:300]}"


def restore_newest_readable(manager: ocp.CheckpointManager, abstract_state, *, data_iter=None,
                            strict: bool = False, set_aside: bool = False):
  """(step, state) of the newest checkpoint that reads; (None, None) if there is none.

  Tries the steps newest first. A step whose files cannot be read (truncated or deleted
  array files, lost metadata, a broken iterator state) is reported in one warning line
  naming it and why, and the next older one is tried; with `strict` it is an error
  instead. A checkpoint that reads but does not fit the config (another model size) is
  always an error: that is the config's fault, not the checkpoint's. With `set_aside`
  (the trainer, process 0 renames) an unreadable step moves to `unreadable.<step>` in the
  checkpoints directory, so the resumed run can save that step again, and where none
  reads the run starts from step 0; without it (evaluate, export) that is an error.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  skipped = []
  for step in steps:
    try:
      state = restore(manager, step, abstract_state)  # shapes checked first, from metadata
      if data_iter is not None:
        restore_data_iterator(manager, step, data_iter)
    except errors.UserError:
      raise
    except Exception as e:  # noqa: BLE001 - any failure to read is a bad checkpoint
      where = f"checkpoint step {step} in {manager.directory}"
      if strict:
        raise errors.InvalidInput(f"{where} cannot be read ({one_line_reason(e)}); without --strict "
                                  "the newest readable checkpoint is used") from e
      logging.warning("%s cannot be read (%s); trying the next older one", where, one_line_reason(e))
      skipped.append(step)
      continue
    if skipped and set_aside:
      _set_aside(manager, skipped)
    return step, state
  if steps and not set_aside:
    raise errors.InvalidInput(f"no checkpoint in {manager.directory} can be read (steps "
                              f"{steps}); see the warnings above for why")
  if steps:
    logging.warning("no checkpoint in %s can be read (steps %s): starting from step 0",
                    manager.directory, steps)
    _set_aside(manager, skipped)
  return None, None


def _set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
  if jax.process_index() == 0:
    directory = epath.Path(manager.directory)
    for step in steps:
      target = directory / f"unreadable.{step}"
      if target.exists():
        target.rmtree()
      (directory / str(step)).rename(target)
      logging.warning("moved the unreadable checkpoint to %s", target)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("mmelectra_set_aside_checkpoints")
  manager.reload()


def restore_data_iterator(manager: ocp.CheckpointManager, step: int, data_iter) -> bool:
  """Sets `data_iter` to where it was at `step`; False (and a warning) if the checkpoint
  has no iterator state for this process (saved by another process count, or without)."""
  path = epath.Path(manager.directory) / str(step) / DATA
  index, count = jax.process_index(), jax.process_count()
  if not path.exists():
    # Written without one (e.g. `import-hf` at step 0): the data order starts afresh.
    logging.info("checkpoint %s has no input-iterator state", path.parent)
    return False
  if not (path / f"process_{index}-of-{count}.json").exists():
    logging.warning("checkpoint %s has no input-iterator state for process %d of %d; the data "
                    "order starts afresh (it is not the order an uninterrupted run would see)",
                    path.parent, index, count)
    return False
  manager.restore(step, args=ocp.args.Composite(**{DATA: grain.checkpoint.CheckpointRestore(data_iter)}))
  return True


def restore_config(manager: ocp.CheckpointManager, step: int) -> dict | None:
  """The config saved with `step` as a dict, or None if it was saved without one."""
  if not (epath.Path(manager.directory) / str(step) / CONFIG).exists():
    return None
  return manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]


def warn_config_changes(saved: dict | None, config) -> list[str]:
  """Logs (and returns) the config fields that differ from those saved with a checkpoint,
  e.g. a resumed run given another batch size."""
  if saved is None:
    return []
  before = flatten_names(saved)
  after = flatten_names(json.loads(config.to_json()))
  changes = [f"{k}: {before.get(k, '<absent>')!r} -> {after.get(k, '<absent>')!r}"
             for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
  if changes:
    logging.warning("resuming with a config that differs from the checkpoint's:\n  %s",
                    "\n  ".join(changes))
  return changes


def abstract_with_shardings(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# --- names and shapes -------------------------------------------------------------------
def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def flatten_names(tree) -> dict[str, Any]:
  """{"encoder/layer_0/query/kernel": leaf, ...} in tree order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)
  return {"/".join(_key_name(k) for k in path): leaf for path, leaf in flat if leaf is not None}


def _unflatten_names(flat: dict[str, Any]) -> dict:
  out: dict = {}
  for name, leaf in flat.items():
    node = out
    *parents, last = name.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = leaf
  return out


def _metadata_tree(pytree_dir: epath.Path):
  return ocp.PyTreeCheckpointHandler().metadata(pytree_dir).tree


def check_state_shapes(manager: ocp.CheckpointManager, step: int, abstract_state) -> set[str]:
  """Raises ValueError naming the first parameter (or state entry) whose saved shape
  differs from the config's, with both shapes, or that only one side has. Reads only
  metadata, so it runs before anything is restored or compiled. Returns the saved state's
  top-level entries (e.g. {"step", "params", "opt"})."""
  path = _state_dir(manager, step)
  saved_tree = _metadata_tree(path)
  # A partial state (parameters only) is checked against that part of the checkpoint.
  saved = flatten_names({k: v for k, v in saved_tree.items() if k in abstract_state})
  wanted = flatten_names(abstract_state)
  # Parameters first: their names are what a user recognises.
  order = sorted(wanted, key=lambda n: (not n.startswith("params/"), list(wanted).index(n)))
  for name in order:
    if name not in saved:
      raise errors.InvalidInput(f"checkpoint {path.parent} does not match the config: it has no "
                                f"'{name}' (config shape {tuple(wanted[name].shape)}). Use another "
                                "workdir, or --config.init_from to start from its parameters")
    if tuple(saved[name].shape) != tuple(wanted[name].shape):
      raise errors.InvalidInput(f"checkpoint {path.parent} does not match the config: '{name}' has "
                                f"shape {tuple(saved[name].shape)} in the checkpoint but "
                                f"{tuple(wanted[name].shape)} in the config. Use another workdir, or the "
                                "config that wrote it")
  extra = [n for n in saved if n not in wanted]
  if extra:
    raise errors.InvalidInput(f"checkpoint {path.parent} does not match the config: it has '{extra[0]}' "
                              f"(shape {tuple(saved[extra[0]].shape)}) that the config's model lacks"
                              + (f", and {len(extra) - 1} more" if len(extra) > 1 else ""))
  return set(saved_tree)


# --- init_from: another run's parameters ------------------------------------------------
@dataclasses.dataclass(frozen=True)
class InitReport:
  """What `load_pretrained_params` did, by '/'-joined parameter name (target names)."""

  source: str  # the state directory the parameters came from
  loaded: tuple[str, ...]  # taken from the checkpoint
  new: tuple[str, ...]  # absent from the checkpoint: kept as initialised
  mismatched: tuple[tuple[str, tuple, tuple], ...]  # (name, saved shape, target shape): kept as initialised
  dropped: tuple[str, ...]  # checkpoint names (after rename) that the target lacks

  @property
  def newly_initialised(self) -> tuple[str, ...]:
    return self.new + tuple(name for name, _, _ in self.mismatched)

  def to_dict(self) -> dict:
    return {"source": self.source, "loaded": list(self.loaded), "new": list(self.new),
            "mismatched": [[n, list(a), list(b)] for n, a, b in self.mismatched],
            "dropped": list(self.dropped)}

  def log(self) -> None:
    """The counts at WARNING (the first names of what was not loaded), every name at INFO."""
    def first(names):
      return f" ({', '.join(names[:8])}{', ...' if len(names) > 8 else ''})" if names else ""
    logging.warning("init_from %s: %d parameters loaded, %d newly initialised%s, %d dropped%s",
                    self.source, len(self.loaded), len(self.newly_initialised),
                    first(self.newly_initialised), len(self.dropped), first(self.dropped))
    logging.info("%s", self.summary())

  def summary(self) -> str:
    lines = [f"init_from {self.source}: {len(self.loaded)} parameters loaded, "
             f"{len(self.newly_initialised)} newly initialised, {len(self.dropped)} dropped"]
    for title, names in (("loaded", self.loaded), ("newly initialised (absent)", self.new),
                         ("newly initialised (shape differs)",
                          [f"{n} {a} -> {b}" for n, a, b in self.mismatched]),
                         ("dropped", self.dropped)):
      if names:
        lines.append(f"  {title}:")
        lines.extend(f"    {n}" for n in names)
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class _SavedParam:
  """A checkpoint parameter, or one layer (`index`) of a stacked (`scan_layers`) one:
  `model.unscan_params` slices it like an array, so both layouts match by unrolled name."""

  name: str  # in the checkpoint
  saved_shape: tuple[int, ...]
  index: int | None = None

  @property
  def shape(self) -> tuple[int, ...]:
    return self.saved_shape if self.index is None else self.saved_shape[1:]

  def __getitem__(self, i: int) -> "_SavedParam":
    return _SavedParam(self.name, self.saved_shape, i)


def _replicated_like(leaf) -> jax.sharding.Sharding:
  sharding = getattr(leaf, "sharding", None)
  if isinstance(sharding, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def load_params_by_name(state_dir, target_params, *,
                        rename: Callable[[str], str | None] | None = None,
                        allow_shape_mismatch: bool = False):
  """Fills `target_params` with the parameters saved in `state_dir`, matched by name.

  Args:
    state_dir: a checkpoint's `state` item directory (`workdir.resolve_state_dir` finds it
      from a workdir or step directory).
    target_params: the new model's initialised parameters (arrays; each loaded parameter
      takes the sharding and dtype of the array it replaces).
    rename: maps a checkpoint parameter name (e.g. "encoder/l_layer_0/attention/query/kernel",
      without the "params/" prefix) to the target's name, or None to drop it.
    allow_shape_mismatch: if False (default) a parameter present on both sides with
      different shapes is an error naming it; if True it keeps its new initialisation and
      is listed in `report.mismatched`.

  Returns:
    (params, report): params has the structure of `target_params`; report is an InitReport.
    Only parameters are read: no optimizer state, step or data position.

  Names (in `rename` and the report) are those of the unrolled layout (`l_layer_{i}`),
  whether the checkpoint, the target or both use `model.scan_layers`; a stacked
  checkpoint parameter is read whole (replicated) and sliced into its layers.
  """
  state_dir = epath.Path(state_dir)
  saved = _saved_params(state_dir)
  canonical_target = model_lib.unscan_params(target_params)
  target = flatten_names(canonical_target)
  source_of, dropped = _match_names(saved, target, rename)
  loaded, new, mismatched = _compare_shapes(saved, target, source_of, allow_shape_mismatch, state_dir)
  values = dict(target)
  values.update(_read_loaded(state_dir, saved, target, source_of, loaded))
  leaves = [values[n] for n in target]
  if set(target) != set(flatten_names(target_params)):  # the target uses scan_layers
    stacked = model_lib.scan_params(jax.tree.unflatten(jax.tree.structure(canonical_target), leaves))
    leaves = [jax.device_put(v, t.sharding) if isinstance(t, jax.Array) else v
              for v, t in zip(jax.tree.leaves(stacked), jax.tree.leaves(target_params), strict=True)]
  report = InitReport(str(state_dir), tuple(loaded), tuple(new), tuple(mismatched), tuple(dropped))
  logging.info("%s", report.summary())
  return jax.tree.unflatten(jax.tree.structure(target_params), leaves), report


def _saved_params(state_dir: epath.Path) -> dict[str, _SavedParam]:
  """The checkpoint's parameters by unrolled name (metadata only)."""
  saved_tree = _metadata_tree(state_dir)
  if "params" not in saved_tree:
    raise errors.InvalidInput(f"init_from: {state_dir} holds no 'params' (keys: {sorted(saved_tree)})")
  return flatten_names(model_lib.unscan_params(jax.tree_util.tree_map_with_path(
      lambda path, m: _SavedParam("/".join(_key_name(k) for k in path), tuple(m.shape)),
      saved_tree["params"])))


def _match_names(saved: dict, target: dict, rename) -> tuple[dict[str, str], list[str]]:
  """(target name -> checkpoint name, the checkpoint names nothing takes)."""
  source_of: dict[str, str] = {}
  dropped = []
  for name in saved:
    new_name = rename(name) if rename is not None else name
    if new_name is None or new_name not in target:
      dropped.append(name if new_name in (None, name) else f"{name} (as {new_name})")
    elif new_name in source_of:
      raise ValueError(f"init_from: rename maps both {source_of[new_name]!r} and {name!r} to {new_name!r}")
    else:
      source_of[new_name] = name
  return source_of, dropped


def _compare_shapes(saved: dict, target: dict, source_of: dict, allow_shape_mismatch: bool,
                    state_dir) -> tuple[list, list, list]:
  """(loaded, new, mismatched) target names; a shape mismatch is an error unless allowed."""
  loaded, new, mismatched = [], [], []
  for name, leaf in target.items():
    if name not in source_of:
      new.append(name)
      continue
    saved_shape, shape = tuple(saved[source_of[name]].shape), tuple(np.shape(leaf))
    if saved_shape == shape:
      loaded.append(name)
    elif allow_shape_mismatch:
      mismatched.append((name, saved_shape, shape))
    else:
      raise errors.InvalidInput(f"init_from {state_dir}: parameter '{name}' has shape {saved_shape} in the "
                                f"checkpoint but {shape} in the model (allow_shape_mismatch=True keeps "
                                "such parameters newly initialised)")
  return loaded, new, mismatched


def _read_loaded(state_dir, saved: dict, target: dict, source_of: dict, loaded: list) -> dict:
  """The `loaded` target names' values, read in one partial restore, each with its target's
  sharding (a stacked checkpoint parameter is read replicated and sliced)."""
  if not loaded:
    return {}

  def abstract(leaf):
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
      sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype, sharding=sharding)

  wanted = {}  # checkpoint name -> what to restore it as
  for n in loaded:
    src = saved[source_of[n]]
    if src.index is None:
      wanted[src.name] = abstract(target[n])
    elif src.name not in wanted:
      wanted[src.name] = jax.ShapeDtypeStruct(src.saved_shape, target[n].dtype,
                                              sharding=_replicated_like(target[n]))
  item = {"params": _unflatten_names(wanted)}
  restored = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True))
  restored = flatten_names(restored["params"])
  values = {}
  for n in loaded:
    src = saved[source_of[n]]
    values[n] = (restored[src.name] if src.index is None
                 else jax.device_put(restored[src.name][src.index], abstract(target[n]).sharding))
  return values
