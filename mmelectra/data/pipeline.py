"""Grain input pipeline: prepared TFDS records -> static-shape batches of numpy arrays.

    record index -> shard -> shuffle (reseeded every epoch) -> repeat -> read + preprocess
    -> batch (padding the last one) -> iterator (worker processes if num_workers > 0)

Every batch is a dict with exactly these keys (b = batch_size, T = max_text_len,
K = regions.num_regions, Dv = regions.feature_dim):
  text_ids int32 [b, T]      "[CLS] caption [SEP]", truncated keeping [SEP], padded [PAD]
  text_mask bool [b, T]      True on real tokens, [CLS] and [SEP] included
  region_feats float32 [b, K, Dv], region_boxes float32 [b, K, 4] (x1, y1, x2, y2 in [0, 1])
  region_mask bool [b, K], region_labels int32 [b, K] (-1: no label or padding)
  image_id int32 [b]         -1 on padding
  example_mask bool [b]      False on padding

Sharding: process p reads records i with i % process_count == p. All processes must take
the same number of steps, so shards are made equal: with drop_remainder the last
`n % process_count` records are dropped; without it, short shards are padded with masked
(example_mask False) examples. Shapes never change, so a jitted step never recompiles.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

from absl import flags
import grain
import numpy as np
import tokenizers

from mmelectra.data import regions as regions_lib
from mmelectra.data import synthetic_scenes
from mmelectra.data import tokenizer as tokenizer_lib

BATCH_KEYS = ("text_ids", "text_mask", "region_feats", "region_boxes", "region_mask",
              "region_labels", "image_id", "example_mask")

# Threads that assemble batches ahead of the consumer (in each worker process when
# num_workers > 0). The work holds the GIL for much of the time, so more threads buy little.
_READ_THREADS = 2
_READ_BUFFER = 4
_PER_WORKER_BUFFER = 2


class BadRecordError(ValueError):
  """A stored record that cannot become a valid example."""


# --- data set on disk ------------------------------------------------------------------
def prepared_builder(data_cfg):
  """The TFDS builder for `data_cfg`; FileNotFoundError if it was never prepared."""
  builder = synthetic_scenes.builder(data_cfg)
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"data set {builder.info.full_name} is not prepared under {data_cfg.data_dir}; "
        "run mmelectra.data.synthetic_scenes.prepare(data_cfg) first")
  return builder


def load_tokenizer(data_cfg) -> tokenizers.Tokenizer:
  """The WordPiece tokenizer saved beside the prepared data set."""
  return tokenizer_lib.load(os.fspath(prepared_builder(data_cfg).data_dir))


def dataset_size(data_cfg, split: str) -> int:
  """Number of records in `split` (all processes together)."""
  splits = prepared_builder(data_cfg).info.splits
  if split not in splits:
    raise KeyError(f"split {split!r} not in {sorted(splits.keys())}")
  return splits[split].num_examples


# --- one record -> one example ----------------------------------------------------------
def empty_example(data_cfg, pad_id: int = 0) -> dict[str, np.ndarray]:
  """The padding example: right shapes, every mask False, labels and image_id -1."""
  text_len = data_cfg.max_text_len
  k, dv = regions_lib.num_regions(data_cfg), regions_lib.feature_dim(data_cfg)
  return {
      "text_ids": np.full(text_len, pad_id, np.int32),
      "text_mask": np.zeros(text_len, bool),
      "region_feats": np.zeros((k, dv), np.float32),
      "region_boxes": np.zeros((k, 4), np.float32),
      "region_mask": np.zeros(k, bool),
      "region_labels": np.full(k, -1, np.int32),
      "image_id": np.int32(-1),
      "example_mask": np.bool_(False),
  }


@contextlib.contextmanager
def _blame(where: str, key: str):
  """Re-raises a failure while handling `key` as a BadRecordError naming the record."""
  try:
    yield
  except BadRecordError:
    raise
  except (ValueError, TypeError, KeyError, IndexError, UnicodeDecodeError) as e:
    raise BadRecordError(f"{where}, key {key!r}: {e}") from e


def encode_caption(caption: str, tokenizer: tokenizers.Tokenizer, max_len: int,
                   special_ids: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
  """([CLS] tokens [SEP] padded to max_len, its mask); truncation keeps [SEP] last."""
  if max_len < 3:
    raise ValueError(f"max_text_len {max_len} leaves no room between [CLS] and [SEP]")
  ids = tokenizer.encode(caption).ids
  if ids[:1] != [special_ids["cls"]] or ids[-1:] != [special_ids["sep"]]:
    raise ValueError("tokenizer does not wrap text in [CLS] ... [SEP]; it needs the "
                     "'[CLS] $A [SEP]' post-processor")
  if len(ids) <= 2:
    raise ValueError(f"caption {caption!r} tokenises to no tokens")
  if len(ids) > max_len:
    ids = ids[:max_len - 1] + [special_ids["sep"]]
  text_ids = np.full(max_len, special_ids["pad"], np.int32)
  text_ids[:len(ids)] = ids
  return text_ids, np.arange(max_len) < len(ids)


def preprocess_record(record: dict, index: int, *, split: str, tokenizer: tokenizers.Tokenizer,
                      special_ids: dict[str, int], data_cfg) -> dict[str, np.ndarray]:
  """One decoded TFDS record -> one example; BadRecordError names record, image and key."""
  image_id = record.get("image_id", "missing")
  where = f"{split} record {index} (image_id {image_id})"
  with _blame(where, "image_id"):
    image_id = int(record["image_id"])
    if not 0 <= image_id <= np.iinfo(np.int32).max:
      raise ValueError(f"image_id {image_id} does not fit int32")
  with _blame(where, "image"):
    image = record["image"]
    size = data_cfg.image_size
    if not isinstance(image, np.ndarray) or image.shape != (size, size, 3):
      raise ValueError(f"expected a [{size}, {size}, 3] array, got shape "
                       f"{getattr(image, 'shape', type(image).__name__)}")
    if image.dtype != np.uint8:
      raise ValueError(f"expected uint8, got {image.dtype}")
  with _blame(where, "caption"):
    caption = record["caption"]
    if isinstance(caption, bytes):
      caption = caption.decode("utf-8")
    if not isinstance(caption, str):
      raise TypeError(f"expected text, got {type(caption).__name__}")
    text_ids, text_mask = encode_caption(caption, tokenizer, data_cfg.max_text_len, special_ids)
  if data_cfg.regions == "patches":
    with _blame(where, "image"):
      regions = regions_lib.image_to_patches(image, data_cfg.patch_size)
  else:
    with _blame(where, "objects"):
      objects = record["objects"]
      regions = regions_lib.object_crops(image, objects["boxes"], objects["label"],
                                         data_cfg.crop_size, regions_lib.num_regions(data_cfg))
  return {
      "text_ids": text_ids,
      "text_mask": text_mask,
      "region_feats": regions.feats,
      "region_boxes": regions.boxes,
      "region_mask": regions.mask,
      "region_labels": regions.labels,
      "image_id": np.int32(image_id),
      "example_mask": np.bool_(True),
  }


class ReadExample:
  """Record index -> example; indices past the end give the padding example.

  A class, not a closure, so grain can pickle it into worker processes.
  """

  def __init__(self, source, split: str, tokenizer: tokenizers.Tokenizer, data_cfg):
    self._source = source
    self._num_records = len(source)
    self._split = split
    self._tokenizer = tokenizer
    self._special_ids = tokenizer_lib.special_token_ids(tokenizer)
    self._data_cfg = data_cfg
    self.empty = empty_example(data_cfg, self._special_ids["pad"])

  def __call__(self, index) -> dict[str, np.ndarray]:
    index = int(index)
    if index >= self._num_records:
      return {k: v.copy() for k, v in self.empty.items()}
    return preprocess_record(self._source[index], index, split=self._split,
                             tokenizer=self._tokenizer, special_ids=self._special_ids,
                             data_cfg=self._data_cfg)


def stack_and_pad(examples, *, batch_size: int, empty: dict[str, np.ndarray]):
  """Stacks examples into a batch, filling up to batch_size with `empty` (masked) copies."""
  examples = list(examples) + [empty] * (batch_size - len(examples))
  return {key: np.stack([e[key] for e in examples]) for key in BATCH_KEYS}


# --- the pipeline -----------------------------------------------------------------------
def shard_record_indices(num_records: int, process_index: int, process_count: int,
                         pad: bool) -> np.ndarray:
  """Record indices of one process, equal in number on every process.

  `pad`: shards are rounded up and indices >= num_records mean padding; else rounded down.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  per_shard = (math.ceil if pad else math.floor)(num_records / process_count)
  if per_shard == 0:
    raise ValueError(f"{num_records} records cannot feed {process_count} processes")
  return process_index + process_count * np.arange(per_shard)


