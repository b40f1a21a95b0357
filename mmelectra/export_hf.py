"""JAX <-> Hugging Face `transformers` LXMERT: parameter map, export, parity check, import.

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
`model.scan_params` on import.

`transformers` and `torch` (the `export` extra) are imported inside the functions that
need them, so the rest of mmelectra never pays for them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from mmelectra import errors
from mmelectra import model as model_lib

# --verify fails above this max abs difference (fp32 on both sides).
PARITY_BOUND = 1e-4
HEADS_FILE = "mmelectra_heads.safetensors"
EXPORT_INFO_FILE = "mmelectra_export.json"
IMPORT_INFO_FILE = "import_hf.json"
# LxmertModel hard-codes LayerNorm eps (it is not in LxmertConfig).
HF_LAYER_NORM_EPS = 1e-12
# LXMERT's box input: (x1, y1, x2, y2), the width of `box_fc`'s input.
VISUAL_POS_DIM = 4
# Prefix of the backbone inside LxmertForPreTraining (its `base_model_prefix`).
BACKBONE = "lxmert."
_TIED_DECODER = "cls.predictions.decoder.weight"
_WORD_TABLE = BACKBONE + "embeddings.word_embeddings.weight"


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


def _get(tree, path):
  for name in path:
    tree = tree[name]
  return tree


def _set(tree, path, value):
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def params_to_hf(params, entries: list[ParamEntry]) -> dict[str, np.ndarray]:
  """Linen params (any mapping of arrays) -> {hf key: float32 numpy array}."""
  out = {}
  for e in entries:
    leaf = np.asarray(jax.device_get(_get(params, e.path)), np.float32)
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
    _set(params, e.path, np.asarray(e.from_hf(*(np.asarray(state_dict[k], np.float32) for k in e.hf_keys))))
  return params


def _flat_head_params(tree, prefix: str) -> dict[str, np.ndarray]:
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
        out.update(_flat_head_params(sub, key))
    else:
      out[key] = np.asarray(jax.device_get(sub), np.float32)
  return out


@contextlib.contextmanager
def _quiet_transformers():
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


# --- export --------------------------------------------------------------------------
def _hf_state_dict(params, cfg: model_lib.ModelConfig, seed: int) -> tuple[dict, list[str]]:
  """Every tensor of `LxmertForPreTraining` (tied decoder included) and the untrained keys."""
  sd = params_to_hf(params, pretraining_param_map(cfg))
  untrained = []
  if cfg.generator is not None:
    # ELECTRA's discriminator has no MLM head, but LxmertForPreTraining always builds
    # cls.predictions. Fill it as transformers would initialise it (N(0, 0.02), LayerNorm
    # 1/0, zero bias), from a fixed seed so an export is reproducible, and say so.
    e = cfg.encoder.hidden_size
    rng = np.random.default_rng(seed)
    sd["cls.predictions.transform.dense.weight"] = rng.normal(0, 0.02, (e, e)).astype(np.float32)
    sd["cls.predictions.transform.dense.bias"] = np.zeros(e, np.float32)
    sd["cls.predictions.transform.LayerNorm.weight"] = np.ones(e, np.float32)
    sd["cls.predictions.transform.LayerNorm.bias"] = np.zeros(e, np.float32)
    sd["cls.predictions.bias"] = np.zeros(cfg.vocab_size, np.float32)
    untrained = sorted(k for k in sd if k.startswith("cls.predictions."))
  sd[_TIED_DECODER] = sd[_WORD_TABLE]
  return sd, untrained


def save_hf_tokenizer(tokenizer, out_dir: str, max_length: int) -> None:
  """Writes the mmelectra WordPiece tokenizer as an `LxmertTokenizerFast` (+ vocab.txt)."""
  import transformers

  from mmelectra.data import tokenizer as tokenizer_lib

  state = json.loads(tokenizer.to_str())
  normalizer = state.get("normalizer") or {}
  if normalizer.get("type") != "BertNormalizer":
    raise errors.InvalidInput(f"expected a BERT WordPiece tokenizer, got normalizer {normalizer.get('type')!r}")
  tokens = tokenizer_lib.vocab_in_id_order(tokenizer)
  hf_tok = transformers.LxmertTokenizerFast(
      vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=normalizer["lowercase"],
      tokenize_chinese_chars=normalizer["handle_chinese_chars"],
      strip_accents=normalizer["strip_accents"], model_max_length=max_length)
  hf_tok.save_pretrained(out_dir)
  # A plain BERT vocabulary too, for tools that read vocab.txt.
  with open(os.path.join(out_dir, tokenizer_lib.VOCAB_TXT), "w", encoding="utf-8") as f:
    f.write("\n".join(tokens) + "\n")


def _model_card(config, cfg: model_lib.ModelConfig, step: int, untrained: list[str]) -> str:
  from mmelectra.data import regions as regions_lib

  d = config.data
  if d.regions == "patches":
    regions_text = (
        f"image patches: the {d.image_size} px image cut into a row-major grid of "
        f"{d.patch_size} x {d.patch_size} patches ({regions_lib.num_regions(d)} regions); each "
        f"feature is the patch's pixels flattened in (row, column, RGB) order, "
        f"{cfg.visual_feat_dim} values, each `(pixel / 255 - {regions_lib.PIXEL_MEAN}) / "
        f"{regions_lib.PIXEL_STD}`; the box is the patch's grid cell.")
  elif d.regions == "features":
    regions_text = (
        f"precomputed detector features ({d.name}): up to {regions_lib.num_regions(d)} regions of "
        f"{cfg.visual_feat_dim} values each, as stored in the data set (no normalisation added).")
  else:
    regions_text = (
        f"object crops: one region per object (at most {regions_lib.num_regions(d)}), its box's "
        f"pixels resized (nearest neighbour) to {d.crop_size} x {d.crop_size} and flattened in "
        f"(row, column, RGB) order, {cfg.visual_feat_dim} values, each `(pixel / 255 - "
        f"{regions_lib.PIXEL_MEAN}) / {regions_lib.PIXEL_STD}`.")
  lm = ("`cls.predictions` is the trained MLM head." if not untrained else
        "`cls.predictions` is NOT trained (ELECTRA's discriminator has no MLM head); it holds "
        "transformers-style initial weights only so the class loads without missing keys.")
  enc = cfg.encoder
  return f"""---
