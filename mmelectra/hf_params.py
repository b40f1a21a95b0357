"""The map between mmelectra's parameters and Hugging Face `transformers` LXMERT's, and
between their configs. Pure numpy: export (`export_hf.py`), the parity check
(`hf_parity.py`) and import (`import_hf.py`) build on it.

The deployed model (docs/method.md §11: embeddings, encoder, pooler, ITM head) maps one to
one onto `transformers.LxmertForPreTraining`:

    mmelectra (Linen)                         transformers (PyTorch)
    embeddings/*                              lxmert.embeddings.*
    visual_embeddings/*                       lxmert.encoder.visn_fc.*
    encoder/l_layer_i, r_layer_i, x_layer_i   lxmert.encoder.layer.i, r_layers.i, x_layers.i
    pooler/dense                              lxmert.pooler.dense
    itm_head                                  cls.seq_relationship (index 1 = "matches")
    mlm_head (objective "mlm" only)           cls.predictions (decoder tied to the word table)

Layout changes, all exact (reshapes and transposes, no arithmetic): a Linen kernel is
`[in, out]`, a torch Linear weight `[out, in]`; attention kernels are multi-dimensional
(`query [E, H, D]`, fused `key_value [E, 2, H, D]`, `output [H, D, E]`), torch's are flat
with head-major `H * D`; LayerNorm `scale` is torch's `weight`.

The map is written for the unrolled layer layout; a run with `model.scan_layers` (stacked
`encoder/l_layers/...`) is converted with `model.unscan_params` on export and
`model.scan_params` on import. `transformers` and `torch` (the `export` extra) are
imported inside the functions that need them, so the rest of mmelectra never pays for them.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import jax
import numpy as np

from mmelectra import errors
from mmelectra import model as model_lib

# LxmertModel hard-codes LayerNorm eps (it is not in LxmertConfig).
HF_LAYER_NORM_EPS = 1e-12
# LXMERT's box input: (x1, y1, x2, y2), the width of `box_fc`'s input.
VISUAL_POS_DIM = 4
# Prefix of the backbone inside LxmertForPreTraining (its `base_model_prefix`).
BACKBONE = "lxmert."
TIED_DECODER = "cls.predictions.decoder.weight"
WORD_TABLE = BACKBONE + "embeddings.word_embeddings.weight"


# --- the parameter map (pure numpy) ----------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ParamEntry:
  """One Linen leaf <-> one or more torch tensors (a fused key/value kernel gives two).

  `to_hf(leaf) -> tuple of arrays` (in `hf_keys` order) and `from_hf(*arrays) -> leaf` are
  exact inverses.
  """

  path: tuple[str, ...]
  hf_keys: tuple[str, ...]
  to_hf: Callable[[np.ndarray], tuple[np.ndarray, ...]]
  from_hf: Callable[..., np.ndarray]


def _same(path, key):
  return ParamEntry(path, (key,), lambda x: (x,), lambda x: x)


def _linear(path, key):
  """nn.Dense {kernel [in, out], bias [out]} <-> torch Linear {weight [out, in], bias}."""
  return [ParamEntry(path + ("kernel",), (key + ".weight",), lambda k: (k.T,), lambda w: w.T),
          _same(path + ("bias",), key + ".bias")]


def _layer_norm(path, key):
  return [_same(path + ("scale",), key + ".weight"), _same(path + ("bias",), key + ".bias")]


def _attention(path, key_self, key_output, num_heads, head_dim):
  """AttentionBlock <-> LxmertAttention (query/key/value) + LxmertAttentionOutput."""
  width = num_heads * head_dim

  def q_to(k):  # [E, H, D] -> [H*D, E]
    return (k.reshape(k.shape[0], width).T,)

  def q_from(w):
    return w.T.reshape(w.shape[1], num_heads, head_dim)

  def kv_to(k):  # [E, 2, H, D] -> key [H*D, E], value [H*D, E]
    return k[:, 0].reshape(k.shape[0], width).T, k[:, 1].reshape(k.shape[0], width).T

  def kv_from(wk, wv):
    e = wk.shape[1]
    return np.stack([wk.T.reshape(e, num_heads, head_dim), wv.T.reshape(e, num_heads, head_dim)], 1)

  def kv_bias_to(b):  # [2, H, D] -> key [H*D], value [H*D]
    return b[0].reshape(width), b[1].reshape(width)

  def kv_bias_from(bk, bv):
    return np.stack([bk.reshape(num_heads, head_dim), bv.reshape(num_heads, head_dim)])

  def out_to(k):  # [H, D, E] -> [E, H*D]
    return (k.reshape(width, k.shape[-1]).T,)

  def out_from(w):
    return w.T.reshape(num_heads, head_dim, w.shape[0])

  return [
      ParamEntry(path + ("query", "kernel"), (key_self + ".query.weight",), q_to, q_from),
      ParamEntry(path + ("query", "bias"), (key_self + ".query.bias",),
                 lambda b: (b.reshape(width),), lambda b: b.reshape(num_heads, head_dim)),
      ParamEntry(path + ("key_value", "kernel"),
                 (key_self + ".key.weight", key_self + ".value.weight"), kv_to, kv_from),
      ParamEntry(path + ("key_value", "bias"),
                 (key_self + ".key.bias", key_self + ".value.bias"), kv_bias_to, kv_bias_from),
      ParamEntry(path + ("output", "kernel"), (key_output + ".dense.weight",), out_to, out_from),
      _same(path + ("output", "bias"), key_output + ".dense.bias"),
      *_layer_norm(path + ("output_layer_norm",), key_output + ".LayerNorm"),
  ]


def _ffn(path, key_inter, key_output):
  """FeedForward <-> LxmertIntermediate + LxmertOutput."""
  return [*_linear(path + ("intermediate",), key_inter + ".dense"),
          *_linear(path + ("output",), key_output + ".dense"),
          *_layer_norm(path + ("output_layer_norm",), key_output + ".LayerNorm")]


def backbone_param_map(enc: model_lib.EncoderConfig) -> list[ParamEntry]:
  """Embeddings, visual embeddings, encoder and pooler <-> `LxmertModel` keys (no prefix)."""
  h, d = enc.num_heads, enc.head_dim
  entries = [
      _same(("embeddings", "word_embeddings", "embedding"), "embeddings.word_embeddings.weight"),
      _same(("embeddings", "position_embeddings", "embedding"), "embeddings.position_embeddings.weight"),
      _same(("embeddings", "token_type_embeddings", "embedding"),
            "embeddings.token_type_embeddings.weight"),
      *_layer_norm(("embeddings", "layer_norm"), "embeddings.LayerNorm"),
  ]
  v = "encoder.visn_fc."
  for name in ("visn_fc", "box_fc"):
    entries += _linear(("visual_embeddings", name), v + name)
  for name in ("visn_layer_norm", "box_layer_norm"):
    entries += _layer_norm(("visual_embeddings", name), v + name)
  for stack, hf_stack, count in (("l_layer", "layer", enc.l_layers), ("r_layer", "r_layers", enc.r_layers)):
    for i in range(count):
      p, k = ("encoder", f"{stack}_{i}"), f"encoder.{hf_stack}.{i}"
      entries += _attention(p + ("attention",), k + ".attention.self", k + ".attention.output", h, d)
      entries += _ffn(p + ("ffn",), k + ".intermediate", k + ".output")
  for i in range(enc.x_layers):
    p, k = ("encoder", f"x_layer_{i}"), f"encoder.x_layers.{i}"
    entries += _attention(p + ("cross_attention",), k + ".visual_attention.att",
                          k + ".visual_attention.output", h, d)
    for side in ("lang", "visn"):
      entries += _attention(p + (f"{side}_self_attention",), f"{k}.{side}_self_att.self",
                            f"{k}.{side}_self_att.output", h, d)
      entries += _ffn(p + (f"{side}_ffn",), f"{k}.{side}_inter", f"{k}.{side}_output")
  entries += _linear(("pooler", "dense"), "pooler.dense")
  return entries


def itm_param_map() -> list[ParamEntry]:
  return _linear(("itm_head",), "cls.seq_relationship")


def mlm_param_map() -> list[ParamEntry]:
  """Objective "mlm"'s TiedMLMHead <-> `cls.predictions` (its decoder is the word table)."""
  return [*_linear(("mlm_head", "transform"), "cls.predictions.transform.dense"),
          *_layer_norm(("mlm_head", "transform_layer_norm"), "cls.predictions.transform.LayerNorm"),
          _same(("mlm_head", "bias"), "cls.predictions.bias")]


