"""model.scan_layers: the scanned encoder is the unrolled one with stacked parameters.

Same outputs and the same train step from converted parameters, the "layers" logical
axis unsharded, and every consumer of the unrolled names (init_from, LLRD, export) gives
the same result from either layout.
"""

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import SPECIAL_IDS, micro_config, random_batch, tiny_data_cfg
from configs import pretrain
from mmelectra import checkpoint, finetune, sharding
from mmelectra import model as model_lib
from mmelectra import setup as setup_lib
from mmelectra import train_step
from mmelectra import workdir as workdir_lib

# Two layers in the L and X stacks, so stacking and its order are exercised.
LAYERS = {"model.l_layers": 2, "model.r_layers": 1, "model.x_layers": 2}


# Compile time dominates these tiny programs (conftest.fast_compile).
pytestmark = pytest.mark.usefixtures("fast_compile")


def _config(scan, **overrides):
  return micro_config(**LAYERS, **{"model.scan_layers": scan}, **overrides)


def _tree_equal(a, b):
  return (jax.tree.structure(a) == jax.tree.structure(b)
          and all(np.array_equal(np.asarray(x), np.asarray(y))
                  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def _encoder_inputs(hidden):
  rng = np.random.default_rng(0)
  lang = jnp.asarray(rng.normal(size=(3, 7, hidden)), jnp.float32)
  vis = jnp.asarray(rng.normal(size=(3, 4, hidden)), jnp.float32)
  lang_mask = jnp.asarray(np.arange(7)[None, :] < np.array([[7], [4], [2]]))
  vis_mask = jnp.asarray(np.arange(4)[None, :] < np.array([[4], [1], [3]]))
  return lang, lang_mask, vis, vis_mask


@pytest.mark.parametrize("layers", [(2, 1, 3), (3, 0, 2)])  # (L, R, X); R = 0: no stack
def test_scanned_encoder_matches_unrolled_from_converted_params(layers):
  l, r, x = layers
  cfg = model_lib.EncoderConfig(hidden_size=16, num_heads=2, mlp_dim=32, l_layers=l, r_layers=r,
                                x_layers=x)
  scfg = dataclasses.replace(cfg, scan_layers=True)
  inputs = _encoder_inputs(16)
  unrolled = nn.unbox(model_lib.Encoder(cfg).init(jax.random.key(0), *inputs, True)["params"])
  scanned = model_lib.scan_params(unrolled)
  # The converted tree is exactly what the scanned module initialises (names and shapes),
  # and converting back is exact.
  fresh = nn.unbox(model_lib.Encoder(scfg).init(jax.random.key(0), *inputs, True)["params"])
  assert jax.tree.map(np.shape, scanned) == jax.tree.map(np.shape, fresh)
  assert set(scanned) == {"l_layers", "x_layers"} | ({"r_layers"} if r else set())
  assert _tree_equal(model_lib.unscan_params(scanned), unrolled)
  assert _tree_equal(model_lib.scan_params(model_lib.unscan_params(fresh)), fresh)

  want = model_lib.Encoder(cfg).apply({"params": unrolled}, *inputs, True)
  got = model_lib.Encoder(scfg).apply({"params": scanned}, *inputs, True)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)

  # With dropout on: remat (inside the scan) recomputes the same values. This also runs
  # remat with deterministic=False, which needs the flag to be static.
  drop = dict(dropout_rate=0.2, attention_dropout_rate=0.2)
  rngs = {"dropout": jax.random.key(1)}
  for base, params in ((cfg, unrolled), (scfg, scanned)):
    outs = [model_lib.Encoder(dataclasses.replace(base, remat=remat, **drop)).apply(
        {"params": params}, *inputs, False, rngs=rngs) for remat in (False, True)]
    for a, b in zip(*outs):
      np.testing.assert_allclose(a, b, atol=1e-6)


def test_stacked_params_have_the_layers_axis_first_and_it_is_not_sharded():
  config = _config(True)
  setup = setup_lib.build(config, SPECIAL_IDS)
  init = lambda r: setup_lib._init_state(r, model=setup.model, tx=setup.tx, config=config)  # noqa: E731
  params = jax.eval_shape(init, jax.random.key(0))["params"]
  is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
  rules = sharding.axis_rules(config)
  assert ("layers", None) in rules
  stacks = set()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_box)[0]:
    names = [p.key for p in path]
    assert isinstance(leaf, nn.LogicallyPartitioned), names
    assert len(leaf.names) == leaf.value.ndim and all(n is not None for n in leaf.names), names
    stack = [n for n in names if n in ("l_layers", "r_layers", "x_layers")]
    if not stack:
      assert "layers" not in leaf.names, names
      continue
    stacks.add((names[0], stack[0]))
    assert leaf.names[0] == "layers" and "layers" not in leaf.names[1:], names
    # The stack's layer count: the discriminator's, or the (per-modality) generator's.
    enc = setup.model.cfg.generator if names[0] == "generator" else setup.model.cfg.encoder
    assert leaf.value.shape[0] == getattr(enc, stack[0]), names
    spec = tuple(nn.logical_to_mesh_axes(leaf.names, rules))
    # No mesh axis for the layers; the layer's own axes keep theirs (e.g. "embed" on fsdp).
    assert spec[0] is None and spec[1:] == tuple(nn.logical_to_mesh_axes(leaf.names[1:], rules)), names
  # The per-modality generator has no cross-modality stack.
  assert stacks == {("encoder", "l_layers"), ("encoder", "r_layers"), ("encoder", "x_layers"),
                    ("generator", "l_layers"), ("generator", "r_layers")}


