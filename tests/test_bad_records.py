"""Every bad-record kind, at build time and at read time, under "error" and under "skip"."""

import json
import os

import conftest
import corpus_files
import ml_collections
import numpy as np
import pytest

from mmelectra import train
from mmelectra.data import bad_records
from mmelectra.data import datasets
from mmelectra.data import pipeline

FEATURE_DIM = 16


def data_cfg(tmp, name, source, **overrides):
  cfg = conftest.tiny_data_cfg(tmp, name=name, manual_dir=str(source), annotations="",
                               feature_dim=FEATURE_DIM, all_captions=True, on_bad_record="error",
                               tokenizer="")
  if name == "lxmert_regions":
    cfg.update(regions="features", max_regions=6)
  cfg.update(overrides)
  return cfg


# --- build time: image_text_folder ------------------------------------------------------
def bad_folder(root, kinds):
  """4 good images plus one row per bad kind; returns {kind: the bad row's line number}."""
  rows = corpus_files.write_image_folder(root, 4, captions_per_image=1)
  lines = {}
  for kind in kinds:
    if kind == "missing_image_file":
      rows.append({"image": "images/gone.png", "captions": ["a picture that is not there"]})
    elif kind == "unreadable_image":
      with open(os.path.join(root, "images", "broken.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is not a jpeg")
      rows.append({"image": "images/broken.jpg", "captions": ["a broken picture"]})
    elif kind == "empty_caption":
      corpus_files.write_image(os.path.join(root, "images", "quiet.png"), (1, 2, 3))
      rows.append({"image": "images/quiet.png", "captions": ["   "]})
    lines[kind] = len(rows)
  corpus_files.write_annotations(root, rows)
  return lines


@pytest.mark.parametrize("kind,file", [("missing_image_file", "gone.png"),
                                       ("unreadable_image", "broken.jpg"),
                                       ("empty_caption", "quiet.png")])
def test_folder_error_names_file_and_line(tmp_path, kind, file):
  lines = bad_folder(str(tmp_path / "src"), [kind])
  cfg = data_cfg(tmp_path / "tfds", "image_text_folder", tmp_path / "src")
  with pytest.raises(bad_records.BadRecordError,
                     match=rf"captions.jsonl:{lines[kind]} \(image images/{file}\)") as error:
    datasets.prepare(cfg)
  assert error.value.reason == kind


def test_folder_skip_counts_reasons_and_keeps_the_good_records(tmp_path):
  kinds = ["missing_image_file", "unreadable_image", "empty_caption"]
  bad_folder(str(tmp_path / "src"), kinds)
  cfg = data_cfg(tmp_path / "tfds", "image_text_folder", tmp_path / "src", on_bad_record="skip")
  builder = datasets.prepare(cfg)
  assert builder.info.splits["train"].num_examples == 4
  report = pipeline.build_report(cfg)
  assert report["counts"] == {k: 1 for k in kinds}
  assert "gone.png" in report["examples"]["missing_image_file"][0]
  batches = list(pipeline.make_iterator(cfg, "train", batch_size=2, seed=0, num_epochs=1))
  # image_id is the index in sorted path order, bad images included: broken.jpg,
  # gone.png, then img_000..003.
  assert sorted(int(i) for b in batches for i in b["image_id"]) == [2, 3, 4, 5]
  # A run that says "error" refuses data whose build dropped records.
  strict = ml_collections.ConfigDict({**cfg.to_dict(), "on_bad_record": "error"})
  with pytest.raises(bad_records.BadRecordError, match="dropped .* bad records"):
    pipeline.make_iterator(strict, "train", batch_size=2, seed=0)
  counter = bad_records.SkipCounter(report["counts"])
  assert counter.metrics() == {f"bad_records_{k}": 1.0 for k in kinds}


# --- build time: lxmert_regions ---------------------------------------------------------
def bad_lxmert(root, kind):
  written = corpus_files.write_lxmert(root, num_train=3, num_val=1, feature_dim=FEATURE_DIM)
  path = os.path.join(root, "train2014_obj36.tsv")
  with open(path) as f:
    lines = f.read().splitlines()
  row = corpus_files.region_row("COCO_train2014_000000000001", 4, FEATURE_DIM, seed=9)
  if kind == "wrong_feature_dim":
    row["features"] = corpus_files.b64(np.ones((4, FEATURE_DIM + 1), np.float32))
  elif kind == "non_finite_features":
    features = np.ones((4, FEATURE_DIM), np.float32)
    features[2, 3] = np.nan
    row["features"] = corpus_files.b64(features)
  elif kind == "malformed_record":
    row["boxes"] = "not base64!"
  if kind == "missing_features":
    del lines[1]
  else:
    lines[1] = "\t".join(str(row[k]) for k in corpus_files.lxmert_regions.FIELDNAMES)
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return written


@pytest.mark.parametrize("kind,where", [
    ("wrong_feature_dim", r"train2014_obj36.tsv:2 \(img_id COCO_train2014_000000000001\)"),
    ("non_finite_features", r"train2014_obj36.tsv:2 \(img_id COCO_train2014_000000000001\)"),
    ("malformed_record", r"train2014_obj36.tsv:2 .*'boxes'"),
    ("missing_features", r"mscoco_train.json entry 1 \(img_id COCO_train2014_000000000001\)"),
])
def test_lxmert_error_and_skip(tmp_path, kind, where):
  bad_lxmert(str(tmp_path / "src"), kind)
  cfg = data_cfg(tmp_path / "tfds", "lxmert_regions", tmp_path / "src")
  with pytest.raises(bad_records.BadRecordError, match=where) as error:
    datasets.prepare(cfg)
  assert error.value.reason == kind
  cfg.on_bad_record = "skip"
  builder = datasets.prepare(cfg)
  assert builder.info.splits["train"].num_examples == 2
  assert pipeline.build_report(cfg)["counts"] == {kind: 1}


# --- read time: the pipeline ------------------------------------------------------------
def png_bytes(rgb):
  import io
  from PIL import Image
  buffer = io.BytesIO()
  Image.fromarray(np.full((8, 8, 3), rgb, np.uint8)).save(buffer, format="PNG")
  return buffer.getvalue()


def region_record(image_id, num_boxes=3, dim=FEATURE_DIM, value=1.0, caption=b"a red thing"):
  return {"image_id": image_id, "source": f"f.tsv:{image_id + 1}", "captions": np.array([caption], object),
          "features": np.full((num_boxes, dim), value, np.float16),
          "boxes": np.tile(np.array([[0.1, 0.1, 0.5, 0.5]], np.float32), (num_boxes, 1)),
          "objects_id": np.arange(num_boxes, dtype=np.int32)}


READ_CASES = {  # kind -> (data set, bad record, config overrides)
    "unreadable_image": ("image_text_folder", {"image": b"GIF89a...nope"}, {}),
    "empty_caption": ("image_text_folder", {"captions": np.array([b" \t"], object)}, {}),
    "wrong_feature_dim": ("lxmert_regions", {"features": np.ones((3, 8), np.float16)}, {}),
    "non_finite_features": ("lxmert_regions",
                            {"features": np.full((3, FEATURE_DIM), np.inf, np.float16)}, {}),
    "too_many_boxes": ("lxmert_regions", region_record(2, num_boxes=7), {}),
}


def read_source(name, kind):
  if name == "image_text_folder":
    good = lambda i: {"image_id": i, "image_file": f"images/{i}.png", "image": png_bytes((9 * i, 0, 0)),  # noqa: E731
                      "captions": np.array([b"a red thing"], object)}
  else:
    good = region_record
  source = [good(i) for i in range(5)]
  source[2] = {**source[2], **READ_CASES[kind][1], "image_id": 2}
  return source


@pytest.mark.parametrize("kind", sorted(READ_CASES))
def test_read_time_bad_records_under_both_policies(tmp_path, kind):
  name = READ_CASES[kind][0]
  cfg = data_cfg(tmp_path, name, tmp_path, image_size=16, patch_size=8,
                 tokenizer=str(tmp_path / "vocab.txt"))
  (tmp_path / "vocab.txt").write_text("\n".join(
      ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "thing"]) + "\n")
  tokenizer = pipeline.load_tokenizer(cfg)
  source = read_source(name, kind)
  table = np.stack([np.arange(5), np.zeros(5, int)], 1)
  make = lambda c: pipeline.make_dataset(source, c, "train", tokenizer, batch_size=5, seed=0,  # noqa: E731
                                         shuffle=False, num_epochs=1, table=table)
  name_re = r"f\.tsv:3" if name == "lxmert_regions" else r"images/2\.png"
  with pytest.raises(bad_records.BadRecordError,
                     match=rf"train record 2 \(image_id 2, {name_re}, caption 0\), key") as error:
    list(make(cfg))
  assert error.value.reason == kind
  cfg.on_bad_record = "skip"
  (batch,) = list(make(cfg))
  np.testing.assert_array_equal(batch["example_mask"], [1, 1, 0, 1, 1])
  np.testing.assert_array_equal(batch["skip_reason"], [0, 0, bad_records.reason_code(kind), 0, 0])
  np.testing.assert_array_equal(batch["image_id"], [0, 1, -1, 3, 4])
  assert not batch["region_mask"][2].any() and not batch["text_mask"][2].any()
  counter = bad_records.SkipCounter()
  rest = counter.take(batch)
  assert "skip_reason" not in rest and "skip_reason" in batch
  counter.take(batch)
  assert counter.metrics() == {f"bad_records_{kind}": 2.0}


