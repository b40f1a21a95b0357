"""Shared by `step_throughput.py` and `mfu.py`: LXMERT-shaped configs, batches and timing.

The shapes are LXMERT pretraining's: BERT vocabulary (30522), 20 text tokens, 36 regions
of 2048-d detector features plus 4-d boxes. Nothing reads a data set: the config names
`lxmert_regions` so that `config_lib.finalize` derives 36 x 2048 from `config.data`, and
the batches are random (`tests/conftest.random_batch`: [CLS] words [SEP] padding, some
padded regions). Dropout is 0 on both sides (the PyTorch reference is run without it).

Runners share one interface, `runner(steps) -> seconds` (blocking until the device is
done): `JaxStep` (mmelectra's jitted train step, state donated, one batch placed on the
device once), `TorchStep` (Hugging Face `LxmertForPreTraining` with masked LM + feature
regression + matching, AdamW) and `MatmulStep` (the peak yardstick). `Worker` runs one in
a process of its own; `measure` times several, in alternating rounds or one after
another, and keeps the median of each.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "tests")):
  if path not in sys.path:
    sys.path.insert(0, path)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from conftest import SPECIAL_IDS, random_batch  # noqa: E402  (the tests' batch maker)
from configs import pretrain  # noqa: E402
from mmelectra import config_lib, flops  # noqa: E402
from mmelectra import setup as setup_lib
from mmelectra import train_step

VOCAB_SIZE = 30522
TEXT_LEN = 20
NUM_REGIONS = 36
FEATURE_DIM = 2048


def lxmert_config(size: str, batch_size: int, objective: str = "mlm",
                  dtype: str = "float32") -> ml_collections.ConfigDict:
  """A finalized pretraining config at `size` with LXMERT's input shapes, dropout 0."""
  c = ml_collections.ConfigDict(
      pretrain.get_config(f"size={size},objective={objective},regions=features").to_dict())
  c.batch_size = batch_size
  c.data.update(name="lxmert_regions", regions="features", max_regions=NUM_REGIONS,
                feature_dim=FEATURE_DIM, max_text_len=TEXT_LEN)
  c.model.update(vocab_size=VOCAB_SIZE, dropout_rate=0.0, attention_dropout_rate=0.0, dtype=dtype)
  return config_lib.finalize(c)


