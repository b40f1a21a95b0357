"""Retrieval fine-tuning: `--config=configs/finetune_retrieval.py[:runlocal] --config.init_from=DIR`.

Trains the ITM head (and encoder) on the pretraining run's image-caption data with
hard negatives mined in-batch; reports t2i/i2t R@1/5/10 on `eval.split`.
`:runlocal` is a shorter run (500 steps, a higher rate, a pool of 100 images).
"""

import ml_collections

from mmelectra_configs import finetune_common


def get_config(arg=None):
  runlocal = finetune_common.parse_arg(arg)
  c = finetune_common.common("retrieval", learning_rate=2e-4 if runlocal else 5e-5,
                             head_learning_rate=0.0, runlocal=runlocal)
  c.retrieval = ml_collections.ConfigDict(dict(
      train_split="train",
      # In-batch candidates scored per text to find its hardest negative image (and, from
      # the same scores, each image's hardest negative text); batch_size - 1 = all.
      num_candidates=15,
  ))
  c.eval = ml_collections.ConfigDict(dict(split="test", retrieval_pool=100 if runlocal else 1000,
                                          retrieval_pairs_per_call=2048))
  c.lock()
  return c
