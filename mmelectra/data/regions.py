"""Images to the model's region interface: features [K, Dv], boxes [K, 4], mask [K], labels [K].

Two detector-free ways to get regions (docs/method.md §2):
  - patches: every P x P grid cell is a region, its raw pixels the feature;
  - crops: every annotated object box is a region, its pixels resized to C x C the feature,
    its class the label (for masked object classification).
Boxes are corners (x1, y1, x2, y2) normalised by image width/height, as in LXMERT.
Labels are -1 where a region has no class (all patches, padding).
A third kind, precomputed detector features (LXMERT TSV, `features` mode), only pads.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from mmelectra import errors
from mmelectra.data.bad_records import BadRecordError


# Pixels are centred and scaled to about unit range. Uncentred values (pixel / 255, all
# near the light background's ~0.85) make fc(feat) of every region point the same way,
# so LayerNorm maps different regions to nearly the same embedding and the encoder
# struggles to tell them apart.
PIXEL_MEAN = 0.5
PIXEL_STD = 0.25


def normalise_pixels(pixels: np.ndarray) -> np.ndarray:
  """uint8 pixels -> float32 `(pixel / 255 - PIXEL_MEAN) / PIXEL_STD`."""
  return ((pixels.astype(np.float32) / 255 - PIXEL_MEAN) / PIXEL_STD).astype(np.float32)


def denormalise_pixels(feats: np.ndarray) -> np.ndarray:
  """Inverse of `normalise_pixels`, back to uint8."""
  return np.clip(np.rint((feats * PIXEL_STD + PIXEL_MEAN) * 255), 0, 255).astype(np.uint8)


class Regions(NamedTuple):
  feats: np.ndarray   # float32 [K, Dv], normalised pixels (see `normalise_pixels`)
  boxes: np.ndarray   # float32 [K, 4], (x1, y1, x2, y2) in [0, 1]
  mask: np.ndarray    # bool [K], True for real regions
  labels: np.ndarray  # int32 [K], -1 where none


def _check_image(image: np.ndarray) -> None:
  if image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"image must be [H, W, 3], got shape {image.shape}")
  if image.dtype != np.uint8:
    raise ValueError(f"image must be uint8, got {image.dtype}")


def image_to_patches(image: np.ndarray, patch_size: int) -> Regions:
  """Row-major grid of P x P patches; feature = the patch's [P, P, 3] pixels flattened."""
  _check_image(image)
  height, width, _ = image.shape
  if height % patch_size or width % patch_size:
    raise ValueError(f"image size {height}x{width} is not divisible by patch_size {patch_size}")
  rows, cols = height // patch_size, width // patch_size
  patches = image.reshape(rows, patch_size, cols, patch_size, 3).transpose(0, 2, 1, 3, 4)
  feats = normalise_pixels(patches.reshape(rows * cols, patch_size * patch_size * 3))
  r, c = np.divmod(np.arange(rows * cols), cols)
  boxes = np.stack([c / cols, r / rows, (c + 1) / cols, (r + 1) / rows], axis=-1)
  return Regions(feats=feats, boxes=boxes.astype(np.float32),
                 mask=np.ones(rows * cols, bool), labels=np.full(rows * cols, -1, np.int32))


def _nearest_indices(start: int, stop: int, count: int) -> np.ndarray:
  """`count` pixel indices sampling [start, stop) at cell centres (nearest neighbour)."""
  return start + ((np.arange(count) + 0.5) * (stop - start) / count).astype(np.int64)


def crop_pixel_bounds(box: np.ndarray, height: int, width: int) -> tuple[int, int, int, int]:
  """Pixel rows/cols [y1, y2) x [x1, x2) covered by a normalised box, at least 1 px each."""
  x1 = min(int(np.floor(box[0] * width)), width - 1)
  y1 = min(int(np.floor(box[1] * height)), height - 1)
  x2 = max(int(np.ceil(box[2] * width)), x1 + 1)
  y2 = max(int(np.ceil(box[3] * height)), y1 + 1)
  return y1, min(y2, height), x1, min(x2, width)


