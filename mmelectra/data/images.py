"""Encoded image bytes -> uint8 RGB arrays with PIL (no TensorFlow), and a cheap check.

Builders store images as the bytes of their files (JPEG/PNG/...), as compact as the
source; grain workers decode them. Every image is resized to a square `size x size`
(aspect not kept), as image-patch regions need a fixed grid; boxes are normalised by width
and height anyway.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# PIL's own guard against decompression bombs stays on; a corrupt header claiming a huge
# size is an unreadable image, not an out-of-memory crash.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError)


class UnreadableImageError(ValueError):
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
  except _DECODE_ERRORS as e:
    raise UnreadableImageError(f"cannot decode image bytes ({len(data)} bytes): {e}") from e
  return size


def decode_resized(data: bytes, size: int) -> np.ndarray:
  """uint8 [size, size, 3] RGB from encoded bytes (bilinear resize, any source mode)."""
  image = _open(data)
  try:
    # JPEG: let the decoder downscale by up to 8x first (much faster than decode + resize).
    image.draft("RGB", (size, size))
    image = image.convert("RGB")
    if image.size != (size, size):
      image = image.resize((size, size), Image.BILINEAR)
    return np.asarray(image, np.uint8)
  except _DECODE_ERRORS as e:
    raise UnreadableImageError(f"cannot decode image bytes ({len(data)} bytes): {e}") from e
