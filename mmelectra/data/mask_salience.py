"""Which words to mask: each token's surprisal given its two neighbours, on the train captions.

A word the text around it already names ("a", "of", "image" in "an image with") teaches a
text-only generator little and gives the discriminator replacements the text alone
gives away; a word the text leaves open (a colour, an object noun, a relation) is the word
an image-text encoder has to read off the image. Masking words in proportion to how
unpredictable the text leaves them concentrates the masks where the image is needed
(EPIC, CVPR 2023, masks image-salient words for the same reason; docs/method.md §6).

The measure is corpus statistics, no model: for every occurrence of token v between
tokens p and n in a train caption,

    surprisal = -log (c(p, v, n) + a) / (c(p, ., n) + a * V)

with c the counts over the captions, a the add-a smoothing and V the number of token
types seen; a token's salience is the mean over its occurrences. Tokens never seen in the
sample get the largest salience seen (a rare word is more likely a content word). The
table is measured when a run starts and saved in its directory (`workdir.save_mask_salience`),
so a resumed or evaluated run masks as it trained.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from mmelectra import errors

SMOOTHING = 0.1


def context_surprisal(rows: Iterable[np.ndarray], vocab_size: int,
                      smoothing: float = SMOOTHING) -> np.ndarray:
  """Mean surprisal of each token id given its left and right neighbour, float32 `[V]`.

  `rows`: token id sequences ("[CLS] caption [SEP]", no padding); the first and last
  token of a row are context only.
  """
  rows = [np.asarray(r, np.int64) for r in rows if len(r) >= 3]
  if not rows:
    raise errors.InvalidInput("no caption of at least one token to measure mask salience on")
  prev = np.concatenate([r[:-2] for r in rows])
  mid = np.concatenate([r[1:-1] for r in rows])
  nxt = np.concatenate([r[2:] for r in rows])
  if mid.max() >= vocab_size or mid.min() < 0:
    raise errors.InvalidInput(f"token id {int(mid.max())} outside the vocabulary of {vocab_size}")
  # Count (p, v, n) and (p, n) with one key each.
  context = prev * vocab_size + nxt
  triple = context * vocab_size + mid
  _, t_inv, t_counts = np.unique(triple, return_inverse=True, return_counts=True)
  _, c_inv, c_counts = np.unique(context, return_inverse=True, return_counts=True)
  types = len(np.unique(mid))
  surprisal = -np.log((t_counts[t_inv] + smoothing) / (c_counts[c_inv] + smoothing * types))
  total = np.bincount(mid, weights=surprisal, minlength=vocab_size)
  count = np.bincount(mid, minlength=vocab_size)
  seen = count > 0
  mean = total[seen] / count[seen]
  salience = np.full(vocab_size, mean.max(), np.float64)
  salience[seen] = mean
  return salience.astype(np.float32)


def mask_log_weights(salience: np.ndarray, floor: float) -> np.ndarray:
  """Log of the masking weight of each token id: `log(salience + floor)`; `floor` keeps a
  word the text fully predicts maskable (some of the generator's MLM stays on it)."""
  if floor <= 0:
    raise errors.InvalidInput(f"text_mask_salience_floor={floor} must be > 0")
  return np.log(np.asarray(salience, np.float64) + floor).astype(np.float32)