# --- end to end: a run that skips reports the counts in metrics.jsonl --------------------
def test_train_on_lxmert_data_skipping_records_over_max_regions(tmp_path):
  corpus_files.write_lxmert(str(tmp_path / "src"), num_train=4, num_val=1, num_boxes=6,
                            feature_dim=FEATURE_DIM)
  config = ml_collections.ConfigDict(conftest.micro_config().to_dict())
  config.model.update(visual_feat_dim=-1, num_regions=-1, num_object_classes=-1, vocab_size=128)
  # Only config.data changes; max_regions=5 drops the 6-box images (half of them).
  config.data.update(data_cfg(tmp_path / "tfds", "lxmert_regions", tmp_path / "src",
                              max_regions=5, on_bad_record="skip", max_text_len=12))
  config.update(batch_size=4, total_steps=2, log_every=2, checkpoint_every=2)
  with conftest.most_optimizations_disabled():
    train.train_and_evaluate(config, str(tmp_path / "run"))
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    (row,) = [json.loads(line) for line in f]
  # 2 steps x 4 examples = one epoch of the 8 (image, caption) pairs; the 2 six-box images
  # (train images 0 and 2) have 2 captions each.
  assert row["bad_records_too_many_boxes"] == 4.0
  assert np.isfinite(row["loss"]) and row["step"] == 2
