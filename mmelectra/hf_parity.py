"""Does the exported PyTorch model compute what the JAX model computes? The same inputs
(random ones with padded text and regions, and real validation examples) through both,
and the max abs difference of each output (`mmelectra export --verify`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mmelectra import errors
from mmelectra import hf_params
from mmelectra import model as model_lib

# --verify fails above this max abs difference (fp32 on both sides).
PARITY_BOUND = 1e-4


# --- parity --------------------------------------------------------------------------
def random_inputs(cfg: model_lib.ModelConfig, special_ids: dict, batch_size: int, text_len: int,
                  num_regions: int, seed: int = 0) -> dict:
  """Random inputs with real structure: `[CLS] words [SEP]` then padding, padded regions."""
  rng = np.random.default_rng(seed)
  ids = np.full((batch_size, text_len), special_ids["pad"], np.int32)
  text_mask = np.zeros((batch_size, text_len), bool)
  region_mask = np.zeros((batch_size, num_regions), bool)
  first_word = max(special_ids.values()) + 1
  for i in range(batch_size):
    n = text_len if i == 0 else int(rng.integers(3, text_len + 1))
    ids[i, 0], ids[i, n - 1] = special_ids["cls"], special_ids["sep"]
    ids[i, 1:n - 1] = rng.integers(first_word, cfg.vocab_size, n - 2)
    text_mask[i, :n] = True
    region_mask[i, :num_regions if i == 0 else int(rng.integers(1, num_regions + 1))] = True
  xy = rng.random((batch_size, num_regions, 2)) * 0.8
  wh = rng.random((batch_size, num_regions, 2)) * 0.2 + 0.01
  boxes = np.concatenate([xy, xy + wh], -1) * region_mask[..., None]
  feats = rng.normal(size=(batch_size, num_regions, cfg.visual_feat_dim)) * region_mask[..., None]
  return {"text_ids": ids, "text_mask": text_mask, "region_feats": feats.astype(np.float32),
          "region_boxes": boxes.astype(np.float32), "region_mask": region_mask}


def jax_outputs(model: model_lib.MMElectra, params, batch: dict) -> dict[str, np.ndarray]:
  """The deployed model in JAX: language, vision, pooled output and ITM logits."""

  def run(module, *args):
    lang, vis, pooled = module.encode(*args, deterministic=True)
    return {"language_output": lang, "vision_output": vis, "pooled_output": pooled,
            "itm_logits": module.itm_logits(pooled)}

  args = [jnp.asarray(batch[k]) for k in ("text_ids", "text_mask", "region_feats", "region_boxes",
                                          "region_mask")]
  with jax.default_matmul_precision("highest"):
    out = jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=run))(
        model_lib.deployed_params(params), *args)
  return {k: np.asarray(jax.device_get(v), np.float32) for k, v in out.items()}


def load_hf_models(hf_dir: str):
  """(LxmertModel, LxmertForPreTraining) from `hf_dir`, eval mode; raises on any missing key
  or any unexpected key outside the pretraining heads."""
  import transformers

  models = []
  for cls in (transformers.LxmertModel, transformers.LxmertForPreTraining):
    with hf_params.quiet_transformers():
      m, info = cls.from_pretrained(hf_dir, output_loading_info=True)
    unexpected = [k for k in info["unexpected_keys"] if not k.startswith("cls.")]
    if info["missing_keys"] or unexpected or info["mismatched_keys"]:
      raise errors.InvalidInput(f"{cls.__name__} from {hf_dir}: missing {sorted(info['missing_keys'])}, "
                                f"unexpected {sorted(unexpected)}, mismatched {info['mismatched_keys']}")
    models.append(m.eval())
  return tuple(models)


def hf_outputs(hf_model, hf_pretraining, batch: dict) -> dict[str, np.ndarray]:
  """The exported model in PyTorch on the same inputs (masks as 0/1 floats)."""
  import torch

  kwargs = dict(
      input_ids=torch.from_numpy(np.asarray(batch["text_ids"], np.int64)),
      attention_mask=torch.from_numpy(np.asarray(batch["text_mask"], np.float32)),
      visual_feats=torch.from_numpy(np.asarray(batch["region_feats"], np.float32)),
      visual_pos=torch.from_numpy(np.asarray(batch["region_boxes"], np.float32)),
      visual_attention_mask=torch.from_numpy(np.asarray(batch["region_mask"], np.float32)),
      token_type_ids=torch.zeros(np.shape(batch["text_ids"]), dtype=torch.int64))
  with torch.no_grad():
    out = hf_model(**kwargs)
    itm = hf_pretraining(**kwargs).cross_relationship_score
  return {"language_output": out.language_output.numpy(), "vision_output": out.vision_output.numpy(),
          "pooled_output": out.pooled_output.numpy(), "itm_logits": itm.numpy()}


def max_abs_diffs(a: dict, b: dict, batch: dict) -> dict[str, float]:
  """Max abs difference per output over real examples (an example with no text is padding).

  Every position of a real example counts, padded ones included: both models compute them
  the same way (masks only hide keys).
  """
  real = np.asarray(batch["text_mask"]).any(-1)
  return {k: float(np.max(np.abs(a[k][real] - b[k][real]), initial=0.0)) for k in a}


def verify(hf_dir: str, model: model_lib.MMElectra, params, batches: dict[str, dict]) -> dict:
  """{input set: {output: max abs diff}} of the exported model against the JAX model."""
  hf_model, hf_pretraining = load_hf_models(hf_dir)
  return {name: max_abs_diffs(jax_outputs(model, params, b), hf_outputs(hf_model, hf_pretraining, b), b)
          for name, b in batches.items()}


def parity_failures(diffs: dict, bound: float = PARITY_BOUND) -> list[str]:
  return [f"{name}/{out}={v:.3g}" for name, d in diffs.items() for out, v in d.items()
          if not v <= bound]  # `not <=` also catches NaN


OUTPUTS = ("language_output", "vision_output", "pooled_output", "itm_logits")


def format_diffs(diffs: dict) -> str:
  outs = [o for o in OUTPUTS if o in next(iter(diffs.values()))]
  width = max(len(n) for n in diffs)
  lines = [f"{'inputs':<{width}}  " + "  ".join(f"{o:>15}" for o in outs)]
  lines += [f"{n:<{width}}  " + "  ".join(f"{d[o]:>15.3e}" for o in outs) for n, d in diffs.items()]
  return "\n".join(lines)
