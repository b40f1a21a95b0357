"""Cross-shard pieces of the method, written as explicit `shard_map` collectives.

Two parts of the method read across examples: MOC `sample` scores each masked region
against every real region of the *global* batch (docs/method.md §5), and an ITM
negative reads another example's text, which may sit on another data-parallel shard
(decision 7). Under `jit` the objectives are written for the global batch, so GSPMD would
insert some collective by itself; these helpers fix which one, and what each device
holds:

* `pool_candidate_scores`: the candidate pool (`[N, D]`, small next to the features) is
  all-gathered over `(data, fsdp)`; each shard scores only its own queries, so the
  `[B, M, N]` score matrix stays split over the batch.
* `take_rows`: `x[idx]` with global indices. Each shard sees every request (the indices
  are all-gathered, a few ints per example), fills the rows it owns, and a
  `psum_scatter` hands every shard its answers: the traffic is the requested rows, never
  the whole pool of region features.

Random draws stay outside, in the global view: with `jax_threefry_partitionable` (the
default) a draw depends on the key and the global shape only, so masks, ITM pairs and
samples are the same however the batch is split, and so are these helpers' results.
Without a mesh, or with one data-parallel shard, they are the plain single-device code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mmelectra import electra

Array = jax.Array

DP_AXES = ("data", "fsdp")


def _data_parallel_mesh():
  """The context mesh if it splits the batch over more than one shard, else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(DP_AXES) <= set(mesh.axis_names):
    return None
  if mesh.shape["data"] * mesh.shape["fsdp"] == 1:
    return None
  return mesh


def all_gather_batch(x: Array) -> Array:
  """Inside shard_map: the global `[B, ...]` array from this shard's rows (batch order)."""
  return jax.lax.all_gather(x, DP_AXES, axis=0, tiled=True)


def pool_candidate_scores(queries: Array, candidates: Array, candidate_valid: Array) -> Array:
  """`electra.region_candidate_scores` against the candidate pool of all shards.

  Args:
    queries: `[B, M, D]`, split over the batch.
    candidates: `[N, D]`, the flattened `[B * K, D]` pool in batch order (split over it).
    candidate_valid: `[N]` bool.
  Returns:
    `[B, M, N]` logits, split over the batch; N indexes the global pool.
  """
  mesh = _data_parallel_mesh()
  if mesh is None:
    return electra.region_candidate_scores(queries, candidates, candidate_valid)

  def local(q, c, v):
    return electra.region_candidate_scores(q, all_gather_batch(c), all_gather_batch(v))

  return jax.shard_map(local, mesh=mesh, in_specs=(P(DP_AXES), P(DP_AXES), P(DP_AXES)),
                       out_specs=P(DP_AXES))(queries, candidates, candidate_valid)


def take_rows(x: Array, idx: Array) -> Array:
  """`x[idx]`: rows of the global `x [N, ...]` (split over N) at global indices `idx [B, ...]`.

  Indices must lie in `[0, N)`. Exact: one shard owns each row, the others add zeros.
  """
  mesh = _data_parallel_mesh()
  if mesh is None:
    return x[idx]
  dtype = x.dtype
  if dtype == jnp.bool_:
    x = x.astype(jnp.int32)

  def local(x_local, idx_local):
    n_local = x_local.shape[0]
    shard = jax.lax.axis_index(DP_AXES)
    wanted = all_gather_batch(idx_local) - shard * n_local  # every shard's requests
    owned = (wanted >= 0) & (wanted < n_local)
    rows = x_local[jnp.clip(wanted, 0, n_local - 1)]
    owned = owned.reshape(owned.shape + (1,) * (rows.ndim - owned.ndim))
    rows = jnp.where(owned, rows, jnp.zeros((), rows.dtype))
    return jax.lax.psum_scatter(rows, DP_AXES, scatter_dimension=0, tiled=True)

  out = jax.shard_map(local, mesh=mesh, in_specs=(P(DP_AXES), P(DP_AXES)),
                      out_specs=P(DP_AXES))(x, idx)
  return out.astype(dtype)
