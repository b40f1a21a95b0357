"""Checkpoint items, shape checks and init_from (in process, one CPU device)."""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import SPECIAL_IDS, micro_config
from mmelectra import checkpoint
from mmelectra import config_lib
from mmelectra import errors
from mmelectra import setup as setup_lib
from mmelectra import workdir as workdir_lib


def _state(objective="electra", seed=0, **overrides):
  """The real state structure and shardings, filled with random numbers (no compile)."""
  setup = setup_lib.build(micro_config(objective=objective, **overrides), SPECIAL_IDS)
  rng = np.random.default_rng(seed)

  def fill(a):
    value = rng.normal(size=a.shape) if np.issubdtype(a.dtype, np.floating) else np.full(a.shape, seed)
    return jax.device_put(value.astype(a.dtype), a.sharding)

  return setup, jax.tree.map(fill, setup.abstract_state)


def _save(workdir, step, state, config=None):
  manager = workdir_lib.training_manager(str(workdir))
  checkpoint.save(manager, step, state, config=config)
  manager.wait_until_finished()
  manager.close()


def _leaves_equal(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_init_from_electra_into_mlm_lists_loaded_new_and_dropped(tmp_path):
  src_setup, src = _state("electra", seed=0)
  _save(tmp_path / "src", 7, src, src_setup.config)
  _, dst = _state("mlm", seed=1)
  params, report = workdir_lib.load_pretrained_params(str(tmp_path / "src"), dst["params"])

  assert report.source.endswith(os.path.join("checkpoints", "7", "state"))
  src_names = checkpoint.flatten_names(src["params"])
  dst_names = checkpoint.flatten_names(dst["params"])
  got = checkpoint.flatten_names(params)
  assert set(report.loaded) == set(src_names) & set(dst_names)
  assert any(n.startswith("encoder/x_layer_0/") for n in report.loaded)
  assert set(report.new) == set(dst_names) - set(src_names)
  assert any(n.startswith("mlm_head/") for n in report.new)
  assert set(report.dropped) == set(src_names) - set(dst_names)
  assert any(n.startswith("generator/") for n in report.dropped)
  assert "rtd_head/logit/kernel" in report.dropped
  for n in report.loaded:
    np.testing.assert_array_equal(got[n], src_names[n])
    assert got[n].sharding == dst_names[n].sharding
  for n in report.new:
    np.testing.assert_array_equal(got[n], dst_names[n])
  assert jax.tree.structure(params) == jax.tree.structure(dst["params"])
  text = report.summary()
  assert "newly initialised" in text and "dropped" in text and report.new[0] in text


def test_init_from_step_dir_rename_and_shape_mismatch(tmp_path):
  _, src = _state("mlm", seed=0)
  _save(tmp_path / "src", 3, src)
  _save(tmp_path / "src", 5, jax.tree.map(lambda x: x + 1, src))
  _, dst = _state("mlm", seed=1, **{"model.vocab_size": 48})
  step3 = str(tmp_path / "src" / "checkpoints" / "3")
  with pytest.raises(ValueError, match=r"word_embeddings/embedding' has shape \(40, 32\) in the "
                     r"checkpoint but \(48, 32\)"):
    workdir_lib.load_pretrained_params(step3, dst["params"])
  params, report = workdir_lib.load_pretrained_params(
      step3, dst["params"], allow_shape_mismatch=True,
      rename=lambda n: None if n.startswith("itm_head/") else n)
  mismatched = {n for n, _, _ in report.mismatched}
  assert "embeddings/word_embeddings/embedding" in mismatched
  assert {"itm_head/kernel", "itm_head/bias"} <= set(report.dropped)
  assert {"itm_head/kernel", "itm_head/bias"} <= set(report.new)
  got, want = checkpoint.flatten_names(params), checkpoint.flatten_names(src["params"])
  np.testing.assert_array_equal(got["pooler/dense/kernel"], want["pooler/dense/kernel"])  # step 3, not 5
  np.testing.assert_array_equal(got["embeddings/word_embeddings/embedding"],
                                checkpoint.flatten_names(dst["params"])["embeddings/word_embeddings/embedding"])


def test_checkpoint_with_other_shapes_is_named_before_restore(tmp_path):
  _, state = _state("mlm")
  _save(tmp_path, 4, state)
  setup, _ = _state("mlm", **{"model.mlp_dim": 48})
  manager = workdir_lib.training_manager(str(tmp_path))
  with pytest.raises(ValueError, match=r"'params/encoder/l_layer_0/ffn/intermediate/bias' has shape \(64,\) in the "
                     r"checkpoint but \(48,\) in the config"):
    checkpoint.restore(manager, 4, setup.abstract_state)
  manager.close()


def test_keeps_the_last_k_and_every_mth_forever(tmp_path):
  manager = workdir_lib.training_manager(str(tmp_path), max_to_keep=2, keep_every=4)
  state = {"step": np.int32(0), "params": {"w": np.ones((2, 3), np.float32)}}
  for step in range(1, 10):
    checkpoint.save(manager, step, dict(state, step=np.int32(step)))
  manager.wait_until_finished()
  assert sorted(manager.all_steps()) == [4, 8, 9]
  manager.close()


def test_plain_orbax_lists_and_restores_the_items(tmp_path):
  setup, state = _state("mlm")
  _save(tmp_path, 2, state, setup.config)
  # No mmelectra code from here on: what a user with only orbax would write.
  manager = ocp.CheckpointManager(os.path.join(tmp_path, "checkpoints"))
  assert manager.all_steps() == [2]
  restored = manager.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                        config=ocp.args.JsonRestore()))
  manager.close()
  assert _leaves_equal(restored["state"]["params"], state["params"])
  assert int(restored["state"]["step"]) == int(state["step"])
  assert restored["config"]["model"]["hidden_size"] == 32


