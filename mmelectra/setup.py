"""What every command builds from a config before it trains, evaluates or exports.

`prepare_data(config)` -> `DataContext`: the data set built if missing, the config
finalized (the model fields the data implies), and the tokenizer and its special ids,
once per command. `build(config, special_ids)` -> `Setup`: the model, the objective's
settings, the mesh and logical axis rules, the optimizer and the abstract sharded train
state. `init_state` initialises that state directly into its shards.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tokenizers

from mmelectra import checkpoint
from mmelectra import config_lib
from mmelectra import electra
from mmelectra import errors
from mmelectra import objectives
from mmelectra import optim
from mmelectra import sharding
from mmelectra import workdir as workdir_lib
from mmelectra.data import batch as batch_lib
from mmelectra.data import datasets
from mmelectra.data import mask_salience as mask_salience_lib
from mmelectra.data import pipeline
from mmelectra.data import tokenizer as tokenizer_lib
from mmelectra.model import MMElectra, model_config_from


@dataclasses.dataclass(frozen=True)
class DataContext:
  """A finalized config with its data set prepared and its tokenizer loaded."""

  config: ml_collections.ConfigDict
  tokenizer: tokenizers.Tokenizer
  special_ids: dict

  def iterator(self, split: str, **kwargs):
    """`pipeline.make_iterator` over this config's data with this tokenizer."""
    return pipeline.make_iterator(self.config.data, split, tokenizer=self.tokenizer, **kwargs)


def prepare_data(config) -> DataContext:
  """Builds the data set if missing, finalizes the config and loads the tokenizer."""
  datasets.prepare(config.data)
  config = config_lib.finalize(config)
  tok = pipeline.load_tokenizer(config.data)
  if tok.get_vocab_size() > config.model.vocab_size:
    raise errors.InvalidInput(f"the tokenizer has {tok.get_vocab_size()} tokens but config.model.vocab_size="
                              f"{config.model.vocab_size}; raise model.vocab_size")
  return DataContext(config, tok, tokenizer_lib.special_token_ids(tok))


def mask_salience(data: DataContext, workdir: str | None) -> np.ndarray | None:
  """The run's per-token mask salience (data/mask_salience.py), None under uniform masking.

  The table the run saved in `workdir` (`train` saves it beside config.json, once the start
  is accepted), so that resuming and evaluating mask as training did; else measured on
  the first `data.mask_salience_examples` captions of the train split. Writes nothing.
  """
  config = data.config
  if config.text_mask_weighting != "salience":
    return None
  if workdir:
    saved = workdir_lib.load_mask_salience(workdir, config.model.vocab_size)
    if saved is not None:
      return saved
  rows = pipeline.caption_token_rows(config.data, "train", data.tokenizer,
                                     config.data.mask_salience_examples)
  return mask_salience_lib.context_surprisal(rows, config.model.vocab_size)


def flat_mask_salience(config) -> np.ndarray | None:
  """Equal salience for every token, for programs built without a data set (compile
  checks, benchmarks, import): the step compiles to the same program; nothing it
  computes is kept. None under uniform masking."""
  if config.text_mask_weighting != "salience":
    return None
  return np.ones(config.model.vocab_size, np.float32)


def build_for_run(data: DataContext, workdir: str | None) -> Setup:
  """`build` for a command on a run: its data's special ids and the run's mask salience."""
  return build(data.config, data.special_ids, mask_salience(data, workdir))


def dummy_batch(config, batch_size: int) -> dict:
  """A batch of real-looking padding with the pipeline's shapes and dtypes (init, compile)."""
  return batch_lib.placeholder(config.data.max_text_len, config.model.num_regions,
                               config.model.visual_feat_dim, batch_size)


def to_global(batch: dict, mesh) -> dict:
  """Process-local numpy batch -> global jax arrays sharded over (data, fsdp)."""
  sh = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sh, np.asarray(v)) for k, v in batch.items()}


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

  @property
  def abstract_params(self) -> dict:
    """The parameters' part of `abstract_state` (what evaluate and export restore)."""
    return {"params": self.abstract_state["params"]}


def build(config, special_token_ids: dict, mask_salience: np.ndarray | None = None) -> Setup:
  """Model, objective, mesh and the (abstract) sharded train state for a finalized config.

  `mask_salience`: the run's table (`mask_salience`) under `text_mask_weighting="salience"`.
  """
  model = MMElectra(model_config_from(config))
  ocfg = objectives.objective_config_from(config, special_token_ids, mask_salience)
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
  variables = model.init(rng, *batch_lib.model_inputs(b), t_pos, r_pos, True)
  params = variables["params"]
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt": tx.init(params)}


def parameter_seed(config) -> int:
  """The seed of the initial parameters: `init_seed` where set (>= 0), else `seed`.

  Apart so that a study can cross the two: the same data order and masks from other initial
  weights, or the reverse.
  """
  return config.seed if config.init_seed < 0 else config.init_seed


def init_state(setup: Setup, seed: int) -> dict:
  """Initialises parameters directly into their shards (no full copy on one device)."""
  init_fn = functools.partial(_init_state, model=setup.model, tx=setup.tx, config=setup.config)
  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
    return jax.jit(lambda r: nn.unbox(init_fn(r)), out_shardings=setup.state_shardings)(
        jax.random.key(seed))
