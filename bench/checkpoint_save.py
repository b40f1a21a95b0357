"""Checkpoint save time (blocking part vs total) and size, for model sizes of the config.

  .venv/bin/python bench/checkpoint_save.py [--sizes=small,base] [--saves=3]

The train state ({"step", "params", "opt"}: AdamW keeps two moments, so about 3x the
parameters) is filled with random numbers on the local devices (no compile), then saved
`--saves` times by the run's async CheckpointManager. "blocking" is how long `save`
holds the train loop (arrays copied to host, the iterator's and config's items written);
"total" is until the checkpoint is committed on disk. The first save includes one-off
setup and is reported apart. Model fields: `small` with the config's synthetic-scenes
defaults (vocabulary 128, 16 patch regions); `base` as LXMERT (BERT vocabulary 30522,
36 regions of 2048-d detector features).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import grain  # noqa: E402
import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from configs import pretrain  # noqa: E402
from mmelectra import checkpoint  # noqa: E402
from mmelectra import setup as setup_lib
from mmelectra import workdir as workdir_lib

SPECIAL_IDS = dict(pad=0, unk=1, cls=2, sep=3, mask=4)
MODEL_FIELDS = {
    "small": dict(visual_feat_dim=16 * 16 * 3, num_regions=16, num_object_classes=48),
    "base": dict(visual_feat_dim=2048, num_regions=36, num_object_classes=1600, vocab_size=30522),
}


def _data_iterator():
  """A small grain iterator stands in for the pipeline: its item is a small JSON state."""
  it = iter(grain.MapDataset.range(100).to_iter_dataset())
  next(it)
  return it


def _setup(size: str):
  c = ml_collections.ConfigDict(pretrain.get_config(f"size={size}").to_dict())
  c.model.update(MODEL_FIELDS[size])
  c.batch_size = len(jax.devices())
  c.lock()
  return setup_lib.build(c, SPECIAL_IDS, setup_lib.flat_mask_salience(c))


def _dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def bench(size: str, saves: int, root: str) -> dict:
  setup = _setup(size)
  rng = np.random.default_rng(0)
  state = jax.tree.map(
      lambda a: jax.device_put(rng.standard_normal(a.shape, np.float32).astype(a.dtype)
                               if np.issubdtype(a.dtype, np.floating) else np.zeros(a.shape, a.dtype),
                               a.sharding),
      setup.abstract_state)
  jax.block_until_ready(state)
  n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  workdir = os.path.join(root, size)
  manager = workdir_lib.training_manager(workdir, max_to_keep=2)
  blocking, total = [], []
  data_iter = _data_iterator()
  for step in range(1, saves + 2):
    t0 = time.perf_counter()
    checkpoint.save(manager, step, state, data_iter=data_iter, config=setup.config)
    t1 = time.perf_counter()
    manager.wait_until_finished()
    t2 = time.perf_counter()
    blocking.append(t1 - t0)
    total.append(t2 - t0)
  size_bytes = _dir_bytes(os.path.join(workdir_lib.checkpoint_dir(workdir), str(saves + 1)))
  manager.close()
  shutil.rmtree(workdir, ignore_errors=True)
  return dict(size=size, params_m=n_params / 1e6, ckpt_mb=size_bytes / 2**20,
              first_blocking_s=blocking[0], first_total_s=total[0],
              blocking_s=statistics.median(blocking[1:]), total_s=statistics.median(total[1:]))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--sizes", default="small,base")
  parser.add_argument("--saves", type=int, default=3)
  parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
  args = parser.parse_args()
  root = args.dir or tempfile.mkdtemp(prefix="ckpt_bench_")
  cpu = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
  print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}, {cpu} CPU cores, dir {root}")
  results = []
  for size in args.sizes.split(","):
    r = bench(size, args.saves, root)
    results.append(r)
    print(f"{r['size']:>5}: {r['params_m']:.1f}M params, checkpoint {r['ckpt_mb']:.1f} MiB; "
          f"save blocking {r['blocking_s']:.3f} s of {r['total_s']:.3f} s total (median of "
          f"{args.saves}; first save {r['first_blocking_s']:.3f} / {r['first_total_s']:.3f} s)",
          flush=True)
  print("RESULT " + "; ".join(
      f"{r['size']}: {r['ckpt_mb']:.1f} MiB, blocking {r['blocking_s']:.3f} s, total {r['total_s']:.3f} s"
      for r in results))


if __name__ == "__main__":
  main()