MESH_CHILD = """
import jax, numpy as np, sys
sys.path.insert(0, "tests")
from conftest import SPECIAL_IDS, micro_config
from mmelectra import checkpoint
from mmelectra import setup as setup_lib
from mmelectra import workdir as workdir_lib
assert len(jax.devices()) == 8
workdir = sys.argv[1]

def setup_for(data, fsdp, model, **overrides):
  return setup_lib.build(micro_config(objective="mlm", **{"mesh.data": data, "mesh.fsdp": fsdp,
                                                     "mesh.model": model}, **overrides), SPECIAL_IDS)

saver = setup_for(8, 1, 1)
rng = np.random.default_rng(0)
state = jax.tree.map(lambda a: jax.device_put(rng.normal(size=a.shape).astype(a.dtype), a.sharding),
                     saver.abstract_state)
manager = workdir_lib.training_manager(workdir)
checkpoint.save(manager, 1, state)
manager.wait_until_finished()
loader = setup_for(2, 2, 2)
restored = checkpoint.restore(manager, 1, loader.abstract_state)
resharded = 0
for a, b, want in zip(jax.tree.leaves(state), jax.tree.leaves(restored), jax.tree.leaves(loader.abstract_state)):
  assert np.array_equal(np.asarray(a), np.asarray(b))
  assert b.sharding == want.sharding, (b.sharding, want.sharding)
  resharded += not b.sharding.is_fully_replicated
assert dict(restored["params"]["encoder"]["l_layer_0"]["ffn"]["intermediate"]["kernel"].sharding.mesh.shape) \\
    == {"data": 2, "fsdp": 2, "model": 2}
assert resharded > 10, resharded
for kwargs, message in ((dict(data=3, fsdp=1, model=1), "needs 3 devices, 8 are available"),
                        (dict(data=-1, fsdp=3, model=1), "8 devices are not divisible"),
                        (dict(data=8, fsdp=1, model=1, batch_size=12), "batch_size=12 must be divisible")):
  overrides = {"batch_size": kwargs.pop("batch_size")} if "batch_size" in kwargs else {}
  try:
    setup_for(**kwargs, **overrides)
  except ValueError as e:
    assert message in str(e), (message, str(e))
  else:
    raise AssertionError(f"no error for {kwargs}")
print("MESH_OK")
"""


