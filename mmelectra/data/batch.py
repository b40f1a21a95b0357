"""The batch: its keys, shapes and dtypes, in one place.

A pretraining batch (what `pipeline` yields) has `PRETRAIN_KEYS`; a VQA batch replaces the
region labels and image ids by the answers (`VQA_KEYS`). The model reads `PAIR_KEYS`, in
that order (`model_inputs`); retrieval scores texts (`TEXT_KEYS`) against images
(`IMAGE_KEYS`). Every array has a leading batch axis; one example drops it.
"""

from __future__ import annotations

import numpy as np

TEXT_KEYS = ("text_ids", "text_mask")
IMAGE_KEYS = ("region_feats", "region_boxes", "region_mask")
PAIR_KEYS = TEXT_KEYS + IMAGE_KEYS  # the encoder's inputs, in its argument order
PRETRAIN_KEYS = PAIR_KEYS + ("region_labels", "image_id", "example_mask")
RETRIEVAL_KEYS = PAIR_KEYS + ("image_id", "example_mask")
VQA_KEYS = PAIR_KEYS + ("answer_scores", "answer_target", "example_mask")


def _arrays(text_len: int, num_regions: int, feat_dim: int, lead: tuple, *, real: bool,
            pad_id: int) -> dict[str, np.ndarray]:
  return {
      "text_ids": np.full(lead + (text_len,), pad_id, np.int32),
      "text_mask": np.full(lead + (text_len,), real, bool),
      "region_feats": np.zeros(lead + (num_regions, feat_dim), np.float32),
      "region_boxes": np.zeros(lead + (num_regions, 4), np.float32),
      "region_mask": np.full(lead + (num_regions,), real, bool),
      "region_labels": np.full(lead + (num_regions,), -1, np.int32),
      "image_id": np.full(lead, 0 if real else -1, np.int32),
      "example_mask": np.full(lead, real, bool),
  }


def padding_example(text_len: int, num_regions: int, feat_dim: int,
                    pad_id: int = 0) -> dict[str, np.ndarray]:
  """One padding example: every mask False, labels and image_id -1 (`PRETRAIN_KEYS`)."""
  ex = _arrays(text_len, num_regions, feat_dim, (), real=False, pad_id=pad_id)
  ex["image_id"], ex["example_mask"] = np.int32(-1), np.bool_(False)
  return ex


def placeholder(text_len: int, num_regions: int, feat_dim: int, batch_size: int) -> dict[str, np.ndarray]:
  """A zero batch whose masks are all True (`PRETRAIN_KEYS`): for init and compile, where
  only shapes and dtypes matter but every position should be a real one."""
  return _arrays(text_len, num_regions, feat_dim, (batch_size,), real=True, pad_id=0)


def model_inputs(batch: dict) -> tuple:
  """The encoder's positional inputs (`PAIR_KEYS`) of a batch."""
  return tuple(batch[k] for k in PAIR_KEYS)


def select(batch: dict, keys: tuple[str, ...]) -> dict:
  """The `keys` of `batch` that it has (a training step takes only what it reads)."""
  return {k: batch[k] for k in keys if k in batch}
