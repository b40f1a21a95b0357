"""Optimizer from the config: AdamW, warmup + decay, global-norm clipping.

No weight decay on LayerNorm parameters and biases (BERT/ELECTRA practice).
"""

from __future__ import annotations

import jax
import optax

from mmelectra import errors


def learning_rate_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup to the peak, then `schedule` down to `end_learning_rate_fraction` of it.

  "linear" and "cosine" decay over every step after warmup. "wsd" (warmup-stable-decay:
  Hu et al. 2024, MiniCPM; Hägele et al. 2024) holds the peak and decays linearly over the
  last `decay_fraction` of the run only.
  """
  peak = opt_cfg.learning_rate
  warmup = min(opt_cfg.warmup_steps, max(total_steps - 1, 0))
  end = peak * opt_cfg.end_learning_rate_fraction
  decay_steps = max(total_steps - warmup, 1)
  if opt_cfg.schedule == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  elif opt_cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=opt_cfg.end_learning_rate_fraction)
  elif opt_cfg.schedule == "wsd":
    fraction = opt_cfg.decay_fraction
    if not 0.0 < fraction <= 1.0:
      raise errors.InvalidInput(f"optimizer.decay_fraction must be in (0, 1], got {fraction!r}")
    cooldown = min(max(round(total_steps * fraction), 1), decay_steps)
    decay = optax.join_schedules(
        [optax.constant_schedule(peak), optax.linear_schedule(peak, end, cooldown)],
        [decay_steps - cooldown])
  else:
    raise errors.InvalidInput(
        f"optimizer.schedule must be 'linear', 'cosine' or 'wsd', got {opt_cfg.schedule!r}")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def weight_decay_mask(params):
  """True for weights that decay: every parameter except biases and LayerNorm scales."""
  def decays(path, _):
    name = getattr(path[-1], "key", str(path[-1]))
    return name not in ("bias", "scale")
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  opt = config.optimizer
  schedule = learning_rate_schedule(opt, config.total_steps)
  tx = optax.chain(
      optax.clip_by_global_norm(opt.grad_clip_norm) if opt.grad_clip_norm > 0 else optax.identity(),
      optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                  weight_decay=opt.weight_decay, mask=weight_decay_mask),
  )
  return tx, schedule
