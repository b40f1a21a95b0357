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
- The same for size words ("small"/"large": `size_mlm_acc_true`, `size_rtd_auc_true`, ...;
  chance 1/2) and shape words (`shape_...`; chance 1/4). A swapped colour can be caught by
  "no region has that colour"; a swapped size word only by finding the region its phrase
  names and reading its extent (a scene usually holds both sizes), so `size_rtd_auc_true`
  near 0.5 means the discriminator does not bind words to regions. At the study's size
  the runs where it did not lost VQA's size questions (docs/findings.md, 2026-12-06 (g)).
- `region_size_acc` / `_unimodal`: held-out accuracy of a ridge classifier of each
  region's size from the fusion encoder's region outputs / the region stack's before the
  cross layers: whether the boxes' extent survives the encoder at all.
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


# The caption words each probe masks or swaps, in the order probed (the rng draws in this
# order, so the colour figures are those of the colour-only probe before size and shape).
ATTRIBUTES = (("colour", synthetic_scenes.COLOURS), ("size", synthetic_scenes.SIZES),
              ("shape", synthetic_scenes.SHAPES))


def pick_words(ids: np.ndarray, word_ids: list[int], rng) -> np.ndarray:
  """One position per caption of a word in `word_ids` (-1 where a caption has none)."""
  pos = np.full(len(ids), -1)
  for i, row in enumerate(ids):
    found = np.flatnonzero(np.isin(row, word_ids))
    if len(found):
      pos[i] = rng.choice(found)
  return pos


def region_size_accuracy(vis: np.ndarray, boxes: np.ndarray, mask: np.ndarray,
                         ridge: float = 1.0) -> float:
  """Held-out accuracy of a ridge classifier of region size from region outputs `[B, K, D]`.

  A region is large when its box's wider side is above the midpoint of the smallest and
  largest seen; fitted on the first half of the examples, scored on the second. 0.5 is
  chance on balanced sizes; near 1 means the outputs still carry the box's extent.
  """
  n = len(vis)
  side = np.maximum(boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1])
  real = mask.astype(bool)
  threshold = (side[real].min() + side[real].max()) / 2
  y = np.where(side > threshold, 1.0, -1.0)
  fit, test = np.arange(n) < n // 2, np.arange(n) >= n // 2
  x_fit, y_fit = vis[fit][real[fit]], y[fit][real[fit]]
  mean, scale = x_fit.mean(0), x_fit.std(0) + 1e-6
  feats = lambda x: np.concatenate([(x - mean) / scale, np.ones((len(x), 1))], 1)
  a = feats(x_fit)
  w = np.linalg.solve(a.T @ a + ridge * np.eye(a.shape[1]), a.T @ y_fit)
  pred = feats(vis[test][real[test]]) @ w
  return float((np.sign(pred) == y[test][real[test]]).mean())


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

  # Box extent in the region outputs: a ridge classifier of each real region's size
  # (side above the midpoint of the two object sizes) fitted on the first half of the scenes,
  # scored on the second; the fusion encoder's outputs and, as a control, the region
  # stack's before the cross layers.
  lang_emb, vis_emb = model.apply({"params": params}, b["text_ids"], *image(same)[:2], True,
                                  method=MMElectra._embed)
  out = model.apply({"params": params}, lang_emb, b["text_mask"], vis_emb, b["region_mask"],
                    True, with_unimodal=True, method=lambda m, *a, **k: m.encoder(*a, **k))
  for key, vis in (("region_size_acc", out[1]), ("region_size_acc_unimodal", out[3])):
    res[key] = region_size_accuracy(np.asarray(vis, np.float32), b["region_boxes"], b["region_mask"])

  tok = data.tokenizer
  rng = np.random.default_rng(_SEED.value)
  rows = np.arange(n)
  method = MMElectra.generate if config.objective == "electra" else MMElectra.predict_masked
  corrective = setup.model.cfg.corrective_lm
  region_positions = np.zeros((n, 1), np.int32)
  for attribute, words in ATTRIBUTES:
    word_ids = [tok.token_to_id(w) for w in words]
    pos = pick_words(b["text_ids"], word_ids, rng)
    has = pos >= 0
    masked = b["text_ids"].copy()
    target = masked[rows, np.maximum(pos, 0)]
    masked[rows[has], pos[has]] = special["mask"]
    positions = np.maximum(pos, 0)[:, None].astype(np.int32)
    for name, img in (("true", same), ("other", other)):
      logits = model.apply({"params": params}, masked, b["text_mask"], *image(img), positions,
                           region_positions, True, method=method)[0]
      res[f"{attribute}_mlm_acc_{name}"] = float(
          (np.asarray(logits)[:, 0].argmax(-1) == target)[has].mean())
    if config.objective != "electra":
      continue
    swapped = b["text_ids"].copy()
    label = (rng.random(n) < 0.5) & has
    for i in np.flatnonzero(label):
      swapped[i, pos[i]] = rng.choice([w for w in word_ids if w != swapped[i, pos[i]]])
    for name, img in (("true", same), ("other", other)):
      out = model.apply({"params": params}, swapped, b["text_mask"], *image(img), True,
                        text_positions=positions if corrective else None,
                        method=MMElectra.discriminate)
      rtd = np.asarray(out["rtd"])
      if corrective:
        clm_pred = np.asarray(out["clm"])[:, 0].argmax(-1)
        res[f"{attribute}_clm_acc_{name}"] = float((clm_pred == target)[has].mean())
        out_masked = model.apply({"params": params}, masked, b["text_mask"], *image(img), True,
                                 text_positions=positions, method=MMElectra.discriminate)
        clm_pred = np.asarray(out_masked["clm"])[:, 0].argmax(-1)
        res[f"{attribute}_clm_masked_acc_{name}"] = float((clm_pred == target)[has].mean())
      # The same AUC as the run's rtd_auc (electra's metric sums).
      hists = metrics_lib.binary_metric_sums("rtd", rtd[rows, np.maximum(pos, 0)],
                                             label.astype(np.float32), has.astype(np.float32))["rtd_auc"]
      res[f"{attribute}_rtd_auc_{name}"] = metrics_lib.auc_from_histograms(*hists)

  print(json.dumps(res, indent=1))
  print("RESULT " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()))


if __name__ == "__main__":
  app.run(main)
