"""Does a pretrained checkpoint read the image? Probes on the synthetic-scenes validation split.

  .venv/bin/python bench/grounding_probe.py --workdir=runs/demo [--num=200]

Prints, for the latest checkpoint of a run trained on `synthetic_scenes`:
- `pooled_image_swap` / `pooled_text_swap`: mean |change| of the pooled output (what the
  ITM head reads) when each example's image, or its caption, is replaced by another
  example's. A fusion encoder that ignores the image has pooled_image_swap near 0.
- `itm_pos_acc`, `itm_neg_acc_same_count`, `itm_neg_acc_diff_count`: ITM head on clean
  pairs (no masking), negatives = captions of other images, split by whether the other
  image has as many objects. High diff-count but chance same-count accuracy means the head
  counts objects rather than matching attributes.
- `itm_pair_acc_same_count` / `_diff_count`: the same negatives without a threshold: how
  often the head scores an image's own caption above the other caption (0.5: no
  preference). A head that ranks well but is calibrated for masked input (the `mlm`
  baseline's says "no" to every clean pair) shows here and not in the accuracies above.
- `colour_mlm_acc_true` / `_other`: one colour word per caption set to [MASK]; accuracy of
  the MLM head (the generator's for `electra`) with the true image vs another image.
  Chance is 1/6; equal values mean colour is not read off the image.
  With the per-modality generator the two are equal by construction (it never sees the image).
- `electra` only, `colour_rtd_auc_true` / `_other`: in half the captions one colour word is
  swapped for another colour; AUC of the discriminator's RTD logit at that word, true
  image vs another image. Equal values mean RTD does not use the image for colours.
- `electra` with the corrective LM only, `colour_clm_acc_true` / `_other`: on the same
  captions, how often the discriminator's corrective-LM head names the original colour;
  `colour_clm_masked_acc_true` / `_other`: the same with the colour word set to [MASK]
  (the baseline's colour_mlm probe, asked of the discriminator).
Ends with a `RESULT key=value ...` line.
"""

from __future__ import annotations

import json

from absl import app
from absl import flags
import numpy as np

from mmelectra.data import synthetic_scenes
from mmelectra.model import MMElectra
from mmelectra import metrics as metrics_lib
from mmelectra import setup as setup_lib
from mmelectra import workdir as workdir_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (trained on synthetic_scenes)", required=True)
_NUM = flags.DEFINE_integer("num", 200, "validation examples probed")
_STEP = flags.DEFINE_integer("step", -1, "checkpoint step (-1: latest)")
_SEED = flags.DEFINE_integer("seed", 0, "rng of the masked/swapped words")


def pick_colour_words(ids: np.ndarray, colour_ids: list[int], rng) -> np.ndarray:
  """One colour-word position per caption (-1 where a caption has none)."""
  pos = np.full(len(ids), -1)
  for i, row in enumerate(ids):
    found = np.flatnonzero(np.isin(row, colour_ids))
    if len(found):
      pos[i] = rng.choice(found)
  return pos


