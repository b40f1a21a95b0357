"""Where metrics go: `WORKDIR/metrics.jsonl`, TensorBoard events and a progress bar.

Only process 0 writes; other processes keep a silent writer so call sites stay simple.
The workdir may be a bucket (`gs://...`, with the `[gcs]` extra): objects there cannot be
appended to, so the jsonl file is rewritten whole at each write (it is small: one line
per `log_every` steps).
"""

from __future__ import annotations

import json
import math
import os

from etils import epath
import jax
import tqdm
from tensorboardX import SummaryWriter


class MetricWriter:

  def __init__(self, workdir: str, total_steps: int, initial_step: int = 0,
               jsonl_name: str = "metrics.jsonl", tb_subdir: str = "tensorboard",
               progress: bool = True, append: bool | None = None):
    """`append`: append to the jsonl file (default for local workdirs) or rewrite it."""
    self.active = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    self._bar = None
    if not self.active:
      return
    self._path = epath.Path(workdir) / jsonl_name
    _drop_rows_after(self._path, initial_step)
    if append is None:
      append = "://" not in os.fspath(workdir)
    if append:
      self._jsonl = open(self._path, "a")
    else:
      self._lines = self._path.read_text() if self._path.exists() else ""
    self._tb = SummaryWriter(os.fspath(epath.Path(workdir) / tb_subdir))
    if progress:
      self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, unit="step",
                            dynamic_ncols=True, mininterval=1.0)

  def write(self, step: int, metrics: dict) -> None:
    if not self.active:
      return
    record = {"step": int(step)}
    record.update({k: float(v) for k, v in sorted(metrics.items()) if math.isfinite(float(v))})
    line = json.dumps(record) + "\n"
    if self._jsonl is not None:
      self._jsonl.write(line)
      self._jsonl.flush()
    else:
      self._lines += line
      self._path.write_text(self._lines)
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


def _drop_rows_after(path: epath.Path, step: int) -> None:
  """A resumed run redoes the steps after its checkpoint: their rows from the run that
  was cut short go, so the file keeps one row per logged step (the redone ones replace
  them). A line that does not parse (cut by a kill mid-write) goes too."""
  if not path.exists():
    return
  lines = path.read_text().splitlines(keepends=True)
  kept = []
  for line in lines:
    try:
      row_step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
      continue
    if row_step <= step:
      kept.append(line if line.endswith("\n") else line + "\n")
  if kept != lines:
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)
