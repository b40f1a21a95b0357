"""Synthetic scenes: generation, the TFDS builder, and the tokenizer saved beside it."""

import os
import re

import conftest
import numpy as np
import pytest

from mmelectra.data import synthetic_scenes as ss
from mmelectra.data import tokenizer as tokenizer_lib

_REF = r"the (\w+)(?: (\w+))?"
RELATION = re.compile(_REF + r" (?:is|lies) (left of|right of|above|below) " + _REF + r"\.")


def resolve_reference(words, objects):
  """Index of the one object that "the circle" / "the red one" / "the red circle" names."""
  first, second = words
  if not second:
    matches = [i for i, s in enumerate(objects["shape"]) if ss.SHAPES[s] == first]
  elif second == "one":
    matches = [i for i, c in enumerate(objects["colour"]) if ss.COLOURS[c] == first]
  else:
    matches = [i for i, (s, c) in enumerate(zip(objects["shape"], objects["colour"]))
               if ss.COLOURS[c] == first and ss.SHAPES[s] == second]
  assert len(matches) == 1, (words, matches)
  return matches[0]


tiny_data_cfg = conftest.tiny_data_cfg


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  cfg = tiny_data_cfg(tmp_path_factory.mktemp("tfds"))
  return cfg, ss.prepare(cfg)


def scenes(count, image_size, seed=0):
  return [ss.generate_scene(np.random.default_rng([seed, i]), image_size) for i in range(count)]


def assert_scenes_equal(a, b):
  assert a["caption"] == b["caption"]
  np.testing.assert_array_equal(a["image"], b["image"])
  for key in a["objects"]:
    np.testing.assert_array_equal(a["objects"][key], b["objects"][key])


# --- generate_scene ---------------------------------------------------------------------
def test_generate_scene_is_deterministic_in_its_seed():
  for image_size in (32, 64):
    first = ss.generate_scene(np.random.default_rng(7), image_size)
    assert_scenes_equal(first, ss.generate_scene(np.random.default_rng(7), image_size))
    other = ss.generate_scene(np.random.default_rng(8), image_size)
    assert first["caption"] != other["caption"] or not np.array_equal(first["image"], other["image"])


@pytest.mark.parametrize("image_size", [32, 64])
def test_scene_arrays_have_documented_types(image_size):
  for scene in scenes(30, image_size):
    assert scene["image"].shape == (image_size, image_size, 3)
    assert scene["image"].dtype == np.uint8
    objects = scene["objects"]
    n = len(objects["label"])
    assert 1 <= n <= ss.MAX_OBJECTS
    assert objects["boxes"].shape == (n, 4) and objects["boxes"].dtype == np.float32
    for key in ("label", "shape", "colour", "size"):
      assert objects[key].shape == (n,) and objects[key].dtype == np.int32
    np.testing.assert_array_equal(objects["label"],
                                  objects["shape"] * len(ss.COLOURS) + objects["colour"])
    assert np.all((0 <= objects["label"]) & (objects["label"] < ss.NUM_CLASSES))
    # (shape, colour) is unique within a scene so captions can refer to "the red circle".
    assert len(set(objects["label"].tolist())) == n


@pytest.mark.parametrize("image_size", [32, 64])
def test_boxes_are_normalised_corners_of_the_drawn_pixels(image_size):
  for scene in scenes(40, image_size):
    image, objects = scene["image"], scene["objects"]
    boxes = objects["boxes"]
    assert np.all((boxes >= 0) & (boxes <= 1))
    assert np.all(boxes[:, 2] > boxes[:, 0]) and np.all(boxes[:, 3] > boxes[:, 1])
    pixel_boxes = np.rint(boxes * image_size).astype(int)
    np.testing.assert_allclose(pixel_boxes / image_size, boxes, atol=1e-6)
    for box, shape, colour, size in zip(pixel_boxes, objects["shape"], objects["colour"],
                                        objects["size"]):
      x1, y1, x2, y2 = box
      side = ss.object_side(int(size), image_size)
      assert x2 - x1 == side and y2 - y1 == side
      matches = np.all(image == ss.COLOUR_RGB[colour], axis=-1)
      # Inside the box: exactly the shape. One pixel around it: nothing of that colour.
      np.testing.assert_array_equal(matches[y1:y2, x1:x2], ss.shape_mask(int(shape), side))
      ring = matches[max(y1 - 1, 0):y2 + 1, max(x1 - 1, 0):x2 + 1].sum()
      assert ring == matches[y1:y2, x1:x2].sum()


