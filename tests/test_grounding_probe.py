"""The grounding probe's pure parts: which words it picks, and its region-size classifier."""

import numpy as np

import conftest

probe = conftest.bench_script("grounding_probe")


def test_pick_words_takes_only_listed_words_and_marks_captions_without_one():
  ids = np.array([[1, 5, 7, 5, 2], [1, 3, 4, 6, 2], [1, 7, 3, 3, 2]])
  rng = np.random.default_rng(0)
  for _ in range(20):
    pos = probe.pick_words(ids, [5, 7], rng)
    assert pos[1] == -1
    assert ids[0, pos[0]] in (5, 7) and ids[2, pos[2]] == 7


WIDTH = 16  # region output width of the synthetic outputs


def _scenes(n=200, k=4, seed=0):
  rng = np.random.default_rng(seed)
  side = np.where(rng.random((n, k)) < 0.5, 0.16, 0.30)
  x1 = rng.random((n, k)) * 0.6
  y1 = rng.random((n, k)) * 0.6
  boxes = np.stack([x1, y1, x1 + side, y1 + side], -1).astype(np.float32)
  mask = np.ones((n, k), bool)
  mask[:, -1] = rng.random(n) < 0.5  # some scenes have a padded slot
  return rng, side, boxes, mask


def test_region_size_accuracy_reads_extent_where_the_outputs_carry_it():
  rng, side, boxes, mask = _scenes()
  noise = rng.normal(size=side.shape + (WIDTH,)).astype(np.float32)
  carries = noise.copy()
  carries[..., 3] += 3.0 * np.sign(side - 0.23)  # one direction holds the size
  assert probe.region_size_accuracy(carries, boxes, mask) > 0.95
  chance = probe.region_size_accuracy(noise, boxes, mask)
  assert 0.35 < chance < 0.65


def test_region_size_accuracy_ignores_padded_regions():
  rng, side, boxes, mask = _scenes()
  vis = rng.normal(size=side.shape + (WIDTH,)).astype(np.float32)
  vis[..., 0] += 3.0 * np.sign(side - 0.23)
  # Padded slots get garbage boxes and outputs; the score must not move.
  garbage_boxes, garbage_vis = boxes.copy(), vis.copy()
  garbage_boxes[~mask] = 5.0
  garbage_vis[~mask] = 1e3
  assert (probe.region_size_accuracy(vis, boxes, mask)
          == probe.region_size_accuracy(garbage_vis, garbage_boxes, mask))
