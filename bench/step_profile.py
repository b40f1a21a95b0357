"""Where the train step's time goes: a profiler trace of the jitted step, summed by part.

    .venv/bin/python bench/step_profile.py [--config=configs/pretrain.py:size=tiny,regions=crops,runlocal]
        [--config.optimizer.schedule=wsd ...] [--steps=10] [--top=12]

The config and its `--config.key=value` overrides are read as `mmelectra train` reads them
(ml_collections' config flags: typed, a mistyped key is an error naming it).

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

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from step_timing import JaxStep  # noqa: E402
from mmelectra import config_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(ROOT, "configs", "pretrain.py:size=tiny,regions=crops,runlocal"),
    "pretraining config file with its ':arg' string; override fields with --config.key=value")
_STEPS = flags.DEFINE_integer("steps", 10, "steps traced")
_TIMING_STEPS = flags.DEFINE_integer("timing_steps", 40, "steps per timing round (best of 3)")
_TOP = flags.DEFINE_integer("top", 12, "rows printed per table")

# Runtime bookkeeping in the trace, not ops of the step.
_NOT_OPS = ("ThunkExecutor", "SlinkyThreadPool", "PjitFunction", "CommonPjRt")


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


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  config = config_lib.finalize(_CONFIG.value)
  runner = JaxStep(config)
  seconds = min(runner(_TIMING_STEPS.value) for _ in range(3)) / _TIMING_STEPS.value
  names = op_names(runner.step_fn.as_text())
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      wall = runner(_STEPS.value) / _STEPS.value
    events, threads = trace_events(trace_dir)
  by_part, by_kind = summarize(events, threads, names, _STEPS.value)
  total = sum(by_part.values())
  gflop = runner.flops_per_step() / 1e9
  overrides = " ".join(f"--config.{k}={v}" for k, v in
                       config_flags.get_override_values(flags.FLAGS["config"]).items())
  print(f"config {config_flags.get_config_filename(flags.FLAGS['config'])} {overrides}; "
        f"batch {config.batch_size}; "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s)")
  print(f"step {seconds * 1e3:.1f} ms ({1 / seconds:.2f} steps/s, best of 3 x {_TIMING_STEPS.value}); "
        f"{gflop:.2f} GFLOP/step (analytic) = {gflop / seconds:.1f} GFLOP/s; compile {runner.compile_s:.0f} s")
  print(f"traced {_STEPS.value} steps: wall {wall * 1e3:.1f} ms/step, op time {total / 1e3:.1f} ms/step "
        f"over the runtime's threads (threads busy {total / 1e6 / wall:.2f})")
  print("\nby part (ms/step, share of op time):")
  for part, micros in by_part.most_common(_TOP.value):
    print(f"  {micros / 1e3:8.2f}  {100 * micros / total:5.1f}%  {part}")
  print("\nby op kind:")
  for kind, micros in by_kind.most_common(_TOP.value):
    print(f"  {micros / 1e3:8.2f}  {100 * micros / total:5.1f}%  {kind}")
  top, top_micros = by_part.most_common(1)[0]
  print(f"\nRESULT steps_per_s={1 / seconds:.2f} gflop_per_step={gflop:.2f} "
        f"gflops={gflop / seconds:.1f} busy={total / 1e6 / wall:.2f} "
        f"top={top}:{top_micros / total:.2f}")


if __name__ == "__main__":
  app.run(main)