def test_objects_do_not_overlap():
  for scene in scenes(60, 32):
    boxes = scene["objects"]["boxes"]
    for i in range(len(boxes)):
      for j in range(i + 1, len(boxes)):
        a, b = boxes[i], boxes[j]
        assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def test_captions_name_every_object_and_a_true_relation():
  for scene in scenes(80, 64):
    caption, objects = scene["caption"], scene["objects"]
    assert re.fullmatch(r"[a-z .]+", caption), caption
    assert ss.caption_length(caption) <= ss.MAX_CAPTION_LENGTH
    for shape, colour, size in zip(objects["shape"], objects["colour"], objects["size"]):
      assert f"a {ss.SIZES[size]} {ss.COLOURS[colour]} {ss.SHAPES[shape]}" in caption
    relations = RELATION.findall(caption)
    assert len(relations) == (1 if len(objects["label"]) >= 2 else 0), caption
    for a1, a2, relation, b1, b2 in relations:
      centre = {}
      for name, words in (("a", (a1, a2)), ("b", (b1, b2))):
        i = resolve_reference(words, objects)
        box = objects["boxes"][i]
        centre[name] = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
        # The shortest unambiguous name, so the relation does not restate the listing.
        shape_unique = list(objects["shape"]).count(objects["shape"][i]) == 1
        colour_unique = list(objects["colour"]).count(objects["colour"][i]) == 1
        form = "shape" if not words[1] else "colour" if words[1] == "one" else "both"
        assert form == ("shape" if shape_unique else "colour" if colour_unique else "both"), caption
      dx = centre["a"][0] - centre["b"][0]
      dy = centre["a"][1] - centre["b"][1]
      expected = {"left of": dx < 0 and abs(dx) >= abs(dy), "right of": dx > 0 and abs(dx) >= abs(dy),
                  "above": dy < 0 and abs(dy) > abs(dx), "below": dy > 0 and abs(dy) > abs(dx)}
      assert expected[relation], (caption, centre)


# --- builder ----------------------------------------------------------------------------
def test_config_name_encodes_every_setting():
  names = {ss.scene_config(seed=1).name, ss.scene_config(seed=2).name,
           ss.scene_config(image_size=32).name, ss.scene_config(num_test=5).name,
           ss.scene_config(vocab_size=64).name, ss.scene_config().name}
  assert len(names) == 6
  assert ss.scene_config() is ss.DEFAULT_CONFIG


def test_builder_writes_every_split_with_unique_ids(built):
  cfg, builder = built
  sizes = {"train": cfg.num_train, "validation": cfg.num_validation, "test": cfg.num_test}
  ids = []
  for split, size in sizes.items():
    assert builder.info.splits[split].num_examples == size
    source = builder.as_data_source(split=split)
    assert len(source) == size
    for i in range(size):
      record = source[i]
      assert record["image"].shape == (32, 32, 3) and record["image"].dtype == np.uint8
      ids.append(int(record["image_id"]))
    # The stored record is exactly the scene generate_scene makes from (seed, image_id).
    expected = ss.generate_scene(np.random.default_rng([cfg.seed, int(record["image_id"])]), 32)
    assert record["caption"].decode() == expected["caption"]
    np.testing.assert_array_equal(record["image"], expected["image"])
    np.testing.assert_array_equal(record["objects"]["boxes"], expected["objects"]["boxes"])
    np.testing.assert_array_equal(record["objects"]["label"], expected["objects"]["label"])
  assert sorted(ids) == list(range(sum(sizes.values())))


def test_tokenizer_beside_data_covers_every_caption(built):
  cfg, builder = built
  for name in ("tokenizer.json", "vocab.txt"):
    assert os.path.exists(os.path.join(builder.data_dir, name))
  tokenizer = tokenizer_lib.load(builder.data_dir)
  assert tokenizer.get_vocab_size() <= cfg.vocab_size
  unk = tokenizer_lib.special_token_ids(tokenizer)["unk"]
  source = builder.as_data_source(split="train")
  for i in range(len(source)):
    caption = source[i]["caption"].decode()
    assert unk not in tokenizer.encode(caption).ids, caption
    assert tokenizer.decode(tokenizer.encode(caption).ids) == caption


