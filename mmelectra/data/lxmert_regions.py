"""TFDS builder for precomputed Faster R-CNN region features (LXMERT / bottom-up attention).

Input layout (`config.data.manual_dir`, default `<data_dir>/downloads/manual`), the files
LXMERT's repository downloads:

    lxmert/
      train2014_obj36.tsv, val2014_obj36.tsv, vg_gqa_obj36.tsv, ...   every *.tsv is read
      mscoco_train.json, mscoco_nominival.json, vgnococo.json        -> split "train"
      mscoco_minival.json                                            -> split "validation"

  TSV: no header, tab separated, columns img_id, img_h, img_w, objects_id, objects_conf,
  attrs_id, attrs_conf, num_boxes, boxes, features; the last six are base64 of raw arrays
  (objects_id, attrs_id int64; objects_conf, attrs_conf float32 [num_boxes]; boxes float32
  [num_boxes, 4] in pixels (x1, y1, x2, y2); features float32 [num_boxes, feature_dim],
  feature_dim = `config.data.feature_dim`, 2048 for LXMERT's 36-box files).
  Caption JSON: a list of {"img_id": ..., "sentf": {"<source>": [sentences], ...}, ...}.
  A JSON file's split is its name: "minival"/"val..." -> validation, "test..." -> test,
  anything else -> train. An img_id in several files of one split gets all their captions.

One record per image that has both captions and a TSV row: image_id (index of the img_id
in sorted order), image_name (the img_id), source ("file.tsv:line"), img_h, img_w, boxes
float32 [n, 4] divided by (img_w, img_h, img_w, img_h) into [0, 1], features float16
[n, feature_dim] (half the disk; values beyond float16's range are bad records; the dtype
is recorded in the data set's metadata), objects_id/attrs_id int32, objects_conf/attrs_conf
float32 [n], captions.
"""

from __future__ import annotations

import base64
import binascii
import csv
import glob
import json
import os
import sys

import numpy as np
import tensorflow_datasets as tfds

from mmelectra import errors
from mmelectra.data import captioned_builder
from mmelectra.data import image_text_folder

NAME = "lxmert_regions"
FIELDNAMES = ("img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id",
              "attrs_conf", "num_boxes", "boxes", "features")
STORED_FEATURE_DTYPE = np.float16
# Detector boxes may overshoot the image by a rounding error; more than this is malformed.
_BOX_TOLERANCE = 0.01


def caption_split(json_path: str) -> str:
  stem = os.path.splitext(os.path.basename(json_path))[0].lower()
  for prefix in ("mscoco_", "vg_", "gqa_"):
    stem = stem.removeprefix(prefix)
  if stem.startswith(("minival", "val")):
    return "validation"
  if stem.startswith("test"):
    return "test"
  return "train"


def read_captions(source_dir: str, tally) -> dict[str, dict[str, tuple]]:
  """split -> {img_id: (captions, where)} from every *.json in `source_dir`."""
  paths = sorted(glob.glob(os.path.join(source_dir, "*.json")))
  if not paths:
    raise errors.NotFound(f"no caption *.json in {source_dir}; see the lxmert_regions layout")
  splits = {}
  for path in paths:
    with open(path, encoding="utf-8") as f:
      entries = json.load(f)
    split = splits.setdefault(caption_split(path), {})
    for i, entry in enumerate(entries):
      where = f"{path} entry {i}"
      if not isinstance(entry, dict) or "img_id" not in entry or not isinstance(entry.get("sentf"), dict):
        tally.bad(where, "malformed_record", "needs 'img_id' and a 'sentf' object")
        continue
      img_id = str(entry["img_id"])
      sentences = [s for source in entry["sentf"].values() for s in source]
      captions = image_text_folder.clean_captions(sentences, f"{where} (img_id {img_id})", tally)
      split.setdefault(img_id, ([], f"{where} (img_id {img_id})"))[0].extend(captions)
  return splits


def _array(row: dict, key: str, dtype, count: int | None = None) -> np.ndarray:
  try:
    array = np.frombuffer(base64.b64decode(row[key], validate=True), dtype=dtype)
  except (binascii.Error, ValueError, TypeError) as e:
    raise ValueError(f"field {key!r} is not base64 of {np.dtype(dtype).name}: {e}") from e
  if count is not None and array.size != count:
    raise ValueError(f"field {key!r} holds {array.size} values, expected {count}")
  return array


