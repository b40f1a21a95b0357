"""Sample efficiency, ELECTRA vs MLM: downstream metrics against training FLOPs and wall clock.

  .venv/bin/python bench/sample_efficiency.py --variant=electra --seed=0 [--budget_tflops=T] [--evals=4]
  .venv/bin/python bench/sample_efficiency.py --variant=electra --seed=0 --reevaluate [...]
  .venv/bin/python bench/sample_efficiency.py --report

One call trains one variant with one seed to a fixed budget of analytic training FLOPs
(`flops.train_step_flops`, which counts the generator), then evaluates the checkpoints
kept at `--evals` equal fractions of the budget and appends one JSON line to
`<results_dir>/sample_efficiency.jsonl`. `--report` turns every line there into
`sample_efficiency.md` (table, headline ratio) and `sample_efficiency.png` (curves).
`--reevaluate` keeps a finished run's training (same variant, seed, budget and --evals)
and evaluates its checkpoints again under the current protocol, appending a new line:
for when the evaluation protocol changes (as the VQA probe's did), not the training.

Variants (docs/method.md: a zero loss weight switches a loss off; `moc` picks the region mode).
Each ablation is measured against the default of its day, and VARIANTS pins that default's
values so it still trains what its lines record: from `no_r2d` to `warm_start` "electra"
below means `no_hold`, from `warm_start_clean` to `clean_unscored_detached_regress` it
means `first_hold`, and for `cmoc_corrupted1` and `nodrop` it means `half_hold`.
  electra       the method as configured by default: per-modality generator, a clean hold
                on the baseline's task for the first 3/8 of the run (RTD/R2D not scoring
                it, the generator off the shared embeddings, corrective MOC at weight 3),
                handed over by half the run to ELECTRA's corrupted pairs: RTD + R2D + ITM
                + corrective LM/MOC, MOC `sample` (its lines were recorded as
                `early_handover` until it became the default, 2026-12-06)
  half_hold     the default of 2026-12-05/06: the same with the hold for half the run,
                handed over by three quarters (its lines were recorded as `electra`)
  first_hold    the default of 2026-12-04/05: half_hold with RTD/R2D scoring the clean
                pairs, the generator training the shared embeddings, corrective MOC at 1
  no_hold       the default before 2026-12-04: first_hold without the clean hold
  electra_crossmodal  electra with the generator reading both modalities (`generator=crossmodal`)
  electra_tied  electra with the tied generator (`generator=tied`), see docs/findings.md
  mlm           the LXMERT-style baseline (no generator): MLM + MOC + ITM on the encoder
  mlm_salience  mlm with electra's salience word masking (text_mask_weighting=salience)
  no_r2d        electra with loss_weights.r2d = 0 (no region discriminator)
  no_rtd        electra with loss_weights.rtd = 0 (no token discriminator)
  moc_regress   electra with MOC `regress` (regressed region features as replacements)
  no_salience   electra with uniform word masking (text_mask_weighting=uniform)
  no_rtd_reads_clm  electra with RTD on its own head (model.rtd_reads_clm=False)
  no_clm        electra without the corrective LM/MOC (and so RTD on its own head)
  no_region_keep  electra replacing every masked region (discriminator_region_mask_fraction=0)
  clean_half    electra reading half the examples as the baseline's clean masked pair
                (discriminator_clean_fraction=0.5)
  clean_half_uniform  clean_half with the clean half's words masked uniformly
                (discriminator_clean_uniform_masking=True)
  clean_half_uniform_detached  clean_half_uniform with generator_trains_embeddings=False
  witness       electra corrupting one modality per example and reading the other
                unmasked (discriminator_witness_fraction=1.0)
  warm_start    electra that reads every masked slot masked (the baseline's task) for the
                first 450 steps, then hands over to replaced slots by step 900
                (discriminator_mask_fraction = region share = 1, hold 450, decay 450)
  warm_start_clean  the same hand-over by whole examples, the held phase masked as the
                baseline masks (discriminator_clean_fraction=1 with uniform masking,
                hold 450, decay 450)
  warm_start_clean_long  the same with the held phase twice as long (hold 900, decay 450):
                does the hand-over to ELECTRA add to the baseline's task or cost it?
  clean_unscored  electra (its half hold) with the clean examples left out of RTD/R2D
                (discriminator_scores_clean=False): no one-class target in the hold
  clean_floor   electra whose clean share falls to a quarter, not to 0, and stays
                (discriminator_clean_floor=0.25): the baseline's task goes on beside
                ELECTRA's after the hand-over
  hold_all      electra whose clean hold never ends (the baseline's task for the
                whole run): does the ELECTRA phase earn its half of the budget?
  generator_detached  electra whose generator does not train the shared embeddings
                (generator_trains_embeddings=False)
  clean_unscored_detached  both of the last two: in the hold the discriminator's losses
                are `mlm`'s, and the generator trains only its own layers
  clean_unscored_detached_noclip  the same without global-norm gradient clipping
                (optimizer.grad_clip_norm=0)
  clean_unscored_detached_regress  clean_unscored_detached with MOC `regress`
  (clean_unscored_detached with the corrective MOC at weight 3 is `half_hold`; its lines
  were recorded as `clean_unscored_detached_cmoc3` until it became the default)
  mlm_moc3      mlm with its MOC at weight 3 (loss_weights.moc=3): the baseline given the
                help the default gives its hold
  cmoc_corrupted1  electra with the corrective MOC at weight 1 on the corrupted pairs
                (cmoc_corrupted_weight=1; the clean pairs keep 3): the same hold
  nodrop        half_hold without dropout (model.dropout_rate = attention_dropout_rate = 0)
  mlm_nodrop    mlm without dropout: the baseline on the same recipe
  itm_intact    electra with ITM also on intact pairs (itm_intact_fraction=0.25)
  witness_after  electra with a witness in every corrupted example and none in the clean
                ones (discriminator_witness_fraction=1.0,
                discriminator_witness_on_clean=False): from the hand-over on
  itm2          electra with the matching loss at weight 2 (loss_weights.itm=2)

What every variant shares: size `small`, synthetic scenes (crops, DATA below, built once
into data/tfds), batch 64, AdamW at the config's peak rate with warmup over the first
WARMUP_FRACTION of the run's own steps and linear decay to 0 at its last step. A run's
step count is floor(budget / step FLOPs), rounded down so that every evaluation point is
a whole logging window; `mlm` has the cheaper step, so it gets more steps.

Each evaluation point records: the step, its cumulative analytic training FLOPs, the
cumulative training wall clock (from the run's metrics.jsonl: the timed windows of the
train loop, i.e. without the first, compiling, step and without any evaluation), every
metric of `mmelectra evaluate` on the validation split (itm_acc, rtd_auc, ..., zero-shot
retrieval t2i/i2t R@1/5/10 over the first RETRIEVAL_POOL images), and `vqa_acc` after
a short fixed VQA fine-tune (VQA below) from that checkpoint.
"""

