"""A few train steps of the micro model on the same global batches, however many processes.

Started by `launch/local_multihost.sh N -- python tests/multihost_steps.py OUT STEPS`
(from `tests/test_multihost.py`). Every process builds the same global batch, keeps its
own rows, and feeds them through `setup.to_global` (make_array_from_process_local_data),
the way the train loop does; process 0 writes the losses to OUT as JSON.
"""

import argparse
import json
import os
import sys

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import jax  # noqa: E402
import flax.linen as nn  # noqa: E402

from conftest import SPECIAL_IDS, micro_config, random_batch  # noqa: E402
from mmelectra import distributed  # noqa: E402
from mmelectra import setup as setup_lib
from mmelectra import train_step


def main():
  p = argparse.ArgumentParser()
  p.add_argument("out")
  p.add_argument("steps", type=int)
  p.add_argument("--coordinator_address")
  p.add_argument("--num_processes", type=int)
  p.add_argument("--process_id", type=int)
  a = p.parse_args()
  jax.config.update("jax_disable_most_optimizations", True)
  distributed.initialize("auto", a.coordinator_address, a.num_processes, a.process_id)
  config = micro_config(**{"optimizer.warmup_steps": 0})
  setup = setup_lib.build(config, SPECIAL_IDS)
  state = setup_lib.init_state(setup, 0)
  step_fn = train_step.make_train_step(setup)
  local = config.batch_size // jax.process_count()
  rows = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
  losses = []
  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
    for step in range(a.steps):
      batch = {k: v[rows] for k, v in random_batch(config, seed=step).items()}
      state, sums = step_fn(state, setup_lib.to_global(batch, setup.mesh))
      sums = jax.device_get(sums)
      losses.append({k: float(sums[k][0] / sums[k][1]) for k in ("loss", "moc_loss", "itm_loss")})
  if distributed.is_lead():
    with open(a.out, "w") as f:
      json.dump({"processes": jax.process_count(), "devices": jax.device_count(),
                 "local_devices": jax.local_device_count(), "losses": losses}, f)


if __name__ == "__main__":
  main()
