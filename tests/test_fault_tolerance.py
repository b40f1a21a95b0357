"""Kills, preemption, non-finite steps and a different mesh, on the real train loop.

Every run here is a child process (a SIGKILL must kill a whole process), on a micro model
and a few dozen 32 px scenes, compiled with most XLA optimizations off.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import ROOT, micro_config

TOTAL, EVERY = 10, 3
# 0-based steps with NaN gradients, in every run (one program for all: compiled once).
NAN_STEPS = (4, 6, 7)

# A child run: train_and_evaluate on a JSON config, with an optional self-inflicted signal.
#   kill_after_save=N: SIGKILL right after the async save of step N has started
#   term_at_step=N:    SIGTERM at the boundary after step N (a scheduler's notice)
#   kill_at_step=N:    SIGKILL at the boundary after step N (before its save, if any)
CHILD = textwrap.dedent("""
    import json, os, signal, sys
    import jax
    jax.config.update("jax_disable_most_optimizations", True)
    jax.config.update("jax_threefry_partitionable", True)
    # One compile for all the children of a test module (the runs share their programs).
    jax.config.update("jax_compilation_cache_dir", os.environ["FT_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    import ml_collections
    from mmelectra import checkpoint, train
    from mmelectra import metric_writer

    spec = json.loads(sys.argv[1])
    config = ml_collections.ConfigDict(spec["config"])
    config.lock()
    if "kill_after_save" in spec:
      real_save = checkpoint.save
      def save(manager, step, *args, **kwargs):
        out = real_save(manager, step, *args, **kwargs)
        if step == spec["kill_after_save"]:
          os.kill(os.getpid(), signal.SIGKILL)
        return out
      checkpoint.save = save
    if "disk_full_after_save" in spec:
      # The background write of that save fails as on a full disk; orbax reports such
      # errors through check_for_errors / wait_until_finished.
      real_make = checkpoint.make_manager
      def make_manager(*args, **kwargs):
        manager = real_make(*args, **kwargs)
        real_save, failed = manager.save, []
        def save(step, *a, **k):
          out = real_save(step, *a, **k)
          failed.append(step == spec["disk_full_after_save"] or bool(failed and failed[-1]))
          return out
        def check_for_errors():
          if failed and failed[-1]:
            raise OSError(28, "No space left on device")
        manager.save, manager.check_for_errors = save, check_for_errors
        manager.wait_until_finished = lambda real=manager.wait_until_finished: (real(), check_for_errors())
        return manager
      checkpoint.make_manager = make_manager
    if "term_at_step" in spec or "kill_at_step" in spec:
      real_advance = metric_writer.MetricWriter.advance
      def advance(self, step, last):
        real_advance(self, step, last)
        if step == spec.get("term_at_step"):
          os.kill(os.getpid(), signal.SIGTERM)
        if step == spec.get("kill_at_step"):
          os.kill(os.getpid(), signal.SIGKILL)
      metric_writer.MetricWriter.advance = advance
    train.train_and_evaluate(config, spec["workdir"])
    print("CHILD_DONE")
""")


def _run_config(data_dir, **overrides):
  """The micro model (mlm objective: the smallest program) on a tiny synthetic-scenes set."""
  c = ml_collections.ConfigDict(micro_config(objective="mlm").to_dict())
  c.model.update(visual_feat_dim=-1, num_regions=-1, num_object_classes=-1, vocab_size=c.data.vocab_size,
                 max_position=16)
  c.data.update(data_dir=str(data_dir), image_size=32, num_train=40, num_validation=8,
                num_test=8, seed=3, regions="patches", patch_size=16, max_text_len=16)
  c.update(batch_size=4, total_steps=TOTAL, log_every=1, checkpoint_every=EVERY,
           max_checkpoints_to_keep=None, debug_nan_steps=",".join(map(str, NAN_STEPS)))
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _child(config, workdir, timeout=300, **actions):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", FT_CACHE_DIR=_CACHE_DIR,
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  script = os.path.join(workdir + "_child.py")
  with open(script, "w") as f:
    f.write(CHILD)
  spec = json.dumps({"config": config.to_dict(), "workdir": workdir, **actions})
  return subprocess.run([sys.executable, script, spec], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout)


def _steps(workdir):
  return sorted(ocp.path.step.checkpoint_steps(os.path.join(workdir, "checkpoints")))


def _state(workdir, step):
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  return ocp.StandardCheckpointer().restore(path)


def _losses(workdir):
  """Per-step metrics; a step logged twice (lost and redone after a kill) keeps the last."""
  rows = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      rows[row["step"]] = row
  return rows


_CACHE_DIR = ""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from mmelectra.data import datasets
  global _CACHE_DIR
  _CACHE_DIR = str(tmp_path_factory.mktemp("jax_cache"))
  path = tmp_path_factory.mktemp("tfds")
  datasets.prepare(_run_config(path).data)
  return path


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
  """The workdir of the run the interrupted ones must end equal to."""
  ref = str(tmp_path_factory.mktemp("ref") / "uninterrupted")
  out = _child(_run_config(data_dir), ref)
  assert out.returncode == 0, out.stderr[-3000:]
  return ref


def test_kills_and_preemption_resume_exactly(data_dir, uninterrupted, tmp_path):
  config = _run_config(data_dir)
  ref = uninterrupted
  assert _steps(ref) == [3, 6, 9, 10]

  run = str(tmp_path / "interrupted")
  # 1. SIGKILL while step 6 is being saved: 3 is the last complete checkpoint, and what
  #    was written of 6 lies in a temporary directory that must not count.
  out = _child(config, run, kill_after_save=6)
  assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
  assert _steps(run) == [3]
  leftovers = [n for n in os.listdir(os.path.join(run, "checkpoints")) if n not in ("3",)]
  assert all("tmp" in n for n in leftovers), leftovers
  # 2. Restart: resumes from 3 (steps 4-6 are redone), then a SIGTERM after step 8
  #    saves step 8 (not a multiple of checkpoint_every) and exits 0.
  out = _child(config, run, term_at_step=8)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "CHILD_DONE" in out.stdout
  assert _steps(run) == [3, 6, 8]
  assert not [n for n in os.listdir(os.path.join(run, "checkpoints")) if "tmp" in n]
  # 3. Restart: resumes from 8 and finishes.
  out = _child(config, run)
  assert out.returncode == 0, out.stderr[-3000:]
  assert _steps(run) == [3, 6, 8, 9, 10]

  # Same parameters and optimizer state, bit for bit, as the uninterrupted run.
  want, got = _state(ref, TOTAL), _state(run, TOTAL)
  assert jax.tree.structure(want) == jax.tree.structure(got)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(got)):
    assert np.array_equal(np.asarray(a), np.asarray(b)), jax.tree_util.keystr(path)
  # Same data order and rng: identical per-step losses, including the redone steps.
  ref_rows, run_rows = _losses(ref), _losses(run)
  assert sorted(run_rows) == list(range(1, TOTAL + 1))
  for step in range(1, TOTAL + 1):
    assert run_rows[step].get("loss") == ref_rows[step].get("loss"), step
  # The NaN steps were skipped (counted, left out of the averages) in both runs.
  for step in range(1, TOTAL + 1):
    bad = step - 1 in NAN_STEPS
    assert ref_rows[step].get("nonfinite_steps", 0) == bad, step
    assert run_rows[step].get("nonfinite_steps", 0) == bad, step
    assert ("loss" in ref_rows[step]) != bad, step


def test_a_failed_save_stops_the_run_in_one_line_at_the_next_step(data_dir, tmp_path):
  run = str(tmp_path / "full")
  out = _child(_run_config(data_dir), run, disk_full_after_save=6)
  assert out.returncode != 0
  lines = [l for l in out.stderr.splitlines() if l.startswith("mmelectra.errors.StorageError: ")]
  assert lines, out.stderr[-3000:]
  last = lines[-1]
  assert "saving a checkpoint in" in last
  assert "No space left on device" in last and "the newest complete checkpoint is step" in last
  # It stopped before the step after the failed save, not steps later.
  with open(os.path.join(run, "metrics.jsonl")) as f:
    assert json.loads(f.readlines()[-1])["step"] == 6


DAMAGE = ("truncate_array_file", "delete_metadata", "empty_iterator_state")


def _corrupt_newest(workdir, kind: str) -> str | None:
  """Damages the newest complete checkpoint one of the three ways of DAMAGE; returns what
  it did (None: there was no checkpoint)."""
  steps = _steps(workdir)
  if not steps:
    return None
  step_dir = os.path.join(workdir, "checkpoints", str(steps[-1]))
  if kind == "truncate_array_file":
    data = os.path.join(step_dir, "state", "ocdbt.process_0", "d")
    biggest = max((os.path.join(data, n) for n in os.listdir(data)), key=os.path.getsize)
    os.truncate(biggest, os.path.getsize(biggest) // 2)
  elif kind == "delete_metadata":
    for name in ("_METADATA", "manifest.ocdbt"):
      for root, _, files in os.walk(os.path.join(step_dir, "state")):
        if name in files:
          os.remove(os.path.join(root, name))
  else:
    open(os.path.join(step_dir, "data", "process_0-of-1.json"), "w").close()
  return f"{kind}@{steps[-1]}"


def test_random_kills_and_corrupted_checkpoints_end_as_an_uninterrupted_run(data_dir, uninterrupted,
                                                                           tmp_path):
  """Every pairing of a kill (SIGKILL at a random step, or during a random save) with a
  damage to the newest checkpoint (DAMAGE), in a random order: six restarts, each
  resuming from the newest readable checkpoint; the run ends with the uninterrupted run's
  parameters and one metrics row per step."""
  config = _run_config(data_dir)
  ref = uninterrupted
  run = str(tmp_path / "faulty")
  rng = np.random.default_rng(0)
  rounds = [(kill, damage) for kill in ("kill_at_step", "kill_after_save") for damage in DAMAGE]
  history = []
  for i in rng.permutation(len(rounds)):
    kill, damage = rounds[i]
    if kill == "kill_at_step":
      action = {kill: int(rng.integers(1, TOTAL + 1))}
    else:
      action = {kill: int(rng.choice([s for s in range(EVERY, TOTAL, EVERY)]))}
    out = _child(config, run, **action)
    # A kill scheduled at a step the run does not reach (it resumed past it) lets it finish.
    assert out.returncode in (-signal.SIGKILL, 0), out.stderr[-3000:]
    history.append((action, out.returncode, _corrupt_newest(run, damage)))
  out = _child(config, run)
  assert out.returncode == 0, (history, out.stderr[-3000:])
  assert _steps(run)[-1] == TOTAL
  want, got = _state(ref, TOTAL), _state(run, TOTAL)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(got)):
    assert np.array_equal(np.asarray(a), np.asarray(b)), (jax.tree_util.keystr(path), history)
  with open(os.path.join(run, "metrics.jsonl")) as f:
    logged = [json.loads(line)["step"] for line in f]
  assert logged == list(range(1, TOTAL + 1)), (logged, history)
  # The damaged checkpoints were named and set aside, not silently reused.
  assert any(h[2] for h in history)


def test_nonfinite_steps_in_a_row_stop_the_run(data_dir, tmp_path):
  # Steps 5, 7 and 8 (1-based) are NaN: the isolated one is skipped, the pair stops the run.
  config = _run_config(data_dir, checkpoint_every=1, max_nonfinite_steps=2)
  run = str(tmp_path / "nan")
  out = _child(config, run)
  assert out.returncode != 0
  assert "TrainingDiverged: stopping: 2 training steps in a row (up to step 8)" in out.stderr, \
      out.stderr[-3000:]
  assert "max_nonfinite_steps=2" in out.stderr
  # A NaN step changes nothing but the step counter: the checkpoints after steps 4 and 5
  # hold the same parameters and optimizer state; so do those after 6, 7 and 8.
  assert _steps(run)[-1] in (8, 9)
  states = {s: _state(run, s) for s in (4, 5, 6, 7, 8)}
  assert [int(states[s]["step"]) for s in states] == [4, 5, 6, 7, 8]

  def same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves({k: a[k] for k in ("params", "opt")}),
                                                    jax.tree.leaves({k: b[k] for k in ("params", "opt")})))
  assert same(states[4], states[5]) and same(states[6], states[7]) and same(states[6], states[8])
  assert not same(states[5], states[6])


MULTIHOST_CHILD = textwrap.dedent("""
    import os, signal, sys, time
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    process_id, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id,
                               local_device_ids=[0])
    from mmelectra import checkpoint, preemption
    manager = checkpoint.make_manager(workdir)
    with preemption.PreemptionWatcher() as watch:
      for step in range(1, 600):
        if step == 5 and process_id == 1:
          os.kill(os.getpid(), signal.SIGTERM)  # only one host gets the notice
        if watch.reached(step, manager):
          print(f"SAVE_AT {step}", flush=True)
          break
        time.sleep(0.02)  # a train step
    manager.close()
""")


def test_sigterm_to_one_host_makes_every_host_save_the_same_step(tmp_path):
  """Two processes (jax.distributed, no compile): the loop's preemption check agrees on one
  step across hosts, after the notice, and neither process dies of the signal."""
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = str(s.getsockname()[1])
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  procs = [subprocess.Popen([sys.executable, "-c", MULTIHOST_CHILD, str(i), port, str(tmp_path)],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  outs = [p.communicate(timeout=240) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  steps = [int(out.split("SAVE_AT ")[1].split()[0]) for out, _ in outs]
  assert steps[0] == steps[1] > 5, steps