def parse_row(row: dict, feature_dim: int, where: str, tally) -> dict | None:
  """One TSV row -> stored fields, or None after `tally.bad`."""
  try:
    if None in row or any(row.get(k) is None for k in FIELDNAMES):
      raise ValueError(f"expected {len(FIELDNAMES)} tab-separated columns")
    img_h, img_w, num_boxes = int(row["img_h"]), int(row["img_w"]), int(row["num_boxes"])
    if img_h <= 0 or img_w <= 0 or num_boxes < 0:
      raise ValueError(f"img_h={img_h}, img_w={img_w}, num_boxes={num_boxes}")
    boxes = _array(row, "boxes", np.float32, num_boxes * 4).reshape(num_boxes, 4)
    fields = {
        "objects_id": _array(row, "objects_id", np.int64, num_boxes).astype(np.int32),
        "objects_conf": _array(row, "objects_conf", np.float32, num_boxes),
        "attrs_id": _array(row, "attrs_id", np.int64, num_boxes).astype(np.int32),
        "attrs_conf": _array(row, "attrs_conf", np.float32, num_boxes),
    }
    features = _array(row, "features", np.float32)
  except ValueError as e:
    tally.bad(where, "malformed_record", str(e))
    return None
  if features.size != num_boxes * feature_dim:
    dim = features.size / num_boxes if num_boxes else features.size
    tally.bad(where, "wrong_feature_dim",
              f"features hold {features.size} values for {num_boxes} boxes ({dim:g} per box), "
              f"expected feature_dim={feature_dim}")
    return None
  features = features.reshape(num_boxes, feature_dim)
  if not (np.isfinite(features).all() and np.isfinite(boxes).all()):
    tally.bad(where, "non_finite_features", "features or boxes hold NaN or inf")
    return None
  limit = np.finfo(STORED_FEATURE_DTYPE).max
  if features.size and np.abs(features).max() > limit:
    tally.bad(where, "non_finite_features",
              f"feature value {np.abs(features).max():g} overflows float16 (max {limit:g})")
    return None
  boxes = boxes / np.array([img_w, img_h, img_w, img_h], np.float32)
  if boxes.size and (boxes.min() < -_BOX_TOLERANCE or boxes.max() > 1 + _BOX_TOLERANCE):
    tally.bad(where, "malformed_record", f"boxes reach outside the {img_w}x{img_h} image")
    return None
  return {"img_h": img_h, "img_w": img_w, "boxes": np.clip(boxes, 0, 1),
          "features": features.astype(STORED_FEATURE_DTYPE), **fields}


def generate_region_records(source_dir: str, captions: dict, image_ids: dict,
                            feature_dim: int, tally):
  """(key, record) for every TSV row whose img_id has captions in this split."""
  csv.field_size_limit(sys.maxsize)  # A features field is ~100 KB of base64.
  seen = set()
  for path in sorted(glob.glob(os.path.join(source_dir, "*.tsv"))):
    with open(path, encoding="utf-8", newline="") as f:
      reader = csv.DictReader(f, FIELDNAMES, delimiter="\t")
      for row in reader:
        img_id = row["img_id"]
        # Images whose captions were all empty were counted as such already.
        if not captions.get(img_id, ((), ""))[0] or img_id in seen:
          continue
        where = f"{os.path.basename(path)}:{reader.line_num} (img_id {img_id})"
        seen.add(img_id)  # A bad row counts once, under its own reason, not as missing.
        fields = parse_row(row, feature_dim, where, tally)
        if fields is None:
          continue
        yield img_id, {"image_id": image_ids[img_id], "image_name": img_id, "source": where,
                       "captions": np.array(captions[img_id][0], dtype=object), **fields}
  for img_id in sorted(i for i in set(captions) - seen if captions[i][0]):
    tally.bad(captions[img_id][1], "missing_features",
              f"img_id {img_id} has captions but no row in the *.tsv files of {source_dir}")


class LxmertRegions(captioned_builder.CaptionedBuilder, skip_registration=True):
  """Region features + captions in LXMERT's layout; see the module docstring."""

  def _info(self) -> tfds.core.DatasetInfo:
    (feature_dim,) = self.builder_config.options
    floats = tfds.features.Tensor(shape=(None,), dtype=np.float32)
    ints = tfds.features.Tensor(shape=(None,), dtype=np.int32)
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__,
        features=tfds.features.FeaturesDict({
            "image_id": tfds.features.Scalar(dtype=np.int64),
            "image_name": tfds.features.Text(),
            "source": tfds.features.Text(),
            "img_h": tfds.features.Scalar(dtype=np.int32),
            "img_w": tfds.features.Scalar(dtype=np.int32),
            "boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
            "features": tfds.features.Tensor(shape=(None, feature_dim),
                                             dtype=STORED_FEATURE_DTYPE),
            "objects_id": ints, "objects_conf": floats, "attrs_id": ints, "attrs_conf": floats,
            "captions": tfds.features.Tensor(shape=(None,), dtype=np.object_),
        }),
        metadata=tfds.core.MetadataDict(
            feature_dim=feature_dim, feature_dtype=np.dtype(STORED_FEATURE_DTYPE).name,
            source_feature_dtype="float32", boxes="x1 y1 x2 y2 / (img_w img_h img_w img_h)"))

  def _split_generators(self, dl_manager):
    del dl_manager
    (feature_dim,) = self.builder_config.options
    splits = read_captions(self.source_dir, self.tally)
    if not glob.glob(os.path.join(self.source_dir, "*.tsv")):
      raise errors.NotFound(f"no feature *.tsv in {self.source_dir}")
    names = sorted({img_id for split in splits.values() for img_id in split})
    image_ids = {img_id: i for i, img_id in enumerate(names)}
    return {split: generate_region_records(self.source_dir, captions, image_ids, feature_dim,
                                           self.tally)
            for split, captions in splits.items()}

  def _generate_examples(self, *args):  # Generators come from _split_generators.
    raise NotImplementedError


def builder(data_cfg) -> LxmertRegions:
  return captioned_builder.make_builder(LxmertRegions, data_cfg, (data_cfg.feature_dim,))
