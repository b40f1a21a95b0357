"""Where metrics go: `WORKDIR/metrics.jsonl`, TensorBoard events and a progress bar.

Only process 0 writes; other processes keep a silent writer so call sites stay simple.
"""

from __future__ import annotations

import json
import math
import os

import jax
import tqdm
from tensorboardX import SummaryWriter


class MetricWriter:

  def __init__(self, workdir: str, total_steps: int, initial_step: int = 0,
               jsonl_name: str = "metrics.jsonl", tb_subdir: str = "tensorboard",
               progress: bool = True):
    self.active = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    self._bar = None
    if not self.active:
      return
    self._jsonl = open(os.path.join(workdir, jsonl_name), "a")
    self._tb = SummaryWriter(os.path.join(workdir, tb_subdir))
    if progress:
      self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, unit="step",
                            dynamic_ncols=True, mininterval=1.0)

  def write(self, step: int, metrics: dict) -> None:
    if not self.active:
      return
    record = {"step": int(step)}
    record.update({k: float(v) for k, v in sorted(metrics.items()) if math.isfinite(float(v))})
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for k, v in record.items():
      if k != "step":
        self._tb.add_scalar(k, v, step)
    self._tb.flush()

  def advance(self, step: int, last_metrics: dict) -> None:
    if self._bar is None:
      return
    self._bar.update(step - self._bar.n)
    if last_metrics:
      post = {"loss": f"{last_metrics.get('loss', float('nan')):.3f}"}
      if "examples_per_sec" in last_metrics:
        post["ex/s"] = f"{last_metrics['examples_per_sec']:.0f}"
      self._bar.set_postfix(post, refresh=False)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
