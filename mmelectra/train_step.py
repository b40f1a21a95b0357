"""The pretraining step: one jitted function from (state, batch) to (state, metric sums).

Generator, sampling, replacement, discriminator and the losses (`objectives.compute_losses`),
gradients of every parameter (accumulated over `grad_accum_steps` micro-batches), and the
guarded optimizer update (`loop.guarded_update`). `train.py` runs it; `compile_check`
and the benchmarks compile it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmelectra import loop
from mmelectra import metrics as metrics_lib
from mmelectra import objectives
from mmelectra import setup as setup_lib
from mmelectra import sharding


def make_train_step(setup: setup_lib.Setup):
  """The one jitted step: generator, sampling, replacement, discriminator, five losses,
  gradients of every parameter and the optimizer update (with optional micro-batching)."""
  config, model, ocfg = setup.config, setup.model, setup.ocfg
  accum = config.grad_accum_steps
  base_rng = jax.random.key(config.seed)

  def loss_fn(params, batch, rng, step):
    return objectives.compute_losses(model, params, batch, rng, ocfg, deterministic=False, step=step)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def gradients(params, batch, rng, step):
    if accum == 1:
      (_, sums), grads = grad_fn(params, batch, rng, step)
      return grads, sums
    micro = jax.tree.map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)

    def body(carry, inputs):
      i, mb = inputs
      (_, s), g = grad_fn(params, mb, jax.random.fold_in(rng, i), step)
      acc_g, acc_s = carry
      return (jax.tree.map(jnp.add, acc_g, g), metrics_lib.add_metric_sums(acc_s, s)), None

    zero_g = jax.tree.map(jnp.zeros_like, params)
    shapes = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro), rng, step)[0][1])
    zero_s = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (grads, sums), _ = jax.lax.scan(body, (zero_g, zero_s), (jnp.arange(accum), micro))
    return jax.tree.map(lambda g: g / accum, grads), sums

  def train_step(state, batch):
    rng = jax.random.fold_in(base_rng, state["step"])
    grads, sums = gradients(state["params"], batch, rng, state["step"])
    if config.debug_nan_steps:
      # Test switch: poison the gradients of the listed (0-based) steps.
      nan_steps = [int(s) for s in str(config.debug_nan_steps).split(",") if s.strip()]
      poison = jnp.isin(state["step"], jnp.asarray(nan_steps, jnp.int32))
      grads = jax.tree.map(lambda g: jnp.where(poison, jnp.nan, g), grads)
    return loop.guarded_update(setup.tx, setup.schedule, state, grads, sums)

  batch_sh = sharding.batch_sharding(setup.mesh)
  return jax.jit(train_step, in_shardings=(setup.state_shardings, batch_sh),
                 out_shardings=(setup.state_shardings, None), donate_argnums=0)
