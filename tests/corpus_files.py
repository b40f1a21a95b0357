"""Writes small real-format corpora: image folders with JSONL/CSV, COCO's layout, LXMERT TSVs.

Every image is one flat colour (PNG exact, JPEG within a few levels), so a test can check
decoded pixels without a reference decoder. Also used by bench/input_pipeline.py.
"""

from __future__ import annotations

import base64
import csv
import json
import os

import numpy as np
from PIL import Image

from mmelectra.data import lxmert_regions


def colour(i: int) -> tuple[int, int, int]:
  return (40 + 37 * i % 200, 200 - 23 * i % 150, 60 + 53 * i % 180)


def write_image(path: str, rgb, size=(40, 30), fmt=None, noise_seed=None) -> None:
  """A flat-colour image (or, with noise_seed, random texture) in PNG/JPEG by extension."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  width, height = size
  pixels = np.empty((height, width, 3), np.uint8)
  pixels[:] = rgb
  if noise_seed is not None:
    pixels = np.random.default_rng(noise_seed).integers(0, 256, (height, width, 3), np.uint8)
  Image.fromarray(pixels).save(path, format=fmt)


def write_image_folder(root: str, num_images: int, captions_per_image: int = 2,
                       fmt: str = "jsonl", splits=None, size=(40, 30), noise=False) -> list[dict]:
  """images/img_<i>.(png|jpg) + captions.(jsonl|csv); returns the rows written.

  Odd images are JPEG, even ones PNG. `splits`: one split name per image (None: no column).
  """
  rows = []
  for i in range(num_images):
    name = f"images/img_{i:03d}.{'jpg' if i % 2 else 'png'}"
    write_image(os.path.join(root, name), colour(i), size=size,
                noise_seed=i if noise else None)
    captions = [f"picture {i} caption {j} of a thing" for j in range(captions_per_image)]
    row = {"image": name, "captions": captions}
    if splits is not None:
      row["split"] = splits[i]
    rows.append(row)
  write_annotations(root, rows, fmt)
  return rows


def write_annotations(root: str, rows: list[dict], fmt: str = "jsonl") -> str:
  """captions.jsonl (one line per image, `captions` lists) or captions.csv (one per caption)."""
  path = os.path.join(root, f"captions.{fmt}")
  with open(path, "w", encoding="utf-8", newline="") as f:
    if fmt == "jsonl":
      for row in rows:
        f.write(json.dumps(row) + "\n")
    else:
      columns = ["image", "caption"] + (["split"] if any("split" in r for r in rows) else [])
      writer = csv.DictWriter(f, columns)
      writer.writeheader()
      for row in rows:
        for caption in row["captions"]:
          writer.writerow({"image": row["image"], "caption": caption,
                           **({"split": row["split"]} if "split" in row else {})})
  return path


def write_coco(root: str, year: int = 2014, num_train: int = 4, num_val: int = 3,
               karpathy: bool = False) -> dict:
  """COCO's layout: annotations/captions_{train,val}<year>.json and the JPEGs.

  Returns {coco_id: (part, captions)}. With `karpathy`, dataset_coco.json puts val images
  alternately in Karpathy's val and test, and the first train image in restval.
  """
  images = {}
  for part, count, first_id in (("train", num_train, 9), ("val", num_val, 42)):
    entries, annotations = [], []
    for i in range(count):
      coco_id = first_id + 7 * i
      file_name = (f"COCO_{part}{year}_{coco_id:012d}.jpg" if year == 2014 else f"{coco_id:012d}.jpg")
      write_image(os.path.join(root, f"{part}{year}", file_name), colour(coco_id))
      entries.append({"id": coco_id, "file_name": file_name, "width": 40, "height": 30})
      captions = [f"a {part} photo number {coco_id}", f"another view of item {coco_id}"]
      for j, caption in enumerate(captions):
        annotations.append({"id": 1000 * coco_id + j, "image_id": coco_id, "caption": caption})
      images[coco_id] = (part, captions)
    path = os.path.join(root, "annotations", f"captions_{part}{year}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      json.dump({"info": {}, "images": entries, "annotations": annotations}, f)
  if karpathy:
    out = []
    val_ids = sorted(i for i, (p, _) in images.items() if p == "val")
    for coco_id, (part, captions) in sorted(images.items()):
      if part == "train":
        split = "restval" if coco_id == 9 else "train"
      else:
        split = "val" if val_ids.index(coco_id) % 2 == 0 else "test"
      out.append({"cocoid": coco_id, "filepath": f"{part}{year}", "split": split,
                  "filename": f"COCO_{part}{year}_{coco_id:012d}.jpg",
                  "sentences": [{"raw": c} for c in captions]})
    with open(os.path.join(root, "dataset_coco.json"), "w") as f:
      json.dump({"images": out, "dataset": "coco"}, f)
  return images


def b64(array) -> str:
  return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def region_row(img_id: str, num_boxes: int, feature_dim: int, seed: int,
               img_w: int = 640, img_h: int = 480) -> dict:
  """One TSV row in LXMERT's layout with pixel boxes inside the image."""
  rng = np.random.default_rng(seed)
  x1 = rng.uniform(0, img_w / 2, num_boxes)
  y1 = rng.uniform(0, img_h / 2, num_boxes)
  boxes = np.stack([x1, y1, x1 + rng.uniform(1, img_w / 2, num_boxes),
                    y1 + rng.uniform(1, img_h / 2, num_boxes)], 1).astype(np.float32)
  return {
      "img_id": img_id, "img_h": img_h, "img_w": img_w,
      "objects_id": b64(rng.integers(0, 1600, num_boxes).astype(np.int64)),
      "objects_conf": b64(rng.random(num_boxes).astype(np.float32)),
      "attrs_id": b64(rng.integers(0, 400, num_boxes).astype(np.int64)),
      "attrs_conf": b64(rng.random(num_boxes).astype(np.float32)),
      "num_boxes": num_boxes, "boxes": b64(boxes),
      "features": b64(rng.gamma(1.0, 1.0, (num_boxes, feature_dim)).astype(np.float32)),
  }


