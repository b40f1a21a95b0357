"""Real-corpus builders on small real-format files, read back through the grain pipeline."""

import itertools
import json
import os
import sys

import conftest
import corpus_files
import ml_collections
import numpy as np
import pytest

from mmelectra.data import captioned_builder
from mmelectra.data import datasets
from mmelectra.data import pipeline
from mmelectra.data import regions as regions_lib

FEATURE_DIM = 16
SPLITS = ["train", "train", "validation", "train", "train", "validation", "train"]


def data_cfg(tmp, name, source, **overrides):
  cfg = conftest.tiny_data_cfg(tmp, name=name, manual_dir=str(source), annotations="",
                               feature_dim=FEATURE_DIM, all_captions=True, on_bad_record="error",
                               tokenizer="")
  if name == "lxmert_regions":
    cfg.update(regions="features", max_regions=6)
  cfg.update(overrides)
  return cfg


def real(batches):
  """(image_id, text_ids) of every real example, in order."""
  return [(int(b["image_id"][i]), tuple(b["text_ids"][i][b["text_mask"][i]]))
          for b in batches for i in np.flatnonzero(b["example_mask"])]


def tokenised(cfg, pairs):
  """(image_id, caption) -> (image_id, its token ids): what the pipeline should produce."""
  tokenizer = pipeline.load_tokenizer(cfg)
  return sorted((i, tuple(tokenizer.encode(c).ids)) for i, c in pairs)


def read_all(cfg, split, **kwargs):
  kwargs = {**dict(batch_size=4, seed=0, num_epochs=1, drop_remainder=False, shuffle=False), **kwargs}
  return list(pipeline.make_iterator(cfg, split, **kwargs))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpora")
  rows = corpus_files.write_image_folder(str(root / "folder"), len(SPLITS), captions_per_image=2,
                                         splits=SPLITS)
  cfg = data_cfg(root / "tfds", "image_text_folder", root / "folder")
  datasets.prepare(cfg)
  return cfg, rows


@pytest.fixture(scope="module")
def lxmert(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpora")
  written = corpus_files.write_lxmert(str(root / "lxmert"), feature_dim=FEATURE_DIM)
  cfg = data_cfg(root / "tfds", "lxmert_regions", root / "lxmert")
  return cfg, written, datasets.prepare(cfg)


# --- image_text_folder ------------------------------------------------------------------
def test_folder_jsonl_splits_captions_and_pixels(folder):
  cfg, rows = folder
  image_ids = {row["image"]: i for i, row in enumerate(sorted(rows, key=lambda r: r["image"]))}
  for split in ("train", "validation"):
    batches = read_all(cfg, split)
    expected = sorted((image_ids[r["image"]], c) for r in rows if r["split"] == split
                      for c in r["captions"])
    # Every caption of every image is one example (all_captions), nothing else.
    assert sorted(real(batches)) == tokenised(cfg, expected)
    k, dv = regions_lib.num_regions(cfg), regions_lib.feature_dim(cfg)
    assert (k, dv) == (16, 8 * 8 * 3)
    for batch in batches:
      assert batch["region_feats"].shape == (4, k, dv) and batch["text_ids"].shape == (4, 32)
      for i in np.flatnonzero(batch["example_mask"]):
        image_id = int(batch["image_id"][i])
        # Flat-colour source images: every patch pixel is the colour (JPEG within a few levels).
        want = regions_lib.normalise_pixels(np.array(corpus_files.colour(image_id), np.uint8))
        got = batch["region_feats"][i].reshape(k, -1, 3)
        tolerance = 4 / 255 / regions_lib.PIXEL_STD if image_id % 2 else 1e-6
        np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), atol=tolerance)
        assert batch["region_mask"][i].all() and np.all(batch["region_labels"][i] == -1)


