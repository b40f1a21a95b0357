"""Per-device memory of base and large on simulated meshes, from `compile-check`.

  .venv/bin/python bench/compile_table.py [--sizes=base,large] [--devices=8,64] [--per_device_batch=32]

For every size x device count x parallelism (data only, fsdp, fsdp + model) this compiles
the real train step (`mmelectra.compile_check.check`, objective electra, LXMERT shapes:
vocabulary 30522, 20 words, 36 regions x 2048 features, fp32, `model.scan_layers=True`)
for that many simulated CPU devices, one fresh process per cell, and prints one device's
parameters, optimizer state and XLA:CPU's temporaries, then a markdown table and a line
`RESULT <size>_<devices>_<parallelism>_gib=<total> ...`. Nothing is run, only compiled.
The global batch is `--per_device_batch` x devices; the batch is split over data x fsdp
only, so with a model axis of 2 or 4 each device holds 2-4x the examples.
The figures are XLA:CPU's memory plan (see compile_check.py): parameters and optimizer
state are exact, temporaries an estimate of what a TPU/GPU compiler would plan.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# parallelism -> mesh (data, fsdp, model) for n devices
MESHES = {
    "data": lambda n: (n, 1, 1),
    "fsdp": lambda n: (1, n, 1),
    "fsdp+model": lambda n: (1, n // 4, 4) if n >= 16 else (1, n // 2, 2),
}

_CELL = r"""
import json, sys
from configs import pretrain
from mmelectra import compile_check
size, mesh, batch = sys.argv[1], tuple(int(x) for x in sys.argv[2].split(",")), int(sys.argv[3])
c = pretrain.get_config(f"size={size}")
c.batch_size = batch
c.data.max_text_len = 20
c.model.update(vocab_size=30522, visual_feat_dim=2048, num_regions=36, num_object_classes=1600,
               scan_layers=True)
r = compile_check.check(c, dict(zip(("data", "fsdp", "model"), mesh)), num_devices=int(sys.argv[4]))
print("CELL " + json.dumps(r))
"""


def run_cell(size: str, n: int, mesh: tuple[int, int, int], batch: int) -> dict:
  from mmelectra import compile_check
  env = dict(compile_check.simulated_cpu_env(n), PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, "-c", _CELL, size, ",".join(map(str, mesh)), str(batch), str(n)],
                       env=env, cwd=ROOT, capture_output=True, text=True)
  for line in out.stdout.splitlines():
    if line.startswith("CELL "):
      return json.loads(line[5:])
  raise RuntimeError(f"{size} on {mesh}: compile-check failed\n{out.stderr[-3000:]}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="base,large")
  parser.add_argument("--devices", default="8,64")
  parser.add_argument("--parallelism", default=",".join(MESHES))
  parser.add_argument("--per_device_batch", type=int, default=32)
  args = parser.parse_args()
  sys.path.insert(0, ROOT)
  gib = lambda b: b / 2**30  # noqa: E731
  rows, result = [], []
  for size in args.sizes.split(","):
    for n in (int(d) for d in args.devices.split(",")):
      for par in args.parallelism.split(","):
        mesh = MESHES[par](n)
        start = time.perf_counter()
        r = run_cell(size, n, mesh, args.per_device_batch * n)
        wall = time.perf_counter() - start
        batch = args.per_device_batch * n
        row = (f"| {size} | {n} | {par} {mesh} | {batch} ({batch // (mesh[0] * mesh[1])}) | {r['num_params'] / 1e6:.0f}M | "
               f"{gib(r['params_bytes']):.2f} | {gib(r['optimizer_bytes']):.2f} | {gib(r['temp_bytes']):.2f} | "
               f"{gib(r['total_bytes']):.2f} | {r['compile_seconds']:.0f} s |")
        print(row, f"(cell wall {wall:.0f} s)", flush=True)
        rows.append(row)
        result.append(f"{size}_{n}_{par.replace('+', '_')}_gib={gib(r['total_bytes']):.2f}")
  print("\n| size | devices | parallelism (data, fsdp, model) | global batch (per data shard) | parameters | "
        "params GiB | optimizer GiB | temporaries GiB | total GiB | compile |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  print("\n".join(rows))
  print("RESULT " + " ".join(result))


if __name__ == "__main__":
  main()
