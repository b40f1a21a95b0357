"""The sample-efficiency study's variants still train what their recorded lines trained.

Every study variant is the default config plus overrides, so a change of the default moves
every variant that does not pin the old value. Each line of the study's results records a
summary of its run's config (loss weights, step FLOPs, step count, ...): rebuilding it from
today's code must give the same summary, or the report would put today's variant beside
lines of another config under one name.
"""

import json
import os

import pytest

import conftest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results", "budget140_v2", "sample_efficiency.jsonl")


def _study():
  return conftest.bench_script("sample_efficiency")


def _lines():
  with open(RESULTS) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def study():
  return _study()


@pytest.fixture(scope="module")
def rebuild(study):
  """line -> (config, step FLOPs, ...) of today's code for its variant, seed, budget and
  evaluation count, built once per such key for every test here."""
  built = {}

  def get(line):
    key = (line["variant"], line["seed"], line["budget_tflops"], line["evals"])
    if key not in built:
      built[key] = study.run_config(line["variant"], line["seed"], line["budget_tflops"] * 1e12,
                                    line["evals"])
    return built[key]
  return get


def test_every_recorded_line_rebuilds_to_its_config(study, rebuild):
  lines = _lines()
  assert len(lines) >= 40
  wrong = []
  for number, line in enumerate(lines, 1):
    config, step_flops, _ = rebuild(line)
    # JSON round trip: the line holds what json wrote (floats, lists).
    rebuilt = json.loads(json.dumps(study.config_summary(config, step_flops)))
    # A loss weight a line lacks is a loss its day did not have (as config_lib.upgrade
    # reads old configs): 0.
    recorded = {**line["config"], "loss_weights": {
        **{name: 0.0 for name in rebuilt["loss_weights"]}, **line["config"]["loss_weights"]}}
    if rebuilt != recorded:
      wrong.append((number, line["variant"],
                    {k: (v, recorded.get(k)) for k, v in rebuilt.items() if recorded.get(k) != v}))
  assert not wrong, wrong


def test_every_recorded_field_rebuilds(study, rebuild):
  """Lines that record their run's whole config (`fields`, from 2026-12-06 on) rebuild to
  it field by field: a default moved under a variant (dropout, the hold's length, ...)
  fails here even where the summary above does not show it."""
  lines = [(n, line) for n, line in enumerate(_lines(), 1) if "fields" in line]
  assert lines, "no results line records its fields"
  wrong = []
  for number, line in lines:
    rebuilt = study.recorded_fields(rebuild(line)[0].to_dict())
    moved = {k: (rebuilt.get(k, "<absent>"), v) for k, v in line["fields"].items()
             if rebuilt.get(k, "<absent>") != v}
    if moved:
      wrong.append((number, line["variant"], moved))
  assert not wrong, wrong


