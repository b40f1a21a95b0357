"""VQA fine-tuning: `--config=configs/finetune_vqa.py[:runlocal] --config.init_from=PRETRAIN_DIR`.

The model, data set and tokenizer come from the pretraining run `init_from`; by default
the questions are the synthetic scenes' VQA derivative (`mmelectra/data/synthetic_vqa.py`),
or JSONL files `vqa.train_jsonl` / `vqa.test_jsonl` of `{image, question, answers}`.
`init_mode=random` trains the same architecture from scratch (the baseline).
`:runlocal` is a shorter run (1000 steps) with the same rates.
"""

import ml_collections

from mmelectra_configs import finetune_common


def get_config(arg=None):
  runlocal = finetune_common.parse_arg(arg)
  # The new VQA head at 10x the encoder's rate: a fresh head at the encoder's 1e-4 learns
  # slowly, and 5e-4 on every parameter scored a pretrained encoder below random
  # initialisation (docs/findings.md, "Sample efficiency").
  c = finetune_common.common("vqa", learning_rate=1e-4, head_learning_rate=1e-3, runlocal=runlocal)
  if runlocal:
    # 1000 steps, not the common 500: at 500 the training accuracy is still rising for
    # pretrained and random encoders alike, and the demo's three pretrained seeds spread
    # 0.53-0.64 around random's 0.52; at 1000 they bind colour and shape and read
    # 0.69-0.77 against random's 0.54-0.55 (docs/findings.md, 2026-12-06 (g)).
    c.total_steps = 1000
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
  c.lock()
  return c
