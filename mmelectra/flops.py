"""Analytic FLOPs of one train step, the peak FLOP/s of a device, and MFU.

Counts matrix multiplications only (2 FLOPs per multiply-add), as MFU conventionally
does; elementwise work (LayerNorm, GELU, softmax, the optimizer) is left out, which is
why `tests/test_flops.py` allows XLA's `cost_analysis()` some slack. Backward costs twice
the forward (gradients of activations and of weights), so a trained matmul counts 3x.
Attention is bidirectional: every query attends to every key (no causal halving).

`train_step_flops(config)` is for the whole global batch; divide by the device count for
a device's share. `peak_flops_per_device()` reads the table below, or on CPU measures a
large matmul once per process and keeps the best figure seen on this host on disk.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time

import jax
import jax.numpy as jnp

from mmelectra import electra
from mmelectra import model as model_lib

# Dense bf16 peak per chip (vendor figures, FLOP/s). MFU is quoted against these, as is
# conventional, whatever the run's compute dtype: a float32 run shows the cost of fp32.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,   # v5e
    "TPU v5p": 459e12,
    "TPU v5": 459e12,        # v5p reports "TPU v5"
    "TPU v6 lite": 918e12,   # v6e (Trillium)
    "TPU v6e": 918e12,
    "A100": 312e12,
    "H100": 989e12,
    "H200": 989e12,
}


@dataclasses.dataclass(frozen=True)
class _Encoder:
  hidden: int
  mlp: int
  l_layers: int
  r_layers: int
  x_layers: int


def _self_layer(s: int, h: int, f: int) -> float:
  """One post-LN transformer layer on s positions: q, kv, out projections, QK^T, PV, FFN."""
  return 2 * s * h * (h + 2 * h + h) + 2 * 2 * s * s * h + 2 * 2 * s * h * f


def _cross_layer(t: int, k: int, h: int, f: int) -> float:
  """LXMERT cross-modality layer: cross-attention both ways, self-attention, FFN per side."""
  cross = 0.0
  for q_len, kv_len in ((t, k), (k, t)):
    cross += 2 * q_len * h * 2 * h + 2 * kv_len * h * 2 * h + 2 * 2 * q_len * kv_len * h
  return cross + _self_layer(t, h, f) + _self_layer(k, h, f)


def encoder_forward_flops(enc: _Encoder, t: int, k: int) -> float:
  """Forward FLOPs of one example through an LXMERT encoder stack (embeddings excluded)."""
  return (enc.l_layers * _self_layer(t, enc.hidden, enc.mlp)
          + enc.r_layers * _self_layer(k, enc.hidden, enc.mlp)
          + enc.x_layers * _cross_layer(t, k, enc.hidden, enc.mlp))


def train_step_flops(config, mcfg: model_lib.ModelConfig | None = None) -> float:
  """FLOPs of one train step (forward + backward) over the global batch of `config`.

  `config` is a finalized run config (batch size, text length, mask rates, loss weights);
  the model's sizes are `mcfg` (default: `model.model_config_from(config)`), the same
  `ModelConfig` the model is built from, generator included.
  """
  mcfg = mcfg or model_lib.model_config_from(config)
  enc = mcfg.encoder
  b, t, k, dv, v = (config.batch_size, config.data.max_text_len, config.model.num_regions,
                    mcfg.visual_feat_dim, mcfg.vocab_size)
  h = enc.hidden_size
  mt = electra.max_masked(t, config.text_mask_rate)
  mr = electra.max_masked(k, config.region_mask_rate)
  moc_out = {"sample": h, "regress": dv, "classify": mcfg.num_object_classes}[mcfg.moc_mode]
  disc = _Encoder(h, enc.mlp_dim, enc.l_layers, enc.r_layers, enc.x_layers)
  # The region-feature projection runs once per step: every pass's visual input and the
  # MOC candidate pool are rows of it (objectives._region_embeddings). Each pass projects
  # its boxes. Word lookups are free.
  visual = 2 * k * dv * h
  boxes = 2 * k * 4 * h

  def heads(width):  # MLM (dense to h, tied vocabulary) and MOC heads at masked slots
    mlm = 2 * mt * (width * h + h * v)
    moc = 2 * mr * (width * width + width * moc_out)
    return mlm + moc

  # MOC `sample`: every masked region scores all b*k regions of the global batch (their
  # keys are the shared visual projection).
  pool = 2 * mr * b * k * h if mcfg.moc_mode == "sample" else 0.0
  itm = 2 * h * h + 2 * h * 2
  if mcfg.generator is not None:  # electra
    g_cfg = mcfg.generator
    g = g_cfg.hidden_size
    gen = _Encoder(g, g_cfg.mlp_dim, g_cfg.l_layers, g_cfg.r_layers, g_cfg.x_layers)
    # tied: the discriminator's own encoder, no width projection.
    projection = 0.0 if mcfg.generator_kind == "tied" else 2 * (t + k) * h * g
    generator = boxes + projection + encoder_forward_flops(gen, t, k) + heads(g) + pool
    binary_heads = 2 * (t + k) * (h * h + h)  # RTD and R2D
    # Corrective LM at the masked slots, or at every position when RTD reads it.
    clm_positions = t if mcfg.rtd_reads_clm else mt
    corrective = 2 * clm_positions * (h * h + h * v) if mcfg.corrective_lm else 0.0
    if mcfg.corrective_moc:  # and its region half, scored against the pool for `sample`
      corrective += 2 * mr * (h * h + h * moc_out) + (2 * mr * b * k * h if mcfg.moc_mode == "sample" else 0.0)
    # Contrastive alignment: two projections to the shared space, and every text against
    # every image of the global batch in both directions.
    c = mcfg.contrastive_dim
    itc = 2 * 2 * h * c + 2 * 2 * b * c if c > 0 else 0.0
    discriminator = boxes + encoder_forward_flops(disc, t, k) + binary_heads + corrective + itc + itm
    # MOC `regress` writes back regressed features, which are projected anew.
    replaced = 2 * mr * dv * h if mcfg.moc_mode == "regress" else 0.0
    forward = visual + generator + replaced + discriminator
  else:  # the mlm baseline
    forward = visual + boxes + encoder_forward_flops(disc, t, k) + heads(h) + pool + itm
  return 3.0 * b * forward


# --- peak -------------------------------------------------------------------------------
def _cache_path() -> str:
  root = os.environ.get("MMELECTRA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "mmelectra")
  return os.path.join(root, "peak_flops.json")


def measure_matmul_flops(n: int = 2048, repeats: int = 5, dtype=jnp.float32, device=None) -> float:
  """Best FLOP/s of an n x n matmul on one device (one warm-up call excluded)."""
  device = device or jax.local_devices()[0]
  x = jax.device_put(jnp.ones((n, n), dtype), device)
  mm = jax.jit(lambda a: a @ a)
  jax.block_until_ready(mm(x))
  best = math.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(mm(x))
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n**3 / best


_MEASURED_THIS_PROCESS: dict[str, float] = {}


def cpu_peak_flops() -> float:
  """This host's float32 matmul FLOP/s: the best ever measured here, kept on disk.

  Each process measures once (a fraction of a second) and keeps the larger of its figure
  and the cached one, so a measurement taken while other jobs shared the cores (which can
  read several times low, and would put MFU above 1) never sticks.
  """
  key = f"{platform.node()}|{platform.processor() or platform.machine()}|{os.cpu_count()}|f32"
  path = _cache_path()
  cache = {}
  if os.path.exists(path):
    try:
      with open(path) as f:
        cache = json.load(f)
    except (OSError, ValueError):
      cache = {}
  if key not in _MEASURED_THIS_PROCESS:
    _MEASURED_THIS_PROCESS[key] = measure_matmul_flops()
  best = max(float(cache.get(key, 0.0)), _MEASURED_THIS_PROCESS[key])
  if best != cache.get(key):
    cache[key] = best
    try:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, "w") as f:
        json.dump(cache, f, indent=1)
    except OSError:
      pass  # a read-only home: this process's figure still serves
  return best


def peak_flops_per_device(device=None) -> float | None:
  """Peak FLOP/s of one device, or None for an unknown accelerator.

  Simulated CPU devices (`--xla_force_host_platform_device_count`) share the host's
  cores, so each gets the measured host peak divided by the local device count.
  """
  device = device or jax.local_devices()[0]
  if device.platform == "cpu":
    return cpu_peak_flops() / jax.local_device_count()
  kind = device.device_kind
  for name in sorted(PEAK_FLOPS, key=len, reverse=True):  # "TPU v5 lite" before "TPU v5"
    if name.lower() in kind.lower():
      return PEAK_FLOPS[name]
  return None


def throughput_metrics(step_flops: float, steps_per_sec: float, num_devices: int,
                       peak_per_device: float | None) -> dict[str, float]:
  """`tflops_per_device` and (when the peak is known) `mfu` of a measured step rate."""
  per_device = step_flops * steps_per_sec / num_devices
  out = {"tflops_per_device": per_device / 1e12}
  if peak_per_device:
    out["mfu"] = per_device / peak_per_device
  return out