def make_dataset(source, data_cfg, split: str, tokenizer: tokenizers.Tokenizer, *,
                 batch_size: int, seed: int, shuffle: bool = True, num_epochs: int | None = None,
                 drop_remainder: bool = True, process_index: int = 0,
                 process_count: int = 1) -> grain.IterDataset:
  """The pipeline over any random-access `source` of decoded records (see make_iterator)."""
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be None (forever) or >= 1, got {num_epochs}")
  indices = shard_record_indices(len(source), process_index, process_count,
                                 pad=not drop_remainder)
  read = ReadExample(source, split, tokenizer, data_cfg)
  ds = grain.MapDataset.source(indices)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  # repeat() after shuffle() reseeds the shuffle per epoch: a new order every epoch.
  ds = ds.repeat(num_epochs).map(read)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder,
                batch_fn=functools.partial(stack_and_pad, batch_size=batch_size,
                                           empty=read.empty))
  # Batching before to_iter_dataset makes whole batches the unit that read threads and
  # worker processes produce, in a fixed order whatever their number.
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=_READ_THREADS,
                                            prefetch_buffer_size=_READ_BUFFER))
  if data_cfg.num_workers > 0:
    # grain 0.2.18 reads an absl flag when starting workers and fails if flags were never
    # parsed (scripts, tests, notebooks; google/grain#1355). Outside absl.app, accept the
    # defaults; absl.app.run still parses the command line as usual.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=data_cfg.num_workers, per_worker_buffer_size=_PER_WORKER_BUFFER))
  return ds


def make_iterator(data_cfg, split: str, *, batch_size: int, seed: int, shuffle: bool = True,
                  num_epochs: int | None = None, drop_remainder: bool = True,
                  process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
  """Iterator of batches (module docstring) over this process's shard of `split`.

  Supports next(), get_state() and set_state() for exact resume. num_epochs=None repeats
  forever. Close it (`it.close()`) when num_workers > 0 to stop the worker processes.
  """
  builder = prepared_builder(data_cfg)
  if split not in builder.info.splits:
    raise KeyError(f"split {split!r} not in {sorted(builder.info.splits.keys())}")
  source = builder.as_data_source(split=split)
  tokenizer = tokenizer_lib.load(os.fspath(builder.data_dir))
  ds = make_dataset(source, data_cfg, split, tokenizer, batch_size=batch_size, seed=seed,
                    shuffle=shuffle, num_epochs=num_epochs, drop_remainder=drop_remainder,
                    process_index=process_index, process_count=process_count)
  return iter(ds)