from __future__ import annotations

import argparse
import datetime
import fractions
import json
import math
import os
import platform
import shutil
import sys
import time
from mmelectra import checkpoint as checkpoint_lib
from mmelectra import config_lib
from mmelectra import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The default's hold until 2026-12-06: the baseline's task for half the run, handed over
# to ELECTRA's corrupted pairs by three quarters (fractions of total_steps, as the
# default's are). Every variant measured against a default of that time pins it.
HALF_HOLD = {"discriminator_mask_hold_steps": lambda c: c.get_ref("total_steps") // 2,
             "discriminator_mask_decay_steps": lambda c: c.get_ref("total_steps") // 4}
# The first default with a clean hold (2026-12-04 to 2026-12-05): RTD/R2D also score the
# hold's clean pairs (every target "original"), the generator's MLM/MOC train the shared
# embeddings, the corrective MOC at weight 1, the half hold. The variants measured against
# that default keep it, so each still trains what its lines in the results record.
FIRST_HOLD = {"discriminator_scores_clean": True, "generator_trains_embeddings": True,
              "loss_weights.cmoc": 1.0, **HALF_HOLD}
# The per-modality default before 2026-12-04: every example corrupted from the first step
# (no clean hold), with the first hold's generator and corrective MOC weight.
NO_HOLD = {**FIRST_HOLD, **config_lib.NO_CLEAN_HOLD}
# The first hold with neither of its extras: no one-class RTD/R2D target on the clean
# pairs, and the generator off the shared embeddings (two variants below).
CLEAN_UNSCORED_DETACHED = {**FIRST_HOLD, "discriminator_scores_clean": False,
                           "generator_trains_embeddings": False}

NO_DROPOUT = {"model.dropout_rate": 0.0, "model.attention_dropout_rate": 0.0}
VARIANTS = {
    # name: (configs/pretrain.py argument string, field overrides)
    # The default (since 2026-12-06; its lines before then were recorded as
    # `early_handover`, the same config).
    "electra": ("objective=electra", {}),
    # The default of 2026-12-05 (evening) to 2026-12-06: today's with the half hold (its
    # lines then were recorded as `electra`, and before as `clean_unscored_detached_cmoc3`).
    "half_hold": ("objective=electra", HALF_HOLD),
    # The default from 2026-12-04 to 2026-12-05 (its lines then were recorded as `electra`).
    "first_hold": ("objective=electra", FIRST_HOLD),
    # The default without a clean hold (the default until 2026-12-04; its lines before
    # then were recorded as `electra`).
    "no_hold": ("objective=electra", NO_HOLD),
    "electra_crossmodal": ("objective=electra,generator=crossmodal", {}),
    "mlm": ("objective=mlm", {}),
    # The baseline with the default's word masking, so a comparison isolates the objective.
    "mlm_salience": ("objective=mlm", {"text_mask_weighting": "salience"}),
    # The baseline's MOC at weight 3, as the default weights the hold's corrective MOC (the
    # same task on the same clean pairs): `mlm`'s MOC stays on the
    # same shape-only plateau on some seeds (seed 3, findings 2026-12-05, late morning),
    # so a fair comparison gives the baseline the same help.
    "mlm_moc3": ("objective=mlm", {"loss_weights.moc": 3.0}),
    "no_r2d": ("objective=electra", {**NO_HOLD, "loss_weights.r2d": 0.0}),
    "no_rtd": ("objective=electra", {**NO_HOLD, "loss_weights.rtd": 0.0}),
    # Its study lines (2026-11-27 and before) summed the smooth-L1 over the feature axis;
    # the loss is averaged over it since 2026-12-05.
    "moc_regress": ("objective=electra,moc=regress", NO_HOLD),
    # Each part of the default's grounding off (docs/method.md §9).
    "no_salience": ("objective=electra", {**NO_HOLD, "text_mask_weighting": "uniform"}),
    "no_rtd_reads_clm": ("objective=electra", {**NO_HOLD, "model.rtd_reads_clm": False}),
    "no_clm": ("objective=electra", {**NO_HOLD, "loss_weights.clm": 0.0, "loss_weights.cmoc": 0.0,
                                     "model.rtd_reads_clm": False}),
    "no_region_keep": ("objective=electra", {**NO_HOLD, "discriminator_region_mask_fraction": 0.0}),
    # Half the pairs clean, for the corrective MOC's sake (docs/findings.md, 2026-12-03).
    "clean_half": ("objective=electra", {**NO_HOLD, "discriminator_clean_fraction": 0.5}),
    # The same with the clean half's words masked uniformly, as the baseline's are
    # (docs/findings.md, 2026-12-03 (evening)).
    "clean_half_uniform": ("objective=electra", {**NO_HOLD, "discriminator_clean_fraction": 0.5,
                                                 "discriminator_clean_uniform_masking": True}),
    # And the generator off the shared embeddings, whose chance-level MOC otherwise trains
    # the region projection the corrective MOC reads (docs/findings.md, 2026-12-03 (evening)).
    "clean_half_uniform_detached": ("objective=electra", {**NO_HOLD,
        "discriminator_clean_fraction": 0.5, "discriminator_clean_uniform_masking": True,
        "generator_trains_embeddings": False}),
    # One modality corrupted per example, the other an intact witness (docs/method.md §9).
    "witness": ("objective=electra", {**NO_HOLD, "discriminator_witness_fraction": 1.0}),
    # The baseline's task first (every masked word [MASK], every masked region zeroed, the
    # corrective LM/MOC then being its MLM/MOC), handed over linearly to the corrupted
    # pair between steps 450 and 900 (of ~1786 at 140 TFLOPs); both shares end at 0
    # (docs/findings.md, 2026-12-04).
    "warm_start": ("objective=electra", {**NO_HOLD,
        "discriminator_mask_fraction": 1.0, "discriminator_region_mask_fraction": 1.0,
        "discriminator_mask_hold_steps": 450, "discriminator_mask_decay_steps": 450}),
    # The same by whole examples (every pair clean, then fewer), the clean pairs' words
    # masked uniformly: the held phase is the baseline's own task, masking included
    # (salience masking costs the baseline its MOC; docs/findings.md, 2026-12-04).
    "warm_start_clean": ("objective=electra", {**FIRST_HOLD,
        "discriminator_clean_fraction": 1.0, "discriminator_clean_uniform_masking": True,
        "discriminator_mask_hold_steps": 450, "discriminator_mask_decay_steps": 450}),
    # Twice the held phase: if VQA rises towards `mlm`'s, the ELECTRA phase costs more than
    # it adds at this budget; if it falls, the hand-over is what earns the FLOPs.
    "warm_start_clean_long": ("objective=electra", {**FIRST_HOLD,
        "discriminator_clean_fraction": 1.0, "discriminator_clean_uniform_masking": True,
        "discriminator_mask_hold_steps": 900, "discriminator_mask_decay_steps": 450}),
    # The first hold with the clean examples out of RTD/R2D: in the hold their every target is
    # "original", which the demo's hold grounds without (docs/findings.md, 2026-12-04 (late)).
    "clean_unscored": ("objective=electra", {**FIRST_HOLD, "discriminator_scores_clean": False}),
    # The first hold whose hand-over stops at a quarter of the examples clean: does the
    # baseline's task beside ELECTRA's keep what the hold grounded (docs/findings.md,
    # 2026-12-04 (late night))?
    "clean_floor": ("objective=electra", {**FIRST_HOLD, "discriminator_clean_floor": 0.25}),
    # The first hold whose hold never ends: every pair clean, the baseline's task, for the
    # whole run (the generator still trains beside it, unread). The control for the
    # ELECTRA phase: at or above first_hold, that phase adds nothing at this budget.
    "hold_all": ("objective=electra", {**FIRST_HOLD, "discriminator_mask_hold_steps": 10 ** 9}),
    # The first hold with the generator reading the shared embeddings through a stop-gradient:
    # in the hold its salience-masked MLM and MOC no longer train the embeddings the
    # baseline's task reads. Is that what keeps the hold below `mlm`?
    "generator_detached": ("objective=electra", {**FIRST_HOLD, "generator_trains_embeddings": False}),
    # Both together: in the hold the discriminator's losses are then `mlm`'s (corrective
    # LM/MOC and ITM on the clean masked pair) and the generator trains only its own
    # layers. At `mlm`'s level, the two extras together keep the hold below it; at
    # first_hold's, what is left (the generator in the global-norm clip, 8% fewer steps).
    "clean_unscored_detached": ("objective=electra", CLEAN_UNSCORED_DETACHED),
    # The same without global-norm clipping: with the generator's gradients in the clip
    # (norm 5.7-14.4 from step 94 on, every step clipped) the discriminator's steps are
    # scaled by the generator's noise. Does the corrective MOC then leave its plateau on
    # seed 1? (No: findings 2026-12-05, morning.)
    "clean_unscored_detached_noclip": ("objective=electra", {**CLEAN_UNSCORED_DETACHED,
                                                             "optimizer.grad_clip_norm": 0.0}),
    # The same with MOC `regress` (both MOC heads; in the hold the generator's is off the
    # shared parameters, so there only the corrective MOC's target changes): the plateau is
    # a shape-only guess among the batch's regions, and the contrastive target is an
    # embedding the same losses train; the region's own features are a fixed target whose
    # colour cannot be left out. Does it bind colour on the seeds that stay on the plateau?
    # Not answered: its smooth-L1, summed over the feature axis (70-134 here against 0.7-5
    # for every other loss), held the corrective LM at 0.38 where weight-1 runs read
    # 0.65-0.69, so the seed-1 half run was stopped at step 530 (findings 2026-12-05,
    # late morning). Since 2026-12-05 (midday) the smooth-L1 is averaged over the feature
    # axis, LXMERT's reduction: this variant's runs from then on are that fair test.
    "clean_unscored_detached_regress": ("objective=electra,moc=regress", CLEAN_UNSCORED_DETACHED),
    # ELECTRA sec. 3.2's tied generator (configs/pretrain.py generator=tied): ITM on its
    # masked pass, discriminator weights 1.
    "electra_tied": ("objective=electra,generator=tied", {}),
    # The default with the corrective MOC at weight 3 on the clean pairs only (the hold's
    # grounding signal) and at 1 on the corrupted ones, where it stays near chance: the
    # hold is the default's, step for step; does the ELECTRA half get its R2D and matching
    # back (docs/findings.md, 2026-12-05 (night))?
    "cmoc_corrupted1": ("objective=electra", {**HALF_HOLD, "cmoc_corrupted_weight": 1.0}),
    # Without dropout: on the demo dropout 0.1 is what keeps the hold of seeds 1 and 2 on
    # the plateau (docs/findings.md, 2026-12-06). The baseline gets the same recipe.
    "nodrop": ("objective=electra", {**HALF_HOLD, **NO_DROPOUT}),
    "mlm_nodrop": ("objective=mlm", NO_DROPOUT),
    # The default with a quarter of the examples read intact and ITM learning from them and
    # the clean pairs only: on the demo it matched at 0.97 and retrieved at R@1 0.60-0.74,
    # but fine-tuned on VQA no better than random initialisation (docs/findings.md,
    # 2026-12-06 (d)); at this size (seeds 0, 1) VQA 0.721 / 0.570 against the default's
    # 0.809 / 0.785 (2026-12-06 (e)).
    "itm_intact": ("objective=electra", {"itm_intact_fraction": 0.25}),
    # The default with a witness in every corrupted example and none in the clean ones, so
    # the hold is the baseline's task whole and the witness acts from the hand-over on: on
    # the demo it lifted colour checking with the true image to 0.91-0.92 without the cost
    # to VQA the witness on clean examples had; here (seed 0) VQA 0.691 against the
    # default's 0.809, its size questions lost (docs/findings.md, 2026-12-06 (f)).
    "witness_after": ("objective=electra", {"discriminator_witness_fraction": 1.0,
                                            "discriminator_witness_on_clean": False}),
    # The default with the matching loss at weight 2: on the demo it lifted matching on
    # its own input to 0.80-0.825 on seeds 0-2 (docs/findings.md, 2026-12-06 (g)); a
    # demo-only weight is ruled out, so it was measured here as a default candidate. Seeds
    # 0-2: R@1 up on each, matching on its own input up on two of three, VQA 0.785 against
    # the default's 0.797 (seed 2 0.771 against 0.797): not the default (2026-12-06 (h)).
    "itm2": ("objective=electra", {"loss_weights.itm": 2.0}),
}
SIZE = "small"
BATCH_SIZE = 64
# 40k scenes build in about 50 s on a 2-core CPU; a budgeted run reads each about 3 times.
DATA = dict(regions="crops", num_train=40_000, num_validation=1_000, num_test=1_000)
WARMUP_FRACTION = 0.1
# Zero-shot retrieval scores every text x image pair of the pool: pool^2 encoder passes
# (10k here, about as many FLOPs as 50 train steps), in one jitted block.
RETRIEVAL_POOL = 100
# The fixed VQA fine-tune after every evaluation point (same for every variant and point,
# and for the random-init floor). Encoder 1e-4, new head 1e-3: with 5e-4 on everything (the
# protocol before 2026-11-27 evening) a pretrained encoder was wrecked in the first steps
# and scored below random init (bench/README.md).
VQA = dict(steps=600, batch_size=32, learning_rate=1e-4, head_learning_rate=1e-3,
           warmup_steps=60, questions_per_image=3, train_split="train[:5000]",
           test_split="test[:500]")
# About 15 minutes of `electra` training on an idle 2-core CPU (see bench/README.md).
DEFAULT_BUDGET_TFLOPS = 140.0
RESULTS_FILE = "sample_efficiency.jsonl"
# Metrics the report tabulates and plots: (key, label).
# `itm_acc` reads each objective's own input (masked pairs for `mlm`, corrupted ones for
# `electra`); `pool_itm_acc` reads intact pairs, as deployed (docs/method.md §12), and is
# the one to compare across objectives. Lines recorded before 2026-12-06 lack it: a point
# shows it only where every seed has it.
HEADLINE = (("retrieval_r1", "zero-shot R@1"), ("itm_acc", "ITM acc"),
            ("pool_itm_acc", "ITM acc, intact pairs"), ("vqa_acc", "VQA acc"))
# The report's reference runs: every other variant's FLOPs to reach their final scores.
# `mlm_moc3` is `mlm` with the help the default's hold gets (its MOC at weight 3).
BASELINES = ("mlm", "mlm_moc3")


# --- the run's configs ---------------------------------------------------------------------
def _set(config, dotted: str, value) -> None:
  """config[dotted] = value; a callable value is called with the config first (for a
  field that follows another, e.g. `lambda c: c.get_ref("total_steps") // 8`)."""
  if callable(value):
    value = value(config)
  node = config
  *parents, leaf = dotted.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value


def base_config(variant: str, seed: int):
  """The pretraining config of a variant, before the step count is known."""
  from configs import pretrain
  arg, overrides = VARIANTS[variant]
  config = pretrain.get_config(f"size={SIZE},regions={DATA['regions']},{arg}")
  config.seed = seed
  config.batch_size = BATCH_SIZE
  for key, value in DATA.items():
    config.data[key] = value
  config.eval.retrieval_pool = RETRIEVAL_POOL
  config.eval.retrieval_pairs_per_call = RETRIEVAL_POOL ** 2
  for key, value in overrides.items():
    _set(config, key, value)
  return config


def config_summary(config, step_flops: float) -> dict:
  """What a results line records of its run's config."""
  return {
      "objective": config.objective, "moc_mode": config.model.moc_mode,
      "loss_weights": config.loss_weights.to_dict(), "size": SIZE,
      "hidden_size": config.model.hidden_size, "batch_size": config.batch_size,
      "total_steps": config.total_steps, "warmup_steps": config.optimizer.warmup_steps,
      "learning_rate": config.optimizer.learning_rate, "step_tflops": step_flops / 1e12,
      "data": {k: config.data[k] for k in ("name", "num_train", "num_validation", "num_test",
                                           "regions", "image_size", "seed")},
  }


# What `recorded_fields` leaves out: where a run writes and how it checkpoints, not what it
# trains; and the model fields training fills in from the data (-1 in a config, the data's
# value in a run's config.json; the data fields themselves are recorded).
UNRECORDED_FIELDS = ("checkpoint_every", "log_every", "eval_every", "keep_checkpoint_every",
                     "max_checkpoints_to_keep", "debug_nan_steps", "max_nonfinite_steps",
                     "init_from", "mesh", "logical_axis_rules", "data.data_dir",
                     "data.manual_dir", "data.num_workers", "model.num_object_classes",
                     "model.num_regions", "model.visual_feat_dim")


def recorded_fields(config: dict) -> dict:
  """Every field of a run's config (`config.to_dict()` or its config.json) as dotted key
  -> JSON value, less UNRECORDED_FIELDS (and, as `checkpoint.flatten_names` reads a tree,
  less any None field). A results line keeps them beside the summary, so that a later
  change of any default (dropout, the hold's length, ...) that moves a variant shows in
  tests/test_study_variants.py, not only the summary's few fields."""
  flat = checkpoint_lib.flatten_names(json.loads(json.dumps(config)))
  return {dotted: value for dotted, value in ((k.replace("/", "."), v) for k, v in flat.items())
          if not any(dotted == u or dotted.startswith(u + ".") for u in UNRECORDED_FIELDS)}


def plan_steps(max_steps: int, evals: int) -> tuple[int, int]:
  """(steps between evaluation points, log_every): the interval is at most
  max_steps // evals and a multiple of a log window of 20-50 steps, so every evaluation
  point ends a timed window of the train loop."""
  interval = max_steps // evals
  if interval < 1:
    raise ValueError(f"the budget allows {max_steps} steps, fewer than --evals={evals}")
  if interval < 40:
    return interval, interval
  while True:
    for log_every in range(50, 19, -1):
      if interval % log_every == 0:
        return interval, log_every
    interval -= 1


def run_config(variant: str, seed: int, budget_flops: float, evals: int):
  """(config, step FLOPs, steps between evaluation points) for a budgeted run."""
  from mmelectra import flops
  config = base_config(variant, seed)
  step_flops = flops.train_step_flops(config_lib.finalize(config))
  interval, log_every = plan_steps(int(budget_flops // step_flops), evals)
  total = interval * evals
  config.total_steps = total
  config.log_every = log_every
  config.checkpoint_every = interval
  config.max_checkpoints_to_keep = evals  # every evaluation point
  config.keep_checkpoint_every = 0
  config.optimizer.warmup_steps = max(1, round(WARMUP_FRACTION * total))
  config.optimizer.schedule = "linear"
  config.optimizer.end_learning_rate_fraction = 0.0
  return config, step_flops, interval


def vqa_config(init_from: str, seed: int):
  from configs import finetune_vqa
  c = finetune_vqa.get_config()
  c.init_from = init_from
  c.seed = seed
  c.batch_size = VQA["batch_size"]
  c.total_steps = VQA["steps"]
  c.log_every = VQA["steps"]
  c.optimizer.learning_rate = VQA["learning_rate"]
  c.optimizer.head_learning_rate = VQA["head_learning_rate"]
  c.optimizer.warmup_steps = VQA["warmup_steps"]
  c.vqa.questions_per_image = VQA["questions_per_image"]
  c.vqa.train_split = VQA["train_split"]
  c.vqa.test_split = VQA["test_split"]
  c.eval.split = VQA["test_split"]
  return c


# --- one run ---------------------------------------------------------------------------------
def train_seconds_by_step(metrics_path: str, batch_size: int) -> dict[int, float]:
  """Cumulative training seconds at each logged step, from the loop's own timing.

  Each metrics.jsonl row holds `examples_per_sec` over the steps since the previous row;
  the first window leaves out the first step (compilation), and nothing outside the loop
  (data set preparation, evaluation) is in it.
  """
  out, total, previous = {}, 0.0, 0
  with open(metrics_path) as f:
    for line in f:
      row = json.loads(line)
      step = int(row["step"])
      timed = step - previous - (1 if previous == 0 else 0)
      if timed > 0 and row.get("examples_per_sec"):
        total += timed * batch_size / row["examples_per_sec"]
      out[step] = total
      previous = step
  return out


def host_info() -> dict:
  import jax
  return {"node": platform.node(), "cpus": os.cpu_count(), "platform": jax.default_backend(),
          "device": jax.devices()[0].device_kind, "jax": jax.__version__,
          "loadavg_1m": round(os.getloadavg()[0], 2)}


def same_run(workdir: str, config, flag: str) -> None:
  """Checks that the run stored in `workdir` is this variant's, seed's and budget's."""
  stored = workdir_lib.load_config(workdir)  # FileNotFoundError naming the path if it is no run
  for key in ("objective", "total_steps", "seed", "batch_size"):
    if stored.get(key) != config[key]:
      raise ValueError(f"{flag}: {workdir} was trained with {key}={stored.get(key)!r}, "
                       f"this variant, seed, budget and --evals give {config[key]!r}")


def finished_run(workdir: str, config, expected_steps: list[int]) -> None:
  """Checks that `workdir` holds a finished run of `config` with a checkpoint at every
  evaluation point (for `--reevaluate`), before any evaluation is spent on it."""
  from etils import epath
  same_run(workdir, config, "--reevaluate")
  directory = epath.Path(workdir_lib.checkpoint_dir(workdir))
  steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []
  if steps != expected_steps:
    raise ValueError(f"--reevaluate: checkpoints {steps} in {directory}, --evals gives {expected_steps}")


def run(variant: str, seed: int, budget_tflops: float, evals: int, workdir_root: str,
        results_dir: str, reevaluate: bool = False, resume: bool = False) -> dict:
  from mmelectra import evaluate, finetune, train
  from mmelectra.data import datasets

  budget = budget_tflops * 1e12
  config, step_flops, interval = run_config(variant, seed, budget, evals)
  name = f"{variant}_seed{seed}_budget{budget_tflops:g}"
  workdir = os.path.join(workdir_root, name)
  host = host_info()
  expected = [interval * (i + 1) for i in range(evals)]
  resumed = False
  if reevaluate:
    finished_run(workdir, config, expected)
    print(f"{name}: evaluating the {config.total_steps}-step run in {workdir} again", flush=True)
    data_seconds = train_call_seconds = load_after_train = None
  else:
    if os.path.exists(workdir):
      if os.listdir(workdir) and not os.path.exists(os.path.join(workdir, "config.json")):
        raise FileExistsError(f"{workdir} exists and is not a run directory; remove it")
      if resume and os.listdir(workdir):
        # Training continues from the run's last checkpoint, as `mmelectra train` does
        # (bit-identical to an uninterrupted run); its timing then spans two processes.
        same_run(workdir, config, "--resume")
        resumed = True
      else:
        # A fresh run by default: a resumed one times a second compile.
        shutil.rmtree(workdir)
    print(f"{name}: {'resuming ' if resumed else ''}{config.total_steps} steps of "
          f"{step_flops / 1e12:.4f} TFLOPs "
          f"({config.total_steps * step_flops / 1e12:.1f} of {budget_tflops:g} TFLOPs), "
          f"evaluation every {interval} steps, workdir {workdir}", flush=True)
    start = time.perf_counter()
    datasets.prepare(config.data)  # built once, shared by every call
    data_seconds = time.perf_counter() - start
    start = time.perf_counter()
    train.train_and_evaluate(config, workdir)
    train_call_seconds = time.perf_counter() - start
    load_after_train = round(os.getloadavg()[0], 2)
  seconds = train_seconds_by_step(os.path.join(workdir, "metrics.jsonl"), config.batch_size)

  start = time.perf_counter()
  evaluated = dict(evaluate.evaluate_all_steps(workdir, "validation"))
  pretrain_eval_seconds = time.perf_counter() - start
  if sorted(evaluated) != expected:
    raise RuntimeError(f"checkpoints {sorted(evaluated)} in {workdir}, expected {expected}")

  points = []
  for step in sorted(evaluated):
    m = evaluated[step]
    start = time.perf_counter()
    ft_dir = os.path.join(workdir, "vqa", f"step_{step}")
    vqa = finetune.finetune(vqa_config(os.path.join(workdir, "checkpoints", str(step)), seed), ft_dir)
    shutil.rmtree(os.path.join(ft_dir, "checkpoints"), ignore_errors=True)  # not needed again
    vqa_seconds = time.perf_counter() - start
    point = {
        "step": step,
        "flops": step * step_flops,
        "budget_fraction": step * step_flops / budget,
        "train_seconds": seconds[step],
        "retrieval_r1": (m["t2i_r1"] + m["i2t_r1"]) / 2,
        **{k: v for k, v in m.items() if isinstance(v, (int, float)) and k != "step"},
        **{k: v for k, v in vqa.items() if k.startswith("vqa_acc")},
        "vqa_seconds": vqa_seconds,
    }
    points.append(point)
    print(f"  step {step}: {point['flops'] / 1e12:.1f} TFLOPs, {point['train_seconds']:.0f} s: "
          f"R@1 {point['retrieval_r1']:.3f} ITM {m['itm_acc']:.3f} (intact pool "
          f"{m['pool_itm_acc']:.3f}) VQA {vqa['vqa_acc']:.3f} "
          f"(VQA fine-tune {vqa_seconds:.0f} s)", flush=True)

  record = {
      "variant": variant, "seed": seed, "budget_tflops": budget_tflops, "evals": evals,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "reevaluated": reevaluate,  # training from an earlier call, evaluation from this one
      "resumed": resumed,  # training continued an earlier call's run: its timing spans both
      "host": {**host, "loadavg_1m_after_train": load_after_train},
      "protocol": protocol(budget_tflops),
      "config": config_summary(config, step_flops),
      "fields": recorded_fields(config.to_dict()),
      "timing": {
          "data_prepare_seconds": data_seconds,
          "train_call_seconds": train_call_seconds,  # data, compile, loop, final save
          "train_seconds": seconds[config.total_steps],  # the loop's timed steps
          "steps_per_sec": (config.total_steps - 1) / seconds[config.total_steps],
          "pretrain_eval_seconds": pretrain_eval_seconds,  # all points, one compile
          "vqa_seconds": sum(p["vqa_seconds"] for p in points),
      },
      "workdir": workdir,
      "points": points,
  }
  os.makedirs(results_dir, exist_ok=True)
  with open(os.path.join(results_dir, RESULTS_FILE), "a") as f:
    f.write(json.dumps(record, sort_keys=True) + "\n")
  t = record["timing"]
  print(f"{name}: trained {t['train_seconds']:.0f} s ({t['steps_per_sec']:.3f} steps/s), "
        f"evaluation {t['pretrain_eval_seconds']:.0f} s + VQA {t['vqa_seconds']:.0f} s "
        f"({(t['pretrain_eval_seconds'] + t['vqa_seconds']) / t['train_seconds']:.0%} of training); "
        f"appended to {os.path.join(results_dir, RESULTS_FILE)}", flush=True)
  return record


def protocol(budget_tflops: float) -> dict:
  """What must be equal for two runs to be compared (the report keeps one protocol).

  Not the number of evaluation points: a run evaluated at 25/50/75/100% and one evaluated
  at 100% only share their last point (`curves` aligns points by budget fraction).
  """
  from configs import pretrain
  return {"budget_tflops": budget_tflops, "size": SIZE, "batch_size": BATCH_SIZE,
          "data": DATA, "warmup_fraction": WARMUP_FRACTION, "retrieval_pool": RETRIEVAL_POOL,
          "vqa": VQA,
          # Regions per image are 1-4 crops: ceil vs stochastic mask counts differ a lot.
          "mask_count": pretrain.get_config(f"size={SIZE},regions={DATA['regions']}").mask_count}


# --- the report ------------------------------------------------------------------------------
def load_runs(results_dir: str, budget_tflops: float | None) -> tuple[list[dict], str]:
  """The latest run of each (variant, seed) under one protocol: the one given by
  `budget_tflops`, else that of the newest line."""
  path = os.path.join(results_dir, RESULTS_FILE)
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  if not records:
    raise ValueError(f"{path} holds no run")
  if budget_tflops is not None:
    records = [r for r in records if r["budget_tflops"] == budget_tflops]
    if not records:
      raise ValueError(f"{path} holds no run with budget {budget_tflops:g} TFLOPs")
  def identity(record):  # lines before 2026-11-27 night also held "evals" (see `protocol`)
    return json.dumps({k: v for k, v in record["protocol"].items() if k != "evals"}, sort_keys=True)
  key = identity(records[-1])
  same = [r for r in records if identity(r) == key]
  latest = {}
  for r in same:
    latest[(r["variant"], r["seed"])] = r
  note = (f"{len(latest)} runs ({len(records) - len(same)} lines of other protocols and "
          f"{len(same) - len(latest)} superseded reruns left out)")
  return list(latest.values()), note


def curves(runs: list[dict]) -> dict:
  """variant -> {seeds, points: [{key: (mean, min, max)}]} over the seeds' aligned points."""
  out = {}
  for variant in VARIANTS:
    mine = sorted((r for r in runs if r["variant"] == variant), key=lambda r: r["seed"])
    if not mine:
      continue
    # Point i of a run evaluated at n points is at (i + 1) / n of the budget; a fraction
    # counts when every seed has it.
    by_fraction = [{fractions.Fraction(i + 1, len(r["points"])): p for i, p in enumerate(r["points"])}
                   for r in mine]
    shared = sorted(set.intersection(*(set(f) for f in by_fraction)))
    points = []
    for fraction in shared:
      row = {}
      for key in ("flops", "train_seconds", "budget_fraction") + tuple(k for k, _ in HEADLINE):
        values = [run[fraction][key] for run in by_fraction if key in run[fraction]]
        if len(values) == len(by_fraction):
          row[key] = (sum(values) / len(values), min(values), max(values))
      points.append(row)
    out[variant] = {"seeds": [r["seed"] for r in mine], "points": points, "config": mine[0]["config"],
                    "steps_per_sec": sum(r["timing"]["steps_per_sec"] for r in mine) / len(mine)}
  return out


def flops_to_reach(curve: dict, key: str, target: float) -> tuple[float | None, bool]:
  """(FLOPs at which the mean curve first reaches `target`, linearly interpolated between
  evaluation points; None if never), and whether the first point already reaches it (then
  the FLOPs are an upper bound)."""
  previous = None
  for p in curve["points"]:
    if key not in p:
      continue
    x, y = p["flops"][0], p[key][0]
    if y >= target:
      if previous is None:
        return x, True
      x0, y0 = previous
      return x0 + (x - x0) * (target - y0) / (y - y0), False
    previous = (x, y)
  return None, False


def _cell(stat) -> str:
  mean, lo, hi = stat
  return f"{mean:.3f}" if lo == hi else f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"


def _ratio_text(ratio: float | None, bound: bool) -> str:
  if ratio is None:
    return ">1.0 (not reached)"
  return f"<= {ratio:.2f}" if bound else f"{ratio:.2f}"


def ratio_table(data: dict, baseline: str, proto: dict) -> tuple[list[str], dict]:
  """The report's section on the FLOPs each variant takes to reach `baseline`'s final
  scores: (markdown lines, {(variant, key): (ratio or None, ratio is an upper bound)})."""
  lines = ["", f"## FLOPs to reach the `{baseline}` baseline's final score", ""]
  if baseline not in data:
    return lines + [f"No `{baseline}` run yet."], {}
  base = data[baseline]["points"][-1]
  base_flops = base["flops"][0]
  chance = 1 / proto["retrieval_pool"]
  warn = (f" **The baseline's R@1 is at chance ({chance:.3f}): its R@1 ratio says nothing.**"
          if base["retrieval_r1"][0] <= chance * 1.5 else "")
  lines += [f"Baseline (`{baseline}`, final point, mean over seeds [min, max]): "
            + ", ".join(f"{label} {_cell(base[key]) if key in base else '-'}" for key, label in HEADLINE)
            + f" at {base_flops / 1e12:.1f} TFLOPs.{warn} Each cell: the "
            "fraction of those FLOPs at which the variant's mean curve first reaches the "
            "baseline's final mean (linear between evaluation points; `<=` when its first "
            "point already does). Target for `electra`: <= 0.5. A metric whose seed spread is "
            "wide against the gap it measures says little; the baseline's spread (max - min) "
            "is " + ", ".join(f"{base[key][2] - base[key][1]:.3f} ({label})" for key, label in HEADLINE
                              if key in base)
            + ".", "",
            "| variant | " + " | ".join(label for _, label in HEADLINE) + " |",
            "|---" * (1 + len(HEADLINE)) + "|"]
  ratios = {}
  for variant, c in data.items():
    if variant in BASELINES:
      continue
    cells = []
    for key, _ in HEADLINE:
      if key not in base:
        cells.append("- (not in the baseline's lines)")
        continue
      x, bound = flops_to_reach(c, key, base[key][0])
      ratio = None if x is None else x / base_flops
      ratios[(variant, key)] = (ratio, bound)
      cells.append(_ratio_text(ratio, bound))
    lines.append(f"| {variant} | " + " | ".join(cells) + " |")
  return lines, ratios


def report(results_dir: str, budget_tflops: float | None) -> dict:
  runs, note = load_runs(results_dir, budget_tflops)
  data = curves(runs)
  proto = runs[0]["protocol"]
  lines = [
      "# Sample efficiency, ELECTRA vs MLM",
      "",
      f"Written by `bench/sample_efficiency.py --report` from `{RESULTS_FILE}`: {note}. "
      f"Budget {proto['budget_tflops']:g} TFLOPs of analytic training FLOPs (generator "
      f"included), size {proto['size']}, batch {proto['batch_size']}, synthetic scenes "
      f"({proto['data']['regions']}, {proto['data']['num_train']} train scenes); zero-shot "
      f"R@1 = mean of text->image and image->text R@1 over {proto['retrieval_pool']} "
      f"validation images (chance {1 / proto['retrieval_pool']:.3f}); VQA acc after "
      f"{proto['vqa']['steps']} fine-tuning steps (batch {proto['vqa']['batch_size']}, "
      f"lr {proto['vqa']['learning_rate']:g}"
      + (f", head lr {proto['vqa']['head_learning_rate']:g}" if proto["vqa"].get("head_learning_rate") else "")
      + f") on `{proto['vqa']['train_split']}`, tested on "
      f"`{proto['vqa']['test_split']}`. Cells: mean over seeds [min, max].",
      "",
      "| variant | seeds | steps | step TFLOPs | steps/s | point | TFLOPs | train s | "
      + " | ".join(label for _, label in HEADLINE) + " |",
      "|---" * (8 + len(HEADLINE)) + "|",
  ]
  for variant, c in data.items():
    for i, p in enumerate(c["points"]):
      head = (f"{variant} | {','.join(map(str, c['seeds']))} | {c['config']['total_steps']} | "
              f"{c['config']['step_tflops']:.4f} | {c['steps_per_sec']:.3f}"
              if i == 0 else " | | | | ")
      lines.append(f"| {head} | {p['budget_fraction'][0]:.2f} | {p['flops'][0] / 1e12:.1f} | "
                   f"{p['train_seconds'][0]:.0f} | "
                   + " | ".join(_cell(p[k]) if k in p else "-" for k, _ in HEADLINE) + " |")

  random_init = vqa_random_init(results_dir, proto["vqa"])
  floors = {"retrieval_r1": 1 / proto["retrieval_pool"], "itm_acc": 0.5, "pool_itm_acc": 0.5}
  if random_init:
    floors["vqa_acc"] = sum(r["vqa_acc"] for r in random_init) / len(random_init)
    lines += ["", f"VQA acc of the same probe from random initialisation (`--vqa_from_random`, "
              f"seeds {','.join(str(r['seed']) for r in random_init)}): "
              f"{floors['vqa_acc']:.3f} (dotted line in the plot)."]
  ratios = {}
  for baseline in BASELINES:
    table, ratios[baseline] = ratio_table(data, baseline, proto)
    lines += table
  timing = ["", "## Timing", "", "| variant | seed | data prepare s | train call s | train s | "
            "pretrain eval s | VQA s | eval / train | host load (1 min, start / after train) |",
            "|---" * 9 + "|"]
  for r in sorted(runs, key=lambda r: (list(VARIANTS).index(r["variant"]), r["seed"])):
    t = r["timing"]
    # A --reevaluate line has no data-prepare or train-call time (it did not train).
    seconds = {k: "-" if t[k] is None else f"{t[k]:.0f}" for k in ("data_prepare_seconds", "train_call_seconds")}
    timing.append(f"| {r['variant']} | {r['seed']} | {seconds['data_prepare_seconds']} | "
                  f"{seconds['train_call_seconds']} | {t['train_seconds']:.0f} | "
                  f"{t['pretrain_eval_seconds']:.0f} | {t['vqa_seconds']:.0f} | "
                  f"{(t['pretrain_eval_seconds'] + t['vqa_seconds']) / t['train_seconds']:.0%} | "
                  f"{r['host']['loadavg_1m']} / {r['host'].get('loadavg_1m_after_train') or '-'} |")
  lines += timing
  lines += ["", f"![curves](sample_efficiency.png)", ""]
  md_path = os.path.join(results_dir, "sample_efficiency.md")
  with open(md_path, "w") as f:
    f.write("\n".join(lines))
  png_path = os.path.join(results_dir, "sample_efficiency.png")
  plot(data, png_path, data.get("mlm"), floors)
  print(f"wrote {md_path} and {png_path}")
  def short(r):
    if r is None:
      return "n/a"
    return ">1.0" if r[0] is None else (f"<={r[0]:.3f}" if r[1] else f"{r[0]:.3f}")
  names = (("r1", "retrieval_r1"), ("itm", "itm_acc"), ("pool_itm", "pool_itm_acc"), ("vqa", "vqa_acc"))
  compared = [variant for variant in (
      "electra", "first_hold", "no_hold", "warm_start_clean_long", "warm_start_clean",
      "electra_tied", "clean_unscored", "clean_floor", "hold_all", "generator_detached",
      "clean_unscored_detached", "clean_unscored_detached_noclip",
      "clean_unscored_detached_regress", "half_hold") if variant == "electra" or variant in data]
  fields = [f"{variant}_flops_to_mlm_{name}={short(ratios['mlm'].get((variant, key)))}"
            for variant in compared for name, key in names]
  # The baseline given the default's help (its MOC at weight 3): the fair reference.
  if "mlm_moc3" in data:
    fields += [f"{variant}_flops_to_mlm_moc3_{name}={short(ratios['mlm_moc3'].get((variant, key)))}"
               for variant in compared if variant in ("electra", "half_hold")
               for name, key in names]
  print("RESULT " + " ".join(fields))
  return ratios


def vqa_random_init(results_dir: str, vqa: dict) -> list[dict]:
  """The latest `--vqa_from_random` record per seed whose probe equals `vqa`."""
  path = os.path.join(results_dir, "vqa_from_random.jsonl")
  if not os.path.exists(path):
    return []
  latest = {}
  with open(path) as f:
    for line in filter(str.strip, f):
      r = json.loads(line)
      if r["vqa"] == vqa:
        latest[r["seed"]] = r
  return [latest[s] for s in sorted(latest)]


def plot(data: dict, path: str, baseline: dict | None, chance: dict) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  xs = (("flops", "training TFLOPs (analytic)", 1e-12), ("train_seconds", "training wall clock (s)", 1.0))
  fig, axes = plt.subplots(len(xs), len(HEADLINE), figsize=(4.5 * len(HEADLINE), 7), squeeze=False)
  for row, (xkey, xlabel, scale) in enumerate(xs):
    for col, (ykey, ylabel) in enumerate(HEADLINE):
      ax = axes[row][col]
      for variant, c in data.items():
        pts = [p for p in c["points"] if ykey in p]
        if not pts:
          continue
        x = [p[xkey][0] * scale for p in pts]
        mean = [p[ykey][0] for p in pts]
        line, = ax.plot(x, mean, marker="o", label=f"{variant} ({len(c['seeds'])} seed"
                        f"{'s' if len(c['seeds']) > 1 else ''})")
        if len(c["seeds"]) > 1:
          ax.fill_between(x, [p[ykey][1] for p in pts], [p[ykey][2] for p in pts],
                          color=line.get_color(), alpha=0.2)
      if baseline is not None and ykey in baseline["points"][-1]:
        ax.axhline(baseline["points"][-1][ykey][0], color="grey", linestyle="--", linewidth=0.8)
      if ykey in chance:
        ax.axhline(chance[ykey], color="black", linestyle=":", linewidth=0.8)
      ax.set_xlabel(xlabel)
      ax.set_ylabel(ylabel)
      ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=8)
  fig.suptitle("Sample efficiency (mean over seeds, band: min-max; dashed: mlm's final; "
               "dotted: chance; for VQA, random init)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def vqa_from_random(pretrain_workdir: str, seed: int, workdir_root: str, results_dir: str) -> dict:
  """The VQA probe of every point, from random weights: appends to vqa_from_random.jsonl."""
  from mmelectra import finetune
  config = vqa_config(pretrain_workdir, seed)
  config.init_mode = "random"
  start = time.perf_counter()
  out = finetune.finetune(config, os.path.join(workdir_root, f"vqa_random_seed{seed}"))
  record = {"seed": seed, "architecture_from": pretrain_workdir, "vqa": VQA,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "seconds": time.perf_counter() - start,
            **{k: v for k, v in out.items() if k.startswith("vqa_acc")}}
  os.makedirs(results_dir, exist_ok=True)
  with open(os.path.join(results_dir, "vqa_from_random.jsonl"), "a") as f:
    f.write(json.dumps(record) + "\n")
  print(f"RESULT vqa_acc_random_init={record['vqa_acc']:.4f}")
  return record


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variant", choices=sorted(VARIANTS))
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--budget_tflops", type=float, default=None,
                      help=f"training budget (default {DEFAULT_BUDGET_TFLOPS:g}); with --report: "
                      "the budget whose runs to report (default: the newest line's)")
  parser.add_argument("--evals", type=int, default=4, help="evaluation points, at equal FLOP fractions")
  parser.add_argument("--vqa_steps", type=int, default=VQA["steps"],
                      help="steps of the VQA fine-tune probe (warmup 10%%); part of the protocol")
  parser.add_argument("--workdir_root", default=os.path.join("/tmp", "mmelectra_sample_efficiency"))
  parser.add_argument("--results_dir", default=os.path.join(ROOT, "bench", "results"))
  parser.add_argument("--report", action="store_true", help="write the table and plot from the results")
  parser.add_argument("--reevaluate", action="store_true",
                      help="evaluate the finished run of --variant/--seed/--budget_tflops/--evals "
                      "under --workdir_root again (current protocol) instead of training it")
  parser.add_argument("--resume", action="store_true",
                      help="continue the run of --variant/--seed/--budget_tflops/--evals under "
                      "--workdir_root from its last checkpoint (after a crash or kill) instead "
                      "of starting it afresh; the line records \"resumed\": true")
  parser.add_argument("--vqa_from_random", default="",
                      help="a pretraining workdir: run the same VQA probe from random init of its "
                      "architecture (the floor every pretrained point is compared with)")
  args = parser.parse_args()
  if args.vqa_steps != VQA["steps"]:
    VQA.update(steps=args.vqa_steps, warmup_steps=max(1, args.vqa_steps // 10))
  if args.report:
    report(args.results_dir, args.budget_tflops)
    return
  if args.variant is None and not args.vqa_from_random:
    parser.error("--variant is required (or --report, --vqa_from_random)")
  if args.resume and args.reevaluate:
    parser.error("--resume continues training a run, --reevaluate only evaluates a finished one")
  import jax
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # as `mmelectra train`: no per-save INFO lines
  jax.config.update("jax_threefry_partitionable", True)  # as `mmelectra train`
  workdir_root, results_dir = os.path.abspath(args.workdir_root), os.path.abspath(args.results_dir)
  # Every evaluation point compiles the same VQA step and evaluators again (new jitted
  # closures): the persistent cache turns those compiles into look-ups.
  jax.config.update("jax_compilation_cache_dir", os.path.join(workdir_root, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  os.chdir(ROOT)  # the config's data_dir (data/tfds) is relative to the repository
  if args.vqa_from_random:
    vqa_from_random(os.path.abspath(args.vqa_from_random), args.seed, workdir_root, results_dir)
    return
  run(args.variant, args.seed, args.budget_tflops or DEFAULT_BUDGET_TFLOPS, args.evals,
      workdir_root, results_dir, reevaluate=args.reevaluate, resume=args.resume)


if __name__ == "__main__":
  main()
