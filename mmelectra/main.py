"""Command line: `mmelectra train | evaluate ...`.

  mmelectra train --config=configs/pretrain.py:size=tiny --workdir=runs/x [--config.key=value]
  mmelectra evaluate --workdir=runs/x [--step=N] [--split=validation]
"""

from __future__ import annotations

import sys

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

COMMANDS = ("train", "evaluate")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, with an optional ':arg' string.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, eval).")
_STEP = flags.DEFINE_integer("step", None, "evaluate: checkpoint step (default: latest).")
_SPLIT = flags.DEFINE_string("split", None, "evaluate: split (default: config.eval.split).")


def _usage(msg: str) -> None:
  raise app.UsageError(f"{msg}\nusage: mmelectra {{{'|'.join(COMMANDS)}}} [flags]; see --help")


def main(argv):
  if len(argv) < 2 or argv[1] not in COMMANDS:
    _usage(f"expected a command, got {argv[1:]!r}")
  if len(argv) > 2:
    _usage(f"unexpected arguments {argv[2:]!r}")
  command = argv[1]
  if not flags.FLAGS["verbosity"].present:
    # orbax and TFDS log every save and read at INFO; keep the console to the progress
    # bar and results unless --verbosity asks for more.
    logging.set_verbosity(logging.WARNING)
  if not _WORKDIR.value:
    _usage("--workdir is required")
  jax.config.update("jax_threefry_partitionable", True)
  if command == "train":
    if _CONFIG.value is None:
      _usage("train needs --config=configs/pretrain.py[:args]")
    from mmelectra import train
    metrics = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    logging.info("final metrics: %s", metrics)
  elif command == "evaluate":
    from mmelectra import evaluate
    step, metrics = evaluate.evaluate_workdir(_WORKDIR.value, _STEP.value, _SPLIT.value)
    if jax.process_index() == 0:
      print(f"evaluation of {_WORKDIR.value} step {step}:")
      print(evaluate.format_table(metrics))


def run():
  if sys.argv[1:2] == ["tokenizer"]:
    # `mmelectra tokenizer train|encode ...` has its own argparse flags (data/tokenizer_cli.py),
    # so it needs no jax and shares no absl flag names with the other commands.
    from mmelectra.data import tokenizer_cli
    sys.exit(tokenizer_cli.main(sys.argv[2:]))
  app.run(main, argv=sys.argv)


if __name__ == "__main__":
  run()
