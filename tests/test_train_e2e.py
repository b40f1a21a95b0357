"""End to end: the real loop on a small synthetic-scenes set, both objectives, then evaluate."""

import json
import os

import ml_collections
import numpy as np
import pytest

from configs import pretrain
from mmelectra import evaluate, train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _config(data_dir, objective, steps, **overrides):
  c = ml_collections.ConfigDict(pretrain.get_config(f"size=tiny,objective={objective}").to_dict())
  c.model.update(l_layers=1, r_layers=1, x_layers=1, dropout_rate=0.0, attention_dropout_rate=0.0)
  c.data.update(data_dir=data_dir, num_train=512, num_validation=64, num_test=64, regions="crops")
  c.update(batch_size=32, total_steps=steps, log_every=10, checkpoint_every=steps)
  c.optimizer.update(warmup_steps=5, learning_rate=1e-3)
  c.eval.batch_size = 32
  for k, v in overrides.items():
    c[k] = v
  c.lock()
  return c


def _read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_electra_losses_fall_and_evaluate_writes_json(data_dir, tmp_path):
  workdir = str(tmp_path / "electra")
  # The default's schedule, shortened: clean pairs (the baseline's task) for 20 steps, handed
  # over to corrupted pairs by step 30.
  train.train_and_evaluate(_config(data_dir, "electra", 60, discriminator_mask_hold_steps=20,
                                   discriminator_mask_decay_steps=10), workdir)
  rows = _read_metrics(workdir)
  assert [r["step"] for r in rows] == [10, 20, 30, 40, 50, 60]
  # Nothing replaced while the clean share holds (no replaced slot to count), then the
  # generator's samples are read.
  assert not {"text_replaced_frac", "region_replaced_frac"} & (set(rows[0]) | set(rows[1]))
  assert all(0 < r["text_replaced_frac"] <= 1 and 0 < r["region_replaced_frac"] <= 1
             for r in rows[2:])
  # The default masks by salience; the run keeps the table it masked with.
  assert os.path.exists(os.path.join(workdir, "mask_salience.npy"))
  first, last = rows[0], rows[-1]
  for key in ("moc_loss", "mlm_loss", "r2d_loss", "rtd_loss", "itm_loss", "rtd_auc", "r2d_auc",
              "text_replaced_frac", "region_replaced_frac", "grad_norm", "learning_rate",
              "examples_per_sec"):
    assert key in last, key
  # A real learning signal, not only "finite": the generator's losses fall clearly.
  # (Region prediction and ITM need cross-modal binding, which takes far more steps.)
  assert last["mlm_loss"] < 0.7 * first["mlm_loss"], (first["mlm_loss"], last["mlm_loss"])
  # RTD ranks replaced words better after 30 steps of corrupted pairs than at the hand-over.
  assert last["rtd_auc"] > rows[2]["rtd_auc"] + 0.05, (rows[2]["rtd_auc"], last["rtd_auc"])
  # The fusion encoder's own first signal, the corrective LM, falls across both phases.
  assert last["clm_loss"] < 0.8 * first["clm_loss"], (first["clm_loss"], last["clm_loss"])
  # The default leaves the clean pairs out of RTD/R2D, so the objective gains those terms at
  # the hand-over and totals compare only within a phase (clean: steps 1-20; corrupted from
  # step 31).
  assert rows[1]["loss"] < rows[0]["loss"], (rows[0]["loss"], rows[1]["loss"])
  assert last["loss"] < rows[3]["loss"], (rows[3]["loss"], last["loss"])
  step, metrics = evaluate.evaluate_workdir(workdir)
  assert step == 60
  with open(os.path.join(workdir, "eval", "step_60.json")) as f:
    written = json.load(f)
  assert written["num_examples"] == 64
  for key in ("loss", "rtd_auc", "r2d_auc", "itm_acc", "mlm_acc", "moc_acc", "rtd_precision"):
    assert np.isfinite(written[key]), key


def test_mlm_objective_trains(data_dir, tmp_path):
  workdir = str(tmp_path / "mlm")
  train.train_and_evaluate(_config(data_dir, "mlm", 40), workdir)
  rows = _read_metrics(workdir)
  first, last = rows[0], rows[-1]
  assert "rtd_loss" not in last and "r2d_auc" not in last  # absent, not zero
  assert last["mlm_loss"] < 0.7 * first["mlm_loss"], (first["mlm_loss"], last["mlm_loss"])
  assert last["loss"] < 0.9 * first["loss"], (first["loss"], last["loss"])
