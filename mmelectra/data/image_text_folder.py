"""TFDS builder for the user's own image-text pairs: a folder of images plus a caption file.

Input layout (`config.data.manual_dir`, default `<data_dir>/downloads/manual`):

    my_data/
      captions.jsonl        one JSON object per line (or captions.csv, see below)
      images/...            any layout; paths in the caption file are relative to my_data/

  JSONL lines: {"image": "images/a.jpg", "caption": "a dog on a sofa"}
           or: {"image": "images/a.jpg", "captions": ["a dog", "a dog on a sofa"]}
  CSV: a header row with `image` and `caption` columns, one caption per row.
  Both take an optional `split` field/column (train | validation | test | any name; rows
  without one go to train). Several lines may name the same image: its captions are
  merged in file order. `config.data.annotations` names the caption file when it is not
  `captions.jsonl` / `captions.csv`.

One record per image: image_id (int, the image's index in sorted path order), image_file
(path as written), image (the file's bytes, any format PIL reads), captions (strings).
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import tensorflow_datasets as tfds

from mmelectra import errors
from mmelectra.data import bad_records
from mmelectra.data import captioned_builder
from mmelectra.data import images as images_lib

NAME = "image_text_folder"
DEFAULT_ANNOTATIONS = ("captions.jsonl", "captions.csv")


def image_features() -> dict:
  """Features shared with coco_captions: an encoded image and all its captions."""
  return {
      "image_id": tfds.features.Scalar(dtype=np.int64),
      "image_file": tfds.features.Text(),
      # Tensor of bytes, not tfds.features.Image: Image decoding needs TensorFlow.
      "image": tfds.features.Tensor(shape=(), dtype=np.object_),
      "captions": tfds.features.Tensor(shape=(None,), dtype=np.object_),
  }


def clean_captions(captions, where: str, tally) -> list[str]:
  """Stripped captions; empty ones are bad records (raised or counted by `tally`)."""
  kept = []
  for i, caption in enumerate(captions):
    if not isinstance(caption, str):
      tally.bad(where, "malformed_record", f"caption {i} is {type(caption).__name__}, not text")
    elif not caption.strip():
      tally.bad(where, "empty_caption", f"caption {i} is empty")
    else:
      kept.append(caption.strip())
  return kept


def read_image_file(path: str, where: str, tally) -> bytes | None:
  """The file's bytes if it exists and decodes; None (after tally.bad) otherwise."""
  if not os.path.isfile(path):
    tally.bad(where, "missing_image_file", f"image file {path} does not exist")
    return None
  with open(path, "rb") as f:
    data = f.read()
  try:
    images_lib.check_image_bytes(data)
  except images_lib.UnreadableImageError as e:
    tally.bad(where, "unreadable_image", f"{path}: {e}")
    return None
  return data


def generate_image_records(source_dir: str, entries, tally):
  """(key, record) for each (image_id, image_file, captions, where) whose image is good."""
  for image_id, image_file, captions, where in entries:
    captions = clean_captions(captions, where, tally)
    data = read_image_file(os.path.join(source_dir, image_file), where, tally)
    if data is None or not captions:
      continue
    yield image_id, {"image_id": image_id, "image_file": image_file, "image": data,
                     "captions": np.array(captions, dtype=object)}


def find_annotations(source_dir: str, name: str) -> str:
  if name:
    path = os.path.join(source_dir, name)
    if not os.path.isfile(path):
      raise errors.NotFound(f"caption file {path} (config.data.annotations) does not exist")
    return path
  for candidate in DEFAULT_ANNOTATIONS:
    path = os.path.join(source_dir, candidate)
    if os.path.isfile(path):
      return path
  raise errors.NotFound(f"no {' or '.join(DEFAULT_ANNOTATIONS)} in {source_dir}; put the "
                        "caption file there or set config.data.annotations")


def _rows(path: str):
  """(line number, dict) for each annotation row; a row that does not parse is None."""
  with open(path, encoding="utf-8", errors=bad_records.TEXT_ERRORS, newline="") as f:
    if path.endswith(".csv"):
      reader = csv.DictReader(f)
      missing = {"image", "caption"} - set(reader.fieldnames or ())
      if missing:
        raise errors.InvalidInput(f"{path}: CSV header {reader.fieldnames} lacks {sorted(missing)}")
      for row in reader:
        bad = next(filter(None, (bad_records.non_utf8(str(v)) for v in row.values())), None)
        yield reader.line_num, row if bad is None else bad
      return
    for line_num, line in enumerate(f, 1):
      if not line.strip():
        continue
      bad = bad_records.non_utf8(line)
      if bad is not None:
        yield line_num, bad
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        yield line_num, f"not JSON: {e}"
        continue
      yield line_num, row if isinstance(row, dict) else "not a JSON object"


def parse_annotations(path: str, tally) -> dict[str, list]:
  """split -> [(image_id, image_file, captions, where)], images in sorted path order."""
  by_image = {}  # image_file -> [split, captions, where of first row]
  for line_num, row in _rows(path):
    where = f"{path}:{line_num}"
    if isinstance(row, str) or not isinstance(row.get("image"), str) or not row["image"]:
      tally.bad(where, "malformed_record", row if isinstance(row, str) else
                "needs an 'image' path and a 'caption' or 'captions'")
      continue
    if "captions" in row:
      captions = row["captions"]
      if not isinstance(captions, list):
        tally.bad(where, "malformed_record", "'captions' must be a list of strings")
        continue
    elif "caption" in row:
      captions = [row["caption"] if row["caption"] is not None else ""]
    else:
      tally.bad(where, "malformed_record", "needs a 'caption' or 'captions' field")
      continue
    image_file = os.path.normpath(row["image"])
    split = (row.get("split") or "train").strip()
    entry = by_image.setdefault(image_file, [split, [], f"{where} (image {image_file})"])
    if entry[0] != split:
      tally.bad(where, "malformed_record",
                f"image {image_file} is in split {split!r} here but {entry[0]!r} before")
      continue
    entry[1].extend(captions)
  splits = {}
  for image_id, image_file in enumerate(sorted(by_image)):
    split, captions, where = by_image[image_file]
    splits.setdefault(split, []).append((image_id, image_file, captions, where))
  return splits


class ImageTextFolder(captioned_builder.CaptionedBuilder, skip_registration=True):
  """Images + captions from a folder; see the module docstring for the layout."""

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=__doc__,
                                 features=tfds.features.FeaturesDict(image_features()))

  def _split_generators(self, dl_manager):
    del dl_manager  # The source is the configured folder.
    (annotations,) = self.builder_config.options
    path = find_annotations(self.source_dir, annotations)
    splits = parse_annotations(path, self.tally)
    if "train" not in splits:
      raise errors.InvalidInput(f"{path} has no train rows (splits: {sorted(splits)})")
    return {split: generate_image_records(self.source_dir, entries, self.tally)
            for split, entries in splits.items()}

  def _generate_examples(self, *args):  # Generators come from _split_generators.
    raise NotImplementedError


def builder(data_cfg) -> ImageTextFolder:
  return captioned_builder.make_builder(ImageTextFolder, data_cfg, (data_cfg.annotations,))