def pretraining_param_map(cfg: model_lib.ModelConfig) -> list[ParamEntry]:
  """Everything that maps onto `LxmertForPreTraining` (keys with its `lxmert.` prefix)."""
  entries = [dataclasses.replace(e, hf_keys=tuple(BACKBONE + k for k in e.hf_keys))
             for e in backbone_param_map(cfg.encoder)]
  entries += itm_param_map()
  if cfg.generator is None:
    entries += mlm_param_map()
  return entries


def get_path(tree, path):
  for name in path:
    tree = tree[name]
  return tree


def set_path(tree, path, value):
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def params_to_hf(params, entries: list[ParamEntry]) -> dict[str, np.ndarray]:
  """Linen params (any mapping of arrays) -> {hf key: float32 numpy array}."""
  out = {}
  for e in entries:
    leaf = np.asarray(jax.device_get(get_path(params, e.path)), np.float32)
    for key, value in zip(e.hf_keys, e.to_hf(leaf), strict=True):
      out[key] = np.ascontiguousarray(value)
  return out


def params_from_hf(state_dict, entries: list[ParamEntry]) -> dict:
  """{hf key: array} -> nested Linen params of the entries; KeyError names a missing key."""
  params = {}
  for e in entries:
    missing = [k for k in e.hf_keys if k not in state_dict]
    if missing:
      raise errors.InvalidInput(f"Hugging Face weights lack {missing} (for mmelectra {'/'.join(e.path)})")
    set_path(params, e.path, np.asarray(e.from_hf(*(np.asarray(state_dict[k], np.float32) for k in e.hf_keys))))
  return params


