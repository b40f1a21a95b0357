"""Salience-weighted masking: the per-token table, the weighted draw, and a run's table."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import SPECIAL_IDS, micro_config, tiny_data_cfg
from mmelectra import electra
from mmelectra import errors
from mmelectra import objectives
from mmelectra import setup as setup_lib
from mmelectra import workdir as workdir_lib
from mmelectra.data import mask_salience


def test_a_word_its_neighbours_fix_has_no_salience_and_an_open_one_has_log_of_its_choices():
  # [CLS]=2 a=10 {red=20 | blue=21 | green=22 | pink=23} box=11 [SEP]=3: "a" and "box" are
  # fixed by their neighbours, the colour is one of four.
  rows = [[2, 10, 20 + i % 4, 11, 3] for i in range(400)]
  table = mask_salience.context_surprisal(rows, vocab_size=30, smoothing=0.01)
  assert table.shape == (30,) and table.dtype == np.float32
  for word in (10, 11):
    assert table[word] < 0.01, table[word]
  for colour in range(20, 24):
    np.testing.assert_allclose(table[colour], np.log(4), rtol=0.01)
  # A token never seen counts as the most salient seen (rare words are content words).
  np.testing.assert_allclose(table[25], table[20:24].max())
  # Only rows with a word between two others count; ids must fit the vocabulary.
  with pytest.raises(errors.InvalidInput, match="no caption"):
    mask_salience.context_surprisal([[2, 3]], vocab_size=30)
  with pytest.raises(errors.InvalidInput, match="outside the vocabulary"):
    mask_salience.context_surprisal([[2, 40, 3]], vocab_size=30)
  with pytest.raises(errors.InvalidInput, match="floor"):
    mask_salience.mask_log_weights(table, 0.0)


def test_weighted_positions_follow_the_weights_and_equal_weights_draw_as_uniform():
  rng = jax.random.key(0)
  maskable = jnp.asarray(np.tile(np.arange(12) < 10, (4000, 1)))  # the last 2: padding
  uniform = electra.choose_mask_positions(rng, maskable, 0.2, 3)
  same = electra.choose_mask_positions(rng, maskable, 0.2, 3, log_weights=jnp.zeros(maskable.shape))
  # Zero log-weights give the very positions of the uniform draw (the same random stream).
  np.testing.assert_array_equal(np.asarray(uniform[0]), np.asarray(same[0]))
  np.testing.assert_array_equal(np.asarray(uniform[1]), np.asarray(same[1]))
  # Position 0 weighs 9 times any other; 2 of 10 drawn without replacement, one at a time
  # in proportion to the weights left: position 0 is drawn first with p = 9/18, else
  # second with p = 9/17; the others share the rest equally.
  log_w = jnp.zeros(maskable.shape).at[:, 0].set(np.log(9.0))
  pos, w = electra.choose_mask_positions(rng, maskable, 0.2, 3, log_weights=log_w)
  pos, w = np.asarray(pos), np.asarray(w)
  chosen = np.zeros(12)
  for p, wt in zip(pos.reshape(-1), w.reshape(-1)):
    chosen[p] += wt
  share = chosen / len(pos)
  assert np.all(w.sum(1) == 2)  # ceil(0.2 * 10)
  np.testing.assert_allclose(share[0], 9 / 18 + 9 / 18 * 9 / 17, atol=0.02)
  np.testing.assert_allclose(share[1:10], (2 - share[0]) / 9, atol=0.02)
  assert share[10:].sum() == 0  # padding is never masked, whatever its weight


def test_the_objective_masks_salient_words_and_needs_a_table():
  config = ml_collections.ConfigDict(micro_config().to_dict())
  config.text_mask_weighting = "salience"
  with pytest.raises(errors.InvalidInput, match="mask-salience table"):
    objectives.objective_config_from(config, SPECIAL_IDS)
  with pytest.raises(errors.InvalidInput, match="one entry per token id"):
    objectives.objective_config_from(config, SPECIAL_IDS, np.ones(7))
  # Token 20 is salient, every other word not: nearly every masked slot holds a 20.
  table = np.zeros(config.model.vocab_size, np.float32)
  table[20] = 5.0
  ocfg = objectives.objective_config_from(config, SPECIAL_IDS, table)
  ids = np.full((64, 12), 30, np.int32)
  ids[:, 0], ids[:, -1], ids[:, 5] = SPECIAL_IDS["cls"], SPECIAL_IDS["sep"], 20
  batch = {"text_ids": jnp.asarray(ids), "text_mask": jnp.ones(ids.shape, bool),
           "region_mask": jnp.ones((64, 6), bool)}
  x = objectives._prepare(
      {**batch, "region_feats": jnp.zeros((64, 6, 12)), "region_boxes": jnp.zeros((64, 6, 4))},
      jax.random.key(1), ocfg)
  def rows_masking_20(x):
    masked = np.asarray(electra.gather(x.text_ids, x.text_positions))
    return ((masked == 20) & (np.asarray(x.text_weights) > 0)).any(1).mean()

  # ceil(0.15 * 11) = 2 of the 11 words masked a row. Salience 5 + floor 0.05 against the
  # floor alone (weight ratio 101) puts the one 20 of a row among them nearly always.
  assert rows_masking_20(x) > 0.95, rows_masking_20(x)
  uniform = objectives.objective_config_from(micro_config(), SPECIAL_IDS)
  x = objectives._prepare(
      {**batch, "region_feats": jnp.zeros((64, 6, 12)), "region_boxes": jnp.zeros((64, 6, 4))},
      jax.random.key(1), uniform)
  assert rows_masking_20(x) < 0.4  # uniform: 2 / 11


def test_a_run_measures_its_table_once_and_reads_it_back(tmp_path):
  config = ml_collections.ConfigDict(micro_config().to_dict())
  config.text_mask_weighting = "salience"
  config.data = tiny_data_cfg(str(tmp_path / "tfds"))
  config.model.update(visual_feat_dim=-1, num_regions=-1, num_object_classes=-1, vocab_size=128,
                      max_position=32)
  data = setup_lib.prepare_data(config)
  workdir = str(tmp_path / "run")
  table = setup_lib.mask_salience(data, workdir)
  assert table.shape == (128,)
  # Measuring writes nothing: `train` saves the table once its start is accepted.
  saved = workdir_lib.mask_salience_path(workdir)
  assert not saved.exists()
  # The synthetic captions' function words are fixed by their neighbours; colour words are not.
  tok = data.tokenizer
  # (30 captions: the add-0.1 smoothing still leaves "and" a little surprise.)
  assert table[tok.token_to_id("red")] > 1.0 and table[tok.token_to_id("and")] < 0.3
  workdir_lib.save_mask_salience(table, workdir)
  np.testing.assert_array_equal(np.load(saved), table)
  # Read back, not measured again: a planted table is what the run gets.
  planted = np.arange(128, dtype=np.float32)
  np.save(saved, planted)
  np.testing.assert_array_equal(setup_lib.mask_salience(data, workdir), planted)
  np.save(saved, planted[:50])
  with pytest.raises(errors.InvalidInput, match="another vocabulary"):
    setup_lib.mask_salience(data, workdir)
  # Uniform masking has no table.
  uniform = ml_collections.ConfigDict(data.config.to_dict())
  uniform.text_mask_weighting = "uniform"
  assert setup_lib.mask_salience(setup_lib.DataContext(uniform, tok, data.special_ids), workdir) is None
