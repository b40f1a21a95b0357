"""The two pretraining objectives as functions of (params, batch, rng).

`electra`: generator fills masked words and regions, the predictions are written back,
the discriminator (fusion encoder) reads the corrupted pair and judges every word (RTD)
and every region (R2D); ITM rides on the pooled output. Five losses (docs/method.md).
`mlm`: the LXMERT/UNITER baseline; the encoder itself does MLM + MOC + ITM.

Both return `(loss, metric_sums)`; see `metrics_lib.finalize_metrics`.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mmelectra import collectives
from mmelectra import electra
from mmelectra import errors
from mmelectra.electra import gather
from mmelectra.model import MMElectra
from mmelectra import metrics as metrics_lib
from mmelectra.data import mask_salience as mask_salience_lib

Array = jax.Array

# How the masked words are chosen (`config.text_mask_weighting`, docs/method.md §6):
# uniformly among the maskable words, or in proportion to their salience.
TEXT_MASK_WEIGHTINGS = ("uniform", "salience")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """Static (hashable) settings of the objective, read from the run config."""

  objective: str
  moc_mode: str
  text_mask_rate: float
  region_mask_rate: float
  max_text_masked: int
  max_region_masked: int
  mask_count: str  # "ceil" | "stochastic", see electra.num_to_mask
  itm_negative_fraction: float
  itm_input: str  # "corrupted" (the discriminator's pair) | "masked" (tied generator's pass)
  text_temperature: float
  region_temperature: float
  # Share of the masked words (and, separately, regions) that the discriminator reads
  # masked, as the baseline's encoder does ([MASK], an all-zero region), instead of the
  # generator's sample (docs/method.md §9); they leave RTD/R2D and count in the corrective
  # LM/MOC. With `discriminator_mask_decay_steps` > 0 both shares (and
  # `discriminator_clean_fraction`) hold for `discriminator_mask_hold_steps`, then fall
  # linearly to 0 over the decay steps.
  discriminator_mask_fraction: float
  discriminator_region_mask_fraction: float
  discriminator_mask_decay_steps: int
  discriminator_mask_hold_steps: int
  loss_weights: tuple[tuple[str, float], ...]
  mask_id: int
  special_ids: tuple[int, ...]  # never masked: [CLS], [SEP], [PAD]
  # `text_mask_weighting="salience"`: the log masking weight of every token id
  # (data/mask_salience.py); None: every maskable word is equally likely.
  text_mask_log_weights: tuple[float, ...] | None = None
  # ELECTRA shares the word table and the visual projection between generator and
  # discriminator, and the generator's MLM/MOC train them too. False: the generator reads
  # them through a stop-gradient, so only the discriminator's losses shape them
  # (docs/method.md §9).
  generator_trains_embeddings: bool = True
  # Share of the examples the discriminator reads as the baseline's clean masked pair
  # (every masked word `[MASK]`, every masked region zeroed; `electra.random_rows`): on
  # them the corrective LM/MOC are the baseline's MLM/MOC, which a pair with replaced
  # words and regions does not teach (docs/findings.md, 2026-12-03). With
  # `discriminator_mask_decay_steps` > 0 it follows the same hold-then-decay schedule.
  discriminator_clean_fraction: float = 0.0
  # Where the clean share's schedule ends: it falls from `discriminator_clean_fraction`
  # to this share, not to 0, and stays there (evaluation reads this share too), so the
  # baseline's task goes on beside ELECTRA's after the hand-over. Needs the schedule
  # (`discriminator_mask_decay_steps` > 0); the masked-slot shares still fall to 0.
  discriminator_clean_floor: float = 0.0
  # True: the clean examples' words are masked uniformly (BERT's, the baseline's) whatever
  # `text_mask_log_weights` says, so a clean pair keeps some of the words that name the
  # region a masked word or region belongs to (docs/findings.md, 2026-12-03 (evening)).
  discriminator_clean_uniform_masking: bool = False
  # True: RTD/R2D score the clean examples too, where every slot they read is the
  # original (a target of one class). False: those examples leave RTD/R2D, as they leave
  # nothing to find; the corrective LM/MOC and ITM still read them (docs/method.md §9).
  discriminator_scores_clean: bool = True
  # Share of the examples in which only one modality is corrupted and the other (half the
  # time the words, half the regions) is read unmasked, an intact witness
  # (`electra.witness_rows`). Its slots leave the corrective LM/MOC (nothing to correct)
  # and stay in RTD/R2D as originals. Not scheduled.
  discriminator_witness_fraction: float = 0.0
  # True: a witness may fall on a clean example, where it unmasks one modality of the
  # baseline's task; False: only corrupted examples get one, so the clean share (the
  # hold) is the baseline's task whole.
  discriminator_witness_on_clean: bool = True
  # The corrective MOC's weight on the corrupted examples, where the clean ones keep
  # `loss_weights.cmoc` (docs/method.md §9); None: `loss_weights.cmoc` on every example.
  cmoc_corrupted_weight: float | None = None
  # Share of the examples the discriminator reads intact, nothing masked or replaced: the
  # pair a user gives the deployed ITM head. > 0 also makes ITM learn only from the pairs
  # that do not contradict themselves, these and the clean ones; a corrupted matched pair
  # (a replaced word or region) leaves ITM, and the intact pairs leave RTD/R2D and the
  # corrective LM/MOC (nothing replaced or masked to find). 0: ITM on every example.
  itm_intact_fraction: float = 0.0
  # Share of the ITM negatives that read a text whose image has as many objects (real
  # regions) as theirs, where the batch holds one: a wrong caption the count alone does
  # not give away. 0: every negative a uniform other example. Training only: evaluation
  # reads uniform negatives.
  itm_same_count_fraction: float = 0.0

  @property
  def weights(self) -> dict[str, float]:
    return dict(self.loss_weights)


def objective_config_from(config, special_token_ids: Mapping[str, int],
                          mask_salience: np.ndarray | None = None) -> ObjectiveConfig:
  """`mask_salience`: the run's per-token salience (`setup.mask_salience`); needed, and
  only read, under `text_mask_weighting="salience"`."""
  text_len, num_regions = config.data.max_text_len, config.model.num_regions
  weighting = _choice(config, "text_mask_weighting", TEXT_MASK_WEIGHTINGS)
  log_weights = None
  if weighting == "salience":
    if mask_salience is None:
      raise errors.InvalidInput("text_mask_weighting='salience' needs the run's mask-salience table "
                                "(setup.mask_salience); none was given")
    if np.shape(mask_salience) != (config.model.vocab_size,):
      raise errors.InvalidInput(f"the mask-salience table has shape {np.shape(mask_salience)}; "
                                f"expected ({config.model.vocab_size},), one entry per token id "
                                "(model.vocab_size)")
    log_weights = tuple(float(w) for w in mask_salience_lib.mask_log_weights(
        mask_salience, config.text_mask_salience_floor))
  return ObjectiveConfig(
      objective=config.objective,
      moc_mode=config.model.moc_mode,
      text_mask_rate=config.text_mask_rate,
      region_mask_rate=config.region_mask_rate,
      max_text_masked=electra.max_masked(text_len, config.text_mask_rate),
      max_region_masked=electra.max_masked(num_regions, config.region_mask_rate),
      mask_count=_choice(config, "mask_count", electra.MASK_COUNTS),
      itm_negative_fraction=config.itm_negative_fraction,
      itm_input=_itm_input(config),
      text_temperature=config.text_temperature,
      discriminator_mask_fraction=config.discriminator_mask_fraction,
      discriminator_region_mask_fraction=config.discriminator_region_mask_fraction,
      discriminator_mask_decay_steps=config.discriminator_mask_decay_steps,
      discriminator_mask_hold_steps=config.discriminator_mask_hold_steps,
      region_temperature=config.region_temperature,
      loss_weights=tuple((k, float(config.loss_weights[k])) for k in electra.LOSS_NAMES),
      mask_id=int(special_token_ids["mask"]),
      special_ids=tuple(int(special_token_ids[k]) for k in ("cls", "sep", "pad")),
      text_mask_log_weights=log_weights,
      generator_trains_embeddings=bool(config.generator_trains_embeddings),
      discriminator_clean_fraction=float(config.discriminator_clean_fraction),
      discriminator_clean_floor=float(config.discriminator_clean_floor),
      discriminator_clean_uniform_masking=bool(config.discriminator_clean_uniform_masking),
      discriminator_scores_clean=bool(config.discriminator_scores_clean),
      cmoc_corrupted_weight=(None if config.cmoc_corrupted_weight < 0
                             else float(config.cmoc_corrupted_weight)),
      discriminator_witness_fraction=float(config.discriminator_witness_fraction),
      discriminator_witness_on_clean=bool(config.discriminator_witness_on_clean),
      itm_intact_fraction=float(config.itm_intact_fraction),
      itm_same_count_fraction=float(config.itm_same_count_fraction),
  )


def _choice(config, key: str, choices: tuple[str, ...]) -> str:
  """`config[key]`, one of `choices`."""
  value = config[key]
  if value not in choices:
    raise errors.InvalidInput(f"config.{key} must be one of {choices}, got {value!r}")
  return value


def _itm_input(config) -> str:
  itm_input = _choice(config, "itm_input", ("corrupted", "masked"))
  if itm_input == "masked" and config.objective == "electra" and config.model.generator != "tied":
    raise errors.InvalidInput("config.itm_input='masked' needs config.model.generator='tied': only then "
                              "is the generator's encoder the deployed fusion encoder")
  return itm_input


@dataclasses.dataclass
class _Inputs:
  """The batch after ITM pairing and masking, shared by both objectives."""

  text_ids: Array
  text_mask: Array
  maskable: Array  # [B, T] bool: real words, not [CLS]/[SEP] (the only ones ever replaced)
  masked_ids: Array
  text_positions: Array
  text_weights: Array  # real mask slots
  feats: Array
  boxes: Array
  region_mask: Array
  region_labels: Array
  region_positions: Array
  region_weights: Array
  example: Array  # [B] float, 1 for real examples
  matched: Array  # [B] float, 1 for matched (positive) pairs
  clean: Array | None = None  # [B] bool, the discriminator_clean_fraction rows (or None)


def _prepare(batch: Mapping[str, Array], rng: Array, ocfg: ObjectiveConfig, step=None) -> _Inputs:
  rng_itm, rng_text, rng_region = jax.random.split(rng, 3)
  example_mask = batch.get("example_mask")
  if example_mask is None:
    example_mask = jnp.ones(batch["text_ids"].shape[:1], bool)
  batch_size = batch["text_ids"].shape[0]
  # Hard negatives by count group the examples by their real regions; off, no group.
  count = (batch["region_mask"].astype(jnp.int32).sum(-1)
           if ocfg.itm_same_count_fraction > 0 else None)
  source, matched = electra.itm_pairs(
      rng_itm, batch_size, ocfg.itm_negative_fraction, example_mask,
      group=count, same_group_fraction=ocfg.itm_same_count_fraction)
  # A negative's text may sit on another data-parallel shard.
  text_ids = collectives.take_rows(batch["text_ids"], source)
  text_mask = collectives.take_rows(batch["text_mask"], source).astype(bool)
  maskable = text_mask & ~jnp.isin(text_ids, jnp.asarray(ocfg.special_ids))
  log_weights = clean = None
  if ocfg.text_mask_log_weights is not None:
    log_weights = jnp.asarray(ocfg.text_mask_log_weights, jnp.float32)[text_ids]
  if ocfg.objective == "electra" and ocfg.discriminator_clean_fraction > 0:
    # Drawn here, as the clean rows may be masked their own way; a stream of its own
    # (fold_in) so runs without them keep theirs.
    clean = electra.random_rows(jax.random.fold_in(rng, 1), batch_size, discriminator_mask_fraction(
        ocfg, step, ocfg.discriminator_clean_fraction, ocfg.discriminator_clean_floor))
    if ocfg.discriminator_clean_uniform_masking and log_weights is not None:
      log_weights = jnp.where(clean[:, None], 0.0, log_weights)
  t_pos, t_w = electra.choose_mask_positions(rng_text, maskable, ocfg.text_mask_rate,
                                             ocfg.max_text_masked, ocfg.mask_count, log_weights)
  region_mask = batch["region_mask"].astype(bool)
  r_pos, r_w = electra.choose_mask_positions(rng_region, region_mask, ocfg.region_mask_rate,
                                             ocfg.max_region_masked, ocfg.mask_count)
  feats = batch["region_feats"]
  labels = batch.get("region_labels")
  if labels is None:
    labels = jnp.full(region_mask.shape, -1, jnp.int32)
  return _Inputs(
      text_ids=text_ids, text_mask=text_mask, maskable=maskable,
      masked_ids=electra.mask_text(text_ids, t_pos, t_w, ocfg.mask_id),
      text_positions=t_pos, text_weights=t_w,
      feats=feats, boxes=batch["region_boxes"], region_mask=region_mask, region_labels=labels,
      region_positions=r_pos, region_weights=r_w,
      example=example_mask.astype(jnp.float32), matched=matched, clean=clean)


def _mlm_terms(mlm_logits, x: _Inputs, loss_weight: Array):
  """L2 and mlm_acc for logits at the masked text slots."""
  target = electra.gather(x.text_ids, x.text_positions)
  mlm = metrics_lib.cross_entropy(mlm_logits, target, loss_weight)
  acc = metrics_lib.accuracy_sums(electra.argmax(mlm_logits), target, loss_weight)
  return mlm, acc


def _itm_terms(itm_logits, x: _Inputs, rows: Array | None = None):
  """L5 and itm_acc over the real examples (those in `rows`, bool `[B]`, if given); label 1
  for a matched pair."""
  labels = x.matched.astype(jnp.int32)
  weights = x.example if rows is None else x.example * rows
  itm = metrics_lib.cross_entropy(itm_logits, labels, weights)
  return itm, metrics_lib.accuracy_sums(electra.argmax(itm_logits), labels, weights)


# The parameters the generator shares with the discriminator (the word table with its
# position/type embeddings, and the visual projection).
SHARED_EMBEDDINGS = ("embeddings", "visual_embeddings")


def _with_detached_embeddings(params):
  """`params` with the shared embeddings behind a stop-gradient, for the generator's pass
  when `generator_trains_embeddings` is False: its losses then train its own layers and
  heads only."""
  return {k: jax.lax.stop_gradient(v) if k in SHARED_EMBEDDINGS else v for k, v in params.items()}


def _region_embeddings(model: MMElectra, params, x: _Inputs) -> tuple[Array, Array]:
  """`candidate_embeddings` (LN(fc(feat))) of every region `[B, K, D]`, and the masked
  regions' inputs `[B, K, D]`: the same with the masked rows set to the embedding of an
  all-zero feature (as `electra.mask_regions` zeroes them).

  Computed once per step: the MOC `sample` candidates and every pass's visual input are
  rows of these, so the projection of the region features (the largest matmul per
  region) runs once, not once per pass.
  """
  embeds = model.apply({"params": params}, x.feats, method=MMElectra.candidate_embeddings)
  zero = jnp.zeros((1, x.feats.shape[-1]), x.feats.dtype)
  masked = model.apply({"params": params}, zero, method=MMElectra.candidate_embeddings)[0]
  masked = jnp.broadcast_to(masked, x.region_positions.shape + masked.shape)
  return embeds, electra.scatter(embeds, x.region_positions, masked, x.region_weights)


def _moc_scoring(moc_out, embeds: Array, x: _Inputs, ocfg: ObjectiveConfig):
  """(terms, scores): `terms(loss_weight)` gives L1 and moc_acc (None for regress) over
  the masked regions `loss_weight` counts; `scores` are the logits replacement sampling
  reads (None for regress). The scores are computed once, whichever weights read them.

  `embeds` are the regions' `candidate_embeddings` (see `_region_embeddings`).
  """
  num_regions = x.feats.shape[1]
  if ocfg.moc_mode == "sample":
    candidates = embeds.reshape(-1, embeds.shape[-1])
    # The pool is every region of the global batch, on all shards (docs/method.md §5).
    scores = collectives.pool_candidate_scores(moc_out, candidates, x.region_mask.reshape(-1))
    target = electra.flat_region_index(x.region_positions, num_regions)
    return (lambda w: (metrics_lib.cross_entropy(scores, target, w),
                       metrics_lib.accuracy_sums(electra.argmax(scores), target, w))), scores
  if ocfg.moc_mode == "regress":
    target = electra.gather(x.feats, x.region_positions)
    return (lambda w: (metrics_lib.smooth_l1(moc_out, target, w), None)), None
  # classify: only regions with a label count.
  labels = electra.gather(x.region_labels, x.region_positions)
  safe_labels = jnp.maximum(labels, 0)

  def terms(w):
    labelled = w * (labels >= 0)
    return (metrics_lib.cross_entropy(moc_out, safe_labels, labelled),
            metrics_lib.accuracy_sums(electra.argmax(moc_out), safe_labels, labelled))
  return terms, moc_out


def _moc_terms(moc_out, embeds: Array, x: _Inputs, loss_weight: Array, ocfg: ObjectiveConfig):
  """L1, moc_acc (None for regress) and the logits replacement sampling reads."""
  terms, scores = _moc_scoring(moc_out, embeds, x, ocfg)
  return (*terms(loss_weight), scores)


def _replacement_regions(rng, moc_out, moc_scores, x: _Inputs, ocfg: ObjectiveConfig,
                         embeds: Array, project) -> tuple[Array, Array]:
  """Region features written back at the masked regions `[B, Mr, Dv]`, and their
  embeddings `[B, Mr, D]`: rows of `embeds`, or `project(features)` for regressed ones."""
  if ocfg.moc_mode == "regress":
    # The regressed vector itself: R2D's gradient reaches the generator through it.
    feats = moc_out.astype(x.feats.dtype)
    return feats, project(feats)
  pools = (x.feats.reshape(-1, x.feats.shape[-1]), embeds.reshape(-1, embeds.shape[-1]))
  if ocfg.moc_mode == "sample":
    idx = electra.gumbel_argmax(rng, moc_scores, ocfg.region_temperature)
    return tuple(collectives.take_rows(pool, idx) for pool in pools)
  rng_cls, rng_pick = jax.random.split(rng)
  classes = electra.gumbel_argmax(rng_cls, moc_scores, ocfg.region_temperature)
  idx, found = electra.sample_regions_of_class(
      rng_pick, classes, x.region_labels.reshape(-1), x.region_mask.reshape(-1))
  originals = (electra.gather(x.feats, x.region_positions), electra.gather(embeds, x.region_positions))
  return tuple(jnp.where(found[..., None], collectives.take_rows(pool, idx), original)
               for pool, original in zip(pools, originals))


def discriminator_mask_fraction(ocfg: ObjectiveConfig, step, start: float | None = None,
                                end: float = 0.0) -> Array | float:
  """The share of masked words (or, given its `start`, of masked regions or of clean
  examples) the discriminator reads masked at `step` (None: the end of the schedule, as
  evaluation uses). With the schedule it holds `start`, then falls linearly to `end`."""
  start = ocfg.discriminator_mask_fraction if start is None else start
  decay = ocfg.discriminator_mask_decay_steps
  if decay <= 0:
    return start
  if step is None:
    return end
  after_hold = step.astype(jnp.float32) - ocfg.discriminator_mask_hold_steps
  return end + (start - end) * jnp.clip(1.0 - after_hold / decay, 0.0, 1.0)


class _Corruption(NamedTuple):
  """The pair the discriminator reads, and which masked slots were left masked."""

  ids: Array  # [B, T] the generator's samples written back at the masked words
  feats: Array  # [B, K, Dv] the replacement regions written back
  embeds: Array  # [B, K, E] their embeddings (what the encoder reads)
  kept_masked: Array | None  # [B, Mt] masked words read as [MASK] (not replaced)
  kept_regions: Array | None  # [B, Mr] masked regions read as all-zero (not replaced)
  witness_text: Array | None = None  # [B] examples whose masked words read as the originals
  witness_regions: Array | None = None  # [B] examples whose masked regions read as the originals


def _corrupt(model: MMElectra, params, x, rng_text, rng_region, mlm_logits, moc_out, moc_scores,
             embeds, masked_embeds, ocfg: ObjectiveConfig, step) -> _Corruption:
  """Writes the generator's predictions back (gradient stopped through token samples),
  leaving `discriminator_mask_fraction` of the masked words and
  `discriminator_region_mask_fraction` of the masked regions masked instead, and every
  masked slot of a `discriminator_clean_fraction` of the examples; in a
  `discriminator_witness_fraction` of them one modality's masked slots read as the
  originals (which overrides both; with `discriminator_witness_on_clean=False` only in
  corrupted examples)."""
  kept_masked = kept_regions = witness_text = witness_regions = None
  if ocfg.discriminator_witness_fraction > 0:  # split only here, as `keep` below
    rng_text, rng_witness = jax.random.split(rng_text)
    witness_text, witness_regions = electra.witness_rows(
        rng_witness, x.text_ids.shape[0], ocfg.discriminator_witness_fraction)
    if not ocfg.discriminator_witness_on_clean and x.clean is not None:
      witness_text, witness_regions = witness_text & ~x.clean, witness_regions & ~x.clean
  keep = (ocfg.discriminator_mask_fraction > 0 or ocfg.discriminator_region_mask_fraction > 0
          or ocfg.discriminator_clean_fraction > 0)
  if keep:  # split only here, so runs without it keep their random streams
    rng_text, rng_keep = jax.random.split(rng_text)
    rng_region, rng_keep_region = jax.random.split(rng_region)
  clean = x.clean
  sampled_tokens = electra.gumbel_argmax(rng_text, mlm_logits, ocfg.text_temperature)
  if keep:
    sampled_tokens, kept_masked = electra.keep_masked(
        rng_keep, sampled_tokens, x.text_weights, discriminator_mask_fraction(ocfg, step),
        ocfg.mask_id, clean)
    kept_regions = electra.kept_slots(
        rng_keep_region, x.region_weights,
        discriminator_mask_fraction(ocfg, step, ocfg.discriminator_region_mask_fraction), clean)
  if witness_text is not None:
    sampled_tokens = electra.restore_rows(sampled_tokens, gather(x.text_ids, x.text_positions),
                                          witness_text)
    if kept_masked is not None:
      kept_masked = kept_masked & ~witness_text[:, None]
  corrupted_ids = electra.scatter(x.text_ids, x.text_positions, sampled_tokens, x.text_weights)

  def project(feats):
    return model.apply({"params": params}, feats, method=MMElectra.candidate_embeddings)

  replacement, replacement_embeds = _replacement_regions(rng_region, moc_out, moc_scores, x, ocfg,
                                                         embeds, project)
  if keep:
    # Kept regions read as the baseline's masked ones: an all-zero feature.
    replacement = jnp.where(kept_regions[..., None], 0.0, replacement).astype(replacement.dtype)
    replacement_embeds = jnp.where(kept_regions[..., None], gather(masked_embeds, x.region_positions),
                                   replacement_embeds)
  if witness_regions is not None:
    replacement = electra.restore_rows(replacement, gather(x.feats, x.region_positions),
                                       witness_regions)
    replacement_embeds = electra.restore_rows(replacement_embeds, gather(embeds, x.region_positions),
                                              witness_regions)
    if kept_regions is not None:
      kept_regions = kept_regions & ~witness_regions[:, None]
  return _Corruption(
      corrupted_ids, electra.scatter(x.feats, x.region_positions, replacement, x.region_weights),
      electra.scatter(embeds, x.region_positions, replacement_embeds, x.region_weights),
      kept_masked, kept_regions, witness_text, witness_regions)


def _discriminator_weights(x, pair_w: Array, c: _Corruption, words_only: bool = False,
                           scores_clean: bool = True) -> tuple[Array, Array]:
  """RTD's and R2D's per-position weights: real tokens (with `words_only`, the maskable
  words: [CLS] and [SEP] are never replaced) and regions of matched pairs, less the slots
  left masked (a [MASK] is plainly not the original: no target there) and, unless
  `scores_clean`, less the clean examples (nothing replaced: every target "original")."""
  if not scores_clean and x.clean is not None:
    pair_w = pair_w * ~x.clean
  text_w = (x.maskable if words_only else x.text_mask) * pair_w[:, None]
  if c.kept_masked is not None:
    text_w = text_w * ~electra.positions_to_dense(x.text_positions, c.kept_masked, x.text_ids.shape[1])
  region_w = x.region_mask * pair_w[:, None]
  if c.kept_regions is not None:
    region_w = region_w * ~electra.positions_to_dense(x.region_positions, c.kept_regions,
                                                      x.feats.shape[1])
  return text_w, region_w


def _grounding_terms(discriminated: dict, x, pair_w, text_loss_w, region_loss_w, embeds,
                     ocfg: ObjectiveConfig) -> tuple[dict, dict]:
  """(losses, other metric sums) of the optional signals on the discriminator (method §9):
  contrastive alignment, the corrective LM and its region half."""
  losses, sums = {}, {}
  if "itc" in discriminated:
    # Contrastive alignment of the discriminator's own single-modality outputs. A text
    # takes part where it is its image's (matched pairs), an image wherever it is real;
    # the candidates are the whole global batch (all data-parallel shards).
    text_emb, image_emb, scale = discriminated["itc"]
    losses["itc"], sums["itc_acc"] = electra.contrastive_terms(
        text_emb, image_emb, scale, pair_w > 0, x.example > 0, collectives.pool_candidate_scores)
  # With clean examples in the batch the corrective LM/MOC are also reported per kind of
  # pair (`clean_clm_loss`, `corrupted_cmoc_acc`, ...): on a clean pair they are the
  # baseline's MLM/MOC, on a corrupted one a harder task, and the whole mixes the two at
  # the step's clean share (docs/method.md §9).
  kinds = {} if x.clean is None else {"clean": x.clean, "corrupted": ~x.clean}
  if ocfg.weights["clm"] > 0:
    # Corrective LM: the original word at every masked slot, from the corrupted pair
    # (matched pairs only, like L2). Where the generator replaced an attribute word, only
    # the image tells the original.
    terms = lambda w: _mlm_terms(discriminated["clm"], x, w)
    losses["clm"], sums["clm_acc"] = terms(text_loss_w)
    sums.update(_by_kind("clm", terms, text_loss_w, kinds))
  if ocfg.weights["cmoc"] > 0:
    # Its region half: the original region at every masked region, from the corrupted
    # pair, scored like the generator's MOC (the same candidate pool for `sample`).
    terms, _ = _moc_scoring(discriminated["cmoc"], embeds, x, ocfg)
    losses["cmoc"], cmoc_acc = terms(region_loss_w)
    by_kind = _by_kind("cmoc", terms, region_loss_w, kinds)
    if ocfg.cmoc_corrupted_weight is not None:
      # The total weighs a corrupted example's terms by `cmoc_corrupted_weight` and a
      # clean one's by `loss_weights.cmoc`: the corrupted part of the sum (every example's
      # without clean ones) is scaled by their ratio, the count is not, so the mean stays
      # over every counted region. `cmoc_loss` reports the plain mean.
      ratio = ocfg.cmoc_corrupted_weight / ocfg.weights["cmoc"]
      total, count = losses["cmoc"]
      corrupted = by_kind["corrupted_cmoc_loss"][0] if kinds else total
      sums["cmoc_loss"] = losses["cmoc"]
      losses["cmoc"] = (total + (ratio - 1.0) * corrupted, count)
    if cmoc_acc is not None:
      sums["cmoc_acc"] = cmoc_acc
    sums.update(by_kind)
  return losses, sums


def _by_kind(name: str, terms, loss_weight: Array, kinds: dict) -> dict:
  """`{kind}_{name}_loss` and `_acc` sums of `terms` (a loss and an accuracy, or None)
  over each kind's rows of `loss_weight` `[B, ...]`."""
  out = {}
  for kind, rows in kinds.items():
    loss, acc = terms(loss_weight * rows[:, None])
    out[f"{kind}_{name}_loss"] = loss
    if acc is not None:
      out[f"{kind}_{name}_acc"] = acc
  return out