def _init_both(**overrides):
  """(unrolled setup, state), (scanned setup, state) with the same parameters."""
  su = setup_lib.build(_config(False, **overrides), SPECIAL_IDS)
  ss = setup_lib.build(_config(True, **overrides), SPECIAL_IDS)
  state_u = setup_lib.init_state(su, 0)
  params_s = model_lib.scan_params(state_u["params"])
  # A fresh step counter: the train step donates (deletes) its input state's arrays.
  state_s = jax.device_put({"step": jnp.zeros((), jnp.int32), "params": params_s,
                            "opt": ss.tx.init(params_s)}, ss.state_shardings)
  return (su, state_u), (ss, state_s)


def test_one_train_step_scanned_equals_unrolled():
  # Dropout off: the scan splits the dropout rng per layer, so masks would differ.
  (su, state_u), (ss, state_s) = _init_both(
      **{"model.dropout_rate": 0.0, "model.attention_dropout_rate": 0.0, "optimizer.warmup_steps": 0})
  before = jax.device_get(state_u["params"])
  batch = random_batch(su.config)
  out = {}
  for name, (setup, state) in (("unrolled", (su, state_u)), ("scanned", (ss, state_s))):
    step = train_step.make_train_step(setup)
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
      new, sums = step(state, setup_lib.to_global(batch, setup.mesh))
    out[name] = jax.device_get((new["params"], sums))
  (pu, su_sums), (ps, ss_sums) = out["unrolled"], out["scanned"]
  for k in su_sums:
    np.testing.assert_allclose(ss_sums[k], su_sums[k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert su_sums["loss"][0] > 0
  pu_names = checkpoint.flatten_names(pu)
  ps_names = checkpoint.flatten_names(model_lib.unscan_params(ps))
  assert set(ps_names) == set(pu_names)
  moved = 0
  for k in pu_names:
    np.testing.assert_allclose(ps_names[k], pu_names[k], atol=2e-6, err_msg=k)
    moved += not np.array_equal(pu_names[k], checkpoint.flatten_names(before)[k])
  assert moved > len(pu_names) // 2  # the step did update the parameters


def _save_params(workdir, params):
  manager = workdir_lib.training_manager(str(workdir))
  checkpoint.save(manager, 1, {"step": np.int32(1), "params": params})
  manager.wait_until_finished()
  manager.close()


def test_init_from_either_layout_into_either_layout(tmp_path):
  su = setup_lib.build(_config(False), SPECIAL_IDS)
  ss = setup_lib.build(_config(True), SPECIAL_IDS)
  mlm_s = setup_lib.build(_config(True, objective="mlm"), SPECIAL_IDS)
  rng = np.random.default_rng(0)
  fill = lambda a: jax.device_put(rng.normal(size=a.shape).astype(a.dtype), a.sharding)  # noqa: E731
  src_u = jax.tree.map(fill, su.abstract_state["params"])
  src_s = model_lib.scan_params(src_u)
  _save_params(tmp_path / "u", src_u)
  _save_params(tmp_path / "s", src_s)
  canonical = checkpoint.flatten_names(src_u)
  for src in ("u", "s"):
    for setup in (su, ss):
      target = jax.tree.map(fill, setup.abstract_state["params"])
      params, report = workdir_lib.load_pretrained_params(str(tmp_path / src), target)
      assert jax.tree.structure(params) == jax.tree.structure(target)
      assert not report.new and not report.dropped and set(report.loaded) == set(canonical)
      assert "encoder/l_layer_1/ffn/output/kernel" in report.loaded  # unrolled names
      assert _tree_equal(jax.device_get(params), jax.device_get(
          model_lib.scan_params(src_u) if setup is ss else src_u)), (src, setup.config.model.scan_layers)
      for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(target)):
        assert got.sharding == want.sharding
  # Partial: a scanned electra checkpoint into a scanned mlm model (no generator, own heads).
  target = jax.tree.map(fill, mlm_s.abstract_state["params"])
  params, report = workdir_lib.load_pretrained_params(str(tmp_path / "s"), target)
  assert any(n.startswith("generator/l_layer_1/") for n in report.dropped)
  assert any(n.startswith("mlm_head/") for n in report.new)
  got = checkpoint.flatten_names(model_lib.unscan_params(jax.device_get(params)))
  for n in report.loaded:
    np.testing.assert_array_equal(got[n], canonical[n])
  np.testing.assert_array_equal(params["mlm_head"]["bias"], target["mlm_head"]["bias"])


def test_layer_wise_learning_rates_follow_the_layers_when_stacked():
  enc = model_lib.EncoderConfig(hidden_size=8, num_heads=2, mlp_dim=8, l_layers=3, r_layers=1,
                                x_layers=2)
  layer = lambda: {"w": np.zeros((4, 2), np.float32), "b": np.zeros((2,), np.float32)}  # noqa: E731
  params = {"embeddings": {"w": np.zeros(2)}, "pooler": {"w": np.zeros(2)},
            "encoder": {**{f"l_layer_{i}": layer() for i in range(3)}, "r_layer_0": layer(),
                        **{f"x_layer_{i}": layer() for i in range(2)}}}
  scanned = model_lib.scan_params(params)
  mult_u = finetune.lr_multipliers(params, enc, 0.5, "vqa_head", 10.0)
  mult_s = finetune.lr_multipliers(scanned, dataclasses.replace(enc, scan_layers=True), 0.5,
                                   "vqa_head", 10.0)
  np.testing.assert_array_equal(mult_s["encoder"]["l_layers"]["w"], [0.5 ** 5, 0.5 ** 4, 0.5 ** 3])
  np.testing.assert_array_equal(mult_s["encoder"]["x_layers"]["b"], [0.25, 0.5])
  # The scaled updates are the unrolled ones, stacked.
  rng = np.random.default_rng(0)
  updates = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  scale = lambda m, u: finetune.scale_by_tree(m).update(u, None)[0]  # noqa: E731
  want = scale(mult_u, updates)
  got = scale(mult_s, model_lib.scan_params(updates))
  assert _tree_equal(jax.device_get(model_lib.unscan_params(got)), jax.device_get(want))


def test_export_from_scanned_params_equals_export_from_unrolled(tmp_path):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from safetensors.numpy import load_file

  from mmelectra import export_hf

  from mmelectra import hf_parity
  from mmelectra.data import pipeline

  def config(scan):
    c = pretrain.get_config("size=tiny").to_dict()
    c["model"].update(hidden_size=32, num_heads=2, mlp_dim=64, l_layers=2, r_layers=1, x_layers=2,
                      generator_width_ratio=0.5, max_position=32, scan_layers=scan)
    c["data"] = tiny_data_cfg(str(tmp_path / "tfds"), regions="crops").to_dict()
    return setup_lib.prepare_data(ml_collections.ConfigDict(c)).config

  cu, cs = config(False), config(True)
  su = setup_lib.build(cu, SPECIAL_IDS, setup_lib.flat_mask_salience(cu))
  rng = np.random.default_rng(0)
  params_u = jax.tree.map(lambda a: rng.normal(0, 0.05, a.shape).astype(np.float32),
                          su.abstract_state["params"])
  params_s = model_lib.scan_params(params_u)
  tok = pipeline.load_tokenizer(cu.data)
  out_u, out_s = str(tmp_path / "hf_u"), str(tmp_path / "hf_s")
  export_hf.export(params_u, cu, tok, out_u, export_heads=True)
  export_hf.export(params_s, cs, tok, out_s, export_heads=True)
  for name in ("model.safetensors", export_hf.HEADS_FILE):
    a, b = load_file(os.path.join(out_u, name)), load_file(os.path.join(out_s, name))
    assert set(a) == set(b) and a
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # And the scanned JAX model matches the exported PyTorch model.
  model_s = model_lib.MMElectra(model_lib.model_config_from(cs))
  batch = hf_parity.random_inputs(model_s.cfg, SPECIAL_IDS, 4, cs.data.max_text_len,
                                  cs.model.num_regions)
  diffs = hf_parity.verify(out_s, model_s, params_s, {"random": batch})
  assert not hf_parity.parity_failures(diffs), diffs


def test_finetune_a_scanned_encoder_from_an_unrolled_run(tiny_pretrained_run):
  from configs import finetune_vqa

  def task_and_params(scan):
    c = ml_collections.ConfigDict(finetune_vqa.get_config().to_dict())
    c.update(init_from=tiny_pretrained_run, scan_layers=scan)
    c.vqa.questions_per_image = 1
    c.optimizer.layer_decay = 0.8
    task, _ = finetune.build_task(c)
    params, _, report = finetune.init_params(task, seed=0)
    return c, task, params, report

  _, task_u, params_u, report_u = task_and_params(0)
  config_s, task_s, params_s, report_s = task_and_params(1)
  assert not task_u.model.cfg.encoder.scan_layers and task_s.model.cfg.encoder.scan_layers
  assert "l_layers" in params_s["encoder"]
  # The same parameters loaded (by unrolled name) and initialised, in the scanned layout.
  assert report_s.loaded == report_u.loaded and report_s.new == report_u.new
  assert _tree_equal(jax.device_get(params_s), jax.device_get(model_lib.scan_params(params_u)))
  # Layer-wise decay: the same update for each layer, whichever the layout.
  updates = {}
  for name, (task, params) in {"u": (task_u, params_u), "s": (task_s, params_s)}.items():
    tx, _ = finetune.make_optimizer(config_s, params, task.model.cfg.encoder)
    grads = jax.tree.map(jnp.ones_like, params)
    updates[name], _ = jax.jit(tx.update)(grads, tx.init(params), params)  # jitted: op by op took ~30 s
  got, want = jax.device_get(model_lib.unscan_params(updates["s"])), jax.device_get(updates["u"])
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):  # the clip's global norm sums
    np.testing.assert_allclose(a, b, rtol=1e-6)                    # leaves in another order
