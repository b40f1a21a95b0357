"""Input pipeline: batch contract, ordering, sharding, padding, resume, worker processes."""

import itertools
import sys

import conftest
import numpy as np
import pytest

from mmelectra.data import pipeline
from mmelectra.data import regions as regions_lib
from mmelectra.data import synthetic_scenes
from mmelectra.data import tokenizer as tokenizer_lib

NUM_TRAIN = 37  # odd, so shards and batches have remainders


def tiny_data_cfg(data_dir, **overrides):
  return conftest.tiny_data_cfg(data_dir, **{**dict(num_train=NUM_TRAIN, num_validation=8, num_test=4, seed=5), **overrides})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tfds")
  synthetic_scenes.prepare(tiny_data_cfg(path))
  return path


@pytest.fixture(scope="module")
def records(data_dir):
  """image_id -> stored record, and the train split's record order."""
  builder = pipeline.prepared_builder(tiny_data_cfg(data_dir))
  by_id, order = {}, []
  for split in ("train", "validation", "test"):
    source = builder.as_data_source(split=split)
    for i in range(len(source)):
      record = source[i]
      by_id[int(record["image_id"])] = record
      if split == "train":
        order.append(int(record["image_id"]))
  return by_id, order


def take(iterator, count):
  return list(itertools.islice(iterator, count))


def real_ids(batches):
  return [int(i) for b in batches for i, m in zip(b["image_id"], b["example_mask"]) if m]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


# --- the batch contract -----------------------------------------------------------------
@pytest.mark.parametrize("mode", ["patches", "crops"])
def test_batches_have_exactly_the_documented_keys_shapes_and_dtypes(data_dir, mode):
  cfg = tiny_data_cfg(data_dir, regions=mode)
  k, dv = regions_lib.num_regions(cfg), regions_lib.feature_dim(cfg)
  expected = {
      "text_ids": (np.int32, (6, 32)), "text_mask": (np.bool_, (6, 32)),
      "region_feats": (np.float32, (6, k, dv)), "region_boxes": (np.float32, (6, k, 4)),
      "region_mask": (np.bool_, (6, k)), "region_labels": (np.int32, (6, k)),
      "image_id": (np.int32, (6,)), "example_mask": (np.bool_, (6,)),
  }
  for batch in take(pipeline.make_iterator(cfg, "train", batch_size=6, seed=0), 3):
    assert {key: (v.dtype.type, v.shape) for key, v in batch.items()} == expected
    assert batch["example_mask"].all()


def test_text_and_regions_come_from_the_same_record(data_dir, records):
  by_id, _ = records
  cfg = tiny_data_cfg(data_dir)
  tokenizer = pipeline.load_tokenizer(cfg)
  ids = tokenizer_lib.special_token_ids(tokenizer)
  batch = next(pipeline.make_iterator(cfg, "validation", batch_size=8, seed=0, shuffle=False))
  for row in range(8):
    record = by_id[int(batch["image_id"][row])]
    text_ids, text_mask = batch["text_ids"][row], batch["text_mask"][row]
    length = int(text_mask.sum())
    np.testing.assert_array_equal(text_mask, np.arange(32) < length)  # a prefix
    assert text_ids[0] == ids["cls"] and text_ids[length - 1] == ids["sep"]
    assert np.all(text_ids[length:] == ids["pad"]) and ids["pad"] == 0
    assert tokenizer.decode(text_ids[:length].tolist()) == record["caption"].decode()
    patches = regions_lib.image_to_patches(record["image"], cfg.patch_size)
    np.testing.assert_array_equal(batch["region_feats"][row], patches.feats)
    np.testing.assert_array_equal(batch["region_boxes"][row], patches.boxes)
    assert batch["region_mask"][row].all() and np.all(batch["region_labels"][row] == -1)


def test_crops_mode_carries_object_labels(data_dir, records):
  by_id, _ = records
  cfg = tiny_data_cfg(data_dir, regions="crops")
  batch = next(pipeline.make_iterator(cfg, "test", batch_size=4, seed=0, shuffle=False))
  for row in range(4):
    objects = by_id[int(batch["image_id"][row])]["objects"]
    n = len(objects["label"])
    np.testing.assert_array_equal(batch["region_mask"][row], np.arange(4) < n)
    np.testing.assert_array_equal(batch["region_labels"][row][:n], objects["label"])
    assert np.all(batch["region_labels"][row][n:] == -1)
    np.testing.assert_array_equal(batch["region_boxes"][row][:n], objects["boxes"])