def decode_row(row: dict, feature_dim: int) -> dict:
  """What a reader of the row should get (float32, pixel boxes)."""
  n = int(row["num_boxes"])
  arr = lambda key, dtype: np.frombuffer(base64.b64decode(row[key]), dtype)  # noqa: E731
  return {"boxes": arr("boxes", np.float32).reshape(n, 4),
          "features": arr("features", np.float32).reshape(n, feature_dim),
          "objects_id": arr("objects_id", np.int64)}


def write_tsv(path: str, rows: list[dict]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, lxmert_regions.FIELDNAMES, delimiter="\t")
    for row in rows:
      writer.writerow(row)


def write_lxmert(root: str, num_train: int = 5, num_val: int = 3, num_boxes: int = 6,
                 feature_dim: int = 16) -> dict:
  """train2014_obj36.tsv + val2014_obj36.tsv, mscoco_train.json + mscoco_minival.json.

  Returns {img_id: (split, row, captions)}.
  """
  out = {}
  for part, split, count, json_name in (("train", "train", num_train, "mscoco_train.json"),
                                        ("val", "validation", num_val, "mscoco_minival.json")):
    rows, entries = [], []
    for i in range(count):
      img_id = f"COCO_{part}2014_{i:012d}"
      row = region_row(img_id, num_boxes - i % 2, feature_dim, seed=i + (0 if part == "train" else 100))
      rows.append(row)
      sentf = {"mscoco": [f"{part} scene {i} with things"], "vg": [f"region text {i}"]}
      entries.append({"img_id": img_id, "labelf": {}, "sentf": sentf})
      out[img_id] = (split, row, sentf["mscoco"] + sentf["vg"])
    write_tsv(os.path.join(root, f"{part}2014_obj36.tsv"), rows)
    with open(os.path.join(root, json_name), "w") as f:
      json.dump(entries, f)
  return out
