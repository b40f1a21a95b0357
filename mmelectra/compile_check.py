"""Ahead-of-time check: compile the real train step for a mesh of many devices, run nothing.

  mmelectra compile-check --config=configs/pretrain.py:size=large --num_devices=64 --mesh=1,8,8

Builds the sharded train state abstractly (no parameter is allocated), lowers and
compiles the same jitted step `train` runs, and prints what one device would hold:
parameters and optimizer state (from their shardings), the batch shard, and XLA's
temporaries (activations and workspace) from `compiled.memory_analysis()`.

The devices are simulated CPU devices (`--xla_force_host_platform_device_count`), which
must be set before JAX starts its backend; when it has already started with another
count, the command re-runs itself in a fresh process. The figures are XLA:CPU's memory
plan: a TPU or GPU compiler fuses and schedules differently, so treat them as an estimate
(close for parameters and optimizer state, rougher for temporaries). `--topology`
compiles for a real TPU topology through `jax.experimental.topologies` where this
machine can describe one (it needs libtpu); otherwise it says so and stops.

Compile time grows with the number of layers, which XLA compiles one by one when they are
unrolled (the default). `--config.model.scan_layers=True` compiles one layer per stack
(`nn.scan`, as MaxText does), several times faster for base and large (measured in
bench/README.md, "Will base and large fit?"). Parameter and optimizer-state bytes are the
same; XLA plans the temporaries differently.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import ml_collections

from mmelectra import errors

CHILD_ENV = "MMELECTRA_COMPILE_CHECK_CHILD"
# Nothing compiled here runs, so LLVM need not optimise the machine code: the memory plan
# (HLO fusion and buffer assignment) is the same and the compile ~40% faster.
FAST_CODEGEN_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
SPECIAL_IDS = dict(pad=0, unk=1, cls=2, sep=3, mask=4)  # only their values' types matter here


def parse_mesh(text: str | None) -> dict[str, int] | None:
  """"data,fsdp,model" sizes, e.g. "1,8,8" or "-1,1,4"; None keeps the config's mesh."""
  if not text:
    return None
  parts = [p.strip() for p in text.split(",")]
  if len(parts) != 3:
    raise errors.InvalidInput(f"--mesh wants three sizes data,fsdp,model (one may be -1), got {text!r}")
  return dict(zip(("data", "fsdp", "model"), (int(p) for p in parts)))


def ensure_cpu_devices(num_devices: int) -> bool:
  """Arranges `num_devices` simulated CPU devices; False when a re-run is needed."""
  import jax
  from jax._src import xla_bridge  # backends_are_initialized has no public twin

  if not xla_bridge.backends_are_initialized():
    flags = os.environ.get("XLA_FLAGS", "")
    flags = " ".join(f for f in flags.split() if "xla_force_host_platform_device_count" not in f)
    os.environ["XLA_FLAGS"] = (f"{flags} {FAST_CODEGEN_FLAGS} "
                               f"--xla_force_host_platform_device_count={num_devices}").strip()
    jax.config.update("jax_platforms", "cpu")
  return jax.device_count() == num_devices and jax.devices()[0].platform == "cpu"


def rerun_in_subprocess(argv: list[str], num_devices: int) -> int:
  env = dict(simulated_cpu_env(num_devices), **{CHILD_ENV: "1"})
  return subprocess.call([sys.executable, "-m", "mmelectra.main", *argv[1:]], env=env)


def simulated_cpu_env(num_devices: int) -> dict[str, str]:
  """This process's environment for a child with `num_devices` simulated CPU devices and
  the compile-only code generation flags."""
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  flags = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                   if "xla_force_host_platform_device_count" not in f)
  env["XLA_FLAGS"] = f"{flags} {FAST_CODEGEN_FLAGS} --xla_force_host_platform_device_count={num_devices}".strip()
  return env


