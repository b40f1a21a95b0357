"""What the fine-tuning configs (`finetune_vqa.py`, `finetune_retrieval.py`) share.

`common(task, arg)` returns the unlocked config with everything but the task's own
section (`vqa` or `retrieval`), its learning rates and its `eval` fields.
"""

import ml_collections


def parse_arg(arg) -> bool:
  """True for `:runlocal`; an error naming what is allowed for anything else."""
  if arg not in (None, "", "runlocal"):
    raise ValueError(f"unknown config argument {arg!r}; expected 'runlocal' or nothing")
  return arg == "runlocal"


def common(task: str, learning_rate: float, head_learning_rate: float,
           runlocal: bool) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = task
  c.init_from = ""  # a pretraining workdir or one of its checkpoints/<step> (required)
  c.init_mode = "pretrained"  # pretrained | random
  c.seed = 0
  c.batch_size = 32
  c.total_steps = 500 if runlocal else 3000
  c.log_every = 50
  # The loop pretraining uses: a rerun resumes from the newest checkpoint; SIGTERM saves.
  c.checkpoint_every = 500
  c.max_checkpoints_to_keep = 1
  c.keep_checkpoint_every = 0
  c.max_nonfinite_steps = 20  # stop after this many non-finite steps in a row (0: never)
  c.eval_every = 0  # > 0: also evaluate on eval.split every this many steps
  c.dropout_rate = -1.0  # -1: the pretraining config's
  # Encoder layers as one nn.scan per stack (model.scan_layers in configs/pretrain.py):
  # -1: the pretraining config's, 0: unrolled, 1: scanned. Either layout loads either's
  # checkpoint (init_from matches parameters in the unrolled layout).
  c.scan_layers = -1
  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=learning_rate, warmup_steps=50 if runlocal else 300,
      schedule="linear",  # after warmup: linear | cosine decay, or wsd (peak, then decay)
      decay_fraction=0.2,  # wsd: the share of the run, at its end, over which the rate decays
      end_learning_rate_fraction=0.0, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.01,
      grad_clip_norm=1.0,
      layer_decay=1.0,  # < 1: layer-wise learning-rate decay (ELECTRA uses 0.8)
      head_learning_rate=head_learning_rate,  # > 0: the task head's own peak rate (0: the encoder's)
  ))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
  return c