library_name: transformers
tags: [lxmert, mmelectra, image-text]
---
# mmelectra LXMERT encoder (step {step})

An LXMERT-architecture image-text encoder pretrained with mmelectra (`objective={config.objective}`),
exported to `transformers.LxmertModel` / `LxmertForPreTraining`. Sizes: hidden {enc.hidden_size},
{enc.num_heads} heads, intermediate {enc.mlp_dim}, L/R/X layers {enc.l_layers}/{enc.r_layers}/{enc.x_layers},
vocabulary {cfg.vocab_size}, visual features {cfg.visual_feat_dim}.

## Inputs
* Text: `LxmertTokenizerFast.from_pretrained(this_dir)(captions, padding="max_length",
  max_length={d.max_text_len}, truncation=True)` gives exactly mmelectra's `[CLS] ... [SEP]` ids
  and `attention_mask`. `token_type_ids` are all 0.
* `visual_feats` `[batch, regions, {cfg.visual_feat_dim}]`: {regions_text}
* `visual_pos` `[batch, regions, 4]`: box corners `(x1, y1, x2, y2)` divided by image width and
  height, in [0, 1] (LXMERT's own convention, not the `(x, y, w, h)` of the transformers docstring).
* `visual_attention_mask`: 1 for real regions, 0 for padding (padded regions have all-zero
  features and boxes).

## Outputs
`language_output`, `vision_output`, `pooled_output` as mmelectra's encoder. Image-text matching:
`LxmertForPreTraining(...).cross_relationship_score` (index 1 = the text matches the image).
{lm}
"""


def export(params, config, tokenizer, out_dir: str, *, step: int = 0, export_heads: bool = False,
           seed: int = 0) -> dict:
  """Writes a Hugging Face LXMERT directory; returns what was written (`mmelectra_export.json`).

  `params`: the full Linen params of `MMElectra`, either layer layout (pretraining-only
  parts are dropped); `config`: the finalized run config; `tokenizer`: the run's
  `tokenizers.Tokenizer`.
  `export_heads` also writes the discriminator's (or MLM baseline's) pretraining heads, in
  torch layout, to `mmelectra_heads.safetensors` (for analysis; transformers ignores it).
  """
  import safetensors.numpy
  import torch
  import transformers

  from mmelectra.data import tokenizer as tokenizer_lib

  cfg = model_lib.model_config_from(config)
  special = tokenizer_lib.special_token_ids(tokenizer)
  hf_config = hf_config_from(cfg, pad_token_id=special["pad"])
  params = model_lib.unscan_params(params)
  sd, untrained = _hf_state_dict(params, cfg, seed)
  os.makedirs(out_dir, exist_ok=True)
  with torch.device("meta"):
    # Built on the meta device (no weight init) and filled by assign: exact copies.
    hf_model = transformers.LxmertForPreTraining(hf_config)
  hf_model.load_state_dict({k: torch.tensor(v) for k, v in sd.items()}, strict=True, assign=True)
  hf_model.tie_weights()
  with _quiet_transformers():
    hf_model.save_pretrained(out_dir)
  save_hf_tokenizer(tokenizer, out_dir, config.data.max_text_len)
  written = {"step": int(step), "objective": config.objective, "untrained_keys": untrained,
             "regions": config.data.regions, "max_text_len": config.data.max_text_len}
  if export_heads:
    names = ("rtd_head", "r2d_head") if cfg.generator is not None else ("moc_head",)
    heads = {}
    for name in names:
      heads.update(_flat_head_params(params[name], name))
    safetensors.numpy.save_file(heads, os.path.join(out_dir, HEADS_FILE))
    written["heads_file"] = HEADS_FILE
  with open(os.path.join(out_dir, "README.md"), "w") as f:
    f.write(_model_card(config, cfg, step, untrained))
  with open(os.path.join(out_dir, EXPORT_INFO_FILE), "w") as f:
    json.dump(written, f, indent=2)
  return written


# --- parity --------------------------------------------------------------------------
def random_inputs(cfg: model_lib.ModelConfig, special_ids: dict, batch_size: int, text_len: int,
                  num_regions: int, seed: int = 0) -> dict:
  """Random inputs with real structure: `[CLS] words [SEP]` then padding, padded regions."""
  rng = np.random.default_rng(seed)
  ids = np.full((batch_size, text_len), special_ids["pad"], np.int32)
  text_mask = np.zeros((batch_size, text_len), bool)
  region_mask = np.zeros((batch_size, num_regions), bool)
  first_word = max(special_ids.values()) + 1
  for i in range(batch_size):
    n = text_len if i == 0 else int(rng.integers(3, text_len + 1))
    ids[i, 0], ids[i, n - 1] = special_ids["cls"], special_ids["sep"]
    ids[i, 1:n - 1] = rng.integers(first_word, cfg.vocab_size, n - 2)
    text_mask[i, :n] = True
    region_mask[i, :num_regions if i == 0 else int(rng.integers(1, num_regions + 1))] = True
  xy = rng.random((batch_size, num_regions, 2)) * 0.8
  wh = rng.random((batch_size, num_regions, 2)) * 0.2 + 0.01
  boxes = np.concatenate([xy, xy + wh], -1) * region_mask[..., None]
  feats = rng.normal(size=(batch_size, num_regions, cfg.visual_feat_dim)) * region_mask[..., None]
  return {"text_ids": ids, "text_mask": text_mask, "region_feats": feats.astype(np.float32),
          "region_boxes": boxes.astype(np.float32), "region_mask": region_mask}


def jax_outputs(model: model_lib.MMElectra, params, batch: dict) -> dict[str, np.ndarray]:
  """The deployed model in JAX: language, vision, pooled output and ITM logits."""

  def run(module, *args):
    lang, vis, pooled = module.encode(*args, deterministic=True)
    return {"language_output": lang, "vision_output": vis, "pooled_output": pooled,
            "itm_logits": module.itm_logits(pooled)}

  args = [jnp.asarray(batch[k]) for k in ("text_ids", "text_mask", "region_feats", "region_boxes",
                                          "region_mask")]
  with jax.default_matmul_precision("highest"):
    out = jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=run))(
        model_lib.deployed_params(params), *args)
  return {k: np.asarray(jax.device_get(v), np.float32) for k, v in out.items()}


def load_hf_models(hf_dir: str):
  """(LxmertModel, LxmertForPreTraining) from `hf_dir`, eval mode; raises on any missing key
  or any unexpected key outside the pretraining heads."""
  import transformers

  models = []
  for cls in (transformers.LxmertModel, transformers.LxmertForPreTraining):
    with _quiet_transformers():
      m, info = cls.from_pretrained(hf_dir, output_loading_info=True)
    unexpected = [k for k in info["unexpected_keys"] if not k.startswith("cls.")]
    if info["missing_keys"] or unexpected or info["mismatched_keys"]:
      raise errors.InvalidInput(f"{cls.__name__} from {hf_dir}: missing {sorted(info['missing_keys'])}, "
                                f"unexpected {sorted(unexpected)}, mismatched {info['mismatched_keys']}")
    models.append(m.eval())
  return tuple(models)


def hf_outputs(hf_model, hf_pretraining, batch: dict) -> dict[str, np.ndarray]:
  """The exported model in PyTorch on the same inputs (masks as 0/1 floats)."""
  import torch

  kwargs = dict(
      input_ids=torch.from_numpy(np.asarray(batch["text_ids"], np.int64)),
      attention_mask=torch.from_numpy(np.asarray(batch["text_mask"], np.float32)),
      visual_feats=torch.from_numpy(np.asarray(batch["region_feats"], np.float32)),
      visual_pos=torch.from_numpy(np.asarray(batch["region_boxes"], np.float32)),
      visual_attention_mask=torch.from_numpy(np.asarray(batch["region_mask"], np.float32)),
      token_type_ids=torch.zeros(np.shape(batch["text_ids"]), dtype=torch.int64))
  with torch.no_grad():
    out = hf_model(**kwargs)
    itm = hf_pretraining(**kwargs).cross_relationship_score
  return {"language_output": out.language_output.numpy(), "vision_output": out.vision_output.numpy(),
          "pooled_output": out.pooled_output.numpy(), "itm_logits": itm.numpy()}


def max_abs_diffs(a: dict, b: dict, batch: dict) -> dict[str, float]:
  """Max abs difference per output over real examples (an example with no text is padding).

  Every position of a real example counts, padded ones included: both models compute them
  the same way (masks only hide keys).
  """
  real = np.asarray(batch["text_mask"]).any(-1)
  return {k: float(np.max(np.abs(a[k][real] - b[k][real]), initial=0.0)) for k in a}


def verify(hf_dir: str, model: model_lib.MMElectra, params, batches: dict[str, dict]) -> dict:
  """{input set: {output: max abs diff}} of the exported model against the JAX model."""
  hf_model, hf_pretraining = load_hf_models(hf_dir)
  return {name: max_abs_diffs(jax_outputs(model, params, b), hf_outputs(hf_model, hf_pretraining, b), b)
          for name, b in batches.items()}


def parity_failures(diffs: dict, bound: float = PARITY_BOUND) -> list[str]:
  return [f"{name}/{out}={v:.3g}" for name, d in diffs.items() for out, v in d.items()
          if not v <= bound]  # `not <=` also catches NaN


OUTPUTS = ("language_output", "vision_output", "pooled_output", "itm_logits")


def format_diffs(diffs: dict) -> str:
  outs = [o for o in OUTPUTS if o in next(iter(diffs.values()))]
  width = max(len(n) for n in diffs)
  lines = [f"{'inputs':<{width}}  " + "  ".join(f"{o:>15}" for o in outs)]
  lines += [f"{n:<{width}}  " + "  ".join(f"{d[o]:>15.3e}" for o in outs) for n, d in diffs.items()]
  return "\n".join(lines)


def validation_batch(config, num_examples: int) -> dict:
  """The first `num_examples` examples of the validation split (real padding and masks)."""
  from mmelectra.data import pipeline

  it = pipeline.make_iterator(config.data, "validation", batch_size=num_examples, seed=config.seed,
                              shuffle=False, num_epochs=1, drop_remainder=False)
  return next(iter(it))


def check_out_dir(out_dir: str, workdir: str) -> None:
  """Refuses an export target that is a mmelectra run directory (the run's own workdir,
  or any pretraining or fine-tuning run): the export's config.json would replace the
  run's. A previous export there is fine (it is overwritten)."""
  from mmelectra import config_lib

  same = os.path.realpath(out_dir) == os.path.realpath(workdir)
  if same or config_lib.workdir_kind(out_dir) in ("pretrain", "finetune") or \
      os.path.isdir(os.path.join(out_dir, "checkpoints")):
    raise errors.InvalidInput(f"--out={out_dir} is a mmelectra run directory; the export would "
                              f"overwrite its config.json: choose another --out, e.g. {workdir}/hf")


