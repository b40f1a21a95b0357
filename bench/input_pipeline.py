"""Input pipeline throughput vs train-step throughput, per host.

    .venv/bin/python bench/input_pipeline.py [--images=128] [--batches=20] [--steps=8]

Builds two small real-format corpora in a temporary directory (or --workdir):
  patches: image_text_folder of JPEGs (320 x 240, 5 captions each), decoded with PIL,
           resized to 64 px and cut into 16 px patches (16 regions x 768 features);
  regions: lxmert_regions from an LXMERT-layout TSV (36 boxes x 2048 float32 features,
           stored float16), padded to 36 regions.
Then measures, with batch 32:
  - examples/s the grain pipeline delivers with 0 and 2 worker processes;
  - examples/s the tiny and small configs' jitted train step consumes on the same shapes
    (electra objective, fp32, after compile).
Prints a table and ends with
    RESULT patches_vs_step=<ratio> regions_vs_step=<ratio>
where each ratio is the pipeline's best rate over the tiny train step's rate (the faster,
so the harder consumer to keep fed). >= 3 means input never bounds training.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import corpus_files  # noqa: E402  (the tests' real-format writers)
from configs import pretrain  # noqa: E402
from mmelectra import config_lib  # noqa: E402
from mmelectra.data import datasets, pipeline  # noqa: E402
from mmelectra import setup as setup_lib
from mmelectra import train_step

BATCH = 32


def write_photos(root: str, count: int) -> None:
  """JPEGs with photo-like content (smooth colour fields upsampled from noise)."""
  rows = []
  for i in range(count):
    low = np.random.default_rng(i).integers(0, 256, (12, 16, 3), np.uint8)
    path = f"images/{i:05d}.jpg"
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    Image.fromarray(low).resize((320, 240), Image.BICUBIC).save(os.path.join(root, path), quality=90)
    rows.append({"image": path, "captions": [f"photo {i} shows thing {j}" for j in range(5)]})
  corpus_files.write_annotations(root, rows)


def write_regions(root: str, count: int) -> None:
  rows = [corpus_files.region_row(f"COCO_train2014_{i:012d}", 36, 2048, seed=i) for i in range(count)]
  corpus_files.write_tsv(os.path.join(root, "train2014_obj36.tsv"), rows)
  import json
  with open(os.path.join(root, "mscoco_train.json"), "w") as f:
    json.dump([{"img_id": r["img_id"], "sentf": {"mscoco": [f"scene {i} has things"] * 5}}
               for i, r in enumerate(rows)], f)


def config_for(mode: str, size: str, workdir: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(pretrain.get_config(f"size={size}").to_dict())
  c.batch_size = BATCH
  c.data.data_dir = os.path.join(workdir, "tfds")
  if mode == "patches":
    c.data.update(name="image_text_folder", manual_dir=os.path.join(workdir, "photos"),
                  regions="patches", image_size=64, patch_size=16)
  else:
    c.data.update(name="lxmert_regions", manual_dir=os.path.join(workdir, "lxmert"),
                  regions="features", max_regions=36, feature_dim=2048)
  return c


def pipeline_rate(data_cfg, workers: int, batches: int) -> float:
  cfg = ml_collections.ConfigDict({**data_cfg.to_dict(), "num_workers": workers})
  it = pipeline.make_iterator(cfg, "train", batch_size=BATCH, seed=0)
  try:
    for _ in range(2):  # worker start-up and first reads
      next(it)
    start = time.perf_counter()
    for _ in range(batches):
      next(it)
    return batches * BATCH / (time.perf_counter() - start)
  finally:
    if workers:
      it.close()


def step_rate(config, steps: int) -> float:
  config = config_lib.finalize(config)
  setup = setup_lib.build(config, dict(pad=0, unk=1, cls=2, sep=3, mask=4), setup_lib.flat_mask_salience(config))
  state = setup_lib.init_state(setup, 0)
  step = train_step.make_train_step(setup)
  batch = setup_lib.dummy_batch(config, BATCH)
  batch["region_feats"] = np.random.default_rng(0).normal(size=batch["region_feats"].shape).astype(np.float32)
  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
    batch = setup_lib.to_global(batch, setup.mesh)
    state, _ = step(state, batch)  # compile
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(steps):
      state, _ = step(state, batch)
    jax.block_until_ready(state)
  return steps * BATCH / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", type=int, default=128)
  parser.add_argument("--batches", type=int, default=20)
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--workdir", default=None)
  args = parser.parse_args()
  jax.config.update("jax_threefry_partitionable", True)
  workdir = args.workdir or tempfile.mkdtemp(prefix="bench_input_")
  if not os.path.exists(os.path.join(workdir, "photos")):
    write_photos(os.path.join(workdir, "photos"), args.images)
    write_regions(os.path.join(workdir, "lxmert"), args.images)
  rates = {}
  for mode in ("patches", "regions"):
    data_cfg = config_for(mode, "tiny", workdir).data
    start = time.perf_counter()
    datasets.prepare(data_cfg)
    print(f"{mode}: prepared in {time.perf_counter() - start:.1f}s", flush=True)
    for workers in (0, 2):
      rates[(mode, f"pipeline, {workers} workers")] = pipeline_rate(data_cfg, workers, args.batches)
      print(f"  pipeline {workers} workers: {rates[(mode, f'pipeline, {workers} workers')]:.0f} ex/s",
            flush=True)
    for size in ("tiny", "small"):
      rates[(mode, f"train step {size}")] = step_rate(config_for(mode, size, workdir), args.steps)
      print(f"  train step {size}: {rates[(mode, f'train step {size}')]:.0f} ex/s", flush=True)
  print(f"\n{'mode':8s} {'what':24s} {'examples/s':>10s}")
  for (mode, what), rate in rates.items():
    print(f"{mode:8s} {what:24s} {rate:10.0f}")
  ratios = {}
  for mode in ("patches", "regions"):
    best = max(rates[(mode, "pipeline, 0 workers")], rates[(mode, "pipeline, 2 workers")])
    ratios[mode] = best / rates[(mode, "train step tiny")]
  print(f"RESULT patches_vs_step={ratios['patches']:.2f} regions_vs_step={ratios['regions']:.2f}")


if __name__ == "__main__":
  main()
