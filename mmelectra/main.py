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

import difflib
import re
import sys

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mmelectra import errors

# Each command: what it does, and an example. `mmelectra --help` prints these.
COMMANDS = {
    "train": ("pretrain in a run directory; rerun the same command to resume",
              "mmelectra train --config=configs/pretrain.py:size=tiny,runlocal --workdir=runs/tiny"),
    "evaluate": ("pretraining metrics and zero-shot retrieval of a run's checkpoint(s)",
                 "mmelectra evaluate --workdir=runs/tiny [--step=N | --all | --watch]"),
    "finetune": ("fine-tune a pretrained encoder on VQA or retrieval",
                 "mmelectra finetune --config=configs/finetune_vqa.py --workdir=runs/vqa "
                 "--config.init_from=runs/tiny"),
    "export": ("write a checkpoint as a Hugging Face LxmertModel (PyTorch)",
               "mmelectra export --workdir=runs/tiny --out=runs/tiny_hf --verify"),
    "import-hf": ("start a run from a Hugging Face LXMERT directory (step 0)",
                  "mmelectra import-hf --hf_dir=path/to/lxmert --workdir=runs/from_hf"),
    "compile-check": ("compile a config's train step for a large mesh, without the hardware",
                      "mmelectra compile-check --config=configs/pretrain.py:size=large "
                      "--num_devices=64 --mesh=1,8,8"),
    "tokenizer": ("train or apply a WordPiece tokenizer (mmelectra tokenizer --help)",
                  "mmelectra tokenizer train --corpus=captions.txt --vocab_size=8000 --out=tok"),
}
_DISTRIBUTED_FLAGS = ("distributed", "coordinator_address", "num_processes", "process_id")
# The flags each command reads (`mmelectra <command> --help` lists these, not absl's).
COMMAND_FLAGS = {
    "train": ("config", "workdir", "strict") + _DISTRIBUTED_FLAGS,
    "evaluate": ("workdir", "step", "split", "all", "watch", "poll_seconds", "idle_timeout",
                 "strict") + _DISTRIBUTED_FLAGS,
    "finetune": ("config", "workdir") + _DISTRIBUTED_FLAGS,
    "export": ("workdir", "out", "step", "verify", "export_heads"),
    "import-hf": ("hf_dir", "workdir", "config"),
    "compile-check": ("config", "num_devices", "mesh", "topology"),
}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, with an optional ':arg' string.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, eval).")
_STEP = flags.DEFINE_integer("step", None, "evaluate, export: checkpoint step (default: latest).")
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
_STRICT = flags.DEFINE_bool("strict", False, "train, evaluate: fail if the newest checkpoint cannot "
                            "be read, instead of falling back to the newest readable one.")


def _usage(msg: str) -> None:
  raise errors.InvalidInput(msg)


def _fail(prefix: str, message: str) -> None:
  """Prints one line to stderr and exits with the user-error status."""
  print(f"{prefix}: error: {message}", file=sys.stderr, flush=True)
  sys.exit(errors.EXIT_USER_ERROR)


def _one_line(error: BaseException) -> str:
  """An exception's message on one line: the last non-empty line of a multi-line one
  (config_flags wraps a failing config file's traceback into its message)."""
  lines = [l.strip() for l in str(error).splitlines() if l.strip()]
  lines = [l for l in lines if not l.startswith("Pass --help")]
  return lines[-1] if lines else type(error).__name__


def overview() -> str:
  width = max(map(len, COMMANDS))
  lines = ["usage: mmelectra <command> [flags]   (mmelectra <command> --help: its flags)", "",
           "commands:"]
  for name, (what, _) in COMMANDS.items():
    lines.append(f"  {name:<{width}}  {what}")
  lines += ["", "examples:"] + [f"  {example}" for _, example in COMMANDS.values()]
  return "\n".join(lines)


def command_help(command: str) -> str:
  what, example = COMMANDS[command]
  lines = [f"usage: mmelectra {command} [flags]", f"  {what}", f"  e.g. {example}", "", "flags:"]
  for name in COMMAND_FLAGS[command]:
    flag = flags.FLAGS[name]
    default = "" if flag.default is None else f" (default: {flag.default})"
    lines.append(f"  --{name}{default}")
    lines.append(f"      {flag.help}")
  if "config" in COMMAND_FLAGS[command]:
    lines.append("  --config.<key>=<value>")
    lines.append("      override any field of the config (a mistyped key is an error naming it)")
  return "\n".join(lines)


def _check_command(argv) -> str:
  """The command word of argv; help and mistyped commands end here."""
  # The command comes first (flags may take their value as the next word).
  words = argv[1:2] if argv[1:2] and not argv[1].startswith("-") else []
  words += [a for a in argv[2:3] if words == ["help"]]
  wants_help = any(a in ("--help", "-h", "--helpshort", "-?") for a in argv[1:])
  if not words:
    if wants_help:
      print(overview())
      sys.exit(0)
    print(overview(), file=sys.stderr)
    _fail("mmelectra", "expected a command")
  command = words[0]
  if command == "help":
    if len(words) > 1 and words[1] in COMMAND_FLAGS:
      print(command_help(words[1]))
    else:
      print(overview())
    sys.exit(0)
  if command not in COMMANDS:
    near = difflib.get_close_matches(command, list(COMMANDS), n=1)
    _fail("mmelectra", f"unknown command {command!r}"
          + (f"; did you mean {near[0]!r}?" if near else f"; expected one of {', '.join(COMMANDS)}"))
  if wants_help and command in COMMAND_FLAGS:
    print(command_help(command))
    sys.exit(0)
  return command