def export_workdir(workdir: str, out_dir: str, *, step: int | None = None, check: bool = False,
                   export_heads: bool = False, num_examples: int = 16) -> tuple[int, dict | None]:
  """`mmelectra export`: a run's checkpoint -> `out_dir`; with `check`, the parity check.

  Returns (step, diffs or None); raises RuntimeError if a difference exceeds PARITY_BOUND.
  """
  from mmelectra import evaluate
  from mmelectra.data import pipeline
  from mmelectra.data import tokenizer as tokenizer_lib

  check_out_dir(out_dir, workdir)
  setup, step, state = evaluate.restore_workdir(workdir, step)
  config = setup.config
  tokenizer = pipeline.load_tokenizer(config.data)
  params = jax.device_get(state["params"])
  export(params, config, tokenizer, out_dir, step=step, export_heads=export_heads, seed=config.seed)
  logging.info("exported %s step %d to %s", workdir, step, out_dir)
  if not check:
    return step, None
  special = tokenizer_lib.special_token_ids(tokenizer)
  # The bound is for float32: check the same weights with float32 compute whatever the
  # run's compute dtype (a bfloat16 run's own outputs differ by bfloat16 rounding).
  cfg = setup.model.cfg
  model_fp32 = model_lib.MMElectra(dataclasses.replace(
      cfg, encoder=dataclasses.replace(cfg.encoder, dtype=jnp.float32)))
  batches = {
      "random": random_inputs(setup.model.cfg, special, num_examples, config.data.max_text_len,
                              config.model.num_regions, seed=config.seed),
      "validation": validation_batch(config, num_examples),
  }
  diffs = verify(out_dir, model_fp32, params, batches)
  failures = parity_failures(diffs)
  if failures:
    raise RuntimeError(f"parity check failed (bound {PARITY_BOUND:g}): {', '.join(failures)}\n"
                       + format_diffs(diffs))
  with open(os.path.join(out_dir, "README.md"), "a") as f:
    f.write(f"\n## Parity\n`mmelectra export --verify`: max abs difference, JAX vs this PyTorch "
            f"model, float32, {num_examples} random and {num_examples} validation examples with "
            f"padded text and regions (bound {PARITY_BOUND:g}):\n\n```\n{format_diffs(diffs)}\n```\n")
  return step, diffs