def object_crops(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, crop_size: int,
                 max_regions: int) -> Regions:
  """One region per box: crop, nearest-neighbour resize to C x C, pad to K regions."""
  _check_image(image)
  boxes = np.asarray(boxes, np.float32)
  labels = np.asarray(labels)
  if boxes.ndim != 2 or boxes.shape[1] != 4:
    raise ValueError(f"boxes must be [N, 4], got shape {boxes.shape}")
  num = boxes.shape[0]
  if labels.shape != (num,):
    raise ValueError(f"labels must be [N] = [{num}] like boxes, got shape {labels.shape}")
  if num > max_regions:
    raise ValueError(f"{num} boxes do not fit in max_regions={max_regions}")
  if not np.all(np.isfinite(boxes)) or np.any(boxes < 0) or np.any(boxes > 1):
    raise ValueError(f"boxes must be finite corners in [0, 1], got {boxes.tolist()}")
  if np.any(boxes[:, 2] < boxes[:, 0]) or np.any(boxes[:, 3] < boxes[:, 1]):
    raise ValueError(f"boxes must be (x1, y1, x2, y2) with x1 <= x2, y1 <= y2, got "
                     f"{boxes.tolist()}")
  height, width, _ = image.shape
  feats = np.zeros((max_regions, crop_size * crop_size * 3), np.float32)
  for i, box in enumerate(boxes):
    y1, y2, x1, x2 = crop_pixel_bounds(box, height, width)
    ys = _nearest_indices(y1, y2, crop_size)
    xs = _nearest_indices(x1, x2, crop_size)
    feats[i] = normalise_pixels(image[ys[:, None], xs[None, :]].reshape(-1))
  out_boxes = np.zeros((max_regions, 4), np.float32)
  out_boxes[:num] = boxes
  out_labels = np.full(max_regions, -1, np.int32)
  out_labels[:num] = labels
  return Regions(feats=feats, boxes=out_boxes, mask=np.arange(max_regions) < num,
                 labels=out_labels)


def precomputed_regions(features: np.ndarray, boxes: np.ndarray, labels: np.ndarray,
                        feature_dim: int, max_regions: int) -> Regions:
  """Detector regions (LXMERT TSV): features [n, Dv] (any float dtype), normalised boxes
  [n, 4], class ids [n] -> float32 regions padded to K = max_regions.

  Raises BadRecordError for the bad-record kinds a run's config decides (wrong width,
  too many boxes) and for non-finite values, so the pipeline can count them by reason.
  """
  features, boxes, labels = np.asarray(features), np.asarray(boxes), np.asarray(labels)
  if features.ndim != 2 or features.shape[1] != feature_dim:
    raise BadRecordError(f"features have shape {features.shape}, expected [n, {feature_dim}] "
                         "(config.data.feature_dim)", "wrong_feature_dim")
  num = features.shape[0]
  if num > max_regions:
    raise BadRecordError(f"{num} boxes exceed config.data.max_regions={max_regions}",
                         "too_many_boxes")
  if boxes.shape != (num, 4) or labels.shape != (num,):
    raise ValueError(f"boxes {boxes.shape} and labels {labels.shape} do not match {num} regions")
  feats = features.astype(np.float32)
  if not (np.isfinite(feats).all() and np.isfinite(boxes).all()):
    raise BadRecordError("features or boxes hold NaN or inf", "non_finite_features")
  out = Regions(feats=np.zeros((max_regions, feature_dim), np.float32),
                boxes=np.zeros((max_regions, 4), np.float32),
                mask=np.arange(max_regions) < num, labels=np.full(max_regions, -1, np.int32))
  out.feats[:num], out.boxes[:num], out.labels[:num] = feats, boxes, labels
  return out


def num_regions(data_cfg) -> int:
  """K: regions per image for `data_cfg.regions` ("patches" or "crops")."""
  if data_cfg.regions == "patches":
    if data_cfg.image_size % data_cfg.patch_size:
      raise errors.InvalidInput(f"image_size {data_cfg.image_size} is not divisible by patch_size "
                                f"{data_cfg.patch_size}")
    return (data_cfg.image_size // data_cfg.patch_size) ** 2
  if data_cfg.regions in ("crops", "features"):
    return data_cfg.max_regions
  raise errors.InvalidInput(f"data_cfg.regions is {data_cfg.regions!r}, expected 'patches', 'crops' "
                            "or 'features'")


def feature_dim(data_cfg) -> int:
  """Dv: feature size per region for `data_cfg.regions`."""
  if data_cfg.regions == "patches":
    return data_cfg.patch_size * data_cfg.patch_size * 3
  if data_cfg.regions == "crops":
    return data_cfg.crop_size * data_cfg.crop_size * 3
  if data_cfg.regions == "features":
    return data_cfg.feature_dim
  raise errors.InvalidInput(f"data_cfg.regions is {data_cfg.regions!r}, expected 'patches', 'crops' "
                            "or 'features'")
