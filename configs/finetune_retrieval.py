"""Retrieval fine-tuning: `--config=configs/finetune_retrieval.py[:runlocal] --config.init_from=DIR`.

Trains the ITM head (and encoder) on the pretraining run's image-caption data with
hard negatives mined in-batch; reports t2i/i2t R@1/5/10 on `eval.split`.
"""

import ml_collections


def get_config(arg=None):
  runlocal = arg == "runlocal"
  if arg not in (None, "", "runlocal"):
    raise ValueError(f"unknown config argument {arg!r}; expected 'runlocal' or nothing")
  c = ml_collections.ConfigDict()
  c.task = "retrieval"
  c.init_from = ""  # a pretraining workdir or one of its checkpoints/<step> (required)
  c.init_mode = "pretrained"  # pretrained | random
  c.seed = 0
  c.batch_size = 32
  c.total_steps = 3000
  c.log_every = 50
  c.dropout_rate = -1.0  # -1: the pretraining config's
  # Encoder layers as one nn.scan per stack (model.scan_layers in configs/pretrain.py):
  # -1: the pretraining config's, 0: unrolled, 1: scanned. Either layout loads either's
  # checkpoint (init_from matches parameters in the unrolled layout).
  c.scan_layers = -1
  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=5e-5, warmup_steps=300, schedule="linear", end_learning_rate_fraction=0.0,
      b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.01, grad_clip_norm=1.0,
      layer_decay=1.0,  # < 1: layer-wise learning-rate decay
      head_learning_rate=0.0,  # > 0: the ITM head's own peak learning rate
  ))
  c.retrieval = ml_collections.ConfigDict(dict(
      train_split="train",
      # In-batch candidates scored per text to find its hardest negative image (and, from
      # the same scores, each image's hardest negative text); batch_size - 1 = all.
      num_candidates=15,
  ))
  c.eval = ml_collections.ConfigDict(dict(split="test", retrieval_pool=1000, retrieval_pairs_per_call=2048))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
  if runlocal:
    c.total_steps = 500
    c.optimizer.learning_rate = 2e-4
    c.optimizer.warmup_steps = 50
    c.eval.retrieval_pool = 100
  c.lock()
  return c
