"""Image-text retrieval with the ITM head: all-pairs scoring and recall@K.

The match score of a (text, image) pair is the ITM head's log-odds `logit[match] -
logit[mismatch]`. `score_all_pairs` scores every text of a pool against every image in
large jitted blocks of pairs sharded over the data-parallel devices (never one pair at a
time); `recall_at_k` and `retrieval_metrics` are pure numpy functions of the score matrix.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmelectra import sharding
from mmelectra.data.batch import IMAGE_KEYS, TEXT_KEYS
from mmelectra.model import MMElectra

KS = (1, 5, 10)


# --- metrics (pure) ---------------------------------------------------------------------
def ranks_of_positives(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
  """Rank (0 = best) of each query's best positive among its negatives.

  scores: [Q, C] query x candidate scores; positive: bool [Q, C], at least one per row.
  A negative that ties the best positive counts as ranked above it, so a model that
  scores everything alike gets recall 0, not 1.
  """
  scores = np.asarray(scores, np.float64)
  positive = np.asarray(positive, bool)
  if scores.shape != positive.shape or scores.ndim != 2:
    raise ValueError(f"scores {scores.shape} and positive {positive.shape} must be equal 2-d shapes")
  if not positive.any(axis=1).all():
    raise ValueError("every query needs at least one positive candidate")
  best = np.where(positive, scores, -np.inf).max(axis=1, keepdims=True)
  return ((scores >= best) & ~positive).sum(axis=1)


def recall_at_k(scores: np.ndarray, positive: np.ndarray, ks: Sequence[int] = KS) -> dict[int, float]:
  """Share of queries whose best positive ranks within the top k, for each k."""
  ranks = ranks_of_positives(scores, positive)
  return {k: float(np.mean(ranks < k)) for k in ks}


def retrieval_metrics(scores: np.ndarray, text_to_image: np.ndarray, ks: Sequence[int] = KS) -> dict:
  """`t2i_r<k>` and `i2t_r<k>` from text x image scores [Nt, Ni].

  text_to_image: [Nt] the image index each text describes (several texts may share one
  image, as in COCO's five captions; every image needs at least one text).
  """
  scores = np.asarray(scores)
  text_to_image = np.asarray(text_to_image)
  positive = text_to_image[:, None] == np.arange(scores.shape[1])[None, :]
  out = {}
  for k, r in recall_at_k(scores, positive, ks).items():
    out[f"t2i_r{k}"] = r
  for k, r in recall_at_k(scores.T, positive.T, ks).items():
    out[f"i2t_r{k}"] = r
  out.update(pool_itm_accuracy(scores, positive))
  return out


def pool_itm_accuracy(scores: np.ndarray, positive: np.ndarray) -> dict:
  """The ITM head's matching accuracy on the pool's intact pairs, as a user deploys it.

  A pair is called matched where its log-odds are > 0 (the head's argmax; a tie is
  "mismatched", as in training). `pool_itm_pos_acc` is the share of matched pairs called
  matched, `pool_itm_neg_acc` of mismatched pairs called mismatched, and `pool_itm_acc`
  their mean: the accuracy on pairs half of which match (the training's
  `itm_negative_fraction` 0.5), read unmasked. Training's `itm_acc` is read on the
  objective's masked or corrupted pairs instead (docs/method.md §12).
  """
  called = np.asarray(scores) > 0
  pos = float(called[positive].mean())
  neg = float((~called[~positive]).mean()) if (~positive).any() else float("nan")
  return {"pool_itm_acc": (pos + neg) / 2, "pool_itm_pos_acc": pos, "pool_itm_neg_acc": neg}


# --- scoring ----------------------------------------------------------------------------
def make_block_scorer(model: MMElectra, mesh, rules):
  """jit(params, texts [Bt, ...], images [Bi, ...]) -> ITM log-odds [Bt, Bi].

  The Bt x Bi pairs are formed inside the jitted function and sharded over the
  data-parallel axes, so one call scores a whole block on every device.
  """
  pair_sharding = sharding.batch_sharding(mesh)

  def score_block(params, texts, images):
    bt, bi = texts["text_ids"].shape[0], images["region_feats"].shape[0]

    def per_text(x):  # text-major: pair p = t * bi + i
      return jax.lax.with_sharding_constraint(jnp.repeat(x, bi, axis=0), pair_sharding)

    def per_image(x):
      return jax.lax.with_sharding_constraint(jnp.tile(x, (bt,) + (1,) * (x.ndim - 1)), pair_sharding)

    variables = {"params": params}
    _, _, pooled = model.apply(
        variables, per_text(texts["text_ids"]), per_text(texts["text_mask"]),
        per_image(images["region_feats"]), per_image(images["region_boxes"]),
        per_image(images["region_mask"]), True, method=MMElectra.encode)
    logits = model.apply(variables, pooled, method=MMElectra.itm_logits)
    return (logits[:, 1] - logits[:, 0]).reshape(bt, bi)

  jitted = jax.jit(score_block)

  def call(params, texts, images):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jitted(params, texts, images)

  return call


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  pad = rows - x.shape[0]
  return np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x


def block_sizes(num_texts: int, num_images: int, pairs_per_call: int, dp: int) -> tuple[int, int]:
  """(texts, images) per block: about `pairs_per_call` pairs, a multiple of `dp`."""
  images = min(num_images, max(1, math.isqrt(pairs_per_call)))
  texts = max(1, min(num_texts, pairs_per_call // images))
  # Pairs per block must split evenly over the data-parallel devices.
  while (texts * images) % dp:
    texts += 1
  return texts, images


def score_all_pairs(scorer, params, texts: Mapping[str, np.ndarray], images: Mapping[str, np.ndarray],
                    pairs_per_call: int, dp: int = 1) -> np.ndarray:
  """Scores [Nt, Ni] of every text against every image, block by block.

  Pools are padded to whole blocks (padding is scored and dropped), so every call has
  the same shapes and the scorer compiles once.
  """
  nt, ni = len(texts["text_ids"]), len(images["region_feats"])
  bt, bi = block_sizes(nt, ni, pairs_per_call, dp)
  nt_pad, ni_pad = math.ceil(nt / bt) * bt, math.ceil(ni / bi) * bi
  texts = {k: _pad_rows(np.asarray(texts[k]), nt_pad) for k in TEXT_KEYS}
  images = {k: _pad_rows(np.asarray(images[k]), ni_pad) for k in IMAGE_KEYS}
  # Padded rows must still be valid inputs: one real token, one real region.
  texts["text_mask"][nt:, 0] = True
  images["region_mask"][ni:, 0] = True
  out = np.zeros((nt_pad, ni_pad), np.float32)
  for t0 in range(0, nt_pad, bt):
    tb = {k: v[t0:t0 + bt] for k, v in texts.items()}
    for i0 in range(0, ni_pad, bi):
      ib = {k: v[i0:i0 + bi] for k, v in images.items()}
      out[t0:t0 + bt, i0:i0 + bi] = np.asarray(jax.device_get(scorer(params, tb, ib)))
  return out[:nt, :ni]
