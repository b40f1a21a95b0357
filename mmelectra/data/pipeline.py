"""Grain input pipeline: prepared TFDS records -> static-shape batches of numpy arrays.

    example index -> shuffle (reseeded every epoch) -> repeat -> this process's rows of
    each global batch -> read + preprocess
    -> batch (padding the last one) -> iterator (worker processes if num_workers > 0)

Every batch is a dict with exactly these keys (b = batch_size, T = max_text_len,
K = regions.num_regions, Dv = regions.feature_dim):
  text_ids int32 [b, T]      "[CLS] caption [SEP]", truncated keeping [SEP], padded [PAD]
  text_mask bool [b, T]      True on real tokens, [CLS] and [SEP] included
  region_feats float32 [b, K, Dv], region_boxes float32 [b, K, 4] (x1, y1, x2, y2 in [0, 1])
  region_mask bool [b, K], region_labels int32 [b, K] (-1: no label or padding)
  image_id int32 [b]         -1 on padding
  example_mask bool [b]      False on padding
and, only under `config.data.on_bad_record="skip"`:
  skip_reason int32 [b]      0, or the code (bad_records.REASONS) of a dropped record,
                             whose slot is a padding example (example_mask False)

Real corpora store all of an image's captions in one record; with
`config.data.all_captions` (default) every (record, caption) pair is one example (the image
repeats), else each record gives one example with its first caption. Shuffling, sharding
and epochs run over these examples.

Sharding: the order of examples is global (one shuffle of all examples, reseeded every
epoch, the same on every process), cut into global batches of batch_size x process_count;
process p reads rows [p * batch_size, (p + 1) * batch_size) of each. The global batches,
and so training, are the same whatever the number of processes. All processes take the
same number of steps: with drop_remainder a last partial global batch is dropped; without
it, it is padded with masked
(example_mask False) examples. Shapes never change, so a jitted step never recompiles.
"""

from __future__ import annotations

import contextlib
import functools
import os

from absl import flags
from absl import logging
import grain
import numpy as np
import tokenizers

from mmelectra import errors
from mmelectra.data import bad_records
from mmelectra.data import batch as batch_lib
from mmelectra.data import captioned_builder
from mmelectra.data import datasets
from mmelectra.data import images as images_lib
from mmelectra.data import regions as regions_lib
from mmelectra.data import tokenizer as tokenizer_lib

# Threads that assemble batches ahead of the consumer (in each worker process when
# num_workers > 0). The work holds the GIL for much of the time, so more threads buy little.
_READ_THREADS = 2
_READ_BUFFER = 4
_PER_WORKER_BUFFER = 2


BadRecordError = bad_records.BadRecordError


# --- data set on disk ------------------------------------------------------------------
def prepared_builder(data_cfg):
  """The TFDS builder for `data_cfg`; FileNotFoundError if it was never prepared."""
  builder = datasets.builder(data_cfg)
  if not builder.is_prepared():
    raise errors.NotFound(
                          f"data set {builder.info.full_name} is not prepared under {data_cfg.data_dir}; "
                          "run mmelectra.data.datasets.prepare(data_cfg) first")
  return builder


def _builder_with_split(data_cfg, split: str):
  """`prepared_builder`, after checking that it has `split` (an error naming the splits)."""
  builder = prepared_builder(data_cfg)
  if split not in builder.info.splits:
    raise errors.MissingEntry(f"split {split!r} not in {sorted(builder.info.splits.keys())}")
  return builder


def load_tokenizer(data_cfg) -> tokenizers.Tokenizer:
  """`config.data.tokenizer` (a BERT vocab.txt, tokenizer.json or directory) if set, else
  the WordPiece tokenizer saved beside the prepared data set."""
  if data_cfg.tokenizer:
    return tokenizer_lib.load(os.path.expanduser(data_cfg.tokenizer))
  return tokenizer_lib.load(os.fspath(prepared_builder(data_cfg).data_dir))


def build_report(data_cfg) -> dict:
  """What the build of the prepared data set skipped (bad_records.json; empty if none)."""
  return bad_records.read_report(prepared_builder(data_cfg).data_dir)


def on_bad_record(data_cfg) -> str:
  return bad_records.check_policy(data_cfg.on_bad_record)


