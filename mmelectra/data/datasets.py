"""`config.data.name` -> its TFDS builder: one place that knows every data set.

  synthetic_scenes   built-in generated scenes (image arrays + object boxes)
  image_text_folder  the user's own images + JSONL/CSV captions
  coco_captions      COCO 2014/2017 captions (Karpathy split if present)
  lxmert_regions     LXMERT/bottom-up-attention region features + LXMERT caption JSON
"""

from __future__ import annotations

from mmelectra import errors
from mmelectra.data import captioned_builder
from mmelectra.data import coco_captions
from mmelectra.data import image_text_folder
from mmelectra.data import lxmert_regions
from mmelectra.data import synthetic_scenes

_CAPTIONED = {
    image_text_folder.NAME: image_text_folder.builder,
    coco_captions.NAME: coco_captions.builder,
    lxmert_regions.NAME: lxmert_regions.builder,
}
NAMES = ("synthetic_scenes",) + tuple(_CAPTIONED)
# Which region modes each data set can feed (regions.py): images give patches, the
# synthetic scenes also object crops, LXMERT files only their precomputed features.
REGION_MODES = {
    "synthetic_scenes": ("patches", "crops"),
    image_text_folder.NAME: ("patches",),
    coco_captions.NAME: ("patches",),
    lxmert_regions.NAME: ("features",),
}

# Object classes of `region_labels` (for moc=classify): the scenes' shape x colour, and
# the 1600 Visual Genome object classes of LXMERT's detector. Image corpora have no labels.
_NUM_OBJECT_CLASSES = {lxmert_regions.NAME: 1600}


def num_object_classes(data_cfg) -> int:
  return _NUM_OBJECT_CLASSES.get(data_cfg.name, synthetic_scenes.NUM_CLASSES)


def check(data_cfg) -> None:
  if data_cfg.name not in NAMES:
    raise errors.InvalidInput(f"config.data.name is {data_cfg.name!r}; expected one of {NAMES}")
  if data_cfg.regions not in REGION_MODES[data_cfg.name]:
    raise errors.InvalidInput(f"config.data.regions={data_cfg.regions!r} does not work with "
                              f"config.data.name={data_cfg.name!r}; use one of "
                              f"{REGION_MODES[data_cfg.name]}")


def builder(data_cfg):
  """The TFDS builder for `data_cfg` (does not build anything)."""
  check(data_cfg)
  if data_cfg.name == "synthetic_scenes":
    return synthetic_scenes.builder(data_cfg)
  return _CAPTIONED[data_cfg.name](data_cfg)


def prepare(data_cfg):
  """Builds the data set (and its tokenizer, unless the run brings one) if missing."""
  check(data_cfg)
  if data_cfg.name == "synthetic_scenes":
    return synthetic_scenes.prepare(data_cfg)
  return captioned_builder.prepare(_CAPTIONED[data_cfg.name], data_cfg)
