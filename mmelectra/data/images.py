"""Encoded image bytes -> uint8 RGB arrays with PIL (no TensorFlow), and a cheap check.

Every mode PIL opens becomes 8-bit RGB with its full range kept (`to_rgb8`): 16-bit and
32-bit integer images are scaled from 0..65535 (PIL's own conversion clips them to white),
float images from 0..1, LAB goes through a colour-managed transform; an image whose range
cannot be known (floats beyond [0, 1], integers beyond 16 bits) is unreadable, a bad record.

Builders store images as the bytes of their files (JPEG/PNG/...), as compact as the
source; grain workers decode them. Every image is resized to a square `size x size`
(aspect not kept), as image-patch regions need a fixed grid; boxes are normalised by width
and height anyway.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from PIL import ImageCms

from mmelectra import errors

# PIL's own guard against decompression bombs stays on; a corrupt header claiming a huge
# size is an unreadable image, not an out-of-memory crash.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError)


class UnreadableImageError(errors.InvalidInput):
  """Bytes that PIL cannot decode into an image."""


def _open(data: bytes) -> Image.Image:
  try:
    return Image.open(io.BytesIO(data))
  except _DECODE_ERRORS as e:
    raise UnreadableImageError(f"cannot decode image bytes ({len(data)} bytes): {e}") from e


def check_image_bytes(data: bytes) -> tuple[int, int]:
  """(width, height) if `data` decodes completely; UnreadableImageError otherwise.

  Decodes at reduced scale where the format allows (JPEG draft mode), which still reads
  every byte, so a truncated file fails here and not in a training worker.
  """
  image = _open(data)
  try:
    size = image.size
    image.draft("RGB", (64, 64))
    image.load()
    to_rgb8(image)  # a mode whose range is unknown is as unreadable as broken bytes
  except _DECODE_ERRORS as e:
    raise UnreadableImageError(f"cannot decode image bytes ({len(data)} bytes): {e}") from e
  return size


def to_rgb8(image: Image.Image) -> Image.Image:
  """`image` as 8-bit RGB over its full range; UnreadableImageError where the range of its
  mode cannot be known."""
  mode = image.mode
  if mode == "RGB":
    return image
  if mode in ("I", "F") or mode.startswith("I;16"):
    pixels = np.asarray(image, np.float64)
    if pixels.size and not np.isfinite(pixels).all():
      raise UnreadableImageError(f"{mode} image with non-finite pixels")
    low, high = (pixels.min(), pixels.max()) if pixels.size else (0.0, 0.0)
    if mode == "F":
      if low < 0 or high > 1:
        raise UnreadableImageError(f"float image with values in [{low:g}, {high:g}]; only [0, 1] "
                                   "has a known range")
      scaled = pixels * 255.0
    else:
      if low < 0 or high > 65535:
        raise UnreadableImageError(f"{mode} image with values in [{low:g}, {high:g}], beyond 16 bits")
      scaled = pixels / 257.0  # 65535 -> 255
    grey = np.clip(np.round(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, "L").convert("RGB")
  if mode == "LAB":
    transform = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"),
                                        "LAB", "RGB")
    return ImageCms.applyTransform(image, transform)
  if mode in ("La", "RGBa"):  # premultiplied alpha: PIL converts only its plain form
    image = image.convert(mode.upper())
  return image.convert("RGB")


def decode_resized(data: bytes, size: int) -> np.ndarray:
  """uint8 [size, size, 3] RGB from encoded bytes (bilinear resize, any source mode)."""
  image = _open(data)
  try:
    # JPEG: let the decoder downscale by up to 8x first (much faster than decode + resize).
    image.draft("RGB", (size, size))
    image = to_rgb8(image)
    if image.size != (size, size):
      image = image.resize((size, size), Image.BILINEAR)
    return np.asarray(image, np.uint8)
  except _DECODE_ERRORS as e:
    raise UnreadableImageError(f"cannot decode image bytes ({len(data)} bytes): {e}") from e
