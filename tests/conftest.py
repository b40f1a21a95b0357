"""Shared fixtures: micro configs that compile in seconds on a 2-core CPU."""

import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# One persistent compilation cache for the whole run, set before JAX starts: tests that
# compile the same program (the micro model's steps, the fine-tuning step) compile it
# once, and so do the subprocesses they start, which inherit the environment. One
# directory per run (xdist workers share their run's id), so nothing stale is read.
# Programs that compile in under a second (the op-by-op dispatch of eager code, thousands
# of them) are not worth a disk entry. The directory goes when the run ends.
_RUN_ID = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"mmelectra-test-jax-cache-{_RUN_ID}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import contextlib  # noqa: E402
import importlib.util  # noqa: E402

import ml_collections  # noqa: E402
import pytest  # noqa: E402

from configs import pretrain  # noqa: E402
from mmelectra import config_lib  # noqa: E402

SPECIAL_IDS = dict(pad=0, unk=1, cls=2, sep=3, mask=4)


@contextlib.contextmanager
def most_optimizations_disabled():
  """XLA's cheapest pipeline: compile time dominates the tiny programs of the tests."""
  import jax
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(scope="module")
def fast_compile():
  """`most_optimizations_disabled` for a whole module: `pytestmark = usefixtures(...)`."""
  with most_optimizations_disabled():
    yield


def bench_script(name):
  """`bench/<name>.py` loaded as a module (bench/ is scripts, not a package)."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "bench", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def micro_config(objective="electra", moc="sample", **overrides):
  """A config with a 1/1/1-layer, 32-wide encoder and model fields filled in by hand."""
  c = ml_collections.ConfigDict(pretrain.get_config(f"size=tiny,objective={objective},moc={moc}").to_dict())
  # Uniform masking: the tests build setups without a data set to measure salience on
  # (`setup.mask_salience`); test_mask_salience.py and the end-to-end runs cover it.
  c.text_mask_weighting = "uniform"
  # Every example corrupted from the first step (ELECTRA's pair, what these tests take
  # apart); the default's clean hold and hand-over have their own tests (test_model.py).
  c.update(config_lib.NO_CLEAN_HOLD)
  c.model.update(hidden_size=32, num_heads=2, mlp_dim=64, l_layers=1, r_layers=1, x_layers=1,
                 generator_width_ratio=0.5, vocab_size=40, max_position=16,
                 visual_feat_dim=12, num_regions=6, num_object_classes=5)
  c.data.update(max_text_len=12)
  c.batch_size = 8
  c.total_steps = 10
  c.optimizer.warmup_steps = 2
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  c.lock()
  return c


def random_batch(config, batch_size=None, seed=0):
  """A batch with real structure: [CLS] words [SEP] padding, some padded regions."""
  import numpy as np

  rng = np.random.default_rng(seed)
  b = batch_size or config.batch_size
  t, k, dv = config.data.max_text_len, config.model.num_regions, config.model.visual_feat_dim
  ids = np.zeros((b, t), np.int32)
  text_mask = np.zeros((b, t), bool)
  for i in range(b):
    n = rng.integers(4, t + 1)
    ids[i, 0], ids[i, n - 1] = SPECIAL_IDS["cls"], SPECIAL_IDS["sep"]
    ids[i, 1:n - 1] = rng.integers(5, config.model.vocab_size, n - 2)
    text_mask[i, :n] = True
  region_mask = np.ones((b, k), bool)
  region_mask[::2, -2:] = False
  feats = rng.normal(size=(b, k, dv)).astype(np.float32) * region_mask[..., None]
  labels = np.where(region_mask, rng.integers(0, config.model.num_object_classes, (b, k)), -1)
  return {
      "text_ids": ids, "text_mask": text_mask,
      "region_feats": feats, "region_boxes": rng.random((b, k, 4)).astype(np.float32),
      "region_mask": region_mask, "region_labels": labels.astype(np.int32),
      "image_id": np.arange(b, dtype=np.int32), "example_mask": np.ones((b,), bool),
  }


def tiny_data_cfg(data_dir, **overrides):
  """A synthetic-scenes data config of a few dozen 32 px scenes, built in seconds (the
  other fields as configs/pretrain.py has them)."""
  cfg = pretrain.get_config().data.to_dict()
  cfg.update(name="synthetic_scenes", data_dir=str(data_dir), image_size=32, num_train=30,
             num_validation=6, num_test=5, seed=3, regions="patches", patch_size=8, crop_size=4,
             max_regions=4, max_text_len=32, vocab_size=128, num_workers=0)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


@pytest.fixture
def micro():
  return micro_config


def tiny_run_config(data_dir, steps):
  """micro_config's model on tiny_data_cfg scenes; model fields follow from the data."""
  c = ml_collections.ConfigDict(micro_config().to_dict())
  c.model.update(visual_feat_dim=-1, num_regions=-1, num_object_classes=-1, vocab_size=128,
                 max_position=32)
  c.data = tiny_data_cfg(data_dir)
  c.update(total_steps=steps, checkpoint_every=steps, log_every=steps, batch_size=6)
  c.eval.update(batch_size=6, retrieval_pool=5, retrieval_pairs_per_call=9)
  c.lock()
  return c


@pytest.fixture(scope="session")
def tiny_pretrained_run(tmp_path_factory):
  """Workdir of a 3-step ELECTRA pretraining run of the micro model (config + checkpoint)."""
  import jax

  from mmelectra import train
  root = tmp_path_factory.mktemp("tiny_run")
  with most_optimizations_disabled():
    train.train_and_evaluate(tiny_run_config(str(root / "tfds"), 3), str(root / "run"))
  return str(root / "run")


# The files that take longest (subprocesses that compile on simulated meshes, restart
# runs, or start several hosts) run first, so that under `make test`'s two workers
# (pytest-xdist, one file per worker at a time) no long file starts last.
_LONGEST_FIRST = ("test_sharding.py", "test_fault_tolerance.py", "test_scan_layers.py",
                  "test_multihost.py", "test_finetune.py", "test_model.py", "test_export_hf.py")


def pytest_collection_modifyitems(session, config, items):
  def rank(item):
    name = os.path.basename(str(item.fspath))
    return _LONGEST_FIRST.index(name) if name in _LONGEST_FIRST else len(_LONGEST_FIRST)
  items.sort(key=rank)  # stable: the order within a file is kept


def pytest_sessionfinish(session, exitstatus):
  # The process that set the cache up (xdist's controller, or pytest alone) removes it.
  if _OWN_CACHE and not hasattr(session.config, "workerinput"):
    import shutil
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