def test_recorded_fields_see_what_the_summary_does_not(study):
  # Dropout and the hold's length are outside config_summary; recorded_fields holds them.
  base, _, _ = study.run_config("half_hold", 0, 140e12, 2)
  other, _, _ = study.run_config("electra", 0, 140e12, 2)
  assert study.config_summary(base, 1.0) == study.config_summary(other, 1.0)
  a, b = study.recorded_fields(base.to_dict()), study.recorded_fields(other.to_dict())
  assert {k for k in a if a[k] != b[k]} == {"discriminator_mask_hold_steps",
                                            "discriminator_mask_decay_steps"}
  assert (a["discriminator_mask_hold_steps"], a["discriminator_mask_decay_steps"]) == (
      base.total_steps // 2, base.total_steps // 4)
  assert (b["discriminator_mask_hold_steps"], b["discriminator_mask_decay_steps"]) == (
      base.total_steps * 3 // 8, base.total_steps // 8)
  nodrop, _, _ = study.run_config("nodrop", 0, 140e12, 2)
  assert study.recorded_fields(nodrop.to_dict())["model.dropout_rate"] == 0.0
  assert a["model.dropout_rate"] == 0.1
  assert not any(k.startswith(("mesh", "logical_axis_rules", "data.data_dir")) for k in a)


def test_the_default_is_its_variant_and_the_earlier_holds_are_pinned(study):
  from configs import pretrain

  default = pretrain.get_config("objective=electra")
  assert study.VARIANTS["electra"] == ("objective=electra", {})
  # The hold's length: 3/8 of the run, handed over by half (since 2026-12-06); the
  # variants measured against the half hold before then keep it at any step count.
  default.total_steps = 1000
  assert (default.discriminator_mask_hold_steps, default.discriminator_mask_decay_steps) == (
      375, 125)
  for variant in ("half_hold", "first_hold", "nodrop", "cmoc_corrupted1", "clean_floor"):
    pinned = study.base_config(variant, 0)
    pinned.total_steps = 1000
    assert (pinned.discriminator_mask_hold_steps,
            pinned.discriminator_mask_decay_steps) == (500, 250), variant
  for variant in ("no_hold", "no_r2d", "witness"):
    assert study.base_config(variant, 0).discriminator_mask_hold_steps == 0, variant
  # The default's hold (docs/method.md §9): RTD/R2D leave the clean pairs, the generator
  # is off the shared embeddings, the corrective MOC at 3.
  assert default.discriminator_scores_clean is False
  assert default.generator_trains_embeddings is False
  assert default.loss_weights.cmoc == 3.0
  first = study.base_config("first_hold", 0).to_dict()
  assert (first["discriminator_scores_clean"], first["generator_trains_embeddings"],
          first["loss_weights"]["cmoc"]) == (True, True, 1.0)
  # The other generators and the baseline keep ELECTRA's sharing and no corrective MOC.
  for arg in ("objective=electra,generator=crossmodal", "objective=electra,generator=tied",
              "objective=mlm"):
    other = pretrain.get_config(arg)
    assert other.generator_trains_embeddings is True, arg
    assert other.loss_weights.cmoc == 0.0, arg


def test_hold_off_argument_gives_the_no_hold_fields(study):
  from configs import pretrain
  from mmelectra import config_lib

  off = pretrain.get_config("objective=electra,hold=off,runlocal")
  for key, value in config_lib.NO_CLEAN_HOLD.items():
    assert off[key] == value, key
  config_lib.validate(off)  # the five fields agree with each other: no "makes none" error
  on = pretrain.get_config("objective=electra,hold=on,runlocal")
  assert on.to_dict() == pretrain.get_config("objective=electra,runlocal").to_dict()
  assert on.discriminator_clean_fraction == 1.0 and on.discriminator_mask_hold_steps > 0
  # The study's no_hold is hold=off with the first hold's generator and corrective MOC.
  no_hold = study.base_config("no_hold", 0)
  for key in config_lib.NO_CLEAN_HOLD:
    assert no_hold[key] == off[key], key
  for arg, match in (("hold=maybe", "expected on or off"),
                     ("objective=mlm,hold=off", "hold= is a setting"),
                     ("generator=tied,hold=off", "hold= is a setting")):
    with pytest.raises(ValueError, match=match):
      pretrain.get_config(arg)


def test_the_report_compares_intact_pair_itm_only_where_every_line_has_it(study):
  # pool_itm_acc exists only in lines recorded since 2026-12-06: a point averages it only
  # over seeds that all have it, and no ratio is drawn against a baseline without it.
  def line(variant, seed, points):
    return {"variant": variant, "seed": seed, "config": {}, "timing": {"steps_per_sec": 1.0},
            "points": [{"flops": f, "train_seconds": f, "budget_fraction": f / 2, **m}
                       for f, m in points]}
  common = {"retrieval_r1": 0.1, "itm_acc": 0.9, "vqa_acc": 0.7}
  runs = [line("mlm", 0, [(1.0, common), (2.0, common)]),
          line("electra", 0, [(1.0, {**common, "pool_itm_acc": 0.8}), (2.0, {**common, "pool_itm_acc": 0.9})]),
          line("electra", 1, [(1.0, common), (2.0, {**common, "pool_itm_acc": 0.7})])]
  data = study.curves(runs)
  first, last = data["electra"]["points"]
  assert "pool_itm_acc" not in first  # seed 1 lacks it there
  assert last["pool_itm_acc"] == pytest.approx((0.8, 0.7, 0.9))
  lines, ratios = study.ratio_table(data, "mlm", {"retrieval_pool": 100})
  assert ("electra", "pool_itm_acc") not in ratios and ratios[("electra", "itm_acc")] == (0.5, True)
  assert any("not in the baseline's lines" in l for l in lines)
  # With the baseline's final pool ITM at 0.5, the electra curve reaches it at its last point
  # (the first one to have the metric), i.e. at the full budget of the baseline.
  runs[0] = line("mlm", 0, [(1.0, common), (2.0, {**common, "pool_itm_acc": 0.5})])
  _, ratios = study.ratio_table(study.curves(runs), "mlm", {"retrieval_pool": 100})
  assert ratios[("electra", "pool_itm_acc")] == (1.0, True)
