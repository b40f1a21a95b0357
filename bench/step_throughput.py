"""Train-step throughput: mmelectra (mlm, electra) against PyTorch LXMERT, side by side.

    .venv/bin/python bench/step_throughput.py [--sizes=small,base] [--batch=small=32,base=8]
        [--steps=small=4,base=2] [--repeats=5] [--only=torch,mlm,electra]
        [--device=cpu|gpu] [--dtype=float32|bfloat16]

For each size, at LXMERT's input shapes (vocabulary 30522, 20 tokens, 36 regions x 2048
features; see `step_timing.py`), the same batch size and encoder sizes, dropout 0:
  torch    Hugging Face `LxmertForPreTraining`: masked LM + feature regression + matching,
           forward, backward, AdamW step (`TorchStep`);
  mlm      mmelectra's jitted train step, objective mlm (MLM + MOC `sample` + ITM);
  electra  the same, objective electra (generator + RTD/R2D + ITM).
Each runs in its own process (started alike; compile and two warm-up steps excluded);
then `--repeats` rounds run `--steps` steps of each in turn, and the median round counts.
Prints examples/s, analytic TFLOP/s (`flops.train_step_flops`; for torch the same count
with its heads over every position, `step_timing.torch_reference_flops`) and the ratios,
and ends with
    RESULT mlm_vs_torch=<small> electra_vs_torch=<small> mlm_vs_torch_base=... ...
(the ratios are examples/s over torch's examples/s; the first size's keys are unsuffixed).
On a GPU (`--device=gpu`) the runners are timed one after another, each with the chip to
itself, and PyTorch runs on cuda (bf16 autocast with --dtype=bfloat16).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import step_timing  # noqa: E402

LOG = functools.partial(print, flush=True)

RUNNERS = ("torch", "mlm", "electra")
DEFAULT_BATCH = {"small": 32, "base": 8, "tiny": 32, "large": 4}
DEFAULT_STEPS = {"small": 4, "base": 2, "tiny": 8, "large": 1}


def per_size(arg: str, cast=int) -> dict:
  """`small=32,base=8` -> {"small": 32, "base": 8}; a bare value applies to every size."""
  if "=" not in arg:
    return {"*": cast(arg)}
  return {k.strip(): cast(v) for k, v in (item.split("=") for item in arg.split(","))}


def pick(table: dict, size: str, default: dict):
  return table.get(size, table.get("*", default[size]))


def spec_for(runner: str, size: str, batch: int, args) -> dict:
  device = "cuda" if args.device == "gpu" else "cpu"
  if runner == "torch":
    return dict(kind="torch", size=size, batch_size=batch, dtype=args.dtype, device=device)
  return dict(kind="jax", size=size, batch_size=batch, objective=runner, dtype=args.dtype)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="small,base")
  parser.add_argument("--batch", default="", help="per size, e.g. small=32,base=8")
  parser.add_argument("--steps", default="", help="steps per round, per size")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--only", default=",".join(RUNNERS))
  parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  args = parser.parse_args()
  sizes = [s for s in args.sizes.split(",") if s]
  runners = [r for r in args.only.split(",") if r]
  if set(runners) - set(RUNNERS):
    parser.error(f"--only: expected some of {RUNNERS}")
  batches, steps = per_size(args.batch) if args.batch else {}, per_size(args.steps) if args.steps else {}
  print(f"device={args.device} dtype={args.dtype} cpus={os.cpu_count()} load={os.getloadavg()[0]:.2f}",
        flush=True)

  results = {}
  for size in sizes:
    batch, n = pick(batches, size, DEFAULT_BATCH), pick(steps, size, DEFAULT_STEPS)
    print(f"\n{size}: batch {batch}, {args.repeats} rounds of {n} steps", flush=True)
    specs = {r: spec_for(r, size, batch, args) for r in runners}
    results[size] = step_timing.measure(specs, n, args.repeats, alternate=args.device == "cpu",
                                        log=LOG)

  print(f"\n{'size':6s} {'runner':8s} {'batch':>5s} {'examples/s':>10s} {'TFLOP/s':>8s} "
        f"{'vs torch':>8s} {'compile s':>9s}")
  keys = []
  for i, size in enumerate(sizes):
    res = results[size]
    for name, r in res.items():
      r["examples_per_sec"] = r["batch_size"] / r["sec_per_step"]
      r["tflops"] = r["flops_per_step"] / r["sec_per_step"] / 1e12
    for name, r in res.items():
      ratio = r["examples_per_sec"] / res["torch"]["examples_per_sec"] if "torch" in res else None
      print(f"{size:6s} {name:8s} {r['batch_size']:5d} {r['examples_per_sec']:10.2f} "
            f"{r['tflops']:8.4f} {'' if ratio is None else f'{ratio:8.2f}'} {r['compile_s']:9.1f}")
      if ratio is not None and name != "torch":
        keys.append(f"{name}_vs_torch{'' if i == 0 else '_' + size}={ratio:.2f}")
  for size in sizes:
    keys += [f"{name}_ex_per_s_{size}={r['examples_per_sec']:.2f}" for name, r in results[size].items()]
  print(f"load={os.getloadavg()[0]:.2f}")
  print("RESULT " + " ".join(keys))


if __name__ == "__main__":
  main()