def test_tokenizer_holds_the_vqa_questions_words_whole(tmp_path):
  """At the default vocabulary size every caption, question and answer word is one token:
  a VQA fine-tune reads the questions in words the pretrained encoder was trained on (with
  captions only, "what colour" was spelt out in never-trained characters)."""
  from mmelectra.data import synthetic_vqa

  cfg = tiny_data_cfg(tmp_path, vocab_size=ss.DEFAULT_CONFIG.vocab_size)
  builder = ss.prepare(cfg)
  tokenizer = tokenizer_lib.load(builder.data_dir)
  vocab = tokenizer.get_vocab()
  source = builder.as_data_source(split="train")
  words = set()
  for i in range(len(source)):
    words.update(source[i]["caption"].decode().replace(".", " ").split())
    for pairs in synthetic_vqa.candidate_questions(source[i]["objects"]).values():
      words.update(w for question, answer in pairs for w in f"{question} {answer}".split())
  assert {"what", "colour", "count", "where", "relative"} <= words
  assert sorted(w for w in words if w not in vocab) == []


def test_prepare_is_idempotent(built):
  cfg, builder = built
  paths = [os.path.join(builder.data_dir, n) for n in ("tokenizer.json", "vocab.txt")]
  mtimes = [os.path.getmtime(p) for p in paths]
  again = ss.prepare(cfg)
  assert os.fspath(again.data_dir) == os.fspath(builder.data_dir)
  assert [os.path.getmtime(p) for p in paths] == mtimes
  # A lost tokenizer is rebuilt from the stored captions, identically.
  with open(paths[1]) as f:
    vocab = f.read()
  os.remove(paths[1])
  os.remove(paths[0])
  ss.prepare(cfg)
  with open(paths[1]) as f:
    assert f.read() == vocab


def test_builder_rejects_other_dataset_names(tmp_path):
  with pytest.raises(ValueError, match="expected 'synthetic_scenes'"):
    ss.builder(tiny_data_cfg(tmp_path, name="coco"))


# --- tokenizer --------------------------------------------------------------------------
CAPTIONS = ["a large red circle.", "there is a small blue square and a large red circle.",
            "the red circle is left of the blue square."]


def test_trained_tokenizer_has_bert_special_ids_and_template():
  tokenizer = tokenizer_lib.train_wordpiece(CAPTIONS * 5, vocab_size=80)
  assert tokenizer_lib.special_token_ids(tokenizer) == dict(pad=0, unk=1, cls=2, sep=3, mask=4)
  encoding = tokenizer.encode("A Large red circle.")  # lower-cased by the normaliser
  assert encoding.tokens[0] == "[CLS]" and encoding.tokens[-1] == "[SEP]"
  assert encoding.tokens[1:-1] == ["a", "large", "red", "circle", "."]


def test_saved_vocab_txt_loads_to_the_same_tokenizer(tmp_path):
  tokenizer = tokenizer_lib.train_wordpiece(CAPTIONS * 5, vocab_size=80)
  tokenizer_lib.save(tokenizer, tmp_path)
  with open(tmp_path / "vocab.txt") as f:
    lines = f.read().splitlines()
  assert lines == tokenizer_lib.vocab_in_id_order(tokenizer)
  assert lines[:5] == list(tokenizer_lib.SPECIAL_TOKENS)
  from_json = tokenizer_lib.load(tmp_path)
  from_vocab = tokenizer_lib.load(tmp_path / "vocab.txt")
  for text in CAPTIONS + ["an unseen zebra [MASK] word."]:
    expected = tokenizer.encode(text).ids
    assert from_json.encode(text).ids == expected
    assert from_vocab.encode(text).ids == expected


def test_special_token_ids_names_the_missing_token(tmp_path):
  (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\na\n")
  with pytest.raises(KeyError, match=r"\[MASK\]"):
    tokenizer_lib.load(tmp_path / "vocab.txt")
  with pytest.raises(FileNotFoundError):
    tokenizer_lib.load(tmp_path / "missing")
