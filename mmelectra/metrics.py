"""Losses and metrics as sums that add up: the plumbing pretraining and fine-tuning share.

Each loss returns `(sum, weight)` and each metric a pair of sums (or, for AUC, two score
histograms), so they aggregate exactly over micro-batches, devices, steps and evaluation
batches; `finalize_metrics` divides on the host. The method's own functions are in
`electra.py`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


# --- losses -----------------------------------------------------------------------------
# Each loss returns (sum, weight) so that losses and metrics aggregate exactly over
# micro-batches, devices and evaluation batches; the mean is sum / weight.
def cross_entropy(logits: Array, labels: Array, weights: Array) -> tuple[Array, Array]:
  logits = logits.astype(jnp.float32)
  # -log_softmax(logits)[label] as logsumexp minus the label's logit, picked by a one-hot
  # select: its gradient is two fused elementwise passes, where log_softmax and
  # take_along_axis materialised the log-probabilities and scattered into zeros the
  # size of the logits (on CPU, half the time of the MLM head over a 30522-word vocabulary).
  onehot = labels[..., None].astype(jnp.int32) == jnp.arange(logits.shape[-1], dtype=jnp.int32)
  nll = jax.nn.logsumexp(logits, axis=-1) - jnp.where(onehot, logits, 0.0).sum(axis=-1)
  return (nll * weights).sum(), weights.sum()


def sigmoid_cross_entropy(logits: Array, labels: Array, weights: Array) -> tuple[Array, Array]:
  logits = logits.astype(jnp.float32)
  loss = jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  return (loss * weights).sum(), weights.sum()


def smooth_l1(pred: Array, target: Array, weights: Array, beta: float = 1.0) -> tuple[Array, Array]:
  """Smooth-L1 averaged over the feature axis, weighted per position.

  The mean over features is LXMERT's reduction for its feature regression; a sum grows
  with the feature width (70-134 for 16x16x3 crops, against 0.7-5 for every other loss)
  and swamps the losses it is added to (docs/findings.md, 2026-12-05).
  """
  diff = jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32))
  loss = jnp.where(diff < beta, 0.5 * diff**2 / beta, diff - 0.5 * beta).mean(axis=-1)
  return (loss * weights).sum(), weights.sum()


def mean(pair: tuple[Array, Array]) -> Array:
  total, weight = pair
  return total / jnp.maximum(weight, 1e-9)


# --- metrics ----------------------------------------------------------------------------
# Metrics are sums of (numerator, denominator) pairs plus score histograms for AUC, so
# they add up across steps and batches; `finalize_metrics` (host side) divides.
# AUC histograms bin the logit (not the probability: early in training the scores cluster
# and probability bins would merge them); 0.015 logit resolution over [-15, 15].
AUC_BINS = 2000
AUC_LOGIT_RANGE = 15.0


def accuracy_sums(pred: Array, labels: Array, weights: Array) -> tuple[Array, Array]:
  return ((pred == labels).astype(jnp.float32) * weights).sum(), weights.sum()


def binary_metric_sums(prefix: str, logits: Array, labels: Array, weights: Array) -> dict:
  """Accuracy, precision, recall (threshold 0.5) and a score histogram per class for AUC."""
  pred = (logits > 0).astype(jnp.float32)
  pos = labels * weights
  neg = (1 - labels) * weights
  tp = (pred * pos).sum()
  scaled = (logits.astype(jnp.float32) + AUC_LOGIT_RANGE) / (2 * AUC_LOGIT_RANGE)
  bins = jnp.clip(jnp.floor(scaled * AUC_BINS).astype(jnp.int32), 0, AUC_BINS - 1)
  hist_pos = jnp.zeros(AUC_BINS, jnp.float32).at[bins.ravel()].add(pos.ravel())
  hist_neg = jnp.zeros(AUC_BINS, jnp.float32).at[bins.ravel()].add(neg.ravel())
  return {
      f"{prefix}_acc": accuracy_sums(pred, labels, weights),
      f"{prefix}_precision": (tp, (pred * weights).sum()),
      f"{prefix}_recall": (tp, pos.sum()),
      f"{prefix}_auc": (hist_pos, hist_neg),
  }


def auc_from_histograms(hist_pos, hist_neg) -> float:
  """ROC AUC from per-bin counts; ties within a bin count one half (Mann-Whitney)."""
  hist_pos = np.asarray(hist_pos, np.float64)
  hist_neg = np.asarray(hist_neg, np.float64)
  n_pos, n_neg = hist_pos.sum(), hist_neg.sum()
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  neg_below = np.cumsum(hist_neg) - hist_neg
  wins = (hist_pos * (neg_below + 0.5 * hist_neg)).sum()
  return float(wins / (n_pos * n_neg))


def add_metric_sums(a: dict | None, b: dict) -> dict:
  """Adds two metric-sum dicts (host or device arrays)."""
  if a is None:
    return b
  return jax.tree.map(lambda x, y: x + y, a, b)


def finalize_metrics(sums: dict) -> dict[str, float]:
  """Turns accumulated sums into values; a metric with zero denominator is dropped."""
  out = {}
  for name, (num, den) in sums.items():
    if name.endswith("_auc"):
      value = auc_from_histograms(num, den)
      if not math.isnan(value):
        out[name] = value
      continue
    den = float(np.asarray(den))
    if den > 0:
      out[name] = float(np.asarray(num)) / den
  return out


def sum_all(sums_list) -> dict:
  """The sum of a list of metric-sum dicts (e.g. a logging window's steps)."""
  total = None
  for s in sums_list:
    total = add_metric_sums(total, s)
  return total