def test_long_captions_are_truncated_keeping_sep_last(data_dir):
  cfg = tiny_data_cfg(data_dir, max_text_len=6)
  tokenizer = pipeline.load_tokenizer(cfg)
  ids = tokenizer_lib.special_token_ids(tokenizer)
  batch = next(pipeline.make_iterator(cfg, "train", batch_size=8, seed=0))
  assert batch["text_mask"].all()  # every caption is longer than 4 tokens
  assert np.all(batch["text_ids"][:, 0] == ids["cls"]) and np.all(batch["text_ids"][:, -1] == ids["sep"])


# --- order ------------------------------------------------------------------------------
def test_same_seed_same_order_new_order_every_epoch(data_dir):
  cfg = tiny_data_cfg(data_dir)

  def stream(seed, shuffle=True):
    it = pipeline.make_iterator(cfg, "train", batch_size=5, seed=seed, shuffle=shuffle,
                                num_epochs=3, drop_remainder=False)
    return real_ids(list(it))

  first = stream(0)
  assert first == stream(0)
  assert first != stream(1)
  epochs = [first[i * NUM_TRAIN:(i + 1) * NUM_TRAIN] for i in range(3)]
  assert len(first) == 3 * NUM_TRAIN
  for epoch in epochs:
    assert sorted(epoch) == sorted(epochs[0]) and len(set(epoch)) == NUM_TRAIN
  assert epochs[0] != epochs[1] and epochs[1] != epochs[2]


def test_no_shuffle_reads_records_in_stored_order(data_dir, records):
  _, order = records
  cfg = tiny_data_cfg(data_dir)
  it = pipeline.make_iterator(cfg, "train", batch_size=7, seed=0, shuffle=False, num_epochs=1,
                              drop_remainder=False)
  assert real_ids(list(it)) == order


def test_repeats_forever_by_default(data_dir):
  it = pipeline.make_iterator(tiny_data_cfg(data_dir), "test", batch_size=3, seed=0)
  assert len(take(it, 10)) == 10  # 30 examples from a 4-example split


# --- sharding and padding ---------------------------------------------------------------
def test_shards_are_disjoint_and_cover_every_record_once(data_dir, records):
  _, order = records
  cfg = tiny_data_cfg(data_dir)
  shards = []
  for process_index in range(2):
    it = pipeline.make_iterator(cfg, "train", batch_size=4, seed=0, shuffle=False, num_epochs=1,
                                drop_remainder=False, process_index=process_index, process_count=2)
    batches = list(it)
    assert len(batches) == 5  # ceil(37 / (2 x 4)) on both processes: they step together
    shards.append(batches)
  # Process p holds rows [4p, 4p + 4) of each global batch of 8, in the global order.
  interleaved = [ids for b0, b1 in zip(*shards) for ids in (real_ids([b0]), real_ids([b1]))]
  assert sum(interleaved, []) == order
  assert not set(real_ids(shards[0])) & set(real_ids(shards[1]))


@pytest.mark.parametrize("shuffle", [False, True])
def test_global_batches_do_not_depend_on_the_process_count(data_dir, shuffle):
  cfg = tiny_data_cfg(data_dir)
  take = lambda it, n: [b["image_id"] for b in itertools.islice(it, n)]  # noqa: E731
  one = take(pipeline.make_iterator(cfg, "train", batch_size=8, seed=5, shuffle=shuffle), 12)
  for count in (2, 4):
    shards = [take(pipeline.make_iterator(cfg, "train", batch_size=8 // count, seed=5,
                                          shuffle=shuffle, process_index=p, process_count=count), 12)
              for p in range(count)]
    for step, rows in enumerate(zip(*shards)):  # 12 steps cross epochs (37 examples)
      np.testing.assert_array_equal(np.concatenate(rows), one[step])


def test_drop_remainder_gives_every_process_the_same_full_batches(data_dir):
  cfg = tiny_data_cfg(data_dir)
  counts = []
  for process_index in range(2):
    it = pipeline.make_iterator(cfg, "train", batch_size=4, seed=0, num_epochs=1,
                                process_index=process_index, process_count=2)
    batches = list(it)
    assert all(b["example_mask"].all() for b in batches)
    counts.append(len(batches))
  assert counts == [4, 4]  # floor(37 / 2) = 18 records -> 4 full batches each


def test_last_batch_is_padded_with_masked_examples(data_dir):
  cfg = tiny_data_cfg(data_dir, regions="crops")
  batches = list(pipeline.make_iterator(cfg, "train", batch_size=8, seed=0, num_epochs=1,
                                        drop_remainder=False))
  assert len(batches) == 5 and all(b["text_ids"].shape == (8, 32) for b in batches)
  last = batches[-1]
  np.testing.assert_array_equal(last["example_mask"], np.arange(8) < 5)  # 37 = 4 * 8 + 5
  pad = slice(5, None)
  assert not last["text_mask"][pad].any() and not last["text_ids"][pad].any()
  assert not last["region_mask"][pad].any() and not last["region_feats"][pad].any()
  assert not last["region_boxes"][pad].any()
  assert np.all(last["region_labels"][pad] == -1) and np.all(last["image_id"][pad] == -1)


