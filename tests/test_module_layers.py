"""The package's modules import only modules of a lower layer (function-level imports too).

Each layer may use those below it and nothing above, so a module can be read, tested and
replaced knowing only what is under it: the training command (`train`) is imported by
`main` alone, and no library module reaches up into a command.
"""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "mmelectra"

LAYERS = [
    {"errors"},
    {"data"},  # the data package as a whole (its own modules: no cycles, below)
    {"metrics", "sharding", "optim", "preemption", "distributed", "metric_writer"},
    {"electra"},
    {"collectives", "model"},
    {"flops", "checkpoint", "config_lib", "retrieval", "objectives", "hf_params"},
    {"workdir"},
    {"setup"},  # reads a run's files (its mask salience) through workdir
    {"loop", "hf_parity"},
    {"train_step", "evaluate", "import_hf"},
    {"finetune", "export_hf", "compile_check"},
    {"train"},
    {"main"},
]


def _layer_of(name: str) -> int:
  top = "data" if name.startswith("data.") or name == "data" else name
  for i, layer in enumerate(LAYERS):
    if top in layer:
      return i
  raise AssertionError(f"mmelectra.{name} is in no layer of {__file__}; add it to LAYERS")


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in PACKAGE.rglob("*.py"):
    rel = path.relative_to(PACKAGE).with_suffix("")
    if rel.name == "__init__":
      continue
    out[".".join(rel.parts)] = path
  return out


def _imports(path: pathlib.Path) -> set[str]:
  """The mmelectra modules `path` imports, anywhere in the file."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and (
        node.module == "mmelectra" or node.module.startswith("mmelectra.")):
      base = node.module[len("mmelectra"):].lstrip(".")
      for alias in node.names:
        candidate = f"{base}.{alias.name}" if base else alias.name
        found.add(candidate if candidate in _modules() else base)
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith("mmelectra."):
          found.add(alias.name[len("mmelectra."):])
  return {m for m in found if m}


def test_every_module_imports_only_lower_layers():
  problems = []
  for name, path in sorted(_modules().items()):
    for dep in sorted(_imports(path)):
      if dep.startswith("data") and name.startswith("data."):
        continue  # inside the data package: checked for cycles below
      if _layer_of(dep) >= _layer_of(name):
        problems.append(f"mmelectra.{name} (layer {_layer_of(name)}) imports mmelectra.{dep} "
                        f"(layer {_layer_of(dep)})")
  assert not problems, "\n".join(problems)


def test_only_main_imports_the_training_command():
  importers = [name for name, path in _modules().items() if "train" in _imports(path)]
  assert importers == ["main"], importers


def test_the_data_package_has_no_import_cycle():
  graph = {name: {d for d in _imports(path) if d.startswith("data.")}
           for name, path in _modules().items() if name.startswith("data.")}
  state: dict[str, int] = {}

  def visit(node, trail):
    if state.get(node) == 1:
      raise AssertionError("import cycle: " + " -> ".join(trail + [node]))
    if state.get(node) == 2:
      return
    state[node] = 1
    for dep in sorted(graph.get(node, ())):
      visit(dep, trail + [node])
    state[node] = 2

  for node in sorted(graph):
    visit(node, [])