def flat_head_params(tree, prefix: str) -> dict[str, np.ndarray]:
  """A head's Linen params -> torch-style names and layouts (dense `weight` is [out, in])."""
  out = {}
  for name, sub in tree.items():
    key = f"{prefix}.{name}"
    if isinstance(sub, dict) or hasattr(sub, "items"):
      if set(sub) == {"kernel", "bias"}:
        out[key + ".weight"] = np.asarray(jax.device_get(sub["kernel"]), np.float32).T.copy()
        out[key + ".bias"] = np.asarray(jax.device_get(sub["bias"]), np.float32)
      elif set(sub) == {"scale", "bias"}:
        out[key + ".weight"] = np.asarray(jax.device_get(sub["scale"]), np.float32)
        out[key + ".bias"] = np.asarray(jax.device_get(sub["bias"]), np.float32)
      else:
        out.update(flat_head_params(sub, key))
    else:
      out[key] = np.asarray(jax.device_get(sub), np.float32)
  return out


@contextlib.contextmanager
def quiet_transformers():
  """transformers prints a load report table and progress bars; keep the console to ours.

  (Loading checks keys itself: see `load_hf_models`.)
  """
  from transformers.utils import logging as hf_logging

  verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
  hf_logging.set_verbosity_error()
  hf_logging.disable_progress_bar()
  try:
    yield
  finally:
    hf_logging.set_verbosity(verbosity)
    if bars:
      hf_logging.enable_progress_bar()


# --- configs -------------------------------------------------------------------------
def hf_config_from(cfg: model_lib.ModelConfig, pad_token_id: int = 0):
  """The `LxmertConfig` of mmelectra's deployed model."""
  import transformers

  enc = cfg.encoder
  if enc.layer_norm_eps != HF_LAYER_NORM_EPS:
    raise errors.InvalidInput(f"model.layer_norm_eps={enc.layer_norm_eps}, but transformers' LXMERT fixes "
                              f"LayerNorm eps at {HF_LAYER_NORM_EPS}; the export could not match")
  return transformers.LxmertConfig(
      vocab_size=cfg.vocab_size, hidden_size=enc.hidden_size, num_attention_heads=enc.num_heads,
      intermediate_size=enc.mlp_dim, hidden_act="gelu",  # erf GELU, as model.gelu
      hidden_dropout_prob=enc.dropout_rate, attention_probs_dropout_prob=enc.attention_dropout_rate,
      max_position_embeddings=cfg.max_position, type_vocab_size=cfg.type_vocab_size,
      l_layers=enc.l_layers, r_layers=enc.r_layers, x_layers=enc.x_layers,
      visual_feat_dim=cfg.visual_feat_dim, visual_pos_dim=VISUAL_POS_DIM,
      # Heads mmelectra does not train are not built, so nothing loads as random weights
      # except cls.predictions.transform for objective "electra" (see the model card).
      task_mask_lm=cfg.generator is None, task_obj_predict=False, task_qa=False,
      task_matched=True, pad_token_id=pad_token_id, architectures=["LxmertForPreTraining"])


def model_fields_from_hf(hf_config) -> dict:
  """`config.model` fields that fix mmelectra's parameter shapes, from an `LxmertConfig`."""
  if hf_config.visual_pos_dim != VISUAL_POS_DIM:
    raise errors.InvalidInput(f"visual_pos_dim={hf_config.visual_pos_dim}; mmelectra boxes have {VISUAL_POS_DIM}")
  if hf_config.hidden_act not in ("gelu", "gelu_python"):
    raise errors.InvalidInput(f"hidden_act={hf_config.hidden_act!r}; mmelectra uses the exact (erf) GELU")
  return dict(
      hidden_size=hf_config.hidden_size, num_heads=hf_config.num_attention_heads,
      mlp_dim=hf_config.intermediate_size, l_layers=hf_config.l_layers,
      r_layers=hf_config.r_layers, x_layers=hf_config.x_layers, layer_norm_eps=HF_LAYER_NORM_EPS,
      dropout_rate=float(hf_config.hidden_dropout_prob),
      attention_dropout_rate=float(hf_config.attention_probs_dropout_prob),
      vocab_size=hf_config.vocab_size, max_position=hf_config.max_position_embeddings,
      type_vocab_size=hf_config.type_vocab_size, visual_feat_dim=hf_config.visual_feat_dim)