def test_folder_all_captions_off_gives_one_example_per_image(folder):
  cfg, rows = folder
  cfg = ml_collections.ConfigDict({**cfg.to_dict(), "all_captions": False})
  train_rows = [r for r in rows if r["split"] == "train"]
  image_ids = {row["image"]: i for i, row in enumerate(sorted(rows, key=lambda r: r["image"]))}
  assert sorted(real(read_all(cfg, "train"))) == tokenised(
      cfg, [(image_ids[r["image"]], r["captions"][0]) for r in train_rows])
  assert pipeline.dataset_size(cfg, "train") == len(train_rows)


def test_folder_csv_without_split_column_puts_everything_in_train(tmp_path):
  corpus_files.write_image_folder(str(tmp_path / "src"), 3, captions_per_image=3, fmt="csv")
  cfg = data_cfg(tmp_path / "tfds", "image_text_folder", tmp_path / "src")
  builder = datasets.prepare(cfg)
  assert set(builder.info.splits) == {"train"}
  np.testing.assert_array_equal(captioned_builder.caption_counts(builder, "train"), [3, 3, 3])
  assert sorted(real(read_all(cfg, "train"))) == tokenised(
      cfg, [(i, f"picture {i} caption {j} of a thing") for i in range(3) for j in range(3)])


# --- coco_captions ----------------------------------------------------------------------
@pytest.mark.parametrize("year,karpathy", [(2014, True), (2017, False)])
def test_coco_layout_and_karpathy_split(tmp_path, year, karpathy):
  images = corpus_files.write_coco(str(tmp_path / "downloads" / "manual"), year=year,
                                  karpathy=karpathy)
  # The default manual dir: <data_dir>/downloads/manual, as TFDS has it.
  cfg = data_cfg(tmp_path, "coco_captions", "", data_dir=str(tmp_path))
  builder = datasets.prepare(cfg)
  sizes = {s: builder.info.splits[s].num_examples for s in builder.info.splits}
  # Karpathy: 3 train + 1 restval -> train; val images alternate val / test.
  assert sizes == ({"train": 4, "validation": 2, "test": 1} if karpathy
                   else {"train": 4, "validation": 3})
  val = read_all(cfg, "validation")
  want = sorted((i, c) for i, (part, caps) in images.items() if part == "val" for c in caps)
  if karpathy:
    want = [w for w in want if w[0] in (42, 56)]
  assert sorted(real(val)) == tokenised(cfg, want)  # image_id is the COCO id


# --- lxmert_regions ---------------------------------------------------------------------
def test_lxmert_features_boxes_labels_and_captions(lxmert):
  cfg, written, builder = lxmert
  assert builder.info.features["features"].np_dtype == np.float16
  assert builder.info.metadata["feature_dtype"] == "float16"
  names = sorted(written)
  batches = read_all(cfg, "validation")
  assert sorted(real(batches)) == tokenised(cfg, [
      (names.index(n), c) for n, (split, _, caps) in written.items() if split == "validation"
      for c in caps])
  seen = set()
  for batch in batches:
    assert batch["region_feats"].shape == (4, 6, FEATURE_DIM) and batch["region_feats"].dtype == np.float32
    for i in np.flatnonzero(batch["example_mask"]):
      name = names[int(batch["image_id"][i])]
      seen.add(name)
      row = written[name][1]
      source = corpus_files.decode_row(row, FEATURE_DIM)
      n = int(row["num_boxes"])
      np.testing.assert_array_equal(batch["region_mask"][i], np.arange(6) < n)
      np.testing.assert_allclose(batch["region_feats"][i][:n], source["features"], rtol=1e-3, atol=1e-3)
      assert not batch["region_feats"][i][n:].any()
      scale = np.array([row["img_w"], row["img_h"]] * 2, np.float32)
      np.testing.assert_allclose(batch["region_boxes"][i][:n], source["boxes"] / scale, rtol=1e-6)
      assert 0 <= batch["region_boxes"][i].min() and batch["region_boxes"][i].max() <= 1
      np.testing.assert_array_equal(batch["region_labels"][i][:n], source["objects_id"])
  assert seen == {n for n, (split, _, _) in written.items() if split == "validation"}


def test_lxmert_needs_features_mode(lxmert):
  cfg, _, _ = lxmert
  with pytest.raises(ValueError, match="regions='patches' does not work with"):
    datasets.builder(ml_collections.ConfigDict({**cfg.to_dict(), "regions": "patches"}))