def main(argv):
  del argv
  config = workdir_lib.load_config(_WORKDIR.value)
  if config.data.name != "synthetic_scenes":
    raise ValueError(f"{_WORKDIR.value} trained on {config.data.name!r}; the probes need synthetic_scenes")
  data = setup_lib.prepare_data(config)
  config, special = data.config, data.special_ids
  setup = setup_lib.build_for_run(data, _WORKDIR.value)
  manager = workdir_lib.read_only_manager(_WORKDIR.value)
  step, restored = workdir_lib.restore_params(manager, setup.abstract_params,
                                              None if _STEP.value < 0 else _STEP.value)
  params = restored["params"]
  model = setup.model
  batch = next(data.iterator("validation", batch_size=_NUM.value, seed=0, shuffle=False,
                             num_epochs=1))
  b = {k: np.asarray(v) for k, v in batch.items()}
  n = len(b["text_ids"])
  other = np.roll(np.arange(n), 1)
  image = lambda p: (b["region_feats"][p], b["region_boxes"][p], b["region_mask"][p])

  def pooled(text_index, img_index):
    return model.apply({"params": params}, b["text_ids"][text_index], b["text_mask"][text_index],
                       *image(img_index), True, method=MMElectra.encode)[2]

  def itm_margin(text_index, img_index):
    logits = np.asarray(model.apply({"params": params}, pooled(text_index, img_index),
                                    method=MMElectra.itm_logits))
    return logits[:, 1] - logits[:, 0]

  same = np.arange(n)
  base = np.asarray(pooled(same, same))
  res = {"step": int(step), "objective": config.objective,
         "pooled_image_swap": float(np.abs(np.asarray(pooled(same, other)) - base).mean()),
         "pooled_text_swap": float(np.abs(np.asarray(pooled(other, same)) - base).mean())}

  count = b["region_mask"].sum(1)
  pos_margin = itm_margin(same, same)
  res["itm_pos_acc"] = float((pos_margin > 0).mean())
  neg, below_own, same_count = [], [], []
  for shift in range(1, 6):
    texts = np.roll(np.arange(n), shift)
    margin = itm_margin(texts, same)
    neg.append(margin < 0)
    below_own.append((margin < pos_margin) + 0.5 * (margin == pos_margin))
    same_count.append(count[texts] == count)
  neg, below_own = np.concatenate(neg), np.concatenate(below_own)
  same_count = np.concatenate(same_count)
  res["itm_neg_acc_same_count"] = float(neg[same_count].mean())
  res["itm_neg_acc_diff_count"] = float(neg[~same_count].mean())
  res["itm_pair_acc_same_count"] = float(below_own[same_count].mean())
  res["itm_pair_acc_diff_count"] = float(below_own[~same_count].mean())

  tok = data.tokenizer
  colour_ids = [tok.token_to_id(c) for c in synthetic_scenes.COLOURS]
  rng = np.random.default_rng(_SEED.value)
  pos = pick_colour_words(b["text_ids"], colour_ids, rng)
  has = pos >= 0
  rows = np.arange(n)
  masked = b["text_ids"].copy()
  target = masked[rows, np.maximum(pos, 0)]
  masked[rows[has], pos[has]] = special["mask"]
  positions = np.maximum(pos, 0)[:, None].astype(np.int32)
  region_positions = np.zeros((n, 1), np.int32)
  method = MMElectra.generate if config.objective == "electra" else MMElectra.predict_masked
  for name, img in (("true", same), ("other", other)):
    logits = model.apply({"params": params}, masked, b["text_mask"], *image(img), positions,
                         region_positions, True, method=method)[0]
    res[f"colour_mlm_acc_{name}"] = float((np.asarray(logits)[:, 0].argmax(-1) == target)[has].mean())

  if config.objective == "electra":
    swapped = b["text_ids"].copy()
    label = (rng.random(n) < 0.5) & has
    for i in np.flatnonzero(label):
      swapped[i, pos[i]] = rng.choice([c for c in colour_ids if c != swapped[i, pos[i]]])
    corrective = setup.model.cfg.corrective_lm
    for name, img in (("true", same), ("other", other)):
      out = model.apply({"params": params}, swapped, b["text_mask"], *image(img), True,
                        text_positions=positions if corrective else None,
                        method=MMElectra.discriminate)
      rtd = np.asarray(out["rtd"])
      if corrective:
        clm_pred = np.asarray(out["clm"])[:, 0].argmax(-1)
        res[f"colour_clm_acc_{name}"] = float((clm_pred == target)[has].mean())
        out_masked = model.apply({"params": params}, masked, b["text_mask"], *image(img), True,
                                 text_positions=positions, method=MMElectra.discriminate)
        clm_pred = np.asarray(out_masked["clm"])[:, 0].argmax(-1)
        res[f"colour_clm_masked_acc_{name}"] = float((clm_pred == target)[has].mean())
      # The same AUC as the run's rtd_auc (electra's metric sums).
      hists = metrics_lib.binary_metric_sums("rtd", rtd[rows, np.maximum(pos, 0)],
                                         label.astype(np.float32), has.astype(np.float32))["rtd_auc"]
      res[f"colour_rtd_auc_{name}"] = metrics_lib.auc_from_histograms(*hists)

  print(json.dumps(res, indent=1))
  print("RESULT " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()))


if __name__ == "__main__":
  app.run(main)
