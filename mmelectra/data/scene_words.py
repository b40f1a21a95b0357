"""The words of the synthetic scenes: what the captions (`synthetic_scenes`) and the VQA
questions (`synthetic_vqa`) both say about an object and about a pair of objects."""

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")


def relation(box_a, box_b) -> str:
  """Where box a is relative to box b, along the axis of larger centre offset: "left",
  "right", "above" or "below" (boxes as (x1, y1, x2, y2), y down)."""
  dx = (box_a[0] + box_a[2]) - (box_b[0] + box_b[2])
  dy = (box_a[1] + box_a[3]) - (box_b[1] + box_b[3])
  if abs(dx) >= abs(dy):
    return "left" if dx < 0 else "right"
  return "above" if dy < 0 else "below"
