"""Sharding: rules, split parameters, shard_map collectives, and one train step on four
meshes of 8 simulated CPU devices against one device.

The 8-device checks run in one subprocess (XLA_FLAGS must be set before JAX starts; this
pytest process has one device) and report JSON back.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from conftest import ROOT, micro_config
from mmelectra import sharding
from mmelectra import setup as setup_lib
from mmelectra import train_step

TESTS = os.path.dirname(os.path.abspath(__file__))
MESHES = [(8, 1, 1), (2, 2, 2), (1, 2, 4), (1, 1, 8)]
# fp32 tolerances for "the same step": losses and gradient norms agree to 1e-5 relative
# (reduction order differs across meshes); updated parameters to 2e-6 absolute, i.e.
# within 0.4% of one step's size (Adam's first step moves each weight by ~lr = 5e-4).
LOSS_RTOL = 1e-5
PARAM_ATOL = 2e-6
# Parameters below this many elements (LayerNorm scales, biases of tiny heads) may stay
# replicated; every larger one must be split under the fsdp and fsdp+model meshes.
SMALL_PARAM = 160


def _step_config(mesh, scan_layers=False, dropout=True):
  no_dropout = {} if dropout else {"model.dropout_rate": 0.0, "model.attention_dropout_rate": 0.0}
  return micro_config(**{"mesh.data": mesh[0], "mesh.fsdp": mesh[1], "mesh.model": mesh[2],
                         "optimizer.warmup_steps": 0, "model.scan_layers": scan_layers},
                      **no_dropout)


def _worker():
  """Runs under 8 CPU devices; prints one JSON line."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  jax.config.update("jax_disable_most_optimizations", True)
  from conftest import SPECIAL_IDS, random_batch
  from mmelectra import collectives, electra
  from mmelectra import model as model_lib

  out = {"devices": jax.device_count()}

  # --- collectives alone, against the single-device code --------------------------------
  rng = np.random.default_rng(0)
  q = rng.normal(size=(8, 3, 16)).astype(np.float32)
  cands = rng.normal(size=(8 * 5, 16)).astype(np.float32)
  valid = rng.random(8 * 5) > 0.3
  idx = rng.integers(0, 8 * 5, size=(8, 3)).astype(np.int32)
  want_scores = np.asarray(electra.region_candidate_scores(q, cands, valid))
  want_grad = np.asarray(jax.grad(lambda c: electra.region_candidate_scores(q, c, valid)[..., :7].sum())(cands))
  out["collectives"] = {}
  for shape in [(8, 1, 1), (2, 2, 2)]:
    mesh = Mesh(np.asarray(jax.devices()).reshape(shape), sharding.MESH_AXES)
    put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh))  # noqa: E731
    with jax.set_mesh(mesh):
      scores = jax.jit(collectives.pool_candidate_scores)(put(q), put(cands), put(valid))
      grad = jax.jit(jax.grad(lambda c: collectives.pool_candidate_scores(put(q), c, put(valid))[..., :7].sum()))(put(cands))
      rows = jax.jit(collectives.take_rows)(put(cands), put(idx))
      flags = jax.jit(collectives.take_rows)(put(valid), put(idx))
    out["collectives"][str(shape)] = {
        "scores": float(np.abs(np.asarray(scores) - want_scores).max()),
        "grad": float(np.abs(np.asarray(grad) - want_grad).max()),
        "rows": float(np.abs(np.asarray(rows) - cands[idx]).max()),
        "bool_rows_equal": bool((np.asarray(flags) == valid[idx]).all()),
        "scores_sharded": not scores.sharding.is_fully_replicated,
    }

  # --- one train step on each mesh against one device --------------------------------
  def run(mesh_shape, devices, init_from=None, scan_layers=False, dropout=True):
    c = _step_config(mesh_shape, scan_layers, dropout)
    orig = sharding.make_mesh
    sharding.make_mesh = lambda cfg, devs=None: orig(cfg, devices)
    try:
      setup = setup_lib.build(c, SPECIAL_IDS)
    finally:
      sharding.make_mesh = orig
    if scan_layers:  # the one-device initial parameters, stacked (Adam's moments start at 0)
      state = setup_lib.init_state(setup, 0)
      state["params"] = jax.device_put(model_lib.scan_params(init_from["params"]),
                                       setup.state_shardings["params"])
    elif init_from is None:  # sharded init (jit with out_shardings)
      state = setup_lib.init_state(setup, 0)
    else:  # the same initial values, placed into this mesh's shardings (saves a compile)
      state = jax.device_put(init_from, setup.state_shardings)
    initial = jax.device_get(state)
    split = {}
    for path, x in jax.tree_util.tree_leaves_with_path(state["params"]):
      split[jax.tree_util.keystr(path)] = [int(x.size), not x.sharding.is_fully_replicated]
    step = train_step.make_train_step(setup)
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
      state, sums = step(state, setup_lib.to_global(random_batch(c), setup.mesh))
    sums = jax.device_get(sums)
    return {"init": initial, "loss": float(sums["loss"][0] / sums["loss"][1]),
            "grad_norm": float(sums["grad_norm"][0]),
            "moc_loss": float(sums["moc_loss"][0] / sums["moc_loss"][1]),
            "itm_loss": float(sums["itm_loss"][0] / sums["itm_loss"][1]),
            "params": jax.device_get(state["params"]), "split": split}

  def max_abs_diff(a, b):
    return max(jax.tree.leaves(jax.tree.map(
        lambda x, y: float(np.abs(np.asarray(x) - np.asarray(y)).max()), a, b)))

  losses = ("loss", "grad_norm", "moc_loss", "itm_loss")

  def summary(r, reference_params, params):
    return {**{k: r[k] for k in losses}, "max_param_diff": max_abs_diff(reference_params, params),
            "split": r["split"]}

  ref = run((1, 1, 1), jax.devices()[:1])
  out["reference"] = {k: ref[k] for k in losses}
  out["meshes"] = {}
  for shape in MESHES:
    # (1, 2, 4) initialises sharded and must reproduce the one-device initial values.
    r = run(shape, jax.devices(), init_from=None if shape == (1, 2, 4) else ref["init"])
    if shape == (1, 2, 4):
      out["sharded_init_diff"] = max_abs_diff(ref["init"], r["init"])
    out["meshes"][str(shape)] = summary(r, ref["params"], r["params"])
  # model.scan_layers on (2, 2, 2): stacked layers shard and step like unrolled layers on
  # one device. Dropout off in both: the scan splits the dropout rng per layer.
  flat = run((1, 1, 1), jax.devices()[:1], init_from=ref["init"], dropout=False)
  r = run((2, 2, 2), jax.devices(), init_from=ref["init"], scan_layers=True, dropout=False)
  out["unrolled_no_dropout"] = {k: flat[k] for k in losses}
  out["scanned"] = summary(r, flat["params"], model_lib.unscan_params(r["params"]))
  out["max_update"] = max_abs_diff(ref["init"]["params"], ref["params"])

  # --- compile-check's AOT compile on a mesh (the mlm objective: a smaller program) ------
  from mmelectra import compile_check
  report = compile_check.check(micro_config("mlm"), {"data": 2, "fsdp": 2, "model": 2}, 8)
  out["compile_check"] = report
  out["compile_check_text"] = compile_check.format_report(report)
  print("RESULT " + json.dumps(out), flush=True)