def test_restore_onto_another_mesh_and_mesh_errors(tmp_path):
  """Saved on an (8, 1, 1) mesh of 8 devices, restored onto (2, 2, 2): same values, new
  shardings. Meshes that do not fit the devices and batches that do not split fail in
  `build`, before any compile."""
  import subprocess
  import sys

  from conftest import ROOT
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  out = subprocess.run([sys.executable, "-c", MESH_CHILD, str(tmp_path)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and "MESH_OK" in out.stdout, out.stderr[-3000:]


def _parse_cli_config(argv):
  from absl import flags
  from ml_collections import config_flags
  fv = flags.FlagValues()
  # Overrides are read from sys_argv (sys.argv in the real CLI), as `mmelectra train` does.
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                           sys_argv=argv)
  fv(argv)
  return holder.value


def test_generator_argument_selects_the_variant_and_rejects_others():
  from configs import pretrain
  tied, default = pretrain.get_config("size=tiny,generator=tied"), pretrain.get_config("size=tiny")
  cross = pretrain.get_config("size=tiny,generator=crossmodal")
  assert (tied.model.generator, tied.itm_input, tied.loss_weights.rtd, tied.loss_weights.r2d) == (
      "tied", "masked", 1.0, 1.0)
  assert (default.model.generator, default.itm_input, default.loss_weights.rtd) == (
      "per_modality", "corrupted", 1.0)
  assert (cross.model.generator, cross.itm_input, cross.loss_weights.rtd) == ("crossmodal", "corrupted", 50.0)
  with pytest.raises(ValueError, match="generator='big'"):
    pretrain.get_config("generator=big")
  with pytest.raises(ValueError, match="objective=electra"):
    pretrain.get_config("objective=mlm,generator=tied")


def test_default_hold_and_hand_over_follow_the_run_length():
  from configs import pretrain
  schedule = lambda c: (c.discriminator_clean_fraction, c.discriminator_clean_uniform_masking,
                        c.discriminator_mask_hold_steps, c.discriminator_mask_decay_steps)
  # The per-modality default: the baseline's task for 3/8 of the run, handed over by 1/2;
  # `runlocal` (the demo) holds for half the run and hands over by 3/4.
  assert schedule(pretrain.get_config("size=tiny")) == (1.0, True, 7_500, 2_500)
  assert schedule(pretrain.get_config("size=tiny,runlocal")) == (1.0, True, 1000, 500)
  c = pretrain.get_config("size=tiny")
  c.total_steps = 1786
  assert schedule(c)[2:] == (669, 223)
  c = pretrain.get_config("size=tiny,runlocal")
  c.total_steps = 3000
  assert schedule(c)[2:] == (1500, 750)
  # From the command line, in either order; a number given for the hold wins.
  from conftest import ROOT
  cli = _parse_cli_config(["x", f"--config={ROOT}/configs/pretrain.py:size=tiny,runlocal",
                           "--config.discriminator_mask_hold_steps=7", "--config.total_steps=300"])
  assert schedule(cli)[2:] == (7, 75)
  assert schedule(_parse_cli_config(["x", f"--config={ROOT}/configs/pretrain.py:size=tiny",
                                     "--config.total_steps=300"]))[2:] == (112, 37)
  # The other generators and the baseline have no clean share.
  for arg in ("generator=tied", "generator=crossmodal", "objective=mlm"):
    assert schedule(pretrain.get_config(arg)) == (0.0, False, 0, 0), arg
  # The demo's witness acts from the hand-over on, in every corrupted example; the
  # default's size, the demo without its hold and the baseline have none. No preset
  # weighs a loss of its own (issue 17: the demo trains the default's objective).
  witness = lambda c: (c.discriminator_witness_fraction, c.discriminator_witness_on_clean)
  assert witness(pretrain.get_config("size=tiny,runlocal")) == (1.0, False)
  for arg in ("size=tiny", "hold=off,runlocal", "objective=mlm,runlocal"):
    assert witness(pretrain.get_config(arg))[0] == 0.0, arg
  assert (pretrain.get_config("size=tiny,runlocal").loss_weights.to_dict()
          == pretrain.get_config("size=tiny").loss_weights.to_dict())


def test_a_config_saved_before_model_generator_existed_is_upgraded_on_load(tmp_path):
  import json
  from configs import pretrain
  for tied, kind in ((False, "crossmodal"), (True, "tied")):
    raw = pretrain.get_config("size=tiny").to_dict()
    raw["logical_axis_rules"] = [list(r) for r in raw["logical_axis_rules"]]
    del raw["model"]["generator"], raw["loss_weights"]["clm"], raw["loss_weights"]["cmoc"]
    del raw["text_mask_weighting"], raw["model"]["rtd_reads_clm"], raw["generator_trains_embeddings"]
    for name in ("discriminator_clean_fraction", "discriminator_clean_uniform_masking",
                 "discriminator_mask_hold_steps", "discriminator_mask_decay_steps",
                 "discriminator_scores_clean", "discriminator_clean_floor", "cmoc_corrupted_weight",
                 "itm_intact_fraction"):
      del raw[name]
    raw["model"]["generator_tied"] = tied
    (tmp_path / "config.json").write_text(json.dumps(raw))
    loaded = workdir_lib.load_config(str(tmp_path))
    assert loaded.model.generator == kind and loaded.loss_weights.clm == 0.0
    assert "generator_tied" not in loaded.model
    # Nor did its time mask by salience, keep regions masked or let RTD read a CLM.
    assert (loaded.text_mask_weighting, loaded.model.rtd_reads_clm) == ("uniform", False)
    assert loaded.generator_trains_embeddings is True  # ELECTRA's sharing, all it had
    # Nor did it begin on clean pairs: every example corrupted from the first step.
    assert (loaded.discriminator_clean_fraction, loaded.discriminator_mask_hold_steps,
            loaded.discriminator_mask_decay_steps, loaded.discriminator_clean_uniform_masking) == (
                0.0, 0, 0, False)
    assert loaded.discriminator_scores_clean is True  # RTD/R2D scored every example
    assert loaded.discriminator_clean_floor == 0.0
    assert loaded.cmoc_corrupted_weight == -1.0  # one corrective MOC weight for every pair
    assert loaded.itm_intact_fraction == 0.0  # ITM learnt from every example


def test_unknown_config_key_is_an_error_naming_it():
  from conftest import ROOT
  base = ["mmelectra", f"--config={ROOT}/configs/pretrain.py:size=tiny"]
  config = _parse_cli_config(base + ["--config.init_from=runs/x", "--config.keep_checkpoint_every=5",
                                     "--config.max_nonfinite_steps=3", "--config.debug_nan_steps=4,6"])
  assert (config.init_from, config.keep_checkpoint_every, config.max_nonfinite_steps,
          config.debug_nan_steps) == ("runs/x", 5, 3, "4,6")
  with pytest.raises(Exception, match="checkpoint_evry"):
    _parse_cli_config(base + ["--config.checkpoint_evry=5"])


def test_init_seed_draws_the_parameters_and_leaves_the_rest_to_seed():
  from conftest import ROOT
  base = ["mmelectra", f"--config={ROOT}/configs/pretrain.py:size=tiny"]
  config = _parse_cli_config(base + ["--config.seed=1"])
  assert (config.init_seed, setup_lib.parameter_seed(config)) == (-1, 1)
  config = _parse_cli_config(base + ["--config.seed=1", "--config.init_seed=2"])
  assert (config.seed, setup_lib.parameter_seed(config)) == (1, 2)
  with pytest.raises(errors.InvalidInput, match="init_seed"):
    config_lib.validate(_parse_cli_config(base + ["--config.init_seed=-2"]))
  # A run saved before the key existed reads as unset: its parameters followed `seed`.
  import json
  from configs import pretrain
  raw = pretrain.get_config("size=tiny").to_dict()
  raw["seed"] = 3
  del raw["init_seed"]
  # Through JSON, as config.json stores it (tuples come back as lists).
  assert setup_lib.parameter_seed(config_lib.from_saved(json.loads(json.dumps(raw)))) == 3
