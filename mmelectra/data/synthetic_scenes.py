"""TFDS builder for synthetic captioned scenes: coloured shapes on a light background.

Every scene is generated from `(seed, image_id)` alone, so the data set needs no download
and rebuilds bit for bit. Captions name each object with its size, colour and shape and
state spatial relations between objects, so predicting a masked caption word needs the
image (several shapes and colours are always plausible from the words alone), and
predicting a masked region needs the caption.

The WordPiece tokenizer lives beside the data (`tokenizer.json`, `vocab.txt` in
`builder.data_dir`), trained on the train captions and on the questions and answers of the
VQA derivative (`synthetic_vqa`) of the train scenes, so data and vocabulary travel
together and a model fine-tuned on those questions reads them as words it was pretrained
on. At the default size (160) every caption and question word is one token.
"""

from __future__ import annotations

import dataclasses
import os

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from mmelectra import errors
from mmelectra.data import scene_words
from mmelectra.data import synthetic_vqa
from mmelectra.data import tokenizer as tokenizer_lib

SHAPES, COLOURS, SIZES = scene_words.SHAPES, scene_words.COLOURS, scene_words.SIZES
NUM_CLASSES = len(SHAPES) * len(COLOURS)  # label = shape_id * len(COLOURS) + colour_id
MAX_OBJECTS = 4

# Every colour has one channel <= 50 and the background has every channel >= ~180, so an
# object pixel can never be mistaken for background (tests rely on exact colour matches).
COLOUR_RGB = np.array([
    (220, 40, 40),    # red
    (40, 170, 60),    # green
    (40, 80, 220),    # blue
    (235, 205, 30),   # yellow
    (140, 50, 180),   # purple
    (245, 135, 25),   # orange
], np.uint8)

# Object side as a fraction of the image side; small and large differ by ~2x so size is
# visible even at 32 px.
_SIDE_FRACTION = {"small": 0.16, "large": 0.30}
# Free pixels kept between objects, so boxes never touch and each box is recoverable from
# the drawn pixels.
_GAP = 2
_MAX_PLACEMENT_TRIES = 200
# Captions stay within 30 words and full stops, so "[CLS] caption [SEP]" fits 32 tokens
# when the vocabulary holds every caption word whole (it does at the default size, 160, and
# at 128).
MAX_CAPTION_LENGTH = 30

# The last intro is empty, so the longest scene always has a template that fits.
_INTRO_TEMPLATES = ("there is {}.", "an image with {}.", "{}.")
_RELATION_TEMPLATES = ("{a} is {rel} {b}.", "{a} lies {rel} {b}.")


def object_side(size_id: int, image_size: int) -> int:
  """Side length in pixels of a small (0) or large (1) object."""
  small = max(3, round(_SIDE_FRACTION["small"] * image_size))
  if size_id == 0:
    return small
  return max(small + 2, round(_SIDE_FRACTION["large"] * image_size))


def shape_mask(shape_id: int, side: int) -> np.ndarray:
  """Bool [side, side] mask of a shape that touches all four edges of its box."""
  yy, xx = np.mgrid[0:side, 0:side]
  centre = side / 2
  name = SHAPES[shape_id]
  if name == "square":
    return np.ones((side, side), bool)
  if name == "circle":
    # Pixel centres within radius side/2: reaches every edge for any side >= 1.
    return (xx + 0.5 - centre) ** 2 + (yy + 0.5 - centre) ** 2 <= centre ** 2
  if name == "triangle":
    # Apex up; half-width measured at each row's lower edge so the top row is not empty.
    return np.abs(xx + 0.5 - centre) <= (yy + 1) / 2 + 1e-9
  if name == "cross":
    bar = max(1, round(side / 3))
    lo = (side - bar) // 2
    in_bar_rows = (yy >= lo) & (yy < lo + bar)
    in_bar_cols = (xx >= lo) & (xx < lo + bar)
    return in_bar_rows | in_bar_cols
  raise ValueError(f"unknown shape id {shape_id}")


