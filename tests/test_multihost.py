"""Multi-host on one machine: 2 processes x 2 CPU devices (jax.distributed over gloo,
started by `launch/local_multihost.sh`) against 1 process x 4 devices; the launch scripts."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

LAUNCH = os.path.join(ROOT, "launch")
STEPS = 3


def _run_steps(tmp_path, processes, devices_per_process):
  out = tmp_path / f"losses_{processes}x{devices_per_process}.json"
  env = dict(os.environ, PYTHON=sys.executable, LOG_DIR=str(tmp_path),
             JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [os.path.join(LAUNCH, "local_multihost.sh"), str(processes),
       f"--devices_per_process={devices_per_process}", "--",
       "python", os.path.join(ROOT, "tests", "multihost_steps.py"), str(out), str(STEPS)],
      env=env, capture_output=True, text=True, timeout=600)
  logs = "".join(p.read_text() for p in tmp_path.glob("mmelectra_process_*.log"))
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:] + logs[-4000:]
  return json.loads(out.read_text())


def test_two_processes_match_one_process(tmp_path):
  two = _run_steps(tmp_path, 2, 2)
  one = _run_steps(tmp_path, 1, 4)
  assert (two["processes"], two["devices"], two["local_devices"]) == (2, 4, 2)
  assert (one["processes"], one["devices"], one["local_devices"]) == (1, 4, 4)
  assert len(two["losses"]) == STEPS
  # Same global batches, same rng, same 4-device mesh: only where the devices live
  # differs, so the losses agree to fp32 reduction-order noise (in practice, exactly).
  for a, b in zip(two["losses"], one["losses"]):
    for key in a:
      assert a[key] == pytest.approx(b[key], rel=1e-6), (key, a, b)
  assert two["losses"][0]["loss"] != two["losses"][-1]["loss"]  # the steps trained


def test_a_failing_process_stops_the_launch(tmp_path):
  # Process 1 exits at once; process 0 would wait for it forever in initialize().
  env = dict(os.environ, PYTHON=sys.executable, LOG_DIR=str(tmp_path))
  script = tmp_path / "fail.py"
  script.write_text("import sys, time\n"
                    "pid = [a for a in sys.argv if a.startswith('--process_id=')][0].split('=')[1]\n"
                    "sys.exit(3) if pid == '1' else time.sleep(120)\n")
  proc = subprocess.run([os.path.join(LAUNCH, "local_multihost.sh"), "2", "--", "python", str(script)],
                        env=env, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 3, proc.stderr


def _tpu(*args):
  return subprocess.run([os.path.join(LAUNCH, "tpu_pod.sh"), *args], capture_output=True,
                        text=True, timeout=30)


def test_launch_scripts_parse():
  for name in ("tpu_pod.sh", "gpu.sh", "local_multihost.sh"):
    assert subprocess.run(["bash", "-n", os.path.join(LAUNCH, name)]).returncode == 0, name


def test_tpu_pod_dry_run_prints_the_gcloud_commands():
  r = _tpu("--zone=us-central2-b", "--accelerator=v4-32", "--workdir=gs://bucket/run",
           "--config=size=large", "--dry-run", "all", "--", "--config.batch_size=1024")
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  assert lines[0].startswith("gcloud compute tpus tpu-vm create mmelectra --zone=us-central2-b "
                             "--accelerator-type=v4-32")
  install = next(l for l in lines if "pip" in l)
  assert "--worker=all" in install and "jax\\[tpu\\]==" in install
  train = next(l for l in lines if "mmelectra\\ train" in l)
  assert "--worker=all" in train and "gs://bucket/run" in train
  assert "size=large" in train and "--config.batch_size=1024" in train
  assert "tail" in lines[-1] and "--worker=0" in lines[-1]  # streams worker 0's log
  down = _tpu("--zone=z", "--name=pod", "--dry-run", "down")
  assert down.stdout.strip() == "gcloud compute tpus tpu-vm delete pod --zone=z --quiet"


def test_tpu_pod_refuses_a_local_workdir():
  r = _tpu("--zone=z", "--workdir=/tmp/run", "--dry-run", "train")
  assert r.returncode == 2 and "gs://" in r.stderr