# --- resume and workers -----------------------------------------------------------------
def test_set_state_resumes_the_same_sequence(data_dir):
  cfg = tiny_data_cfg(data_dir)
  it = pipeline.make_iterator(cfg, "train", batch_size=5, seed=3)
  take(it, 9)  # crosses an epoch boundary
  state = it.get_state()
  expected = take(it, 6)
  resumed = pipeline.make_iterator(cfg, "train", batch_size=5, seed=3)
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 6), expected)


def test_worker_processes_give_the_same_batches(data_dir):
  reference = take(pipeline.make_iterator(tiny_data_cfg(data_dir), "train", batch_size=4,
                                          seed=2), 12)
  it = pipeline.make_iterator(tiny_data_cfg(data_dir, num_workers=2), "train", batch_size=4, seed=2)
  try:
    first = take(it, 7)
    state = it.get_state()
    rest = take(it, 5)
    assert_batches_equal(first + rest, reference)
    it.set_state(state)
    assert_batches_equal(take(it, 5), rest)
  finally:
    it.close()


# --- errors -----------------------------------------------------------------------------
def good_record(image_size=32):
  scene = synthetic_scenes.generate_scene(np.random.default_rng(0), image_size)
  return {"image_id": 42, "image": scene["image"], "caption": scene["caption"].encode(),
          "objects": scene["objects"]}


def preprocess(data_dir, record, **overrides):
  cfg = tiny_data_cfg(data_dir, **overrides)
  tokenizer = pipeline.load_tokenizer(cfg)
  return pipeline.preprocess_record(record, 5, split="train", tokenizer=tokenizer,
                                    special_ids=tokenizer_lib.special_token_ids(tokenizer),
                                    data_cfg=cfg)


def test_bad_records_name_the_record_and_the_key(data_dir):
  assert preprocess(data_dir, good_record())["example_mask"]
  where = r"train record 5 \(image_id 42\), key "
  record = good_record()
  record["image"] = record["image"][:16]
  with pytest.raises(pipeline.BadRecordError, match=where + r"'image': .*\[32, 32, 3\].*\(16, 32, 3\)"):
    preprocess(data_dir, record)
  record = good_record()
  record["image"] = record["image"].astype(np.float32)
  with pytest.raises(pipeline.BadRecordError, match=where + "'image': expected uint8"):
    preprocess(data_dir, record)
  record = good_record()
  record["caption"] = b"  "
  with pytest.raises(pipeline.BadRecordError, match=where + "'caption': .*tokenises to no tokens"):
    preprocess(data_dir, record)
  record = good_record()
  record["caption"] = b"\xff\xfe"
  with pytest.raises(pipeline.BadRecordError, match=where + "'caption'"):
    preprocess(data_dir, record)
  record = good_record()
  record["objects"] = {"boxes": np.tile([[0, 0, 0.5, 0.5]], (6, 1)).astype(np.float32),
                       "label": np.zeros(6, np.int32)}
  with pytest.raises(pipeline.BadRecordError, match=where + "'objects': 6 boxes do not fit"):
    preprocess(data_dir, record, regions="crops")
  record = good_record()
  del record["caption"]
  with pytest.raises(pipeline.BadRecordError, match=where + "'caption'"):
    preprocess(data_dir, record)


def test_bad_record_error_surfaces_through_the_pipeline(data_dir):
  cfg = tiny_data_cfg(data_dir)
  source = [good_record() for _ in range(6)]
  source[4] = dict(source[4], image_id=99, caption=b"")
  ds = pipeline.make_dataset(source, cfg, "train", pipeline.load_tokenizer(cfg), batch_size=2,
                             seed=0, shuffle=False, num_epochs=1)
  with pytest.raises(pipeline.BadRecordError, match=r"train record 4 \(image_id 99\), key 'caption'"):
    list(ds)


def test_unprepared_data_says_how_to_prepare_it(tmp_path):
  with pytest.raises(FileNotFoundError, match="prepare"):
    pipeline.make_iterator(tiny_data_cfg(tmp_path), "train", batch_size=2, seed=0)


def test_nothing_imports_tensorflow(data_dir):
  take(pipeline.make_iterator(tiny_data_cfg(data_dir), "train", batch_size=2, seed=0), 2)
  assert "tensorflow" not in sys.modules


def test_dataset_size_and_unknown_split(data_dir):
  cfg = tiny_data_cfg(data_dir)
  assert [pipeline.dataset_size(cfg, s) for s in ("train", "validation", "test")] == [NUM_TRAIN, 8, 4]
  with pytest.raises(KeyError, match="'dev'"):
    pipeline.make_iterator(cfg, "dev", batch_size=2, seed=0)