def _place_objects(rng: np.random.Generator, sides: list[int], image_size: int):
  """Top-left corners for non-overlapping squares, by rejection sampling.

  Returns fewer corners than sides when a square does not fit after many tries; the caller
  keeps only the placed objects, so image, boxes and caption still agree.
  """
  placed = []  # (x1, y1, x2, y2) in pixels, exclusive ends
  for side in sides:
    for _ in range(_MAX_PLACEMENT_TRIES):
      x1, y1 = rng.integers(0, image_size - side + 1, size=2)
      box = (int(x1), int(y1), int(x1) + side, int(y1) + side)
      if all(box[0] >= b[2] + _GAP or box[2] + _GAP <= b[0] or
             box[1] >= b[3] + _GAP or box[3] + _GAP <= b[1] for b in placed):
        placed.append(box)
        break
    else:
      break
  return placed


def _relation(box_a, box_b) -> str:
  """Where object a is relative to object b, as a caption says it ("left of", "above")."""
  where = scene_words.relation(box_a, box_b)
  return f"{where} of" if where in ("left", "right") else where


def caption_length(caption: str) -> int:
  """Words plus full stops: the token count when every word is one WordPiece token."""
  return len(caption.replace(".", " . ").split())


def object_reference(i: int, shapes, colours) -> str:
  """The shortest unambiguous name of object i: "the circle", "the red one" or "the red circle".

  The relation does not repeat what the listing already said where it need not: a
  masked colour or shape word then has to be read off the image, not off the caption's
  other mention of the same object. Otherwise MLM and RTD are solvable from the text
  alone and nothing teaches the fusion layers to bind words to regions (which is what
  ITM needs).
  """
  if list(shapes).count(shapes[i]) == 1:
    return f"the {SHAPES[shapes[i]]}"
  if list(colours).count(colours[i]) == 1:
    return f"the {COLOURS[colours[i]]} one"
  return f"the {COLOURS[colours[i]]} {SHAPES[shapes[i]]}"


def make_caption(rng: np.random.Generator, shapes, colours, sizes, pixel_boxes) -> str:
  """Names every object ("a large red circle") and relates one pair of them (if N >= 2).

  An intro ("there is ...") is added only where the caption stays within
  MAX_CAPTION_LENGTH, so four objects plus a relation still fit without truncation.
  """
  phrases = [f"a {SIZES[s]} {COLOURS[c]} {SHAPES[h]}" for h, c, s in zip(shapes, colours, sizes)]
  listing = " and ".join(phrases)
  relation = ""
  n = len(shapes)
  if n >= 2:
    a, b = rng.choice(n, size=2, replace=False)
    template = _RELATION_TEMPLATES[rng.integers(len(_RELATION_TEMPLATES))]
    relation = " " + template.format(
        a=object_reference(a, shapes, colours),
        rel=_relation(pixel_boxes[a], pixel_boxes[b]),
        b=object_reference(b, shapes, colours))
  fitting = [t for t in _INTRO_TEMPLATES
             if caption_length(t.format(listing) + relation) <= MAX_CAPTION_LENGTH]
  return fitting[rng.integers(len(fitting))].format(listing) + relation


