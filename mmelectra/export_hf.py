"""`mmelectra export`: a run's checkpoint -> a Hugging Face LXMERT directory
(`LxmertForPreTraining` weights, `LxmertTokenizerFast`, a model card), and with `--verify`
the parity check (`hf_parity.py`). The parameter map is `hf_params.py`; the way back is
`import_hf.py`."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mmelectra import errors
from mmelectra import hf_params
from mmelectra import hf_parity
from mmelectra import model as model_lib

HEADS_FILE = "mmelectra_heads.safetensors"
EXPORT_INFO_FILE = "mmelectra_export.json"


def _hf_state_dict(params, cfg: model_lib.ModelConfig, seed: int) -> tuple[dict, list[str]]:
  """Every tensor of `LxmertForPreTraining` (tied decoder included) and the untrained keys."""
  sd = hf_params.params_to_hf(params, hf_params.pretraining_param_map(cfg))
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
  sd[hf_params.TIED_DECODER] = sd[hf_params.WORD_TABLE]
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
  hf_config = hf_params.hf_config_from(cfg, pad_token_id=special["pad"])
  params = model_lib.unscan_params(params)
  sd, untrained = _hf_state_dict(params, cfg, seed)
  os.makedirs(out_dir, exist_ok=True)
  with torch.device("meta"):
    # Built on the meta device (no weight init) and filled by assign: exact copies.
    hf_model = transformers.LxmertForPreTraining(hf_config)
  hf_model.load_state_dict({k: torch.tensor(v) for k, v in sd.items()}, strict=True, assign=True)
  hf_model.tie_weights()
  with hf_params.quiet_transformers():
    hf_model.save_pretrained(out_dir)
  save_hf_tokenizer(tokenizer, out_dir, config.data.max_text_len)
  written = {"step": int(step), "objective": config.objective, "untrained_keys": untrained,
             "regions": config.data.regions, "max_text_len": config.data.max_text_len}
  if export_heads:
    names = ("rtd_head", "r2d_head") if cfg.generator is not None else ("moc_head",)
    heads = {}
    for name in names:
      heads.update(hf_params.flat_head_params(params[name], name))
    safetensors.numpy.save_file(heads, os.path.join(out_dir, HEADS_FILE))
    written["heads_file"] = HEADS_FILE
  with open(os.path.join(out_dir, "README.md"), "w") as f:
    f.write(_model_card(config, cfg, step, untrained))
  with open(os.path.join(out_dir, EXPORT_INFO_FILE), "w") as f:
    json.dump(written, f, indent=2)
  return written



def validation_batch(data, num_examples: int) -> dict:
  """The first `num_examples` examples of the validation split (real padding and masks) of
  a `setup.DataContext`."""
  it = data.iterator("validation", batch_size=num_examples, seed=data.config.seed, shuffle=False,
                     num_epochs=1, drop_remainder=False)
  return next(iter(it))


def check_out_dir(out_dir: str, workdir: str) -> None:
  """Refuses an export target that is a mmelectra run directory (the run's own workdir,
  or any pretraining or fine-tuning run): the export's config.json would replace the
  run's. A previous export there is fine (it is overwritten)."""
  from mmelectra import workdir as workdir_lib

  same = os.path.realpath(out_dir) == os.path.realpath(workdir)
  if same or workdir_lib.kind(out_dir) in ("pretrain", "finetune") or \
      os.path.isdir(os.path.join(out_dir, "checkpoints")):
    raise errors.InvalidInput(f"--out={out_dir} is a mmelectra run directory; the export would "
                              f"overwrite its config.json: choose another --out, e.g. {workdir}/hf")


def export_workdir(workdir: str, out_dir: str, *, step: int | None = None, check: bool = False,
                   export_heads: bool = False, num_examples: int = 16) -> tuple[int, dict | None]:
  """`mmelectra export`: a run's checkpoint -> `out_dir`; with `check`, the parity check.

  Returns (step, diffs or None); raises RuntimeError if a difference exceeds hf_parity.PARITY_BOUND.
  """
  from mmelectra import evaluate

  check_out_dir(out_dir, workdir)
  setup, data, step, restored = evaluate.restore_workdir(workdir, step)
  config = setup.config
  params = jax.device_get(restored["params"])
  export(params, config, data.tokenizer, out_dir, step=step, export_heads=export_heads, seed=config.seed)
  logging.info("exported %s step %d to %s", workdir, step, out_dir)
  if not check:
    return step, None
  special = data.special_ids
  # The bound is for float32: check the same weights with float32 compute whatever the
  # run's compute dtype (a bfloat16 run's own outputs differ by bfloat16 rounding).
  cfg = setup.model.cfg
  model_fp32 = model_lib.MMElectra(dataclasses.replace(
      cfg, encoder=dataclasses.replace(cfg.encoder, dtype=jnp.float32)))
  batches = {
      "random": hf_parity.random_inputs(setup.model.cfg, special, num_examples, config.data.max_text_len,
                              config.model.num_regions, seed=config.seed),
      "validation": validation_batch(data, num_examples),
  }
  diffs = hf_parity.verify(out_dir, model_fp32, params, batches)
  failures = hf_parity.parity_failures(diffs)
  if failures:
    raise RuntimeError(f"parity check failed (bound {hf_parity.PARITY_BOUND:g}): {', '.join(failures)}\n"
                       + hf_parity.format_diffs(diffs))
  with open(os.path.join(out_dir, "README.md"), "a") as f:
    f.write(f"\n## Parity\n`mmelectra export --verify`: max abs difference, JAX vs this PyTorch "
            f"model, float32, {num_examples} random and {num_examples} validation examples with "
            f"padded text and regions (bound {hf_parity.PARITY_BOUND:g}):\n\n```\n{hf_parity.format_diffs(diffs)}\n```\n")
  return step, diffs