@pytest.fixture(scope="module")
def eight_devices():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip(),
             PYTHONPATH=os.pathsep.join([TESTS, ROOT]))
  code = "import test_sharding; test_sharding._worker()"
  proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=1800)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
  return json.loads(lines[-1][len("RESULT "):])


def test_worker_saw_eight_devices(eight_devices):
  assert eight_devices["devices"] == 8


@pytest.mark.parametrize("shape", ["(8, 1, 1)", "(2, 2, 2)"])
def test_collectives_match_single_device(eight_devices, shape):
  r = eight_devices["collectives"][shape]
  assert r["scores"] < 1e-5 and r["grad"] < 1e-5, r
  assert r["rows"] == 0.0 and r["bool_rows_equal"], r  # take_rows is exact
  assert r["scores_sharded"], "the [B, M, N] scores must stay split over the batch"


@pytest.mark.parametrize("shape", [str(s) for s in MESHES])
def test_one_train_step_matches_one_device(eight_devices, shape):
  ref, r = eight_devices["reference"], eight_devices["meshes"][shape]
  for key in ("loss", "grad_norm", "moc_loss", "itm_loss"):
    assert r[key] == pytest.approx(ref[key], rel=LOSS_RTOL), (key, r[key], ref[key])
  # The step really moved the weights, and every mesh moved them the same way.
  assert eight_devices["max_update"] > 100 * PARAM_ATOL
  assert r["max_param_diff"] < PARAM_ATOL, r["max_param_diff"]


