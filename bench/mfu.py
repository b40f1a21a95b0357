"""Model FLOPs utilisation of the train step: analytic FLOP/s over the device's peak.

    .venv/bin/python bench/mfu.py [--sizes=small] [--objectives=electra,mlm] [--batch=small=64]
        [--steps=small=4] [--repeats=5] [--matmul=2048,4096]
        [--device=cpu|gpu] [--dtype=float32|bfloat16]

The config is the LXMERT-shaped one of `step_throughput.py` (vocabulary 30522, 20
tokens, 36 regions x 2048 features, dropout 0; `step_timing.lxmert_config`), objective
electra (the method) and mlm (the baseline), at the config's batch size (64) unless
--batch says otherwise. FLOPs per step are `flops.train_step_flops` (matmuls only,
backward = 2x forward).

CPU: the peak is this machine's fp32 large-matmul rate, measured fresh in the same run
and the same conditions as the steps: an n x n matmul (each n of --matmul) is one more
runner in its own process, timed in the same alternating rounds (`step_timing.measure`);
the peak is the best round of any size. MFU = median step FLOP/s / peak.
GPU (`--device=gpu`): the peak is the vendor's dense bf16 figure (`flops.PEAK_FLOPS`,
989 TFLOP/s for an H100); each objective is timed alone on the chip, at the first batch
of --batch (a list, largest first, e.g. base=1024,512,256) that compiles and runs.
Ends with
    RESULT mfu_<size>=<electra> mfu_<size>_mlm=<mlm> peak_tflops=<peak> batch_<size>=<batch>
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import step_timing  # noqa: E402
from configs import pretrain  # noqa: E402
from step_throughput import DEFAULT_STEPS, pick  # noqa: E402

LOG = functools.partial(print, flush=True)


def per_size_list(arg: str) -> dict:
  """`small=32,base=1024,512` -> {"small": [32], "base": [1024, 512]}."""
  out, key = {}, "*"
  for item in filter(None, arg.split(",")):
    if "=" in item:
      key, item = item.split("=")
    out.setdefault(key.strip(), []).append(int(item))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="small")
  parser.add_argument("--objectives", default="electra,mlm")
  parser.add_argument("--batch", default="", help="per size (default: the config's, 64); "
                      "on GPU a list, largest first: base=768,512,256")
  parser.add_argument("--steps", default="", help="steps per round, per size")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--matmul", default="2048,4096", help="CPU: matmul sizes for the peak")
  parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  args = parser.parse_args()
  sizes = [s for s in args.sizes.split(",") if s]
  objectives = [o for o in args.objectives.split(",") if o]
  batches = per_size_list(args.batch)
  steps = {k: v[0] for k, v in per_size_list(args.steps).items()}
  on_cpu = args.device == "cpu"
  print(f"device={args.device} dtype={args.dtype} cpus={os.cpu_count()} load={os.getloadavg()[0]:.2f}",
        flush=True)

  keys = []
  for size in sizes:
    # Default: the config's own batch size (configs/pretrain.py).
    candidates = batches.get(size, batches.get("*", [pretrain.get_config(f"size={size}").batch_size]))
    n = pick(steps, size, DEFAULT_STEPS)
    print(f"\n{size}: batch {candidates}, {args.repeats} rounds of {n} steps", flush=True)
    specs = {o: dict(kind="jax", size=size, objective=o, dtype=args.dtype) for o in objectives}
    if on_cpu:
      specs = {o: {**spec, "batch_size": candidates[0]} for o, spec in specs.items()}
      for m in filter(None, args.matmul.split(",")):
        # Timed in the same rounds as the steps, so the peak sees the same load.
        specs[f"matmul{m}"] = dict(kind="matmul", n=int(m), dtype=args.dtype)
      res = step_timing.measure(specs, n, args.repeats, alternate=True, log=LOG)
    else:
      # One objective at a time on the chip; the later ones try no batch above the first's.
      res = {}
      for o, spec in specs.items():
        res.update(step_timing.measure({o: spec}, n, args.repeats, alternate=False,
                                       batch_sizes=candidates, log=LOG))
        candidates = [b for b in candidates if b <= res[o]["batch_size"]]
    rate = {name: r["flops_per_step"] / r["sec_per_step"] for name, r in res.items()}
    if on_cpu:
      # The peak is the best round of any matmul size: the highest rate seen, so the MFU
      # is not flattered by a round the machine's load slowed.
      peak = 0.0
      for k in (k for k in res if k.startswith("matmul")):
        best = res[k]["flops_per_step"] / min(res[k]["all_sec_per_step"])
        peak = max(peak, best)
        print(f"  {k}: median {rate[k] / 1e9:.1f} GFLOP/s, best round {best / 1e9:.1f} GFLOP/s")
      print(f"  peak (best round): {peak / 1e9:.1f} GFLOP/s")
    else:
      peak = res[objectives[0]]["peak_flops"]
      if not peak:
        raise SystemExit(f"no peak FLOP/s known for {res[objectives[0]]['device_kind']!r} (flops.PEAK_FLOPS)")
    print(f"\n{'size':6s} {'objective':9s} {'batch':>5s} {'examples/s':>10s} {'TFLOP/s':>8s} {'MFU':>6s}")
    for o in objectives:
      r = res[o]
      mfu = rate[o] / peak
      print(f"{size:6s} {o:9s} {r['batch_size']:5d} {r['batch_size'] / r['sec_per_step']:10.2f} "
            f"{rate[o] / 1e12:8.4f} {mfu:6.1%}")
      keys.append(f"mfu_{size}{'' if o == 'electra' else '_' + o}={mfu:.3f}")
    keys.append(f"batch_{size}={res[objectives[0]]['batch_size']}")
    keys.append(f"peak_tflops_{size}={peak / 1e12:.4g}")
  print(f"load={os.getloadavg()[0]:.2f}")
  print("RESULT " + " ".join(keys))


if __name__ == "__main__":
  main()
