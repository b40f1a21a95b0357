"""Where the train step's time goes: a profiler trace of the jitted step, summed by part.

    .venv/bin/python bench/step_profile.py [--config=size=tiny,regions=crops,runlocal]
        [--steps=10] [--top=12] [--override=optimizer.schedule=wsd ...]

Times the step (`step_timing.JaxStep`: a pretraining config's own shapes, one random batch
placed once, state donated), then traces `--steps` steps with `jax.profiler` and sums the
duration of every executed XLA op by what it computes, read from the op's `op_name`
metadata in the compiled HLO: the model method and its first submodule (for example
`discriminate/encoder`; the optimizer's update, under `loop.guarded_update`'s cond, is
one part), forward or backward, and the op's kind (`ynn_fusion` and `dot`
are matrix multiplications on CPU). Op time is summed over the runtime's threads, so
`threads busy` (op time / wall time) says how much of the host the step keeps working.

The last line is `RESULT steps_per_s=... gflop_per_step=... gflops=... busy=...
top=<part>:<share>`.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax  # noqa: E402
import ml_collections  # noqa: E402

from step_timing import JaxStep  # noqa: E402
from configs import pretrain  # noqa: E402
from mmelectra import config_lib  # noqa: E402

# Runtime bookkeeping in the trace, not ops of the step.
_NOT_OPS = ("ThunkExecutor", "SlinkyThreadPool", "PjitFunction", "CommonPjRt")


def build_config(arg: str, overrides: list[str]) -> ml_collections.ConfigDict:
  config = pretrain.get_config(arg)
  for item in overrides:
    key, _, value = item.partition("=")
    *path, leaf = key.split(".")
    node = config
    for part in path:
      node = node[part]
    old = node[leaf]
    node[leaf] = (value == "True") if isinstance(old, bool) else type(old)(value)
  return config_lib.finalize(config)


def op_names(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> its `op_name` metadata (the JAX/Flax scope it came from)."""
  out = {}
  for m in re.finditer(r"\n\s*%?([\w.\-]+) = [^\n]*?op_name=\"([^\"]*)\"", hlo_text):
    out.setdefault(m.group(1), m.group(2))
  return out


def part_of(op_name: str | None) -> str:
  """`discriminate/encoder bwd`-style label: the model method, its first submodule, and
  whether the op is in the backward pass (JAX's transpose of the forward)."""
  if op_name is None:
    return "(no metadata)"
  if op_name.split("/")[1:2] == ["cond"]:  # the train step's one cond: the non-finite guard
    return "optimizer update (loop.guarded_update)"
  direction = " bwd" if "transpose(" in op_name else ""
  m = re.search(r"MMElectra\.(\w+)\)*/(\w+)", op_name)
  if m:
    return f"{m.group(1)}/{m.group(2)}{direction}"
  scope = [p for p in op_name.split("/")[1:] if p][:2]
  return "/".join(scope)[:48] + direction


def trace_events(trace_dir: str) -> tuple[list[dict], dict]:
  path = glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "perfetto_trace.json.gz"))
  if not path:
    raise FileNotFoundError(f"no perfetto trace under {trace_dir}")
  data = json.load(gzip.open(path[0]))
  events = data["traceEvents"] if isinstance(data, dict) else data
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  return events, threads


def summarize(events, threads, names: dict[str, str], steps: int):
  by_part, by_kind = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") != "X":
      continue
    thread = threads.get((e["pid"], e["tid"]), "")
    if thread.startswith("python") or e["name"].startswith(_NOT_OPS) or e["name"].startswith("$"):
      continue
    micros = e["dur"] / steps
    by_part[part_of(names.get(e["name"]))] += micros
    by_kind[re.sub(r"\.\d+$", "", e["name"])] += micros
  return by_part, by_kind


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="size=tiny,regions=crops,runlocal",
                 help="configs/pretrain.py's argument string")
  p.add_argument("--override", nargs="*", default=[], help="key=value, e.g. batch_size=64")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--timing_steps", type=int, default=40)
  p.add_argument("--top", type=int, default=12)
  args = p.parse_args(argv)

  config = build_config(args.config, args.override)
  runner = JaxStep(config)
  seconds = min(runner(args.timing_steps) for _ in range(3)) / args.timing_steps
  names = op_names(runner.step_fn.lower(runner.state, runner.batch).compile().as_text())
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      wall = runner(args.steps) / args.steps
    events, threads = trace_events(trace_dir)
  by_part, by_kind = summarize(events, threads, names, args.steps)
  total = sum(by_part.values())
  gflop = runner.flops_per_step() / 1e9
  print(f"config {args.config} {' '.join(args.override)}; batch {config.batch_size}; "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s)")
  print(f"step {seconds * 1e3:.1f} ms ({1 / seconds:.2f} steps/s, best of 3 x {args.timing_steps}); "
        f"{gflop:.2f} GFLOP/step (analytic) = {gflop / seconds:.1f} GFLOP/s; compile {runner.compile_s:.0f} s")
  print(f"traced {args.steps} steps: wall {wall * 1e3:.1f} ms/step, op time {total / 1e3:.1f} ms/step "
        f"over the runtime's threads (threads busy {total / 1e6 / wall:.2f})")
  print("\nby part (ms/step, share of op time):")
  for part, micros in by_part.most_common(args.top):
    print(f"  {micros / 1e3:8.2f}  {100 * micros / total:5.1f}%  {part}")
  print("\nby op kind:")
  for kind, micros in by_kind.most_common(args.top):
    print(f"  {micros / 1e3:8.2f}  {100 * micros / total:5.1f}%  {kind}")
  top, top_micros = by_part.most_common(1)[0]
  print(f"\nRESULT steps_per_s={1 / seconds:.2f} gflop_per_step={gflop:.2f} "
        f"gflops={gflop / seconds:.1f} busy={total / 1e6 / wall:.2f} "
        f"top={top}:{top_micros / total:.2f}")


if __name__ == "__main__":
  main()