def example_table(builder, split: str, data_cfg) -> np.ndarray | None:
  """int32 [num_examples, 2] of (record index, caption index), or None: one per record.

  Only real corpora (records with a `captions` list) have one; with
  `config.data.all_captions` every caption of every record is an example.
  """
  if data_cfg.name == "synthetic_scenes":
    return None
  counts = captioned_builder.caption_counts(builder, split)
  if not data_cfg.all_captions:
    return np.stack([np.arange(len(counts)), np.zeros(len(counts), np.int64)], 1).astype(np.int32)
  records = np.repeat(np.arange(len(counts)), counts)
  starts = np.cumsum(counts) - counts
  return np.stack([records, np.arange(len(records)) - starts[records]], 1).astype(np.int32)


def dataset_size(data_cfg, split: str) -> int:
  """Number of examples in `split` (all processes together): records, or (record,
  caption) pairs for real corpora with `config.data.all_captions`."""
  builder = _builder_with_split(data_cfg, split)
  table = example_table(builder, split, data_cfg)
  return builder.info.splits[split].num_examples if table is None else len(table)


def caption_token_rows(data_cfg, split: str, tokenizer: tokenizers.Tokenizer,
                       max_examples: int) -> list[np.ndarray]:
  """The token ids ("[CLS] caption [SEP]", unpadded) of the first `max_examples` examples of
  `split`, in record order: what `data/mask_salience.py` counts. A caption that does not
  read is left out here; training names its record."""
  builder = _builder_with_split(data_cfg, split)
  source = builder.as_data_source(split=split)
  table = example_table(builder, split, data_cfg)
  if table is None:
    table = np.stack([np.arange(len(source)), np.zeros(len(source), np.int64)], 1)
  special_ids = tokenizer_lib.special_token_ids(tokenizer)
  rows, record, record_index = [], None, None
  for ri, ci in table[:max_examples]:
    if ri != record_index:
      record, record_index = source[int(ri)], ri
    try:
      ids, mask = encode_caption(_record_caption(record, int(ci)), tokenizer,
                                 data_cfg.max_text_len, special_ids)
    except (BadRecordError, KeyError, IndexError, TypeError, UnicodeDecodeError):
      continue
    rows.append(ids[mask])
  return rows


# --- one record -> one example ----------------------------------------------------------
def empty_example(data_cfg, pad_id: int = 0) -> dict[str, np.ndarray]:
  """The padding example: right shapes, every mask False, labels and image_id -1."""
  example = batch_lib.padding_example(data_cfg.max_text_len, regions_lib.num_regions(data_cfg),
                                      regions_lib.feature_dim(data_cfg), pad_id)
  if on_bad_record(data_cfg) == "skip":
    example["skip_reason"] = np.int32(0)
  return example


@contextlib.contextmanager
def _blame(where: str, key: str, reason: str = "malformed_record"):
  """Re-raises a failure while handling `key` as a BadRecordError naming the record."""
  try:
    yield
  except BadRecordError as e:
    if e.args[0].startswith(where):
      raise
    raise BadRecordError(f"{where}, key {key!r}: {e}", e.reason) from e
  except images_lib.UnreadableImageError as e:
    raise BadRecordError(f"{where}, key {key!r}: {e}", "unreadable_image") from e
  except (ValueError, TypeError, KeyError, IndexError, UnicodeDecodeError) as e:
    raise BadRecordError(f"{where}, key {key!r}: {e}", reason) from e