def _parse_flags(argv):
  """absl's flag parsing, with a bad flag or config override as one line and status 2."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError, OSError) as e:
    message = _one_line(e)
    detail = e.args[0] if e.args else None
    while isinstance(detail, BaseException) and detail.args:  # AttributeError(KeyError(...))
      detail = detail.args[0]
    if isinstance(e, (AttributeError, KeyError)) and isinstance(detail, str):
      # ml_collections: "'key'\nDid you mean "other" instead of "key"?"
      first, *rest = detail.splitlines()
      key = first.strip("\"'")
      named = [a.split("=")[0] for a in argv
               if a.startswith("--config.") and a.split("=")[0].endswith(f".{key}")]
      if named:
        hint = re.search(r'Did you mean "([^"]+)"', " ".join(rest))
        message = (f"{named[0]}: the config has no field {key!r}"
                   + (f"; did you mean {hint.group(1)!r}?" if hint else ""))
    _fail(f"mmelectra {_command_of(argv)}", message)


def _command_of(argv) -> str:
  return argv[1] if argv[1:2] and not argv[1].startswith("-") else ""


def main(argv):
  if len(argv) < 2 or argv[1] not in COMMANDS:
    _fail("mmelectra", f"expected a command, got {argv[1:]!r}; see mmelectra --help")
  if len(argv) > 2:
    _fail(f"mmelectra {argv[1]}", f"unexpected arguments {argv[2:]!r}")
  command = argv[1]
  try:
    _dispatch(command)
  except errors.UserError as e:
    _fail(f"mmelectra {command}", _one_line(e) if "\n" in str(e) else str(e))


def _config():
  """--config's value; a config file that failed to load is a user error."""
  try:
    config = _CONFIG.value
    if config is not None:
      config.keys()  # config_flags loads lazily: a file that failed to load raises here
    return config
  except (OSError, ValueError, AttributeError) as e:
    raise errors.InvalidInput(f"--config: {_one_line(e)}") from e


def _dispatch(command: str) -> None:
  if not flags.FLAGS["verbosity"].present:
    # orbax and TFDS log every save and read at INFO; keep the console to the progress
    # bar and results unless --verbosity asks for more.
    logging.set_verbosity(logging.WARNING)
  jax.config.update("jax_threefry_partitionable", True)
  if command == "compile-check":
    if _config() is None:
      _usage("compile-check needs --config=configs/pretrain.py[:args]")
    from mmelectra import compile_check
    sys.exit(compile_check.main(_config(), _NUM_DEVICES.value, _MESH.value, _TOPOLOGY.value,
                                sys.argv))
  if not _WORKDIR.value:
    _usage("--workdir is required")
  from mmelectra import distributed
  distributed.initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                         _PROCESS_ID.value)
  if command == "train":
    if _config() is None:
      _usage("train needs --config=configs/pretrain.py[:args]")
    from mmelectra import train
    metrics = train.train_and_evaluate(_config(), _WORKDIR.value, strict=_STRICT.value)
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
      report(*evaluate.evaluate_workdir(_WORKDIR.value, _STEP.value, _SPLIT.value,
                                        strict=_STRICT.value))
  elif command == "finetune":
    if _config() is None:
      _usage("finetune needs --config=configs/finetune_vqa.py or configs/finetune_retrieval.py")
    from mmelectra import evaluate
    from mmelectra import finetune
    metrics = finetune.finetune(_config(), _WORKDIR.value)
    if jax.process_index() == 0 and metrics.get("preempted"):
      print(f"preempted: saved step {metrics['step']} in {_WORKDIR.value}; rerun the same "
            "command to resume")
    elif jax.process_index() == 0:
      print(f"fine-tuned {_WORKDIR.value}, test metrics:")
      print(evaluate.format_table(metrics))
  elif command == "export":
    if not _OUT.value:
      _usage("export needs --out=HF_DIR")
    from mmelectra import export_hf
    from mmelectra import hf_parity
    step, diffs = export_hf.export_workdir(_WORKDIR.value, _OUT.value, step=_STEP.value,
                                           check=_VERIFY.value, export_heads=_EXPORT_HEADS.value)
    print(f"exported {_WORKDIR.value} step {step} to {_OUT.value}")
    if diffs is not None:
      print(f"parity, max abs difference JAX vs PyTorch (bound {hf_parity.PARITY_BOUND:g}):")
      print(hf_parity.format_diffs(diffs))
  elif command == "import-hf":
    if not _HF_DIR.value:
      _usage("import-hf needs --hf_dir=HF_DIR")
    from mmelectra import import_hf
    base_config = _config()
    if base_config is None:  # the installed preset (configs/ installs as mmelectra_configs)
      from mmelectra_configs import pretrain
      base_config = pretrain.get_config()
    summary = import_hf.import_hf(_HF_DIR.value, _WORKDIR.value, base_config)
    print(f"imported {_HF_DIR.value} into {_WORKDIR.value} (step 0): {len(summary['loaded'])} "
          f"parameters loaded, {len(summary['initialised'])} freshly initialised; see "
          f"{_WORKDIR.value}/{import_hf.IMPORT_INFO_FILE}")


def run():
  argv = sys.argv
  command = _check_command(argv)
  if command == "tokenizer":
    # `mmelectra tokenizer train|encode ...` has its own argparse flags (data/tokenizer_cli.py),
    # so it needs no jax and shares no absl flag names with the other commands.
    from mmelectra.data import tokenizer_cli
    sys.exit(tokenizer_cli.main(argv[argv.index("tokenizer") + 1:]))
  app.run(main, argv=argv, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
