"""VQA fine-tuning: `--config=configs/finetune_vqa.py[:runlocal] --config.init_from=PRETRAIN_DIR`.

The model, data set and tokenizer come from the pretraining run `init_from`; by default
the questions are the synthetic scenes' VQA derivative (`mmelectra/data/synthetic_vqa.py`),
or JSONL files `vqa.train_jsonl` / `vqa.test_jsonl` of `{image, question, answers}`.
`init_mode=random` trains the same architecture from scratch (the baseline).
"""

import ml_collections


def get_config(arg=None):
  runlocal = arg == "runlocal"
  if arg not in (None, "", "runlocal"):
    raise ValueError(f"unknown config argument {arg!r}; expected 'runlocal' or nothing")
  c = ml_collections.ConfigDict()
  c.task = "vqa"
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
      learning_rate=1e-4, warmup_steps=300, schedule="linear", end_learning_rate_fraction=0.0,
      b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.01, grad_clip_norm=1.0,
      layer_decay=1.0,  # < 1: layer-wise learning-rate decay (ELECTRA uses 0.8)
      # > 0: the new VQA head's own peak learning rate (0: the encoder's). 10x the encoder's:
      # a fresh head at the encoder's 1e-4 learns slowly, and 5e-4 on everything wrecked a
      # pretrained encoder (bench/README.md, "Sample efficiency").
      head_learning_rate=1e-3,
  ))
  c.vqa = ml_collections.ConfigDict(dict(
      num_answers=3129,  # top-K training answers (VQA v2 practice); the synthetic set has 21
      loss="bce",  # bce: VQA soft scores | ce: cross-entropy on the most frequent answer
      questions_per_image=3,
      train_split="train", test_split="test",
      train_jsonl="", test_jsonl="",  # set both to fine-tune on JSONL files instead
      # A bad JSONL line (not JSON, a missing or mistyped field, a missing or undecodable
      # image): "error" stops naming file:line, "skip" drops it and counts it in
      # WORKDIR/bad_records.json. Both files are checked before training starts.
      on_bad_record="error",
  ))
  c.eval = ml_collections.ConfigDict(dict(split="test", batch_size=100))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
  if runlocal:
    # A shorter run with the same rates: 5e-4 on every parameter scored a pretrained
    # encoder below random initialisation (bench/README.md, "Sample efficiency").
    c.total_steps = 500
    c.optimizer.warmup_steps = 50
  c.lock()
  return c