def encode_caption(caption: str, tokenizer: tokenizers.Tokenizer, max_len: int,
                   special_ids: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
  """([CLS] tokens [SEP] padded to max_len, its mask); truncation keeps [SEP] last."""
  if max_len < 3:
    raise errors.InvalidInput(f"max_text_len {max_len} leaves no room between [CLS] and [SEP]")
  ids = tokenizer.encode(caption).ids
  if ids[:1] != [special_ids["cls"]] or ids[-1:] != [special_ids["sep"]]:
    raise errors.InvalidInput("tokenizer does not wrap text in [CLS] ... [SEP]; it needs the "
                              "'[CLS] $A [SEP]' post-processor")
  if len(ids) <= 2:
    raise BadRecordError(f"caption {caption!r} tokenises to no tokens", "empty_caption")
  if len(ids) > max_len:
    ids = ids[:max_len - 1] + [special_ids["sep"]]
  text_ids = np.full(max_len, special_ids["pad"], np.int32)
  text_ids[:len(ids)] = ids
  return text_ids, np.arange(max_len) < len(ids)


def _record_caption(record: dict, caption_index: int) -> str:
  """The record's `caption`, or entry `caption_index` of its `captions` (real corpora)."""
  if "caption" in record:
    caption = record["caption"]
  else:
    caption = record["captions"][caption_index]
  if isinstance(caption, bytes):
    caption = caption.decode("utf-8")
  if not isinstance(caption, str):
    raise TypeError(f"expected text, got {type(caption).__name__}")
  return caption


def _record_image(record: dict, size: int) -> np.ndarray:
  """uint8 [size, size, 3]: a stored array as is (checked), encoded bytes decoded+resized."""
  image = record["image"]
  if isinstance(image, bytes):
    return images_lib.decode_resized(image, size)
  if not isinstance(image, np.ndarray) or image.shape != (size, size, 3):
    raise ValueError(f"expected a [{size}, {size}, 3] array, got shape "
                     f"{getattr(image, 'shape', type(image).__name__)}")
  if image.dtype != np.uint8:
    raise ValueError(f"expected uint8, got {image.dtype}")
  return image


def _record_name(record: dict, index: int, caption_index: int | None, split: str) -> str:
  """How errors name a record: split, index, image_id and, where stored, its source file."""
  details = [f"image_id {record.get('image_id', 'missing')}"]
  for key in ("image_file", "source"):
    if key in record:
      value = record[key]
      details.append(value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value))
  if caption_index is not None:
    details.append(f"caption {caption_index}")
  return f"{split} record {index} ({', '.join(details)})"


def preprocess_record(record: dict, index: int, *, split: str, tokenizer: tokenizers.Tokenizer,
                      special_ids: dict[str, int], data_cfg,
                      caption_index: int | None = None) -> dict[str, np.ndarray]:
  """One decoded TFDS record -> one example; BadRecordError names record, file and key.

  `caption_index` picks one of a real-corpus record's `captions` (None: `caption`).
  """
  where = _record_name(record, index, caption_index, split)
  with _blame(where, "image_id"):
    image_id = int(record["image_id"])
    if not 0 <= image_id <= np.iinfo(np.int32).max:
      raise ValueError(f"image_id {image_id} does not fit int32")
  with _blame(where, "caption" if caption_index is None else "captions"):
    caption = _record_caption(record, caption_index or 0)
    text_ids, text_mask = encode_caption(caption, tokenizer, data_cfg.max_text_len, special_ids)
  if data_cfg.regions == "features":
    with _blame(where, "features"):
      regions = regions_lib.precomputed_regions(
          record["features"], record["boxes"], record["objects_id"],
          data_cfg.feature_dim, regions_lib.num_regions(data_cfg))
  else:
    with _blame(where, "image"):
      image = _record_image(record, data_cfg.image_size)
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
  """Example index -> example; indices past the end give the padding example.

  Under on_bad_record="skip" a bad record gives the padding example with its
  `skip_reason`. A class, not a closure, so grain can pickle it into worker processes.
  """

  def __init__(self, source, split: str, tokenizer: tokenizers.Tokenizer, data_cfg,
               table: np.ndarray | None = None):
    self._source = source
    self._table = table
    self._num_examples = len(source) if table is None else len(table)
    self._split = split
    self._tokenizer = tokenizer
    self._special_ids = tokenizer_lib.special_token_ids(tokenizer)
    self._data_cfg = data_cfg
    self._skip = on_bad_record(data_cfg) == "skip"
    self.empty = empty_example(data_cfg, self._special_ids["pad"])

  def __len__(self) -> int:
    return self._num_examples

  def __call__(self, index) -> dict[str, np.ndarray]:
    index = int(index)
    if index >= self._num_examples:
      return {k: v.copy() for k, v in self.empty.items()}
    record_index, caption_index = (index, None) if self._table is None else self._table[index]
    try:
      example = preprocess_record(
          self._source[int(record_index)], int(record_index), split=self._split,
          tokenizer=self._tokenizer, special_ids=self._special_ids, data_cfg=self._data_cfg,
          caption_index=None if caption_index is None else int(caption_index))
    except BadRecordError as e:
      if not self._skip:
        raise
      logging.log_every_n(logging.WARNING, "skipping bad record (%s): %s", 100, e.reason, e)
      example = {k: v.copy() for k, v in self.empty.items()}
      example["skip_reason"] = np.int32(bad_records.reason_code(e.reason))
      return example
    if self._skip:
      example["skip_reason"] = np.int32(0)
    return example