def _replaced_fractions(x, pair_w, c: _Corruption, rtd_labels, r2d_labels) -> dict:
  """Share of the sampled words and replaced regions that differ from the original."""
  sampled_w = x.text_weights if c.kept_masked is None else x.text_weights * ~c.kept_masked
  if c.witness_text is not None:
    sampled_w = sampled_w * ~c.witness_text[:, None]
  masked_text = electra.positions_to_dense(x.text_positions, sampled_w * pair_w[:, None],
                                           x.text_ids.shape[1])
  replaced_w = x.region_weights if c.kept_regions is None else x.region_weights * ~c.kept_regions
  if c.witness_regions is not None:
    replaced_w = replaced_w * ~c.witness_regions[:, None]
  masked_regions = electra.positions_to_dense(x.region_positions, replaced_w * pair_w[:, None],
                                              x.feats.shape[1])
  return {
      "text_replaced_frac": ((rtd_labels * masked_text).sum(), masked_text.sum().astype(jnp.float32)),
      "region_replaced_frac": ((r2d_labels * masked_regions).sum(),
                               masked_regions.sum().astype(jnp.float32)),
  }


def electra_losses(model: MMElectra, params, batch, rng, ocfg: ObjectiveConfig,
                   deterministic: bool, step=None) -> tuple[Array, dict]:
  """The five losses (and the optional grounding signals) of one batch: mask, generate,
  corrupt, discriminate, score."""
  rng_prep, rng_gen, rng_disc, rng_text, rng_region = jax.random.split(rng, 5)
  x = _prepare(batch, rng_prep, ocfg, step)
  # L1-L4 count matched pairs only (LXMERT); padding examples count nowhere.
  pair_w = x.example * x.matched
  text_loss_w = x.text_weights * pair_w[:, None]
  region_loss_w = x.region_weights * pair_w[:, None]

  itm_on_masked = ocfg.itm_input == "masked"
  embeds, masked_embeds = _region_embeddings(model, params, x)
  gen_params, gen_embeds, gen_masked_embeds = params, embeds, masked_embeds
  if not ocfg.generator_trains_embeddings:
    gen_params = _with_detached_embeddings(params)
    gen_embeds, gen_masked_embeds = jax.lax.stop_gradient((embeds, masked_embeds))
  generated = model.apply(
      {"params": gen_params}, x.masked_ids, x.text_mask, None, x.boxes, x.region_mask,
      x.text_positions, x.region_positions, deterministic, itm_on_masked,
      region_embeds=gen_masked_embeds, method=MMElectra.generate, rngs={"dropout": rng_gen})
  mlm_logits, moc_out = generated[:2]
  mlm, mlm_acc = _mlm_terms(mlm_logits, x, text_loss_w)
  moc, moc_acc, moc_scores = _moc_terms(moc_out, gen_embeds, x, region_loss_w, ocfg)

  c = _corrupt(model, params, x, rng_text, rng_region, mlm_logits, moc_out, moc_scores, embeds,
               masked_embeds, ocfg, step)
  # The pairs the discriminator has something to find in: all matched ones, less the
  # intact examples below.
  disc_pair_w = pair_w
  itm_rows = intact = None
  if ocfg.itm_intact_fraction > 0:
    # The intact examples: the discriminator reads the original pair, so RTD and R2D find
    # nothing replaced there and the corrective LM/MOC nothing masked, and they leave all
    # four (and the replaced shares). ITM learns from them and from the clean pairs,
    # skipping the corrupted ones.
    intact = electra.random_rows(jax.random.fold_in(rng, 7), x.example.shape[0],
                                 ocfg.itm_intact_fraction)
    c = c._replace(ids=electra.restore_rows(c.ids, x.text_ids, intact),
                   feats=electra.restore_rows(c.feats, x.feats, intact),
                   embeds=electra.restore_rows(c.embeds, embeds, intact))
    disc_pair_w = pair_w * ~intact
    text_loss_w = text_loss_w * ~intact[:, None]
    region_loss_w = region_loss_w * ~intact[:, None]
    itm_rows = intact if x.clean is None else intact | x.clean
  rtd_labels = electra.replaced_tokens(x.text_ids, c.ids, x.text_mask)
  r2d_labels = electra.replaced_regions(x.feats, c.feats, x.region_mask)

  discriminated = model.apply(
      {"params": params}, c.ids, x.text_mask, None, x.boxes, x.region_mask, deterministic,
      region_embeds=c.embeds,
      text_positions=x.text_positions if ocfg.weights["clm"] > 0 else None,
      region_positions=x.region_positions if ocfg.weights["cmoc"] > 0 else None,
      method=MMElectra.discriminate, rngs={"dropout": rng_disc})
  rtd_logits, r2d_logits = discriminated["rtd"], discriminated["r2d"]
  # RTD reading the corrective LM skips [CLS] and [SEP]: there it would only teach the
  # corrective LM to name them, pulling the [CLS] state the pooler reads (docs/method.md §9).
  text_w, region_w = _discriminator_weights(x, disc_pair_w, c, words_only=model.cfg.rtd_reads_clm,
                                            scores_clean=ocfg.discriminator_scores_clean)
  rtd = metrics_lib.sigmoid_cross_entropy(rtd_logits, rtd_labels, text_w)
  r2d = metrics_lib.sigmoid_cross_entropy(r2d_logits, r2d_labels, region_w)
  itm_logits = generated[2] if itm_on_masked else discriminated["itm"]
  itm, itm_acc = _itm_terms(itm_logits, x, itm_rows)

  losses = {"moc": moc, "mlm": mlm, "r2d": r2d, "rtd": rtd, "itm": itm}
  # A witness's slots read as the originals: nothing for the corrective LM/MOC to correct.
  if c.witness_text is not None:
    text_loss_w = text_loss_w * ~c.witness_text[:, None]
    region_loss_w = region_loss_w * ~c.witness_regions[:, None]
  extra_losses, extra_sums = _grounding_terms(discriminated, x, pair_w, text_loss_w,
                                              region_loss_w, embeds, ocfg)
  losses.update(extra_losses)
  loss = electra.weighted_total({k: metrics_lib.mean(v) for k, v in losses.items()}, ocfg.weights)
  sums = {f"{k}_loss": v for k, v in losses.items()}
  sums["mlm_acc"] = mlm_acc
  sums.update(extra_sums)
  if moc_acc is not None:
    sums["moc_acc"] = moc_acc
  sums.update(metrics_lib.binary_metric_sums("rtd", rtd_logits, rtd_labels, text_w))
  sums.update(metrics_lib.binary_metric_sums("r2d", r2d_logits, r2d_labels, region_w))
  sums["itm_acc"] = itm_acc
  if x.clean is not None:
    # Matching per kind of pair, whether or not ITM learns from it: on a clean pair it is
    # the baseline's; on a corrupted one a matched pair may contradict itself.
    for kind, rows in (("clean", x.clean), ("corrupted", ~x.clean)):
      rows = rows if intact is None else rows & ~intact
      sums[f"{kind}_itm_acc"] = _itm_terms(itm_logits, x, rows)[1]
  if intact is not None:
    sums["intact_itm_acc"] = _itm_terms(itm_logits, x, intact)[1]
  sums.update(_replaced_fractions(x, disc_pair_w, c, rtd_labels, r2d_labels))
  sums["loss"] = (loss * x.example.sum(), x.example.sum())
  return loss, sums