def generate_scene(rng: np.random.Generator, image_size: int) -> dict:
  """One scene: image uint8 [S,S,3], caption str, objects {boxes, label, shape, colour, size}.

  Boxes are corners (x1, y1, x2, y2) / image_size with exclusive ends, so
  `boxes * S` are the exact pixel bounds of the drawn object.
  """
  num_objects = int(rng.integers(1, MAX_OBJECTS + 1))
  # Distinct (shape, colour) pairs keep the captions' references unambiguous.
  classes = rng.choice(NUM_CLASSES, size=num_objects, replace=False)
  shapes = classes // len(COLOURS)
  colours = classes % len(COLOURS)
  sizes = rng.integers(0, len(SIZES), size=num_objects)
  # Large objects first: they are the hardest to fit, so rejections stay rare.
  order = np.argsort(-sizes, kind="stable")
  shapes, colours, sizes = shapes[order], colours[order], sizes[order]
  pixel_boxes = _place_objects(rng, [object_side(s, image_size) for s in sizes], image_size)
  n = len(pixel_boxes)
  shapes, colours, sizes = shapes[:n], colours[:n], sizes[:n]
  # Caption order is random, not largest-first, so word order carries no size hint.
  perm = rng.permutation(n)
  shapes, colours, sizes = shapes[perm], colours[perm], sizes[perm]
  pixel_boxes = [pixel_boxes[i] for i in perm]

  background = rng.integers(200, 246, size=3)
  noise = rng.normal(0.0, 4.0, size=(image_size, image_size, 3)).clip(-12, 12)
  image = np.clip(np.rint(background + noise), 0, 255).astype(np.uint8)
  for shape, colour, (x1, y1, x2, y2) in zip(shapes, colours, pixel_boxes):
    image[y1:y2, x1:x2][shape_mask(int(shape), x2 - x1)] = COLOUR_RGB[colour]

  caption = make_caption(rng, shapes, colours, sizes, pixel_boxes)
  boxes = np.asarray(pixel_boxes, np.float32).reshape(n, 4) / np.float32(image_size)
  return {
      "image": image,
      "caption": caption,
      "objects": {
          "boxes": boxes,
          "label": (shapes * len(COLOURS) + colours).astype(np.int32),
          "shape": shapes.astype(np.int32),
          "colour": colours.astype(np.int32),
          "size": sizes.astype(np.int32),
      },
  }


@dataclasses.dataclass
class SceneConfig(tfds.core.BuilderConfig):
  image_size: int = 64
  num_train: int = 8000
  num_validation: int = 1000
  num_test: int = 1000
  seed: int = 0
  vocab_size: int = 160

  def __reduce__(self):
    # Unpickling goes through scene_config, so the default settings come back as the
    # registered DEFAULT_CONFIG object; TFDS rejects an equal copy of it by identity when
    # a data source (it pickles its builder) is rebuilt in a grain worker process.
    return (scene_config, (self.image_size, self.num_train, self.num_validation,
                           self.num_test, self.seed, self.vocab_size))


def _config_name(image_size, num_train, num_validation, num_test, seed, vocab_size) -> str:
  return (f"s{image_size}_train{num_train}_val{num_validation}_test{num_test}"
          f"_seed{seed}_vocab{vocab_size}")


def scene_config(image_size: int = 64, num_train: int = 8000, num_validation: int = 1000,
                 num_test: int = 1000, seed: int = 0, vocab_size: int = 160) -> SceneConfig:
  """The config for these settings; its name encodes them so builds never collide on disk."""
  name = _config_name(image_size, num_train, num_validation, num_test, seed, vocab_size)
  # TFDS refuses a custom config that shares a name with a registered one, so hand back
  # the registered object for the default settings.
  if name == DEFAULT_CONFIG.name:
    return DEFAULT_CONFIG
  if image_size < 16:
    raise errors.InvalidInput(f"image_size {image_size} < 16 leaves no room for {MAX_OBJECTS} objects")
  if min(num_train, num_validation, num_test) < 1:
    raise errors.InvalidInput("every split needs at least one example: "
                              f"{num_train=} {num_validation=} {num_test=}")
  return SceneConfig(name=name, image_size=image_size, num_train=num_train,
                     num_validation=num_validation, num_test=num_test, seed=seed,
                     vocab_size=vocab_size,
                     description="Synthetic captioned scenes (see module docstring).")


DEFAULT_CONFIG = SceneConfig(name=_config_name(64, 8000, 1000, 1000, 0, 160),
                             description="Synthetic captioned scenes, default sizes.")