# --- order, sharding, workers -----------------------------------------------------------
def test_same_seed_same_order_and_two_processes_read_every_example_once(lxmert):
  cfg, _, _ = lxmert
  total = pipeline.dataset_size(cfg, "train")
  assert total == 10  # 5 images x 2 captions
  stream = lambda seed: real(read_all(cfg, "train", seed=seed, shuffle=True, num_epochs=2))  # noqa: E731
  first = stream(0)
  assert first == stream(0) and first != stream(1)
  assert sorted(first[:total]) == sorted(first[total:]) and len(set(first[:total])) == total
  # Two processes read rows [0, 4) and [4, 8) of each global batch of 8: every example once.
  shards = [real(read_all(cfg, "train", seed=4, shuffle=True, process_index=p, process_count=2))
            for p in range(2)]
  assert len(shards[0]) + len(shards[1]) == total
  assert sorted(shards[0] + shards[1]) == sorted(first[:total])


def test_worker_processes_and_resume_give_the_same_batches(folder):
  cfg, _ = folder
  take = lambda it, n: list(itertools.islice(it, n))  # noqa: E731
  reference = take(pipeline.make_iterator(cfg, "train", batch_size=3, seed=1), 7)
  it = pipeline.make_iterator(ml_collections.ConfigDict({**cfg.to_dict(), "num_workers": 2}),
                              "train", batch_size=3, seed=1)
  try:
    head = take(it, 4)
    state = it.get_state()
    tail = take(it, 3)
    it.set_state(state)
    again = take(it, 3)
  finally:
    it.close()
  for got, want in zip(head + tail + again, reference + reference[4:]):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_no_tensorflow_and_a_bert_vocab_replaces_the_trained_one(folder, tmp_path):
  cfg, _ = folder
  words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "picture", "caption", "of", "a", "thing"]
  words += [str(i) for i in range(10)]
  (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
  own = ml_collections.ConfigDict({**cfg.to_dict(), "tokenizer": str(tmp_path / "vocab.txt")})
  batch = read_all(own, "train")[0]
  ids = batch["text_ids"][0][batch["text_mask"][0]]
  assert [words[i] for i in ids][:3] == ["[CLS]", "picture", words[int(ids[2])]]
  assert set(ids) <= set(range(len(words)))
  assert "tensorflow" not in sys.modules


def test_build_writes_counts_and_report(folder):
  cfg, _ = folder
  directory = pipeline.prepared_builder(cfg).data_dir
  with open(os.path.join(directory, "bad_records.json")) as f:
    assert json.load(f)["counts"] == {}
  assert os.path.exists(os.path.join(directory, "caption_counts.train.npy"))


# --- train on each builder -----------------------------------------------------------------
@pytest.mark.parametrize("name", ["image_text_folder", "coco_captions"])
def test_train_runs_on_the_builder_by_changing_only_config_data(tmp_path, name):
  # lxmert_regions: tests/test_bad_records.py::test_train_on_lxmert_data_skipping_records_over_max_regions
  from mmelectra import train
  if name == "image_text_folder":
    corpus_files.write_image_folder(str(tmp_path / "src"), len(SPLITS), captions_per_image=2,
                                    splits=SPLITS)
  else:
    corpus_files.write_coco(str(tmp_path / "src"), year=2017)
  config = ml_collections.ConfigDict(conftest.micro_config().to_dict())
  config.model.update(visual_feat_dim=-1, num_regions=-1, num_object_classes=-1, vocab_size=128,
                      max_position=32)
  config.data = data_cfg(tmp_path / "tfds", name, tmp_path / "src")  # patches of the images
  config.update(batch_size=4, total_steps=2, log_every=2, checkpoint_every=2)
  with conftest.most_optimizations_disabled():
    train.train_and_evaluate(config, str(tmp_path / "run"))
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    (row,) = [json.loads(line) for line in f]
  assert row["step"] == 2 and np.isfinite(row["loss"]) and row["loss"] > 0