def mlm_losses(model: MMElectra, params, batch, rng, ocfg: ObjectiveConfig,
               deterministic: bool) -> tuple[Array, dict]:
  rng_prep, rng_model = jax.random.split(rng)
  x = _prepare(batch, rng_prep, ocfg)
  pair_w = x.example * x.matched
  text_loss_w = x.text_weights * pair_w[:, None]
  region_loss_w = x.region_weights * pair_w[:, None]
  embeds, masked_embeds = _region_embeddings(model, params, x)
  mlm_logits, moc_out, itm_logits = model.apply(
      {"params": params}, x.masked_ids, x.text_mask, None, x.boxes, x.region_mask,
      x.text_positions, x.region_positions, deterministic, region_embeds=masked_embeds,
      method=MMElectra.predict_masked, rngs={"dropout": rng_model})
  mlm, mlm_acc = _mlm_terms(mlm_logits, x, text_loss_w)
  moc, moc_acc, _ = _moc_terms(moc_out, embeds, x, region_loss_w, ocfg)
  itm, itm_acc = _itm_terms(itm_logits, x)
  losses = {"moc": moc, "mlm": mlm, "itm": itm}
  loss = electra.weighted_total({k: metrics_lib.mean(v) for k, v in losses.items()}, ocfg.weights)
  sums = {f"{k}_loss": v for k, v in losses.items()}
  sums["mlm_acc"] = mlm_acc
  if moc_acc is not None:
    sums["moc_acc"] = moc_acc
  sums["itm_acc"] = itm_acc
  sums["loss"] = (loss * x.example.sum(), x.example.sum())
  return loss, sums


def compute_losses(model: MMElectra, params, batch, rng, ocfg: ObjectiveConfig,
                   deterministic: bool, step=None) -> tuple[Array, dict]:
  """`step` (a scalar array) drives the schedules; None: their end values."""
  if ocfg.objective == "electra":
    return electra_losses(model, params, batch, rng, ocfg, deterministic, step)
  return mlm_losses(model, params, batch, rng, ocfg, deterministic)
