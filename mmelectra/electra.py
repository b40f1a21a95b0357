"""The method as pure functions over arrays: mask, sample, replace, label, loss.

Every function here is shape-static (XLA friendly), free of model code, and tested
alone in `tests/test_electra.py`. `objectives.py` strings them together with the model.

Conventions: a "positions" array `[B, M]` lists the masked indices of each example and a
"weights" array `[B, M]` (0/1 float) says which of the M slots are real; M is static
(`max_masked`), the number of real slots varies per example.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mmelectra import metrics

Array = jax.Array


# --- masking ----------------------------------------------------------------------------
def max_masked(length: int, rate: float) -> int:
  """Static number of mask slots for a sequence of `length` positions."""
  return max(1, math.ceil(rate * length))


MASK_COUNTS = ("ceil", "stochastic")


def num_to_mask(maskable: Array, rate: float, max_count: int, rounding: str = "ceil",
                rng: Array | None = None) -> Array:
  """How many positions each example masks.

  `ceil` (docs/method.md §6): `ceil(rate * valid)`, at least 1 where anything is
  maskable. `stochastic`: `floor(rate * valid + u)`, u ~ U[0, 1) per example (needs
  `rng`), whose mean is exactly `rate * valid`. The two agree in expectation for long
  sequences; for a few regions per image (1-4 object crops) `ceil` masks 25-100% of
  them, every time, where `stochastic` masks 15% on average.
  """
  valid = maskable.sum(axis=-1)
  expected = rate * valid.astype(jnp.float32)
  if rounding == "ceil":
    count = jnp.ceil(expected).astype(jnp.int32)
    count = jnp.where(valid > 0, jnp.maximum(count, 1), 0)
  elif rounding == "stochastic":
    if rng is None:
      raise ValueError("num_to_mask(rounding='stochastic') needs an rng")
    count = jnp.floor(expected + jax.random.uniform(rng, valid.shape)).astype(jnp.int32)
  else:
    raise ValueError(f"mask count rounding must be one of {MASK_COUNTS}, got {rounding!r}")
  return jnp.minimum(jnp.minimum(count, valid), max_count)


def choose_mask_positions(rng: Array, maskable: Array, rate: float, max_count: int,
                          rounding: str = "ceil", log_weights: Array | None = None
                          ) -> tuple[Array, Array]:
  """Picks `num_to_mask(...)` maskable positions per example by top-k of noise.

  Args:
    maskable: `[B, L]` bool, True where a position may be masked (real, not special).
    max_count: static slot count M (see `max_masked`).
    rounding: `ceil` (exactly `ceil(rate * valid)`) or `stochastic` (see `num_to_mask`).
    log_weights: optional `[B, L]` log of each position's masking weight. The positions
      are then a sample without replacement with probability proportional to the weight
      (Gumbel top-k: the k largest of `log_weights + Gumbel noise`); None: uniform.
  Returns:
    positions `[B, M]` int32 and weights `[B, M]` float32 (1 for a real masked slot).
    Slots with weight 0 point at arbitrary distinct positions and must be ignored.
  """
  rng_pos, rng_count = jax.random.split(rng)
  noise = jax.random.uniform(rng_pos, maskable.shape)
  if log_weights is None:
    # Non-maskable positions sort below every maskable one.
    scores = jnp.where(maskable, noise, -1.0)
  else:
    # The same uniform draw as Gumbel noise: -log(-log u), u kept inside (0, 1).
    tiny = jnp.finfo(jnp.float32).tiny
    gumbel = -jnp.log(-jnp.log(jnp.clip(noise, tiny, 1.0 - 1e-7)))
    scores = jnp.where(maskable, gumbel + log_weights.astype(jnp.float32), -jnp.inf)
  _, positions = jax.lax.top_k(scores, max_count)
  count = num_to_mask(maskable, rate, max_count, rounding, rng_count)
  weights = (jnp.arange(max_count)[None, :] < count[:, None]).astype(jnp.float32)
  return positions.astype(jnp.int32), weights


def positions_to_dense(positions: Array, weights: Array, length: int) -> Array:
  """`[B, M]` slots -> `[B, L]` bool mask of the real masked positions."""
  onehot = jax.nn.one_hot(positions, length, dtype=jnp.float32) * weights[..., None]
  return onehot.sum(axis=1) > 0


def gather(x: Array, positions: Array) -> Array:
  """`x[b, positions[b, m]]` for `x` of shape `[B, L, ...]`."""
  idx = positions.reshape(positions.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)


def scatter(x: Array, positions: Array, values: Array, weights: Array) -> Array:
  """Writes `values[b, m]` to `x[b, positions[b, m]]` where `weights[b, m] > 0`.

  Positions within an example are distinct (top-k), so writes never collide.
  """
  keep = gather(x, positions)
  w = (weights > 0).reshape(weights.shape + (1,) * (values.ndim - 2))
  values = jnp.where(w, values.astype(x.dtype), keep)
  batch = jnp.arange(x.shape[0])[:, None]
  return x.at[batch, positions].set(values)


def mask_text(ids: Array, positions: Array, weights: Array, mask_id: int) -> Array:
  """Sets the masked words to `[MASK]`."""
  return scatter(ids, positions, jnp.full(positions.shape, mask_id, ids.dtype), weights)


def mask_regions(feats: Array, positions: Array, weights: Array) -> Array:
  """Zeroes the masked region features (LXMERT); boxes stay, so the model knows where."""
  zeros = jnp.zeros(positions.shape + feats.shape[2:], feats.dtype)
  return scatter(feats, positions, zeros, weights)


# --- sampling ---------------------------------------------------------------------------
def argmax(x: Array) -> Array:
  """`jnp.argmax(x, axis=-1)` as int32: the first index of each row's maximum.

  Written as a max, then a min over the indices that reach it, with the indices held as
  float32 (exact up to 2**24): XLA on CPU vectorises neither `jnp.argmax` (one reduction
  over value-index pairs) nor an int32 min-reduction (the timings:
  bench/results/step_throughput/README.md). A row holding NaN gives its last index
  (`jnp.argmax` gives the NaN's).
  """
  n = x.shape[-1]
  if n > 2**24:
    raise ValueError(f"argmax over {n} entries: float32 indices are exact only up to 2**24")
  top = x.max(axis=-1, keepdims=True)
  first = jnp.where(x == top, jnp.arange(n, dtype=jnp.float32), float(n)).min(axis=-1)
  return jnp.minimum(first, n - 1).astype(jnp.int32)


# Rows longer than two blocks are sampled in two levels (`gumbel_argmax`).
SAMPLE_BLOCK = 256


def gumbel_argmax(rng: Array, logits: Array, temperature: float = 1.0) -> Array:
  """One exact sample from `softmax(logits / T)` per row (last axis); no gradient.

  `temperature == 0` takes the argmax. A row of at most `2 * SAMPLE_BLOCK` entries is
  sampled by Gumbel-max. A longer row (a 30522-word vocabulary, a batch's region pool) is
  cut into blocks of `SAMPLE_BLOCK` (the last one short): a block is drawn by Gumbel-max
  over the blocks' log-masses, then an entry by Gumbel-max within it, so
  P(i) = P(block of i) * P(i | block) = softmax(logits / T)_i, the same distribution.
  It draws `V / 256 + 256` noise values per row instead of V: threefry's noise for a
  30522-word vocabulary was a tenth of a CPU train step (bench/results/step_throughput/
  README.md); `tests/test_electra.py` checks the frequencies.
  """
  logits = jax.lax.stop_gradient(logits.astype(jnp.float32))
  if temperature == 0:
    return argmax(logits)
  z = logits / temperature
  v = z.shape[-1]
  if v <= 2 * SAMPLE_BLOCK:
    return argmax(z + jax.random.gumbel(rng, z.shape, jnp.float32))
  blocks = -(-v // SAMPLE_BLOCK)
  batch_shape = z.shape[:-1]
  p = jnp.exp(z - z.max(axis=-1, keepdims=True))
  p = jnp.pad(p, [(0, 0)] * len(batch_shape) + [(0, blocks * SAMPLE_BLOCK - v)])
  log_mass = jnp.log(p.reshape(batch_shape + (blocks, SAMPLE_BLOCK)).sum(axis=-1))
  rng_block, rng_entry = jax.random.split(rng)
  block = argmax(log_mass + jax.random.gumbel(rng_block, log_mass.shape, jnp.float32))
  # The chosen block's entries, gathered from the unpadded row; the short last block's
  # missing entries are -inf.
  idx = block[..., None] * SAMPLE_BLOCK + jnp.arange(SAMPLE_BLOCK)
  within = jnp.take_along_axis(z, jnp.minimum(idx, v - 1), axis=-1)
  within = jnp.where(idx < v, within, -jnp.inf)
  entry = argmax(within + jax.random.gumbel(rng_entry, within.shape, jnp.float32))
  return block * SAMPLE_BLOCK + entry


def region_candidate_scores(queries: Array, candidates: Array, candidate_valid: Array) -> Array:
  """Scores of every masked-region query against every region of the batch.

  Args:
    queries: `[B, M, D]` generator outputs at masked regions.
    candidates: `[N, D]` embeddings of the candidate pool (N = all regions of the global
      batch, flattened), `candidate_valid` `[N]` bool marks real ones.
  Returns:
    `[B, M, N]` float32 logits, `-inf`-like where the candidate is padding.
  """
  scale = 1.0 / math.sqrt(queries.shape[-1])
  scores = jnp.einsum("bmd,nd->bmn", queries.astype(jnp.float32), candidates.astype(jnp.float32)) * scale
  return jnp.where(candidate_valid[None, None, :], scores, -1e9)


def flat_region_index(positions: Array, num_regions: int) -> Array:
  """Index of region `positions[b, m]` of example b in the flattened `[B*K]` pool."""
  return jnp.arange(positions.shape[0])[:, None] * num_regions + positions


def sample_regions_of_class(rng: Array, classes: Array, candidate_labels: Array,
                            candidate_valid: Array) -> tuple[Array, Array]:
  """For MOC `classify`: a uniformly drawn real region of each requested class.

  Returns pool indices `[B, M]` and whether such a region existed `[B, M]`.
  """
  match = (candidate_labels[None, None, :] == classes[..., None]) & candidate_valid[None, None, :]
  noise = jax.random.uniform(rng, match.shape)
  idx = jnp.argmax(jnp.where(match, noise, -1.0), axis=-1).astype(jnp.int32)
  return idx, match.any(axis=-1)


def kept_slots(rng: Array, weights: Array, fraction, rows: Array | None = None) -> Array:
  """A random `fraction` of the real masked slots (`weights > 0`), bool `[B, M]`: those
  the discriminator reads masked rather than replaced. `rows` (bool `[B]`, optional):
  examples whose every real masked slot is kept as well (`random_rows`)."""
  kept = jax.random.uniform(rng, weights.shape) < fraction
  if rows is not None:
    kept = kept | rows[:, None]
  return kept & (weights > 0)


def random_rows(rng: Array, batch_size: int, fraction) -> Array:
  """A random `fraction` of the examples, bool `[B]`: the clean pairs the discriminator
  reads as the baseline reads its masked pair (every masked word `[MASK]`, every masked
  region zeroed) and the intact ones it reads unmasked (nothing masked or replaced)."""
  return jax.random.uniform(rng, (batch_size,)) < fraction


def witness_rows(rng: Array, batch_size: int, fraction) -> tuple[Array, Array]:
  """Examples whose one modality is the other's uncorrupted witness, bool `[B]` each
  (disjoint): a random `fraction` of the examples, half with their words and half with
  their regions read unmasked. In them only the other modality is corrupted, so whether a
  slot was replaced can be read off an intact other side (docs/method.md §9)."""
  rng_rows, rng_side = jax.random.split(rng)
  rows = jax.random.uniform(rng_rows, (batch_size,)) < fraction
  text_side = jax.random.bernoulli(rng_side, 0.5, (batch_size,))
  return rows & text_side, rows & ~text_side


def restore_rows(values: Array, originals: Array, rows: Array) -> Array:
  """`values` `[B, M, ...]` with every slot of the examples in `rows` (bool `[B]`) set back
  to `originals` (same shape)."""
  rows = rows.reshape(rows.shape + (1,) * (values.ndim - 1))
  return jnp.where(rows, originals, values).astype(values.dtype)


def keep_masked(rng: Array, sampled: Array, weights: Array, fraction,
                mask_id: int, rows: Array | None = None) -> tuple[Array, Array]:
  """The tokens the discriminator reads at the masked slots `[B, M]`: the generator's
  samples, except the `kept_slots` (with `rows`, see there), which stay `mask_id`.

  Returns the tokens and the bool `[B, M]` of the slots kept masked.
  """
  kept = kept_slots(rng, weights, fraction, rows)
  return jnp.where(kept, jnp.asarray(mask_id, sampled.dtype), sampled), kept


# --- labels -----------------------------------------------------------------------------
def replaced_tokens(original: Array, corrupted: Array, valid: Array) -> Array:
  """RTD labels: 1 where the token differs from the original (a sampled original is 0)."""
  return ((original != corrupted) & valid).astype(jnp.float32)


def replaced_regions(original: Array, corrupted: Array, valid: Array) -> Array:
  """R2D labels: 1 where the region feature differs from the original in any component."""
  return ((original != corrupted).any(axis=-1) & valid).astype(jnp.float32)


def itm_pairs(rng: Array, batch_size: int, negative_fraction: float,
              example_mask: Array | None = None, group: Array | None = None,
              same_group_fraction: float = 0.0) -> tuple[Array, Array]:
  """Chooses which examples get another example's text (ITM negatives).

  Returns `text_source [B]` (index of the example whose text each example reads; itself
  for a matched pair) and `is_matched [B]` float32. A negative never reads its own text;
  it reads a random other real example's. With `group [B]` (e.g. each image's object
  count) a `same_group_fraction` of the negatives read a text of their own group where
  the batch has one: a hard negative that cannot be told by the group alone.
  """
  rng_neg, rng_src = jax.random.split(rng)
  negative = jax.random.uniform(rng_neg, (batch_size,)) < negative_fraction
  if batch_size < 2:
    negative = jnp.zeros_like(negative)
  real = jnp.ones((batch_size,), bool) if example_mask is None else example_mask
  # Another real example, uniformly: random scores, own index and padding excluded.
  scores = jax.random.uniform(rng_src, (batch_size, batch_size))
  allowed = real[None, :] & ~jnp.eye(batch_size, dtype=bool)
  candidates = allowed
  if group is not None and same_group_fraction > 0:
    same = allowed & (group[:, None] == group[None, :])
    hard = (jax.random.uniform(jax.random.fold_in(rng, 1), (batch_size,)) < same_group_fraction)
    candidates = jnp.where((hard & same.any(axis=-1))[:, None], same, allowed)
  other = jnp.argmax(jnp.where(candidates, scores, -1.0), axis=-1)
  negative = negative & allowed.any(axis=-1)
  source = jnp.where(negative, other, jnp.arange(batch_size)).astype(jnp.int32)
  return source, (~negative).astype(jnp.float32)


# --- losses -----------------------------------------------------------------------------
# The generic ones (cross-entropy, sigmoid, smooth-L1) and the metric sums are in
# `metrics.py`; what is the method's own is here.
def contrastive_terms(text: Array, image: Array, scale: Array, text_valid: Array,
                      image_valid: Array, scores_fn=None) -> tuple[tuple[Array, Array], tuple[Array, Array]]:
  """Symmetric InfoNCE between example b's text and its image (CLIP, ALBEF's ITC).

  Args:
    text, image: `[B, C]` unit-norm embeddings; row b of each belongs to example b.
    scale: the inverse temperature.
    text_valid: `[B]` texts that take part (as queries and as candidates).
    image_valid: `[B]` images that take part.
    scores_fn: `(queries [B, 1, C], candidates [B, C], valid [B]) -> [B, 1, B]` dot
      products over sqrt(C) (`region_candidate_scores`, or its all-shard version).
  Returns:
    the loss as `(sum, weight)` over both directions, and the text->image top-1
    accuracy sums. A row counts when its text and image both take part.
  """
  scores_fn = scores_fn or region_candidate_scores
  factor = scale * math.sqrt(text.shape[-1])
  t2i = scores_fn(text[:, None], image, image_valid)[:, 0] * factor
  i2t = scores_fn(image[:, None], text, text_valid)[:, 0] * factor
  rows = (text_valid & image_valid).astype(jnp.float32)
  labels = jnp.arange(text.shape[0], dtype=jnp.int32)
  a, b = metrics.cross_entropy(t2i, labels, rows), metrics.cross_entropy(i2t, labels, rows)
  return (a[0] + b[0], a[1] + b[1]), metrics.accuracy_sums(argmax(t2i), labels, rows)


# The patent's five losses (L1-L5), then the optional corrective LM and contrastive
# alignment (docs/method.md).
LOSS_NAMES = ("moc", "mlm", "r2d", "rtd", "itm", "clm", "cmoc", "itc")


def weighted_total(losses: dict[str, Array], weights) -> Array:
  """`w1*L1 + ... + w5*L5` over the losses present; a zero weight drops the term."""
  total = jnp.zeros((), jnp.float32)
  for name in LOSS_NAMES:
    if name in losses and float(weights[name]) != 0.0:
      total = total + float(weights[name]) * losses[name]
  return total
