"""Evaluation: recall@K on hand-made scores, all-pairs scoring, evaluate/--all/--watch on a
tiny trained run."""

import json
import os
import shutil
import threading
import time

import jax
import numpy as np
import pytest

from conftest import micro_config
from mmelectra import evaluate, retrieval
from mmelectra.model import MMElectra, model_config_from
from mmelectra import workdir as workdir_lib

RETRIEVAL_KEYS = ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10")


# --- metrics on a hand-made score matrix ------------------------------------------------
def test_recall_at_k_on_hand_made_scores():
  # Text t describes image t. Ranks of the true image per text: 0, 1, 2, 0.
  scores = np.array([
      [9., 1., 2., 3.],
      [5., 4., 1., 0.],
      [3., 7., 2., 1.],
      [0., 0., 0., 1.],
  ])
  assert retrieval.ranks_of_positives(scores, np.eye(4, dtype=bool)).tolist() == [0, 1, 2, 0]
  assert retrieval.recall_at_k(scores, np.eye(4, dtype=bool), ks=(1, 2, 3)) == {1: 0.5, 2: 0.75, 3: 1.0}
  m = retrieval.retrieval_metrics(scores, np.arange(4), ks=(1, 2))
  assert m["t2i_r1"] == 0.5 and m["t2i_r2"] == 0.75
  # Columns (image -> texts): image 0 ranks text 0 first; image 1: text 2 (7) beats
  # text 1 (4); image 2: text 0 ties text 2 (2) and a tie counts against; image 3: texts 0
  # (3) and 2 (1, a tie) rank above text 3. Ranks 0, 1, 1, 2.
  assert m["i2t_r1"] == 0.25 and m["i2t_r2"] == 0.75


def test_recall_ties_count_against_and_several_texts_per_image():
  # Constant scores must not look perfect.
  flat = retrieval.retrieval_metrics(np.zeros((5, 5)), np.arange(5), ks=(1, 5))
  assert flat["t2i_r1"] == 0.0 and flat["i2t_r1"] == 0.0 and flat["t2i_r5"] == 1.0
  # Two captions per image (COCO style): image j is found if either caption ranks high.
  scores = np.array([[5., 0.], [1., 0.], [0., 3.], [0., 4.]])
  m = retrieval.retrieval_metrics(scores, np.array([0, 0, 1, 1]), ks=(1,))
  assert m["t2i_r1"] == 1.0 and m["i2t_r1"] == 1.0
  scores[0, 0] = -1.0  # caption 1 (score 1) still beats the other image's captions (0, 0)
  assert retrieval.retrieval_metrics(scores, np.array([0, 0, 1, 1]), ks=(1,))["i2t_r1"] == 1.0
  with pytest.raises(ValueError, match="positive"):
    retrieval.recall_at_k(np.zeros((2, 2)), np.zeros((2, 2), bool))


def test_pool_itm_accuracy_reads_the_heads_sign_on_matched_and_mismatched_pairs():
  # Text t describes image t; log-odds > 0 means "matched". Matched pairs: 3 of 4 called
  # matched (the tie at 0 is "mismatched"); mismatched pairs: 10 of 12 called mismatched.
  scores = np.array([
      [2., -1., -1., 3.],
      [-1., 0.5, -2., -1.],
      [-1., 1., 4., -1.],
      [-1., -1., -1., 0.],
  ])
  m = retrieval.retrieval_metrics(scores, np.arange(4), ks=(1,))
  assert m["pool_itm_pos_acc"] == 0.75 and m["pool_itm_neg_acc"] == 10 / 12
  assert m["pool_itm_acc"] == pytest.approx((0.75 + 10 / 12) / 2)
  # A head that calls everything matched is at chance, however its scores rank.
  m = retrieval.retrieval_metrics(scores + 10.0, np.arange(4), ks=(1,))
  assert (m["pool_itm_pos_acc"], m["pool_itm_neg_acc"], m["pool_itm_acc"]) == (1.0, 0.0, 0.5)
  assert m["t2i_r1"] == retrieval.retrieval_metrics(scores, np.arange(4), ks=(1,))["t2i_r1"]


def test_score_all_pairs_matches_one_pair_at_a_time():
  from conftest import random_batch
  from mmelectra import sharding
  config = micro_config(objective="mlm")
  model = MMElectra(model_config_from(config))
  b = random_batch(config, batch_size=5, seed=1)
  pos = np.zeros((1, 1), np.int32)
  params = model.init(jax.random.key(0), b["text_ids"][:1], b["text_mask"][:1], b["region_feats"][:1],
                      b["region_boxes"][:1], b["region_mask"][:1], pos, pos)["params"]
  import flax.linen as nn
  params = nn.unbox(params)
  mesh = sharding.make_mesh(config)
  scorer = retrieval.make_block_scorer(model, mesh, sharding.axis_rules(config))
  # 5 texts x 5 images in blocks of ~4 pairs: padding and several calls.
  scores = retrieval.score_all_pairs(scorer, params, b, b, pairs_per_call=4)
  assert scores.shape == (5, 5)
  # The reference: each pair as its own example of one ordinary batch.
  t, i = np.array([0, 1, 4, 4, 2]), np.array([0, 3, 2, 4, 1])

  @jax.jit
  def reference(params):
    _, _, pooled = model.apply({"params": params}, b["text_ids"][t], b["text_mask"][t],
                               b["region_feats"][i], b["region_boxes"][i], b["region_mask"][i], True,
                               method=MMElectra.encode)
    logits = model.apply({"params": params}, pooled, method=MMElectra.itm_logits)
    return logits[:, 1] - logits[:, 0]

  np.testing.assert_allclose(scores[t, i], reference(params), rtol=1e-4, atol=1e-5)


