"""TFDS builder for COCO captions from the official files in TFDS's manual directory.

Input layout (`config.data.manual_dir`, default `<data_dir>/downloads/manual`), as the
COCO site ships it (2014 or 2017):

    manual/
      annotations/captions_train2014.json   {"images": [{id, file_name, ...}],
      annotations/captions_val2014.json      "annotations": [{image_id, caption, ...}]}
      train2014/COCO_train2014_000000000009.jpg ...
      val2014/COCO_val2014_000000000042.jpg ...
      dataset_coco.json                     optional: Karpathy's split (2014 only)

  (2017: captions_train2017.json, captions_val2017.json, train2017/, val2017/.)

Splits: train and validation from the official files; with Karpathy's `dataset_coco.json`
(in manual/ or manual/annotations/) train = Karpathy train + restval, validation = val,
test = test, captions from the official files. The year is 2014 when Karpathy's file is
there, else 2017 if its caption files are there, else 2014.

One record per image, as in image_text_folder: image_id (the COCO id), image_file
(path under manual/), image (JPEG bytes), captions (all of the image's captions).
"""

from __future__ import annotations

import json
import os

import tensorflow_datasets as tfds

from mmelectra import errors
from mmelectra.data import captioned_builder
from mmelectra.data import image_text_folder

NAME = "coco_captions"
KARPATHY_FILE = "dataset_coco.json"
_KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "validation", "test": "test"}


def _captions_file(source_dir: str, part: str, year: int) -> str:
  return os.path.join(source_dir, "annotations", f"captions_{part}{year}.json")


def find_karpathy(source_dir: str) -> str | None:
  for path in (os.path.join(source_dir, KARPATHY_FILE),
               os.path.join(source_dir, "annotations", KARPATHY_FILE)):
    if os.path.isfile(path):
      return path
  return None


def detect_year(source_dir: str) -> int:
  if find_karpathy(source_dir) is None and os.path.isfile(_captions_file(source_dir, "train", 2017)):
    return 2017
  return 2014


def read_official(source_dir: str, part: str, year: int, tally) -> dict[int, tuple]:
  """COCO id -> (image_file, captions, where) from one official captions file."""
  path = _captions_file(source_dir, part, year)
  if not os.path.isfile(path):
    raise errors.NotFound(f"{path} not found; see the coco_captions layout in the README")
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  images = {}
  for entry in data["images"]:
    image_file = os.path.join(f"{part}{year}", entry["file_name"])
    images[int(entry["id"])] = (image_file, [], f"{path} image id {entry['id']} ({image_file})")
  for ann in data["annotations"]:
    image_id = int(ann["image_id"])
    if image_id not in images:
      tally.bad(f"{path} annotation id {ann.get('id')}", "malformed_record",
                f"caption for image id {image_id}, which the file does not list")
      continue
    images[image_id][1].append(ann.get("caption") or "")
  return images


def coco_splits(source_dir: str, tally) -> dict[str, list]:
  """split -> [(image_id, image_file, captions, where)] in id order."""
  year = detect_year(source_dir)
  official = {}
  for part in ("train", "val"):
    official.update(read_official(source_dir, part, year, tally))
  karpathy = find_karpathy(source_dir) if year == 2014 else None
  if karpathy is None:
    assignment = {image_id: ("train" if file.startswith("train") else "validation")
                  for image_id, (file, _, _) in official.items()}
  else:
    with open(karpathy, encoding="utf-8") as f:
      assignment = {int(e["cocoid"]): _KARPATHY_SPLITS[e["split"]] for e in json.load(f)["images"]}
  splits = {}
  for image_id in sorted(official):
    if image_id not in assignment:
      continue  # Karpathy's split leaves no COCO 2014 image out, but tolerate subsets.
    image_file, captions, where = official[image_id]
    splits.setdefault(assignment[image_id], []).append((image_id, image_file, captions, where))
  missing = sorted(set(assignment) - set(official))
  if missing:
    tally.bad(f"{karpathy}", "missing_image_file",
              f"{len(missing)} Karpathy images are in no official captions file, e.g. {missing[:3]}")
  return splits


class CocoCaptions(captioned_builder.CaptionedBuilder, skip_registration=True):
  """COCO captions; see the module docstring for the layout."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__,
        features=tfds.features.FeaturesDict(image_text_folder.image_features()),
        homepage="https://cocodataset.org")

  def _split_generators(self, dl_manager):
    del dl_manager
    splits = coco_splits(self.source_dir, self.tally)
    return {split: image_text_folder.generate_image_records(self.source_dir, entries, self.tally)
            for split, entries in splits.items()}

  def _generate_examples(self, *args):  # Generators come from _split_generators.
    raise NotImplementedError


def builder(data_cfg) -> CocoCaptions:
  source_dir = captioned_builder.manual_dir(data_cfg)
  return captioned_builder.make_builder(
      CocoCaptions, data_cfg, (detect_year(source_dir), find_karpathy(source_dir) is not None))