def stack_and_pad(examples, *, batch_size: int, empty: dict[str, np.ndarray]):
  """Stacks examples into a batch, filling up to batch_size with `empty` (masked) copies."""
  examples = list(examples) + [empty] * (batch_size - len(examples))
  return {key: np.stack([e[key] for e in examples]) for key in empty}


# --- the pipeline -----------------------------------------------------------------------
class ProcessRows(grain.MapDataset):
  """Process `process_index`'s rows of each global batch of an index dataset.

  Global batch g holds `parent[g * B : (g + 1) * B]` with B = batch_size x process_count;
  this process reads its `batch_size` consecutive rows of each. With `pad` a last partial
  global batch is completed with `pad_index` (an index that reads as padding), else it is
  dropped.
  """

  def __init__(self, parent: grain.MapDataset, *, batch_size: int, process_index: int,
               process_count: int, pad: bool, pad_index: int):
    super().__init__(parent)
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    self._local, self._offset = batch_size, process_index * batch_size
    self._global = batch_size * process_count
    self._pad, self._pad_index = pad, pad_index
    n = len(parent)
    self._num_batches = -(-n // self._global) if pad else n // self._global
    if self._num_batches == 0:
      raise errors.InvalidInput(f"{n} examples make no global batch of {self._global} "
                                f"({process_count} processes x {batch_size}); use drop_remainder=False")

  def __len__(self) -> int:
    return self._num_batches * self._local

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    if index >= len(self):
      raise IndexError(f"index {index} past the end ({len(self)})")
    j = (index // self._local) * self._global + self._offset + index % self._local
    return self._parent[j] if j < len(self._parent) else self._pad_index


def example_indices(num_examples: int, *, batch_size: int, seed: int, shuffle: bool,
                    num_epochs: int | None, drop_remainder: bool, process_index: int,
                    process_count: int) -> grain.MapDataset:
  """This process's example indices in training order (module docstring, "Sharding").

  `batch_size` is per process; indices >= num_examples mean padding.
  """
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be None (forever) or >= 1, got {num_epochs}")
  ds = grain.MapDataset.range(num_examples)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  # repeat() after shuffle() reseeds the shuffle per epoch: a new order every epoch.
  ds = ds.repeat(num_epochs)
  return ProcessRows(ds, batch_size=batch_size, process_index=process_index,
                     process_count=process_count, pad=not drop_remainder, pad_index=num_examples)


def make_dataset(source, data_cfg, split: str, tokenizer: tokenizers.Tokenizer, *,
                 batch_size: int, seed: int, shuffle: bool = True, num_epochs: int | None = None,
                 drop_remainder: bool = True, process_index: int = 0,
                 process_count: int = 1, table: np.ndarray | None = None) -> grain.IterDataset:
  """The pipeline over any random-access `source` of decoded records (see make_iterator).

  `table` ([num_examples, 2] record and caption indices, see `example_table`) makes the
  examples (record, caption) pairs; None: one example per record.
  """
  read = ReadExample(source, split, tokenizer, data_cfg, table)
  ds = example_indices(len(read), batch_size=batch_size, seed=seed, shuffle=shuffle,
                       num_epochs=num_epochs, drop_remainder=drop_remainder,
                       process_index=process_index, process_count=process_count).map(read)
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
                  process_index: int = 0, process_count: int = 1,
                  tokenizer: tokenizers.Tokenizer | None = None) -> grain.DatasetIterator:
  """Iterator of batches (module docstring) over this process's shard of `split`.

  `tokenizer`: the data set's (`load_tokenizer`, loaded here if not given; a command
  loads it once, `setup.DataContext`).

  Supports next(), get_state() and set_state() for exact resume. num_epochs=None repeats
  forever. Close it (`it.close()`) when num_workers > 0 to stop the worker processes.
  """
  builder = _builder_with_split(data_cfg, split)
  # Under "error", data whose build dropped bad records is itself an error.
  bad_records.check_build_report(bad_records.read_report(builder.data_dir),
                                 on_bad_record(data_cfg), builder.data_dir)
  source = builder.as_data_source(split=split)
  if tokenizer is None:
    tokenizer = load_tokenizer(data_cfg)
  ds = make_dataset(source, data_cfg, split, tokenizer, batch_size=batch_size,
                    seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                    drop_remainder=drop_remainder, process_index=process_index,
                    process_count=process_count, table=example_table(builder, split, data_cfg))
  return iter(ds)
