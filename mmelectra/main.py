"""Command line: `mmelectra train | evaluate ...`.

  mmelectra train --config=configs/pretrain.py:size=tiny --workdir=runs/x [--config.key=value]
  mmelectra evaluate --workdir=runs/x [--step=N | --all | --watch] [--split=validation]
  mmelectra finetune --config=configs/finetune_vqa.py --workdir=runs/y --config.init_from=runs/x
  mmelectra export --workdir=runs/x [--step=N] --out=runs/x/hf [--verify] [--export_heads]
  mmelectra import-hf --hf_dir=path/to/lxmert --workdir=runs/z [--config=configs/pretrain.py[:args]]
  mmelectra compile-check --config=configs/pretrain.py:size=large --num_devices=64 --mesh=1,8,8
Multi-process (one process per host): jax.distributed starts by itself on Cloud TPU pod
slices; elsewhere pass --coordinator_address=HOST:PORT --num_processes=N --process_id=I.
"""

from __future__ import annotations

import sys

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

COMMANDS = ("train", "evaluate", "finetune", "export", "import-hf", "compile-check")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, with an optional ':arg' string.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, eval).")
_STEP = flags.DEFINE_integer("step", None, "evaluate: checkpoint step (default: latest).")
_SPLIT = flags.DEFINE_string("split", None, "evaluate: split (default: config.eval.split).")
_ALL = flags.DEFINE_bool("all", False, "evaluate: every checkpoint of the workdir, oldest first.")
_WATCH = flags.DEFINE_bool("watch", False, "evaluate: poll the workdir and evaluate each new "
                           "checkpoint once, until the run's final step (the sidecar job).")
_POLL_SECONDS = flags.DEFINE_float("poll_seconds", 30.0, "evaluate --watch: seconds between polls.")
_IDLE_TIMEOUT = flags.DEFINE_float("idle_timeout", 0.0, "evaluate --watch: stop after this many "
                                   "seconds without a new checkpoint (0: never).")
_OUT = flags.DEFINE_string("out", None, "export: output Hugging Face directory.")
_VERIFY = flags.DEFINE_bool("verify", False, "export: check the PyTorch model against the JAX "
                            "model on random and validation inputs; fail above 1e-4.")
_EXPORT_HEADS = flags.DEFINE_bool("export_heads", False, "export: also write the pretraining "
                                  "heads (RTD/R2D or MOC) to mmelectra_heads.safetensors.")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "import-hf: Hugging Face LXMERT directory to import.")
# Multi-process runs (one process per host); see mmelectra/distributed.py and launch/.
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "jax.distributed: auto starts it when --coordinator_address is "
                                 "given or JAX detects a cluster (Cloud TPU pod slices, SLURM).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0-based.")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", 8, "compile-check: simulated CPU devices.")
_MESH = flags.DEFINE_string("mesh", None, "compile-check: data,fsdp,model sizes, e.g. 1,8,8 "
                            "(default: the config's mesh).")
_TOPOLOGY = flags.DEFINE_string("topology", None, "compile-check: a TPU topology such as v5e:4x4 "
                                "instead of simulated CPU devices (needs libtpu).")


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
  jax.config.update("jax_threefry_partitionable", True)
  if command == "compile-check":
    if _CONFIG.value is None:
      _usage("compile-check needs --config=configs/pretrain.py[:args]")
    from mmelectra import compile_check
    sys.exit(compile_check.main(_CONFIG.value, _NUM_DEVICES.value, _MESH.value, _TOPOLOGY.value,
                                sys.argv))
  if not _WORKDIR.value:
    _usage("--workdir is required")
  from mmelectra import distributed
  distributed.initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                         _PROCESS_ID.value)
  if command == "train":
    if _CONFIG.value is None:
      _usage("train needs --config=configs/pretrain.py[:args]")
    from mmelectra import train
    metrics = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    logging.info("final metrics: %s", metrics)
  elif command == "evaluate":
    from mmelectra import evaluate

    def report(step, metrics):
      if jax.process_index() == 0:
        print(f"evaluation of {_WORKDIR.value} step {step}:")
        print(evaluate.format_table(metrics), flush=True)

    if sum([_ALL.value, _WATCH.value, _STEP.value is not None]) > 1:
      _usage("--step, --all and --watch exclude each other")
    if _WATCH.value:
      evaluate.watch_workdir(_WORKDIR.value, _SPLIT.value, poll_seconds=_POLL_SECONDS.value,
                             idle_timeout=_IDLE_TIMEOUT.value, on_result=report)
    elif _ALL.value:
      for step, metrics in evaluate.evaluate_all_steps(_WORKDIR.value, _SPLIT.value):
        report(step, metrics)
    else:
      report(*evaluate.evaluate_workdir(_WORKDIR.value, _STEP.value, _SPLIT.value))
  elif command == "finetune":
    if _CONFIG.value is None:
      _usage("finetune needs --config=configs/finetune_vqa.py or configs/finetune_retrieval.py")
    from mmelectra import evaluate
    from mmelectra import finetune
    metrics = finetune.finetune(_CONFIG.value, _WORKDIR.value)
    if jax.process_index() == 0:
      print(f"fine-tuned {_WORKDIR.value}, test metrics:")
      print(evaluate.format_table(metrics))
  elif command == "export":
    if not _OUT.value:
      _usage("export needs --out=HF_DIR")
    from mmelectra import export_hf
    step, diffs = export_hf.export_workdir(_WORKDIR.value, _OUT.value, step=_STEP.value,
                                           check=_VERIFY.value, export_heads=_EXPORT_HEADS.value)
    print(f"exported {_WORKDIR.value} step {step} to {_OUT.value}")
    if diffs is not None:
      print(f"parity, max abs difference JAX vs PyTorch (bound {export_hf.PARITY_BOUND:g}):")
      print(export_hf.format_diffs(diffs))
  elif command == "import-hf":
    if not _HF_DIR.value:
      _usage("import-hf needs --hf_dir=HF_DIR")
    from mmelectra import export_hf
    summary = export_hf.import_hf(_HF_DIR.value, _WORKDIR.value, _CONFIG.value)
    print(f"imported {_HF_DIR.value} into {_WORKDIR.value} (step 0): {len(summary['loaded'])} "
          f"parameters loaded, {len(summary['initialised'])} freshly initialised; see "
          f"{_WORKDIR.value}/{export_hf.IMPORT_INFO_FILE}")


def run():
  if sys.argv[1:2] == ["tokenizer"]:
    # `mmelectra tokenizer train|encode ...` has its own argparse flags (data/tokenizer_cli.py),
    # so it needs no jax and shares no absl flag names with the other commands.
    from mmelectra.data import tokenizer_cli
    sys.exit(tokenizer_cli.main(sys.argv[2:]))
  app.run(main, argv=sys.argv)


if __name__ == "__main__":
  run()