def torch_reference_flops(config) -> float:
  """Analytic FLOPs of the PyTorch LXMERT step: `flops.train_step_flops` of the mlm
  objective with every position masked (MLM head over all 20 tokens, feature-regression
  head h -> h -> 2048 over all 36 regions, no candidate pool), as LxmertForPreTraining
  computes its heads over the whole sequence."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.objective = "mlm"
  c.text_mask_rate = c.region_mask_rate = 1.0
  c.model.moc_mode = "regress"
  return flops.train_step_flops(c)


# --- runners ----------------------------------------------------------------------------
class JaxStep:
  """mmelectra's train step for a finalized config, compiled and warmed up.

  Compiled ahead of time, once: `step_fn` is the executable the timings run, so its HLO
  (`step_fn.as_text()`, `cost_analysis()`) is that of the steps measured."""

  def __init__(self, config, warmup: int = 2, seed: int = 0):
    self.config = config
    self.setup = setup_lib.build(config, SPECIAL_IDS, setup_lib.flat_mask_salience(config))
    self.state = setup_lib.init_state(self.setup, setup_lib.parameter_seed(config))
    with self._context():
      self.batch = setup_lib.to_global(random_batch(config, seed=seed), self.setup.mesh)
      start = time.perf_counter()
      self.step_fn = train_step.make_train_step(self.setup).lower(self.state, self.batch).compile()
      self.state, sums = self.step_fn(self.state, self.batch)
      jax.block_until_ready(self.state)
      self.compile_s = time.perf_counter() - start
      loss = float(jax.device_get(sums["loss"][0] / sums["loss"][1]))
      if not np.isfinite(loss):
        raise FloatingPointError(f"mmelectra {config.objective}: loss {loss}")
      self.first_loss = loss
    self(warmup)

  def _context(self):
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.setup.mesh))
    stack.enter_context(nn.logical_axis_rules(self.setup.rules))
    return stack

  def __call__(self, steps: int) -> float:
    with self._context():
      start = time.perf_counter()
      for _ in range(steps):
        self.state, _ = self.step_fn(self.state, self.batch)
      jax.block_until_ready(self.state)
      return time.perf_counter() - start

  def flops_per_step(self) -> float:
    return flops.train_step_flops(self.config)


class TorchStep:
  """Hugging Face `LxmertForPreTraining` at the config's sizes: forward (its heads run
  over every position: masked LM over all 20 tokens, feature regression over all 36
  regions, their losses at the masked ones; image-text matching), backward, AdamW step,
  zero_grad. `device="cuda"` runs under bf16 autocast when the config's dtype is
  bfloat16."""

  def __init__(self, config, device: str = "cpu", warmup: int = 2, seed: int = 0):
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    self.torch, self.config, self.device = torch, config, device
    if device == "cpu":
      torch.set_num_threads(os.cpu_count())
    m = config.model
    hf_config = transformers.LxmertConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_attention_heads=m.num_heads,
        intermediate_size=m.mlp_dim, hidden_act="gelu", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, max_position_embeddings=m.max_position,
        type_vocab_size=m.type_vocab_size, l_layers=m.l_layers, r_layers=m.r_layers,
        x_layers=m.x_layers, visual_feat_dim=m.visual_feat_dim, visual_pos_dim=4,
        task_mask_lm=True, task_obj_predict=True, visual_obj_loss=False, visual_attr_loss=False,
        visual_feat_loss=True, task_matched=True, task_qa=False, pad_token_id=SPECIAL_IDS["pad"])
    torch.manual_seed(seed)
    self.model = transformers.LxmertForPreTraining(hf_config).to(device).train()
    opt = config.optimizer
    # On CUDA the fused AdamW kernel, PyTorch's fastest; on CPU the default (foreach).
    self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=opt.learning_rate,
                                       betas=(opt.b1, opt.b2), eps=opt.eps,
                                       weight_decay=opt.weight_decay,
                                       fused=True if device.startswith("cuda") else None)
    self.autocast = m.dtype == "bfloat16"
    self.inputs = self._inputs(random_batch(config, seed=seed), seed)
    start = time.perf_counter()
    self.first_loss = float(self._step())
    self.compile_s = time.perf_counter() - start
    if not np.isfinite(self.first_loss):
      raise FloatingPointError(f"PyTorch LXMERT: loss {self.first_loss}")
    self(warmup)

  def _inputs(self, batch: dict, seed: int) -> dict:
    """The same batch as LXMERT's pretraining inputs: 15% of words -> [MASK] with labels
    there (-100 elsewhere), 15% of regions zeroed with their features as targets, and
    a random half of the examples labelled as matched."""
    torch = self.torch
    rng = np.random.default_rng(seed)
    ids = batch["text_ids"].astype(np.int64)
    maskable = batch["text_mask"] & ~np.isin(ids, [SPECIAL_IDS[k] for k in ("cls", "sep", "pad")])
    text_masked = maskable & (rng.random(ids.shape) < self.config.text_mask_rate)
    labels = np.where(text_masked, ids, -100)
    ids = np.where(text_masked, SPECIAL_IDS["mask"], ids)
    feats = batch["region_feats"]
    region_masked = batch["region_mask"] & (rng.random(batch["region_mask"].shape) < self.config.region_mask_rate)
    inputs = dict(
        input_ids=ids, attention_mask=batch["text_mask"].astype(np.int64),
        token_type_ids=np.zeros_like(ids),
        visual_feats=np.where(region_masked[..., None], 0.0, feats).astype(np.float32),
        visual_pos=batch["region_boxes"], visual_attention_mask=batch["region_mask"].astype(np.float32),
        labels=labels, matched_label=rng.integers(0, 2, ids.shape[0]))
    out = {k: torch.as_tensor(v).to(self.device) for k, v in inputs.items()}
    out["obj_labels"] = {"feat": (torch.as_tensor(feats).to(self.device),
                                  torch.as_tensor(region_masked.astype(np.float32)).to(self.device))}
    return out

  def _step(self):
    """One training step; returns the loss tensor (reading it would wait for the device)."""
    torch = self.torch
    with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.autocast):
      loss = self.model(**self.inputs).loss
    loss.backward()
    self.optimizer.step()
    self.optimizer.zero_grad(set_to_none=True)
    return loss.detach()

  def sync(self):
    if self.device.startswith("cuda"):
      self.torch.cuda.synchronize()

  def __call__(self, steps: int) -> float:
    self.sync()
    start = time.perf_counter()
    for _ in range(steps):
      self._step()
    self.sync()
    return time.perf_counter() - start

  def flops_per_step(self) -> float:
    return torch_reference_flops(self.config)


class MatmulStep:
  """An n x n matmul, jitted: `runner(steps)` times `steps` of them (the peak yardstick)."""

  def __init__(self, n: int, dtype: str = "float32"):
    import jax.numpy as jnp
    self.n = n
    self.x = jax.device_put(jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype))
    self.matmul = jax.jit(lambda a: a @ a)
    start = time.perf_counter()
    jax.block_until_ready(self.matmul(self.x))
    self.compile_s = time.perf_counter() - start
    self.first_loss = 0.0
    # One "step" is as many matmuls as take about 0.25 s, so a round of steps lasts about
    # as long as a round of train steps and sees the same load.
    self.per_step = 1
    self.per_step = max(1, round(0.25 / self(1)))

  def __call__(self, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps * self.per_step):
      out = self.matmul(self.x)
    jax.block_until_ready(out)
    return time.perf_counter() - start

  def flops_per_step(self) -> float:
    return 2.0 * self.n**3 * self.per_step


# --- one process per runner -------------------------------------------------------------
# PyTorch's OpenMP threads and XLA's thread pool fight when both live in one process (the
# PyTorch step ran 9x slower next to a JAX runner on the 2-core CPU), so every runner has
# a process of its own, started the same way; the idle ones wait on a pipe, using no CPU.
def make_runner(kind: str, size: str = "small", batch_size: int = 32, objective: str = "mlm",
                dtype: str = "float32", device: str = "cpu", n: int = 2048):
  if kind == "matmul":
    return MatmulStep(n, dtype)
  config = lxmert_config(size, batch_size, objective, dtype)
  if kind == "jax":
    return JaxStep(config)
  if kind == "torch":
    return TorchStep(config, device=device)
  raise ValueError(f"unknown runner kind {kind!r}")


def _serve(conn, spec: dict) -> None:
  try:
    runner = make_runner(**spec)
    if spec["kind"] == "torch":
      device_kind = spec.get("device", "cpu")
      if device_kind.startswith("cuda"):
        device_kind = runner.torch.cuda.get_device_name()
    else:
      device_kind = jax.devices()[0].device_kind
    # An accelerator's vendor peak (flops.PEAK_FLOPS); a CPU's is measured by the caller.
    peak = None if spec["kind"] == "torch" or jax.default_backend() == "cpu" else flops.peak_flops_per_device()
    conn.send({"compile_s": runner.compile_s, "first_loss": runner.first_loss,
               "flops_per_step": runner.flops_per_step(), "device_kind": device_kind,
               "peak_flops": peak})
  except BaseException as e:  # report, then exit: the parent raises it
    import traceback
    conn.send({"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"})
    return
  while (steps := conn.recv()) is not None:
    conn.send(runner(steps))


class Worker:
  """A runner (`make_runner(**spec)`) in its own process; `worker(steps) -> seconds`."""

  def __init__(self, **spec):
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    self.spec = spec
    self._conn, child = ctx.Pipe()
    self._process = ctx.Process(target=_serve, args=(child, spec), daemon=True)
    self._process.start()
    child.close()
    try:
      self.info = self._conn.recv()
    except EOFError:  # killed (out of host memory, say) before it could report
      self.info = {"error": f"the process exited with code {self._process.join(5) or self._process.exitcode}"}
    if "error" in self.info:
      self.close()
      raise RuntimeError(f"runner {spec} failed to start:\n{self.info['error']}")

  def __call__(self, steps: int) -> float:
    self._conn.send(steps)
    return self._conn.recv()

  def close(self) -> None:
    if self._process.is_alive():
      try:
        self._conn.send(None)
      except OSError:
        pass
      self._process.join(timeout=30)
    if self._process.is_alive():
      self._process.kill()


def start_largest(spec: dict, batch_sizes: list[int], log=print) -> Worker:
  """A worker at the first of `batch_sizes` (largest first) that compiles and runs."""
  for i, b in enumerate(batch_sizes):
    try:
      return Worker(**{**spec, "batch_size": b})
    except RuntimeError as e:
      if i == len(batch_sizes) - 1:
        raise
      last = str(e).strip().splitlines()
      log(f"  batch {b} does not fit ({last[1][:200] if len(last) > 1 else last[0]}); trying {batch_sizes[i + 1]}")
  raise ValueError("no batch sizes given")


# --- timing -----------------------------------------------------------------------------
def measure(specs: dict[str, dict], steps: int, repeats: int, alternate: bool = True,
            batch_sizes: list[int] | None = None, log=print) -> dict[str, dict]:
  """Seconds per step (median over `repeats` rounds of `steps` steps) of each runner.

  alternate: every runner is started first (one compile at a time), then each round runs
    them in turn, so drifts in the machine's load hit all alike (a shared CPU).
    Otherwise each runner has the machine to itself: started, timed, closed (a GPU, whose
    memory one runner may fill).
  batch_sizes: candidates, largest first, for specs without "batch_size".
  Returns {name: {"sec_per_step", "all_sec_per_step", "batch_size", **worker.info}}.
  """
  def start(name, spec):
    log(f"  starting {name} ...")
    if "batch_size" in spec or spec["kind"] == "matmul":
      w = Worker(**spec)
    else:
      w = start_largest(spec, batch_sizes, log)
    log(f"  {name}: ready (compile + first step {w.info['compile_s']:.1f} s, "
        f"loss {w.info['first_loss']:.3g}, {w.info['device_kind']})")
    return w

  def result(w, times):
    return {**w.info, "batch_size": w.spec.get("batch_size"), "all_sec_per_step": times,
            "sec_per_step": statistics.median(times)}

  out = {}
  if alternate:
    workers = {}
    try:
      for name, spec in specs.items():
        workers[name] = start(name, spec)
      per_step = {name: [] for name in specs}
      for r in range(repeats):
        for name, w in workers.items():
          per_step[name].append(w(steps) / steps)
        log(f"  round {r + 1}/{repeats}: " + "  ".join(
            f"{name} {1 / per_step[name][-1]:.3g}/s" for name in specs))
      out = {name: result(workers[name], per_step[name]) for name in specs}
    finally:
      for w in workers.values():
        w.close()
  else:
    for name, spec in specs.items():
      w = start(name, spec)
      try:
        times = [w(steps) / steps for _ in range(repeats)]
        log(f"  {name}: " + " ".join(f"{1 / t:.3g}/s" for t in times))
        out[name] = result(w, times)
      finally:
        w.close()
  return out
