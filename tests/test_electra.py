"""Each pure function of the method, alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmelectra import electra
from mmelectra import metrics as metrics_lib


def _maskable(batch=6, length=20, seed=0):
  rng = np.random.default_rng(seed)
  valid = rng.integers(3, length + 1, size=batch)
  maskable = np.zeros((batch, length), bool)
  for b, v in enumerate(valid):
    maskable[b, 1:v - 1] = True  # [CLS] at 0 and [SEP] at v-1 are not maskable
  return maskable


def test_mask_counts_are_exact_and_avoid_excluded_positions():
  maskable = _maskable()
  rate = 0.25
  m = electra.max_masked(maskable.shape[1], rate)
  pos, w = electra.choose_mask_positions(jax.random.key(0), jnp.asarray(maskable), rate, m)
  pos, w = np.asarray(pos), np.asarray(w)
  for b in range(maskable.shape[0]):
    n_valid = maskable[b].sum()
    expected = min(max(int(np.ceil(rate * n_valid)), 1), n_valid) if n_valid else 0
    chosen = pos[b][w[b] > 0]
    assert len(chosen) == expected
    assert len(set(chosen.tolist())) == expected
    assert maskable[b, chosen].all(), "masked a [CLS]/[SEP]/padding position"
  dense = np.asarray(electra.positions_to_dense(jnp.asarray(pos), jnp.asarray(w), maskable.shape[1]))
  assert (dense.sum(1) == w.sum(1)).all()
  assert not (dense & ~maskable).any()


def test_stochastic_mask_count_averages_the_rate_and_stays_in_range():
  # Images with 1..4 regions: ceil masks one region of each, every time (25-100%);
  # stochastic rounding masks rate * valid of them on average.
  valid = np.array([1, 2, 3, 4] * 2000)
  maskable = np.arange(4)[None, :] < valid[:, None]
  rate = 0.15
  m = electra.max_masked(4, rate)
  ceil_w = np.asarray(electra.choose_mask_positions(jax.random.key(0), jnp.asarray(maskable), rate, m)[1])
  assert (ceil_w.sum(1) == 1).all()
  pos, w = electra.choose_mask_positions(jax.random.key(0), jnp.asarray(maskable), rate, m,
                                         rounding="stochastic")
  pos, w = np.asarray(pos), np.asarray(w)
  counts = w.sum(1)
  for n in range(1, 5):
    mean = counts[valid == n].mean()
    assert abs(mean - rate * n) < 0.04, (n, mean)
  assert counts.min() == 0 and counts.max() <= m
  dense = np.asarray(electra.positions_to_dense(jnp.asarray(pos), jnp.asarray(w), 4))
  assert not (dense & ~maskable).any()
  with pytest.raises(ValueError, match="rounding"):
    electra.num_to_mask(jnp.asarray(maskable), rate, m, rounding="round")


def test_mask_positions_vary_with_rng_and_example_with_nothing_maskable():
  maskable = _maskable()
  maskable[2] = False
  m = electra.max_masked(maskable.shape[1], 0.15)
  p1, w1 = electra.choose_mask_positions(jax.random.key(1), jnp.asarray(maskable), 0.15, m)
  p2, _ = electra.choose_mask_positions(jax.random.key(2), jnp.asarray(maskable), 0.15, m)
  assert not np.array_equal(np.asarray(p1), np.asarray(p2))
  assert np.asarray(w1)[2].sum() == 0


def test_mask_text_and_regions_write_only_real_slots():
  ids = jnp.arange(2 * 6).reshape(2, 6) + 10
  pos = jnp.array([[1, 3], [2, 4]])
  w = jnp.array([[1.0, 0.0], [1.0, 1.0]])
  masked = np.asarray(electra.mask_text(ids, pos, w, mask_id=4))
  expected = np.asarray(ids).copy()
  expected[0, 1] = 4
  expected[1, 2] = expected[1, 4] = 4
  np.testing.assert_array_equal(masked, expected)
  feats = jnp.ones((2, 6, 3))
  mf = np.asarray(electra.mask_regions(feats, pos, w))
  assert mf[0, 1].sum() == 0 and mf[0, 3].sum() == 3
  assert mf[1, 2].sum() == 0 and mf[1, 4].sum() == 0
  assert mf.sum() == 3 * (12 - 3)


def test_gumbel_argmax_follows_the_distribution_and_zero_temperature_is_argmax():
  logits = jnp.log(jnp.array([0.7, 0.2, 0.1]))
  draws = jax.vmap(lambda k: electra.gumbel_argmax(k, logits))(jax.random.split(jax.random.key(0), 20000))
  freq = np.bincount(np.asarray(draws), minlength=3) / 20000
  np.testing.assert_allclose(freq, [0.7, 0.2, 0.1], atol=0.02)
  assert int(electra.gumbel_argmax(jax.random.key(0), jnp.array([0.0, 5.0, 1.0]), 0.0)) == 1
  # no gradient flows through a sample
  g = jax.grad(lambda l: electra.gumbel_argmax(jax.random.key(0), l).astype(jnp.float32).sum())(logits)
  assert np.all(np.asarray(g) == 0)


def test_two_level_sampling_of_long_rows_follows_the_distribution():
  # 1000 entries: four blocks of 256, the last one short (232). Mass on entries in the
  # first, a middle and the short last block; the rest share 10% and -inf is never drawn.
  v = 1000
  assert v > 2 * electra.SAMPLE_BLOCK
  hot = [3, 300, 511, 512, 999]
  probs = np.full(v, 0.1 / (v - len(hot)))
  probs[hot] = [0.3, 0.2, 0.1, 0.1, 0.2]
  logits = np.log(probs)
  logits[7] = -np.inf
  logits = jnp.asarray(logits, jnp.float32).reshape(1, 1, v)  # extra batch axes pass through
  n = 40000
  draws = jax.jit(jax.vmap(lambda k: electra.gumbel_argmax(k, logits, 0.5)))(jax.random.split(jax.random.key(1), n))
  draws = np.asarray(draws).reshape(-1)
  assert draws.min() >= 0 and draws.max() < v and not np.any(draws == 7)
  # temperature 0.5: softmax(2 * logits)
  tempered = probs ** 2
  tempered[7] = 0.0
  tempered /= tempered.sum()
  freq = np.bincount(draws, minlength=v) / n
  np.testing.assert_allclose(freq[hot], tempered[hot], atol=0.01)
  # the rest of the row, together
  assert abs(freq.sum() - freq[hot].sum() - (1 - tempered[hot].sum())) < 0.01
  # rows are sampled independently
  two = jnp.stack([jnp.asarray(np.log(probs), jnp.float32)] * 2)
  pairs = np.asarray(jax.vmap(lambda k: electra.gumbel_argmax(k, two))(jax.random.split(jax.random.key(2), 2000)))
  assert np.mean(pairs[:, 0] == pairs[:, 1]) < 0.3


def test_argmax_is_the_first_maximum_like_jnp_argmax():
  x = jax.random.randint(jax.random.key(0), (64, 700), 0, 5).astype(jnp.float32)  # many ties
  np.testing.assert_array_equal(np.asarray(electra.argmax(x)), np.asarray(jnp.argmax(x, axis=-1)))
  assert electra.argmax(x).dtype == jnp.int32
  assert int(electra.argmax(jnp.array([1.0, jnp.nan, 3.0]))) == 2


def test_sampled_token_equal_to_original_is_not_replaced():
  original = jnp.array([[2, 7, 8, 9, 3, 0]])
  valid = original != 0
  corrupted = jnp.array([[2, 7, 5, 9, 3, 0]])  # position 1 "sampled" its original token 7
  labels = np.asarray(electra.replaced_tokens(original, corrupted, valid))
  np.testing.assert_array_equal(labels, [[0, 0, 1, 0, 0, 0]])


def test_replaced_regions_compares_features_and_ignores_padding():
  orig = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)
  corr = orig.at[0, 1, 2].add(1.0).at[1, 2].set(0.0)
  valid = jnp.array([[True, True, True], [True, True, False]])
  labels = np.asarray(electra.replaced_regions(orig, corr, valid))
  np.testing.assert_array_equal(labels, [[0, 1, 0], [0, 0, 0]])


def test_sample_mode_returns_real_candidate_features_and_keeps_boxes():
  rng = np.random.default_rng(0)
  feats = jnp.asarray(rng.normal(size=(3, 5, 4)).astype(np.float32))
  boxes = jnp.asarray(rng.random((3, 5, 4)).astype(np.float32))
  region_mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], bool)
  pos = jnp.array([[0, 2], [1, 4], [1, 0]])
  w = jnp.array([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
  queries = jnp.asarray(rng.normal(size=(3, 2, 4)).astype(np.float32))
  scores = electra.region_candidate_scores(queries, feats.reshape(-1, 4), region_mask.reshape(-1))
  idx = electra.gumbel_argmax(jax.random.key(0), scores, 1.0)
  pool = np.asarray(feats).reshape(-1, 4)
  valid_pool = np.asarray(region_mask).reshape(-1)
  assert valid_pool[np.asarray(idx)].all(), "sampled a padding region"
  replaced = electra.scatter(feats, pos, pool[np.asarray(idx)], w)
  # every written feature is a real region of the batch
  for b in range(3):
    for m in range(2):
      if w[b, m]:
        row = np.asarray(replaced)[b, int(pos[b, m])]
        assert (np.abs(pool[valid_pool] - row).sum(-1) == 0).any()
  # the unmasked slot of example 1 is untouched; boxes are not an input to replacement
  np.testing.assert_array_equal(np.asarray(replaced)[1, 4], np.asarray(feats)[1, 4])
  assert boxes.shape == (3, 5, 4)
  target = electra.flat_region_index(pos, 5)
  np.testing.assert_array_equal(np.asarray(target)[1], [6, 9])


def test_sample_regions_of_class_picks_that_class_or_reports_none():
  labels = jnp.array([0, 1, 2, 1, -1, 2])
  valid = jnp.array([True, True, True, True, False, False])
  classes = jnp.array([[1, 2, 3]])
  idx, found = electra.sample_regions_of_class(jax.random.key(0), classes, labels, valid)
  idx, found = np.asarray(idx), np.asarray(found)
  assert found.tolist() == [[True, True, False]]
  assert np.asarray(labels)[idx[0, 0]] == 1 and idx[0, 1] == 2  # label-2 region 5 is padding


def test_itm_pairs_negatives_read_another_real_example():
  example_mask = jnp.array([True] * 7 + [False])
  src, matched = electra.itm_pairs(jax.random.key(3), 8, 0.5, example_mask)
  src, matched = np.asarray(src), np.asarray(matched)
  for i in range(8):
    if matched[i]:
      assert src[i] == i
    else:
      assert src[i] != i and src[i] < 7
  big_src, big_matched = electra.itm_pairs(jax.random.key(0), 4000, 0.5)
  assert abs(np.asarray(big_matched).mean() - 0.5) < 0.03
  _, none_neg = electra.itm_pairs(jax.random.key(0), 16, 0.0)
  assert np.asarray(none_neg).all()


def test_itm_hard_negatives_read_a_text_of_their_own_group():
  rng, n = jax.random.key(5), 400
  group = jnp.asarray(np.random.RandomState(0).randint(1, 5, n))  # object counts 1-4
  real = jnp.asarray(np.arange(n) < n - 10)
  uniform = electra.itm_pairs(rng, n, 0.5, real)
  # Off (and no group) draws exactly the uniform negatives: earlier runs keep their stream.
  off = electra.itm_pairs(rng, n, 0.5, real, group=group, same_group_fraction=0.0)
  np.testing.assert_array_equal(np.asarray(off[0]), np.asarray(uniform[0]))
  src, matched = (np.asarray(a) for a in electra.itm_pairs(rng, n, 0.5, real, group=group,
                                                         same_group_fraction=1.0))
  g, neg = np.asarray(group), matched == 0
  np.testing.assert_array_equal(matched, np.asarray(uniform[1]))  # the same pairs negative
  assert (src[neg] != np.arange(n)[neg]).all() and (src[neg] < n - 10).all()
  assert (g[src[neg]] == g[neg]).all()
  # Uniform negatives share the group about a quarter of the time; half hard, between.
  base = (g[np.asarray(uniform[0])[neg]] == g[neg]).mean()
  half, _ = electra.itm_pairs(rng, n, 0.5, real, group=group, same_group_fraction=0.5)
  mixed = (g[np.asarray(half)[neg]] == g[neg]).mean()
  assert base < 0.4 and base + 0.2 < mixed < 0.9
  # An example alone in its group falls back to a uniform other example.
  lone = jnp.asarray([1, 2, 2, 2])
  src1, m1 = electra.itm_pairs(jax.random.key(1), 4, 1.0, group=lone, same_group_fraction=1.0)
  assert int(src1[0]) != 0 and not bool(m1[0])


def test_losses_match_reference_formulas():
  logits = jnp.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
  labels = jnp.array([0, 2])
  w = jnp.array([1.0, 0.0])
  total, weight = metrics_lib.cross_entropy(logits, labels, w)
  ref = -np.log(np.exp(2.0) / np.exp([2.0, 0.5, -1.0]).sum())
  np.testing.assert_allclose(float(total), ref, rtol=1e-6)
  assert float(weight) == 1.0
  z = jnp.array([3.0, -2.0, 0.0])
  y = jnp.array([1.0, 0.0, 1.0])
  s, n = metrics_lib.sigmoid_cross_entropy(z, y, jnp.ones(3))
  p = 1 / (1 + np.exp(-np.asarray(z)))
  np.testing.assert_allclose(float(s), -(np.log(p[0]) + np.log(1 - p[1]) + np.log(p[2])), rtol=1e-6)
  sl, _ = metrics_lib.smooth_l1(jnp.array([[0.0, 3.0]]), jnp.array([[0.5, 0.0]]), jnp.ones(1))
  np.testing.assert_allclose(float(sl), (0.125 + 2.5) / 2)  # mean over the feature axis


def test_zero_loss_weight_removes_that_losses_gradient():
  def total(params, weights):
    losses = {"mlm": params["a"] ** 2, "rtd": 3.0 * params["b"], "itm": params["a"] * params["b"]}
    return electra.weighted_total(losses, weights)

  params = {"a": jnp.array(2.0), "b": jnp.array(5.0)}
  on = dict(moc=1, mlm=1, r2d=50, rtd=50, itm=1)
  off = dict(on, rtd=0, itm=0)
  g_on = jax.grad(total)(params, on)
  g_off = jax.grad(total)(params, off)
  assert float(g_on["b"]) == 150.0 + 2.0
  assert float(g_off["b"]) == 0.0
  assert float(g_off["a"]) == 4.0


def test_binary_metrics_and_auc():
  logits = jnp.array([3.0, 2.0, -1.0, 0.5, -2.0, -3.0])
  labels = jnp.array([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
  sums = metrics_lib.binary_metric_sums("rtd", logits, labels, jnp.ones(6))
  m = metrics_lib.finalize_metrics(jax.device_get(sums))
  assert m["rtd_acc"] == pytest.approx(4 / 6)
  assert m["rtd_precision"] == pytest.approx(2 / 3)
  assert m["rtd_recall"] == pytest.approx(2 / 3)
  # pairs (pos, neg) ranked correctly: 3*3 minus (-1 < 0.5) -> 8/9
  assert m["rtd_auc"] == pytest.approx(8 / 9, abs=1e-6)
  # a metric with nothing to count is absent, not zero
  empty = metrics_lib.binary_metric_sums("r2d", logits, labels, jnp.zeros(6))
  assert metrics_lib.finalize_metrics(jax.device_get(empty)) == {}


def test_metric_sums_add_across_batches():
  a = {"x_acc": (jnp.array(3.0), jnp.array(4.0))}
  b = {"x_acc": (jnp.array(1.0), jnp.array(4.0))}
  assert metrics_lib.finalize_metrics(metrics_lib.add_metric_sums(a, b))["x_acc"] == pytest.approx(0.5)


def test_contrastive_terms_are_symmetric_infonce_over_the_rows_that_take_part():
  rng = np.random.default_rng(0)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  text, image = unit(rng.normal(size=(5, 8))), unit(rng.normal(size=(5, 8)))
  text_valid = np.array([1, 1, 0, 1, 1], bool)  # row 2's text is another image's
  image_valid = np.array([1, 1, 1, 1, 0], bool)  # row 4 is padding
  (total, weight), (correct, rows) = electra.contrastive_terms(
      jnp.asarray(text), jnp.asarray(image), 10.0, jnp.asarray(text_valid), jnp.asarray(image_valid))
  sim = 10.0 * text @ image.T
  t2i = np.where(image_valid[None], sim, -np.inf)
  i2t = np.where(text_valid[None], sim.T, -np.inf)
  lse = lambda x: np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
  rows_in = text_valid & image_valid
  want = sum(lse(m)[rows_in].sum() - m[rows_in, np.flatnonzero(rows_in)].sum() for m in (t2i, i2t))
  np.testing.assert_allclose(float(total), want, rtol=1e-5)
  assert float(weight) == 2 * rows_in.sum() and float(rows) == rows_in.sum()
  assert float(correct) == (t2i.argmax(-1) == np.arange(5))[rows_in].sum()
  # Perfectly aligned pairs at a high temperature cost almost nothing.
  (aligned, _), _ = electra.contrastive_terms(jnp.asarray(image), jnp.asarray(image), 100.0,
                                              jnp.ones(5, bool), jnp.ones(5, bool))
  assert float(aligned) < 1e-3


def test_keep_masked_leaves_the_requested_share_of_real_slots_masked():
  sampled = jnp.full((200, 8), 7, jnp.int32)
  weights = jnp.ones((200, 8)).at[:, -2:].set(0.0)  # the last two slots are padding
  tokens, kept = electra.keep_masked(jax.random.key(0), sampled, weights, 0.25, mask_id=4)
  tokens, kept = np.asarray(tokens), np.asarray(kept)
  assert not kept[:, -2:].any()
  assert abs(kept[:, :-2].mean() - 0.25) < 0.03
  np.testing.assert_array_equal(tokens, np.where(kept, 4, 7))
  none, _ = electra.keep_masked(jax.random.key(0), sampled, weights, 0.0, mask_id=4)
  np.testing.assert_array_equal(np.asarray(none), 7)


def test_clean_rows_keep_every_real_slot_of_their_examples_and_only_those():
  weights = jnp.ones((400, 6)).at[:, -1].set(0.0)
  rows = electra.random_rows(jax.random.key(1), 400, 0.3)
  assert abs(float(rows.mean()) - 0.3) < 0.06
  kept = np.asarray(electra.kept_slots(jax.random.key(0), weights, 0.0, rows))
  # All or nothing per example, never a padding slot.
  np.testing.assert_array_equal(kept[:, :-1], np.repeat(np.asarray(rows)[:, None], 5, 1))
  assert not kept[:, -1].any()
  # With a slot share as well: a clean row is whole, the others keep about that share.
  mixed = np.asarray(electra.kept_slots(jax.random.key(0), weights, 0.5, rows))
  assert mixed[np.asarray(rows), :-1].all()
  assert abs(mixed[~np.asarray(rows), :-1].mean() - 0.5) < 0.05


def test_witness_rows_are_disjoint_split_evenly_and_restore_whole_examples():
  text, regions = (np.asarray(r) for r in electra.witness_rows(jax.random.key(2), 4000, 0.6))
  assert not (text & regions).any()
  assert abs((text | regions).mean() - 0.6) < 0.03
  assert abs(text.mean() - 0.3) < 0.03 and abs(regions.mean() - 0.3) < 0.03
  assert not electra.witness_rows(jax.random.key(2), 50, 0.0)[0].any()
  values = jnp.arange(24, dtype=jnp.float32).reshape(3, 4, 2)
  rows = jnp.array([False, True, False])
  restored = np.asarray(electra.restore_rows(values, -values, rows))
  np.testing.assert_array_equal(restored[1], -np.asarray(values[1]))
  np.testing.assert_array_equal(restored[[0, 2]], np.asarray(values)[[0, 2]])
