"""A run directory written by an earlier version still evaluates, exports and resumes.

`tests/fixtures/run_2026_12_02/` is steps 1-2 of a 4-step pretraining run of the micro
model on 30 synthetic scenes, written by commit 404f00f (before setup, run directories and
the training loop moved into modules of their own): its `config.json`, its step-2
checkpoint and `metrics.jsonl`. `expected_metrics.jsonl` holds what that code logged for
all four steps; a resumed run must log the same losses for steps 3 and 4. The data set is
built again from the config (it is deterministic); only its directory is filled in.
"""

import json
import os
import shutil

import ml_collections
import pytest

from mmelectra import evaluate
from mmelectra import export_hf
from mmelectra import hf_parity
from mmelectra import train
from mmelectra import workdir as workdir_lib

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "run_2026_12_02")
# The old run's programs were compiled like the tests' (jax_disable_most_optimizations).
pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("old_run_data"))


@pytest.fixture
def old_run(data_dir, tmp_path):
  run = str(tmp_path / "run")
  shutil.copytree(FIXTURE, run, ignore=shutil.ignore_patterns("expected_metrics.jsonl"))
  path = os.path.join(run, "config.json")
  with open(path) as f:
    raw = json.load(f)
  raw["data"]["data_dir"] = data_dir
  with open(path, "w") as f:
    json.dump(raw, f)
  return run


def _rows(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_an_old_run_evaluates_and_exports(old_run, tmp_path):
  step, metrics = evaluate.evaluate_workdir(old_run)
  assert step == 2
  assert 0.0 <= metrics["itm_acc"] <= 1.0 and 0.0 <= metrics["rtd_auc"] <= 1.0
  assert metrics["retrieval_pool"] == 5
  step, diffs = export_hf.export_workdir(old_run, str(tmp_path / "hf"), check=True)
  assert step == 2 and not hf_parity.parity_failures(diffs), diffs


def test_an_old_run_resumes_and_logs_what_the_old_code_logged(old_run):
  config = ml_collections.ConfigDict(workdir_lib.load_config(old_run).to_dict())
  assert config.total_steps == 4
  train.train_and_evaluate(config, old_run)
  rows = _rows(os.path.join(old_run, "metrics.jsonl"))
  expected = _rows(os.path.join(FIXTURE, "expected_metrics.jsonl"))
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  for got, want in zip(rows[2:], expected[2:]):
    for key in ("loss", "mlm_loss", "moc_loss", "rtd_loss", "r2d_loss", "itm_loss", "grad_norm"):
      assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-7), (got["step"], key)