def test_block_sizes_split_over_devices():
  for nt, ni, pairs, dp in [(100, 100, 2048, 1), (7, 5, 4, 8), (1000, 1000, 2048, 8), (3, 1, 10, 4)]:
    bt, bi = retrieval.block_sizes(nt, ni, pairs, dp)
    assert (bt * bi) % dp == 0 and bi <= ni and bt >= 1


# --- a tiny trained run -------------------------------------------------------------------
# Compile time dominates these tiny programs (conftest.fast_compile).
pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture
def trained(tiny_pretrained_run):
  return tiny_pretrained_run


def test_evaluate_all_writes_every_metric_and_tensorboard(trained):
  results = evaluate.evaluate_all_steps(trained)
  assert [s for s, _ in results] == [3]
  with open(os.path.join(trained, "eval", "step_3.json")) as f:
    written = json.load(f)
  for key in ("loss", "moc_loss", "mlm_loss", "r2d_loss", "rtd_loss", "itm_loss", "mlm_acc", "moc_acc",
              "rtd_acc", "rtd_auc", "rtd_precision", "rtd_recall", "r2d_acc", "r2d_auc",
              "text_replaced_frac", "region_replaced_frac", "itm_acc", *RETRIEVAL_KEYS,
              "pool_itm_acc", "pool_itm_pos_acc", "pool_itm_neg_acc"):
    assert key in written and np.isfinite(written[key]), key
  assert written["retrieval_pool"] == 5 and written["split"] == "validation"
  # Over a pool of 5, R@5 and R@10 are 1 by definition; R@1 is a real share.
  assert written["t2i_r5"] == 1.0 and written["i2t_r10"] == 1.0
  assert 0.0 <= written["t2i_r1"] <= 1.0
  events = os.listdir(os.path.join(trained, "tensorboard", "eval"))
  assert any(e.startswith("events.out.tfevents") for e in events)


def test_evaluating_a_step_again_replaces_its_results(tmp_path):
  # Another protocol (split, pool) evaluates the same checkpoint again: its file is replaced.
  workdir_lib.write_eval_results(str(tmp_path), 7, {"step": 7, "itm_acc": 0.5, "split": "validation"})
  workdir_lib.write_eval_results(str(tmp_path), 7, {"step": 7, "itm_acc": 0.75, "split": "test"})
  with open(tmp_path / "eval" / "step_7.json") as f:
    assert json.load(f) == {"step": 7, "itm_acc": 0.75, "split": "test"}
  assert os.listdir(tmp_path / "eval") == ["step_7.json"]


def test_watch_picks_up_a_checkpoint_written_after_it_started(trained, tmp_path):
  # The sidecar: started on an empty workdir, it waits for the config and the checkpoint.
  watched = str(tmp_path / "watched")
  os.makedirs(watched)
  seen, errors = [], []

  def watch():
    try:
      evaluate.watch_workdir(watched, poll_seconds=0.2, idle_timeout=120,
                             on_result=lambda s, m: seen.append((s, m)))
    except Exception as e:  # noqa: BLE001 - surfaced below
      errors.append(e)

  thread = threading.Thread(target=watch, daemon=True)
  thread.start()
  time.sleep(0.5)
  shutil.copy(os.path.join(trained, "config.json"), watched)
  # A checkpoint still being written: a step directory without its files.
  os.makedirs(os.path.join(watched, "checkpoints", "1", "state"))
  time.sleep(1.0)
  assert not seen and thread.is_alive() and not errors
  shutil.copytree(os.path.join(trained, "checkpoints", "3"), os.path.join(watched, "checkpoints", "3"))
  thread.join(timeout=120)
  assert not errors, errors
  assert not thread.is_alive()
  # Step 3 is the run's final step: evaluated once, then the watcher stops.
  assert [s for s, _ in seen] == [3]
  assert os.path.exists(os.path.join(watched, "eval", "step_3.json"))
  assert "t2i_r1" in seen[0][1]


def test_eval_every_evaluates_during_training_as_evaluate_does_afterwards(tmp_path):
  """`config.eval_every`: the loop runs the evaluators on the live parameters; a later
  `mmelectra evaluate` of the saved checkpoint gives the same figures."""
  import ml_collections

  from conftest import tiny_run_config
  from mmelectra import train

  config = ml_collections.ConfigDict(tiny_run_config(str(tmp_path / "tfds"), 2).to_dict())
  config.update(eval_every=1, checkpoint_every=1)
  run = str(tmp_path / "run")
  train.train_and_evaluate(config, run)
  assert sorted(os.listdir(os.path.join(run, "eval"))) == ["step_1.json", "step_2.json"]
  with open(os.path.join(run, "eval", "step_2.json")) as f:
    during = json.load(f)
  step, after = evaluate.evaluate_workdir(run)
  assert step == 2 and set(during) == set(after)
  for key, value in after.items():
    assert during[key] == (value if isinstance(value, str) else pytest.approx(value, rel=1e-6)), key