def _tree_bytes(abstract_tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
  import jax
  import numpy as np

  total = 0
  for x in jax.tree.leaves(abstract_tree):
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
  return total


def check(config: ml_collections.ConfigDict, mesh: dict[str, int] | None = None,
          num_devices: int | None = None, topology: str | None = None) -> dict:
  """Compiles the train step of `config` on `mesh` and returns per-device bytes and timing."""
  import flax.linen as nn
  import jax

  from mmelectra import config_lib
  from mmelectra import flops
  from mmelectra import setup as setup_lib
  from mmelectra import sharding
  from mmelectra import train_step

  config = ml_collections.ConfigDict(config.to_dict())
  if mesh is not None:
    config.mesh.update(mesh)
  if any(config.model[k] == -1 for k in ("visual_feat_dim", "num_regions", "num_object_classes")):
    config = config_lib.finalize(config)  # fill the model fields the data config implies
  devices = None
  backend = "XLA:CPU"
  if topology:
    from jax.experimental import topologies
    try:
      devices = topologies.get_topology_desc(topology, platform="tpu").devices
    except Exception as e:  # pylint: disable=broad-except
      raise errors.InvalidInput(f"this machine cannot describe TPU topology {topology!r} "
                                f"(jax.experimental.topologies needs libtpu): {e}") from e
    backend = f"TPU {topology}"
  elif num_devices is not None and jax.device_count() != num_devices:
    raise RuntimeError(f"{jax.device_count()} devices, {num_devices} requested")
  if devices is not None:
    orig = sharding.make_mesh
    sharding.make_mesh = lambda cfg, devs=None: orig(cfg, devices)
  try:
    setup = setup_lib.build(config, SPECIAL_IDS, setup_lib.flat_mask_salience(config))
  finally:
    if devices is not None:
      sharding.make_mesh = orig
  step = train_step.make_train_step(setup)
  batch_sh = sharding.batch_sharding(setup.mesh)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh)
           for k, v in setup_lib.dummy_batch(config, config.batch_size).items()}
  t0 = time.perf_counter()
  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
    lowered = step.lower(setup.abstract_state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
  t2 = time.perf_counter()
  mem = compiled.memory_analysis()
  args = mem.argument_size_in_bytes
  temp = mem.temp_size_in_bytes
  out = mem.output_size_in_bytes
  alias = mem.alias_size_in_bytes
  n_params = sum(x.size for x in jax.tree.leaves(setup.abstract_state["params"]))
  return {
      "backend": backend,
      "mesh": dict(setup.mesh.shape),
      "num_devices": setup.mesh.size,
      "batch_size": config.batch_size,
      "num_params": int(n_params),
      "params_bytes": _tree_bytes(setup.abstract_state["params"]),
      "optimizer_bytes": _tree_bytes(setup.abstract_state["opt"]),
      "batch_bytes": _tree_bytes(batch),
      "argument_bytes": args,
      "temp_bytes": temp,
      "output_bytes": out,
      "alias_bytes": alias,
      "total_bytes": args + temp + out - alias,
      "lower_seconds": t1 - t0,
      "compile_seconds": t2 - t1,
      "step_tflops": flops.train_step_flops(config, setup.model.cfg) / 1e12,
  }


def format_report(r: dict) -> str:
  mib = lambda b: f"{b / 2**20:,.1f} MiB"  # noqa: E731
  mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
  lines = [
      f"compile-check: {r['num_params'] / 1e6:.1f}M parameters, global batch {r['batch_size']}, "
      f"mesh {mesh} ({r['num_devices']} devices), {r['step_tflops']:.2f} TFLOP per step",
      f"per device ({r['backend']} memory plan):",
      f"  parameters             {mib(r['params_bytes'])}",
      f"  optimizer state        {mib(r['optimizer_bytes'])}",
      f"  batch                  {mib(r['batch_bytes'])}",
      f"  temporaries            {mib(r['temp_bytes'])}   (activations kept for backward, workspace)",
      f"  total                  {mib(r['total_bytes'])}   (arguments + temporaries + outputs - donated)",
      f"lowered in {r['lower_seconds']:.1f} s, compiled in {r['compile_seconds']:.1f} s",
  ]
  if r["backend"] == "XLA:CPU":
    lines.append("note: XLA:CPU's plan for simulated devices; a TPU/GPU compiler's differs "
                 "(temporaries most). --topology=v5e:4x4 etc. compiles for TPU where libtpu is installed.")
  return "\n".join(lines)


def main(config, num_devices: int, mesh_text: str | None, topology: str | None, argv) -> int:
  """The `compile-check` command; returns the exit status."""
  mesh = parse_mesh(mesh_text)
  if not topology and not ensure_cpu_devices(num_devices):
    if os.environ.get(CHILD_ENV):
      raise RuntimeError(f"could not get {num_devices} simulated CPU devices")
    return rerun_in_subprocess(argv, num_devices)
  print(format_report(check(config, mesh, None if topology else num_devices, topology)), flush=True)
  return 0