# --- import --------------------------------------------------------------------------
def import_config(hf_config, base_config) -> ml_collections.ConfigDict:
  """`base_config` (a run config) with the model sizes of `hf_config`; locked.

  The data fields are kept as they are; `visual_feat_dim` comes from the weights, so a run
  whose data gives another feature width fails `config_lib.finalize` with a clear message.
  """
  from mmelectra.data import datasets
  from mmelectra.data import regions as regions_lib

  config = ml_collections.ConfigDict(base_config.to_dict())
  config.model.update(model_fields_from_hf(hf_config))
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


def import_hf(hf_dir: str, workdir: str, base_config, seed: int = 0) -> dict:
  """`mmelectra import-hf`: a Hugging Face LXMERT directory -> an mmelectra workdir.

  Writes `config.json` (`base_config`, e.g. `configs/pretrain.py`'s, with the model sizes
  of the HF weights) and a step-0 checkpoint of a full train state: embeddings, encoder and
  pooler from HF; the ITM head from `cls.seq_relationship` and (objective "mlm") the MLM
  head from `cls.predictions` where the HF weights have them; everything else (generator,
  RTD/R2D/MOC heads) freshly initialised from `seed`; optimizer state fresh. Returns (and
  writes to `import_hf.json`) what was loaded and what was initialised.
  """
  import transformers

  from mmelectra import checkpoint
  from mmelectra import config_lib
  from mmelectra import train

  if config_lib.workdir_kind(workdir) is not None or os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise errors.InvalidInput(f"--workdir={workdir} already holds a run; import-hf starts a new "
                              "one: choose an empty or new --workdir")

  with _quiet_transformers():
    hf_model, info = transformers.LxmertForPreTraining.from_pretrained(hf_dir, output_loading_info=True)
  absent = set(info["missing_keys"]) | set(info["mismatched_keys"])
  sd = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items() if k not in absent}
  config = import_config(hf_model.config, base_config)
  setup = train.build(config, _special_ids_of(hf_dir))
  cfg = setup.model.cfg
  entries = [dataclasses.replace(e, hf_keys=tuple(BACKBONE + k for k in e.hf_keys))
             for e in backbone_param_map(cfg.encoder)]
  for heads in [itm_param_map()] + ([mlm_param_map()] if cfg.generator is None else []):
    if all(k in sd for e in heads for k in e.hf_keys):
      entries += heads
  loaded = params_from_hf(sd, entries)
  state = train.init_state(setup, seed)
  params = model_lib.unscan_params(state["params"])
  for e in entries:
    old = _get(params, e.path)
    new = _get(loaded, e.path)
    if old.shape != new.shape:
      raise errors.InvalidInput(f"{'/'.join(e.path)}: HF gives shape {new.shape}, mmelectra expects {old.shape}")
    _set(params, e.path, jax.device_put(new.astype(old.dtype), old.sharding))
  state["params"] = (jax.device_put(model_lib.scan_params(params), setup.state_shardings["params"])
                     if cfg.encoder.scan_layers else params)
  loaded_paths = {"/".join(e.path) for e in entries}
  fresh = sorted("/".join(str(getattr(k, "key", k)) for k in path)
                 for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
                 if "/".join(str(getattr(k, "key", k)) for k in path) not in loaded_paths)
  os.makedirs(workdir, exist_ok=True)
  config_lib.save(config, workdir)
  manager = checkpoint.make_manager(workdir)
  checkpoint.save(manager, 0, state, force=True, config=config)
  manager.wait_until_finished()
  manager.close()
  tok_dir = os.path.join(workdir, "tokenizer")
  for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    if os.path.exists(os.path.join(hf_dir, name)):
      os.makedirs(tok_dir, exist_ok=True)
      shutil.copy(os.path.join(hf_dir, name), tok_dir)
  used = {k for e in entries for k in e.hf_keys}
  summary = {"hf_dir": os.path.abspath(hf_dir), "step": 0, "objective": config.objective,
             "loaded": sorted(loaded_paths), "initialised": fresh,
             "hf_keys_not_used": sorted(k for k in sd if k not in used and k != _TIED_DECODER)}
  with open(os.path.join(workdir, IMPORT_INFO_FILE), "w") as f:
    json.dump(summary, f, indent=2)
  return summary