def test_scanned_layers_step_on_a_mesh_matches_one_unrolled_device(eight_devices):
  ref, r = eight_devices["unrolled_no_dropout"], eight_devices["scanned"]
  for key in ("loss", "grad_norm", "moc_loss", "itm_loss"):
    assert r[key] == pytest.approx(ref[key], rel=LOSS_RTOL), (key, r[key], ref[key])
  assert r["max_param_diff"] < PARAM_ATOL, r["max_param_diff"]
  assert any("l_layers" in name for name in r["split"])  # it really ran stacked


@pytest.mark.parametrize("shape", ["(1, 2, 4)", "(2, 2, 2)", "scanned (2, 2, 2)"])
def test_every_large_parameter_is_split(eight_devices, shape):
  split = (eight_devices["scanned"] if shape.startswith("scanned") else eight_devices["meshes"][shape])["split"]
  replicated = [name for name, (size, is_split) in split.items() if size >= SMALL_PARAM and not is_split]
  assert not replicated, f"fully replicated under {shape}: {replicated}"
  assert sum(s for s, _ in split.values()) > 10_000  # the micro model, not an empty tree


def test_model_axis_splits_the_wide_matrices(eight_devices):
  split = eight_devices["meshes"]["(1, 1, 8)"]["split"]
  for part in ("intermediate']['kernel", "word_embeddings"):  # mlp 64 and 32, vocab 40 over 8
    hits = [s for name, s in split.items() if part in name]
    assert hits and all(is_split for _, is_split in hits), (part, hits)
  # 2 (and the generator's 1) heads do not divide model=8: replicated, not an error.
  queries = [s for name, s in split.items() if "['query']['kernel" in name]
  assert queries and not any(is_split for _, is_split in queries)


def test_sharded_init_equals_one_device_init(eight_devices):
  # jit(init, out_shardings) on (1, 2, 4) draws the same values as on one device.
  assert eight_devices["sharded_init_diff"] == 0.0


def test_compile_check_reports_per_device_memory(eight_devices):
  r = eight_devices["compile_check"]
  assert r["num_devices"] == 8 and r["mesh"] == {"data": 2, "fsdp": 2, "model": 2}
  full_params = 4 * r["num_params"]
  # fsdp=2 x model=2 split the weights: a device holds well under half of them...
  assert 0 < r["params_bytes"] < 0.5 * full_params
  # ...Adam keeps two moments per weight, and XLA planned some temporaries.
  assert r["optimizer_bytes"] == pytest.approx(2 * r["params_bytes"], rel=0.05)
  assert r["temp_bytes"] > 0 and r["total_bytes"] >= r["argument_bytes"]
  assert "XLA:CPU" in eight_devices["compile_check_text"]


# --- in-process (one device) --------------------------------------------------------------
class _MeshShape:
  """What `fit_spec` reads from a mesh: its axis sizes (no devices needed)."""

  def __init__(self, shape):
    self.shape = dict(zip(sharding.MESH_AXES, shape))


def test_fit_spec_drops_axes_that_do_not_divide():
  mesh = _MeshShape((2, 2, 8))
  # 12 heads on model=8: replicated along heads; embed 768 over fsdp=2 stays.
  assert sharding.fit_spec(P("fsdp", "model", None), (768, 12, 64), mesh) == P("fsdp")
  assert sharding.fit_spec(P("fsdp", "model"), (768, 3072), mesh) == P("fsdp", "model")
  # A batch of 6 over (data, fsdp) = 4 keeps data only; 5 keeps nothing.
  assert sharding.fit_spec(P(("data", "fsdp")), (6, 3), mesh) == P("data")
  assert sharding.fit_spec(P(("data", "fsdp")), (5, 3), mesh) == P()


def test_default_rules():
  rules = dict(sharding.axis_rules(micro_config()))
  assert rules["batch"] == ("data", "fsdp")
  assert rules["embed"] == "fsdp"
  for name in ("mlp", "heads", "vocab"):
    assert rules[name] == "model"
  for name in ("act_embed", "length", "regions"):
    assert rules[name] is None  # activations split over the batch only, not over fsdp