class SyntheticScenes(tfds.core.GeneratorBasedBuilder):
  """Captioned synthetic scenes; see the module docstring."""

  VERSION = tfds.core.Version("1.2.0")
  RELEASE_NOTES = {
      "1.0.0": "Initial release.",
      "1.2.0": "Tokenizer also trained on the VQA derivative's questions and answers.",
  }
  BUILDER_CONFIGS = [DEFAULT_CONFIG]

  # TFDS finds a builder's own files (checksums, metadata) through `code_path`; its default
  # needs the `importlib_resources` backport for builders inside a package, which this
  # environment does not have. This file's path is what the default would return.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    ints = tfds.features.Tensor(shape=(None,), dtype=np.int32)
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image_id": tfds.features.Scalar(dtype=np.int64),
            # Tensor, not tfds.features.Image: Image decoding needs TensorFlow.
            "image": tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8,
                                          encoding=tfds.features.Encoding.ZLIB),
            "caption": tfds.features.Text(),
            # Plain ragged tensors, not tfds.features.Sequence: without TensorFlow a
            # Sequence decodes to Python lists of per-object arrays.
            "objects": tfds.features.FeaturesDict({
                "boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
                "label": ints, "shape": ints, "colour": ints, "size": ints,
            }),
        }),
        supervised_keys=None,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    cfg = self.builder_config
    # image_id ranges follow each other so ids are unique across splits.
    return {
        "train": self._generate_examples(0, cfg.num_train),
        "validation": self._generate_examples(cfg.num_train, cfg.num_validation),
        "test": self._generate_examples(cfg.num_train + cfg.num_validation, cfg.num_test),
    }

  def _generate_examples(self, first_id: int, count: int):
    cfg = self.builder_config
    for image_id in range(first_id, first_id + count):
      rng = np.random.default_rng([cfg.seed, image_id])
      yield image_id, {"image_id": image_id, **generate_scene(rng, cfg.image_size)}

  def _post_download_and_prepare_hook(self) -> None:
    ensure_tokenizer(self)


def ensure_tokenizer(builder: SyntheticScenes) -> None:
  """Trains the WordPiece tokenizer unless it is already saved: on the train captions and
  on the words of every question and answer that `synthetic_vqa.candidate_questions` makes
  of the train scenes, each word once (sorted, so the vocabulary is deterministic). Once
  each, the question words are the rarest, so caption words always come first: a
  vocabulary too small for both (128) still holds every caption word whole and spells some
  question words; at 160 every word is whole.

  Without the questions, words such as "what", "colour" and "count" were spelt out in
  characters the pretrained encoder had never been trained on, so a VQA fine-tune had to
  learn the question words from scratch.
  """
  directory = os.fspath(builder.data_dir)
  names = (tokenizer_lib.TOKENIZER_JSON, tokenizer_lib.VOCAB_TXT)
  if all(os.path.exists(os.path.join(directory, n)) for n in names):
    return
  source = builder.as_data_source(split="train")
  captions, qa_words = [], set()
  for i in range(len(source)):
    record = source[i]
    captions.append(record["caption"].decode("utf-8"))
    for pairs in synthetic_vqa.candidate_questions(record["objects"]).values():
      qa_words.update(word for pair in pairs for text in pair for word in text.split())
  tokenizer = tokenizer_lib.train_wordpiece(captions + sorted(qa_words),
                                            builder.builder_config.vocab_size)
  tokenizer_lib.save(tokenizer, directory)


def builder(data_cfg) -> SyntheticScenes:
  """The builder for `data_cfg` (does not build anything)."""
  if data_cfg.name != "synthetic_scenes":
    raise ValueError(f"data_cfg.name is {data_cfg.name!r}, expected 'synthetic_scenes'")
  config = scene_config(image_size=data_cfg.image_size, num_train=data_cfg.num_train,
                        num_validation=data_cfg.num_validation, num_test=data_cfg.num_test,
                        seed=data_cfg.seed, vocab_size=data_cfg.vocab_size)
  return SyntheticScenes(config=config, data_dir=os.path.expanduser(os.fspath(data_cfg.data_dir)),
                         file_format="array_record")


def prepare(data_cfg) -> SyntheticScenes:
  """Builds the data set and its tokenizer if missing; cheap when both exist.

  Several processes may call it on one shared directory: the build is deterministic
  (data and vocabulary), so whichever copy lands first is the one every process reads.
  Building once and synchronising still saves the duplicated work.
  """
  scenes = builder(data_cfg)
  try:
    # No GCS look-up: the data is generated locally and machines may have no network.
    scenes.download_and_prepare(download_config=tfds.download.DownloadConfig(
        try_download_gcs=False))
  except OSError:
    # TFDS builds in a temporary directory and renames it; the rename fails when another
    # process finished first.
    scenes = builder(data_cfg)
    if not scenes.is_prepared():
      raise
  ensure_tokenizer(scenes)  # The hook does not run when the data already existed.
  return scenes
